//! `rehydra run --config FILE`: a TOML file whose keys are the long flags of
//! `rehydra run` (`max-in-flight = 4096`, `idle-timeout = "5m"`, a
//! repeatable flag as an array), and the order in which a setting is looked
//! for: the command line, then the environment, then the file, then the
//! built-in default.
//!
//! Clap reads neither files nor an environment other than the process's.
//! Rather than a second parser per flag, a value found in the environment or
//! in the file becomes that argument's *default value* in clap's own
//! `Command` ([`layer`]): clap then parses it with the flag's own value
//! parser, exactly as it would parse it on the command line, and a flag
//! given on the command line still wins over it. Each value is first parsed
//! on its own ([`check`]), so that an error can say where the value came
//! from (the file and its line, or the variable).
//!
//! The environment is passed in ([`Env`]) instead of read by clap, so that
//! tests can give one without touching the process's environment.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use clap::{Arg, ArgAction, ColorChoice, Command};
use toml::{Spanned, Value};

/// The id of the argument that names the configuration file. The file
/// cannot set it.
pub const CONFIG_ARG: &str = "config";

/// A configuration file, read but not yet interpreted.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    /// Where it was read from, as given (for messages).
    pub path: PathBuf,
    /// Its text.
    pub text: String,
}

impl ConfigFile {
    /// Reads the file at `path`.
    pub fn read(path: &Path) -> Result<ConfigFile, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(ConfigFile {
                path: path.to_path_buf(),
                text,
            }),
            Err(e) => Err(ConfigError(format!(
                "cannot read the configuration file {} (given by --config or REHYDRA_CONFIG): {e}; \
                 check the path (a relative one is relative to the working directory), or leave \
                 --config out to run on flags and built-in defaults alone",
                path.display()
            ))),
        }
    }
}

/// A configuration the host cannot start with; the message says what is
/// wrong, where, and what would be right.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

/// The environment as [`layer`] sees it: a variable's value by name.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<OsString>;

/// One key of the file: its value and the line it is on.
struct Entry {
    line: usize,
    value: Value,
}

/// `cmd` with the default of each argument replaced by the value the
/// environment gives it (through the argument's `env` variable) or, failing
/// that, `file` gives it (under the argument's long name); and with no
/// `env` left on any argument, so that clap does not read the process's
/// environment on its own. Every value is checked with the argument's own
/// parser first.
pub fn layer(
    mut cmd: Command,
    env: Env<'_>,
    file: Option<&ConfigFile>,
) -> Result<Command, ConfigError> {
    let (mut entries, file_name) = match file {
        Some(file) => (parse(file)?, file.path.display().to_string()),
        None => (BTreeMap::new(), String::new()),
    };
    let args: Vec<Arg> = cmd.get_arguments().cloned().collect();
    check_keys(&file_name, &entries, &file_keys(&cmd))?;
    for arg in &args {
        let id = arg.get_id().as_str().to_string();
        // The file's value is checked even when the environment or a flag
        // overrides it: a file is refused as a whole or taken as a whole.
        let from_file = match arg.get_long().and_then(|key| entries.remove(key)) {
            Some(entry) => {
                let bad = |reason: String| {
                    ConfigError(format!(
                        "{file_name}, line {}: {} = {}: {}",
                        entry.line,
                        arg.get_long().unwrap_or_default(),
                        entry.value,
                        with_expected(reason, arg)
                    ))
                };
                let values = from_toml(arg, &entry.value).map_err(bad)?;
                check(arg, &values).map_err(bad)?;
                Some(values)
            }
            None => None,
        };
        let from_env = match arg.get_env() {
            Some(name) => {
                let name = name.to_string_lossy().into_owned();
                cmd = cmd.mut_arg(&id, |a| a.env(None::<&'static str>));
                match env(&name) {
                    Some(value) => {
                        check(arg, std::slice::from_ref(&value)).map_err(|reason| {
                            ConfigError(format!(
                                "the environment variable {name}={}: {}",
                                value.to_string_lossy(),
                                with_expected(reason, arg)
                            ))
                        })?;
                        Some(vec![value])
                    }
                    None => None,
                }
            }
            None => None,
        };
        let Some(values) = from_env.or(from_file) else {
            continue;
        };
        cmd = cmd.mut_arg(&id, |a| a.default_values(values));
    }
    Ok(cmd)
}

/// The file's keys with their values and lines.
fn parse(file: &ConfigFile) -> Result<BTreeMap<String, Entry>, ConfigError> {
    let table: BTreeMap<Spanned<String>, Spanned<Value>> =
        toml::from_str(&file.text).map_err(|e| {
            ConfigError(format!(
                "the configuration file {} is not valid TOML: {e}",
                file.path.display()
            ))
        })?;
    Ok(table
        .into_iter()
        .map(|(key, value)| {
            let line = 1 + file.text[..key.span().start.min(file.text.len())]
                .matches('\n')
                .count();
            (
                key.into_inner(),
                Entry {
                    line,
                    value: value.into_inner(),
                },
            )
        })
        .collect())
}

/// The keys a file may set: every long flag but `--config` (and `--help`).
pub fn file_keys(cmd: &Command) -> Vec<&str> {
    cmd.get_arguments()
        .filter(|a| !matches!(a.get_id().as_str(), CONFIG_ARG | "help" | "version"))
        .filter_map(Arg::get_long)
        .collect()
}

/// Refuses the first key (in the file's order) that is not in `known`.
fn check_keys(
    file_name: &str,
    entries: &BTreeMap<String, Entry>,
    known: &[&str],
) -> Result<(), ConfigError> {
    let unknown = entries
        .iter()
        .filter(|(key, _)| !known.contains(&key.as_str()))
        .min_by_key(|(_, entry)| entry.line);
    let Some((key, entry)) = unknown else {
        return Ok(());
    };
    let at = format!("{file_name}, line {}", entry.line);
    if key.as_str() == CONFIG_ARG {
        return Err(ConfigError(format!(
            "{at}: `{CONFIG_ARG}` cannot be set in a configuration file (it names the file); \
             remove the line"
        )));
    }
    let hint = match closest(key, known) {
        Some(valid) => format!("did you mean `{valid}`?"),
        None if matches!(entry.value, Value::Table(_)) => {
            "the file has no sections: write every key at the top level".to_string()
        }
        None => "see `rehydra run --help` or deploy/rehydra.toml for the keys".to_string(),
    };
    Err(ConfigError(format!(
        "{at}: unknown key `{key}`: {hint} (the keys are the long flags of `rehydra run`, \
         spelled with dashes)"
    )))
}

/// The valid key closest to `key`, if one is close enough: the key with
/// dashes for underscores, or the most similar by the Jaro measure above
/// the threshold clap uses for misspelt flags.
fn closest<'a>(key: &str, known: &[&'a str]) -> Option<&'a str> {
    let dashed = key.replace('_', "-");
    if let Some(exact) = known.iter().find(|k| **k == dashed) {
        return Some(exact);
    }
    known
        .iter()
        .map(|k| (strsim::jaro(&dashed, k), *k))
        .filter(|(score, _)| *score > 0.7)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| k)
}

