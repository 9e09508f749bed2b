//! Users, after the `User` aggregate of Extreme.System's README.
//!
//! A user is created with an email and a name, which emits two events:
//! `Created` and `ProfileSet`. Updating the profile to the name it already
//! has changes nothing and answers with the user's current version, so a
//! client can tell "already so" from "done".
//!
//! | command          | mode   | data                | events                  |
//! |------------------|--------|---------------------|-------------------------|
//! | `new`            | create | `{"email", "name"}` | `Created`, `ProfileSet` |
//! | `update-profile` | update | `{"name"}`          | `ProfileSet`, or none   |
//!
//! Email and name are required; the email must contain `@` and the name
//! must have at least 6 characters (surrounding whitespace is ignored).
//! The command fields default to empty, so that validation reports every
//! invalid field at once rather than only the first one missing.

use rehydra_guest::{Aggregate, CommandSpec, Context, Decision, FieldErrors, Rejection};
use serde::{Deserialize, Serialize};

/// The user aggregate.
pub struct Users;

/// A user's state, stored as `{"id": "...", "email": "...", "name": "..."}`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct User {
    id: String,
    email: String,
    name: String,
}

/// What a client can ask of a user.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Command {
    New {
        #[serde(default)]
        email: String,
        #[serde(default)]
        name: String,
    },
    UpdateProfile {
        #[serde(default)]
        name: String,
    },
}

/// What happened to a user.
#[derive(Debug, Serialize, Deserialize)]
pub enum Event {
    Created { id: String, email: String },
    ProfileSet { id: String, name: String },
}

/// The shortest acceptable name, in characters.
const MIN_NAME_CHARS: usize = 6;

impl Aggregate for Users {
    const TYPE: &'static str = "user";
    const STREAM_PREFIX: &'static str = "ex_users";
    const COMMANDS: &'static [CommandSpec] = &[
        CommandSpec::create("new"),
        CommandSpec::update("update-profile"),
    ];
    type State = User;
    type Command = Command;
    type Event = Event;

    fn handle(user: &User, command: Command, ctx: &Context) -> Result<Decision<Event>, Rejection> {
        let id = ctx.aggregate_id().to_owned();
        match command {
            Command::New { email, name } => {
                let (email, name) = (email.trim(), name.trim());
                let mut errors = FieldErrors::new();
                check_email(&mut errors, email);
                check_name(&mut errors, name);
                errors.into_result()?;
                let created = Event::Created {
                    id: id.clone(),
                    email: email.to_owned(),
                };
                let profile = Event::ProfileSet {
                    id,
                    name: name.to_owned(),
                };
                Ok(vec![created, profile].into())
            }
            Command::UpdateProfile { name } => {
                let name = name.trim();
                let mut errors = FieldErrors::new();
                check_name(&mut errors, name);
                errors.into_result()?;
                if name == user.name {
                    return Ok(Decision::none().with_reply(ctx.version()));
                }
                Ok(Event::ProfileSet {
                    id,
                    name: name.to_owned(),
                }
                .into())
            }
        }
    }

    fn apply(user: &mut User, event: Event) {
        match event {
            Event::Created { id, email } => {
                user.id = id;
                user.email = email;
            }
            Event::ProfileSet { name, .. } => user.name = name,
        }
    }
}

fn check_email(errors: &mut FieldErrors, email: &str) {
    if email.is_empty() {
        errors.add("email", "is required");
    } else {
        errors.ensure(email.contains('@'), "email", "must be an email address");
    }
}

fn check_name(errors: &mut FieldErrors, name: &str) {
    if name.is_empty() {
        errors.add("name", "is required");
    } else {
        errors.ensure(
            name.chars().count() >= MIN_NAME_CHARS,
            "name",
            format!("must be at least {MIN_NAME_CHARS} characters"),
        );
    }
}

rehydra_guest::export_aggregate!(Users);
