//! [`Rejection`]: why a command was refused, and [`FieldErrors`] to collect
//! the invalid fields of a command.

use std::fmt;

/// One invalid field of a command.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FieldError {
    /// The field: a key of the command's JSON data (`"amount"`), a path to a
    /// nested one (`"address.city"`, `"lines[2].qty"`), or `""` for the data
    /// as a whole.
    pub field: String,
    /// What is wrong with it, for people (`"must be greater than 0"`).
    pub message: String,
}

impl FieldError {
    /// An error on `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

/// Why a command was refused. Nothing is stored.
///
/// ```
/// use rehydra_guest::{FieldErrors, Rejection};
///
/// let r = Rejection::invalid("amount", "must be greater than 0");
/// assert_eq!(r.to_string(), "invalid command: amount: must be greater than 0");
///
/// let r = Rejection::rejected("insufficient funds");
/// assert_eq!(r, Rejection::Rejected("insufficient funds".into()));
///
/// let mut errors = FieldErrors::new();
/// errors.ensure(false, "email", "is required");
/// errors.ensure(true, "name", "is required");
/// assert_eq!(errors.into_result(), Err(Rejection::invalid("email", "is required")));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// The command's data is invalid (HTTP 422 `invalid_command`).
    Invalid(Vec<FieldError>),
    /// A domain rule refused the command (HTTP 422 `rejected`).
    Rejected(String),
    /// The caller may not do this (HTTP 403 `forbidden`).
    Forbidden(String),
    /// The plugin cannot read state bytes of this schema; the host rebuilds
    /// the state from the events and retries. The SDK returns it by itself;
    /// plugins have no reason to.
    IncompatibleState(u32),
}

impl Rejection {
    /// One invalid field. For several, use [`FieldErrors`] or
    /// [`and_invalid`](Rejection::and_invalid).
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Rejection::Invalid(vec![FieldError::new(field, message)])
    }

    /// A domain rule refused the command, e.g. `"insufficient funds"`.
    pub fn rejected(message: impl Into<String>) -> Self {
        Rejection::Rejected(message.into())
    }

    /// The caller may not do this, e.g. `"only the owner may close the
    /// account"`.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Rejection::Forbidden(message.into())
    }

    /// Adds an invalid field to an [`Invalid`](Rejection::Invalid)
    /// rejection; any other rejection is returned unchanged.
    pub fn and_invalid(mut self, field: impl Into<String>, message: impl Into<String>) -> Self {
        if let Rejection::Invalid(errors) = &mut self {
            errors.push(FieldError::new(field, message));
        }
        self
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::Invalid(errors) => {
                f.write_str("invalid command")?;
                for (i, error) in errors.iter().enumerate() {
                    f.write_str(if i == 0 { ": " } else { "; " })?;
                    write!(f, "{error}")?;
                }
                Ok(())
            }
            Rejection::Rejected(message) => write!(f, "rejected: {message}"),
            Rejection::Forbidden(message) => write!(f, "forbidden: {message}"),
            Rejection::IncompatibleState(schema) => {
                write!(f, "cannot read state of schema {schema}")
            }
        }
    }
}

impl std::error::Error for Rejection {}

/// Collects the invalid fields of a command, so that the client learns of
/// all of them at once.
///
/// ```
/// use rehydra_guest::{FieldErrors, Rejection};
///
/// fn validate(email: &str, name: &str) -> Result<(), Rejection> {
///     let mut errors = FieldErrors::new();
///     errors.ensure(email.contains('@'), "email", "must be an email address");
///     errors.ensure(name.chars().count() >= 6, "name", "must be at least 6 characters");
///     errors.into_result()
/// }
///
/// assert!(validate("ada@example.com", "Ada Lovelace").is_ok());
/// let Err(Rejection::Invalid(fields)) = validate("ada", "Ada") else { panic!() };
/// assert_eq!(fields.len(), 2);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldErrors {
    errors: Vec<FieldError>,
}

impl FieldErrors {
    /// No errors yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `field` is invalid.
    pub fn add(&mut self, field: impl Into<String>, message: impl Into<String>) -> &mut Self {
        self.errors.push(FieldError::new(field, message));
        self
    }

    /// Records that `field` is invalid unless `condition` holds.
    pub fn ensure(
        &mut self,
        condition: bool,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> &mut Self {
        if !condition {
            self.add(field, message);
        }
        self
    }

    /// Whether no field is invalid.
    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    /// Whether `field` already has an error (to skip further checks on it).
    pub fn has(&self, field: &str) -> bool {
        self.errors.iter().any(|e| e.field == field)
    }

    /// The errors recorded so far.
    pub fn errors(&self) -> &[FieldError] {
        &self.errors
    }

    /// `Ok(())` when no field is invalid, else [`Rejection::Invalid`] with
    /// every recorded error — ready for `?`.
    pub fn into_result(self) -> Result<(), Rejection> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(Rejection::Invalid(self.errors))
        }
    }
}

impl From<FieldErrors> for Rejection {
    fn from(errors: FieldErrors) -> Self {
        Rejection::Invalid(errors.errors)
    }
}