/// The strings clap would have got on the command line for a TOML value.
fn from_toml(arg: &Arg, value: &Value) -> Result<Vec<OsString>, String> {
    if !arg.get_action().takes_values() {
        // A switch such as --no-cache: `true` is giving it.
        return match value {
            Value::Boolean(b) => Ok(vec![b.to_string().into()]),
            other => Err(format!("a {} is not true or false", other.type_str())),
        };
    }
    let scalar = |v: &Value| match v {
        Value::String(s) => Ok(OsString::from(s)),
        Value::Integer(i) => Ok(i.to_string().into()),
        Value::Float(f) => Ok(f.to_string().into()),
        other => Err(format!(
            "a {} is not a value of this flag",
            other.type_str()
        )),
    };
    match value {
        Value::Array(items) if matches!(arg.get_action(), ArgAction::Append) => {
            items.iter().map(scalar).collect()
        }
        Value::Array(_) => Err("this flag takes one value, not an array".to_string()),
        v => scalar(v).map(|s| vec![s]),
    }
}

/// Parses `values` with `arg`'s own parser, as if given on the command
/// line, and says why not when it fails.
fn check(arg: &Arg, values: &[OsString]) -> Result<(), String> {
    let Some(long) = arg.get_long() else {
        return Ok(());
    };
    if !arg.get_action().takes_values() {
        return Ok(());
    }
    let probe = Command::new("rehydra run")
        .no_binary_name(true)
        .color(ColorChoice::Never)
        .arg(arg.clone().env(None::<&'static str>));
    let argv = values.iter().map(|v| {
        // `--flag=VALUE`, so that a value starting with '-' stays a value.
        let mut a = OsString::from(format!("--{long}="));
        a.push(v);
        a
    });
    match probe.try_get_matches_from(argv) {
        Ok(_) => Ok(()),
        Err(e) => Err(reason(&e)),
    }
}

/// What a value parser said, without clap's usage lines.
fn reason(e: &clap::Error) -> String {
    if let Some(source) = std::error::Error::source(e) {
        return source.to_string();
    }
    let text = e.render().to_string();
    let first = text.split("\n\n").next().unwrap_or_default();
    let first = first.strip_prefix("error: ").unwrap_or(first);
    first
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// `reason`, followed by the form `arg` expects unless it says so already
/// (some value parsers do).
fn with_expected(reason: String, arg: &Arg) -> String {
    if reason.contains("expected") {
        reason
    } else {
        format!("{reason}; expected {}", expected(arg))
    }
}

/// The form a value of `arg` takes, for messages: its value name and, when
/// it has one, its default as a line of the file.
fn expected(arg: &Arg) -> String {
    if !arg.get_action().takes_values() {
        return "true or false".to_string();
    }
    let name = arg
        .get_value_names()
        .and_then(|names| names.first())
        .map(|n| n.to_string())
        .unwrap_or_else(|| arg.get_id().as_str().to_uppercase());
    let repeatable = matches!(arg.get_action(), ArgAction::Append);
    let name = if repeatable {
        format!("{name}, or an array of them")
    } else {
        name
    };
    match (arg.get_long(), arg.get_default_values()) {
        (Some(key), [default]) => format!("{name}, e.g. {key} = {}", toml_literal(default)),
        _ => name,
    }
}

/// `text` as a TOML value: a number or a boolean as it is, anything else
/// quoted.
pub fn toml_literal(text: &OsStr) -> String {
    let text = text.to_string_lossy();
    if text.parse::<i64>().is_ok() || text == "true" || text == "false" {
        text.into_owned()
    } else {
        Value::String(text.into_owned()).to_string()
    }
}
