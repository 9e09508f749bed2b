//! Logging to the host: messages go to the host's log, tagged with the
//! plugin's name.
//!
//! ```
//! rehydra_guest::log::info(format_args!("opened account for {}", "Ada"));
//! rehydra_guest::log::warn("balance is low");
//! ```
//!
//! Outside WebAssembly (unit tests and doctests run natively) there is no
//! host to log to, and these functions do nothing.

use std::fmt::Display;

/// The severity of a log message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Very detailed tracing.
    Trace,
    /// Information for debugging.
    Debug,
    /// Normal, noteworthy events.
    Info,
    /// Something unexpected that the plugin copes with.
    Warn,
    /// Something failed.
    Error,
}

/// Logs `message` at `level`.
pub fn log(level: Level, message: impl Display) {
    emit(level, message)
}

/// Logs `message` at [`Level::Trace`].
pub fn trace(message: impl Display) {
    log(Level::Trace, message)
}

/// Logs `message` at [`Level::Debug`].
pub fn debug(message: impl Display) {
    log(Level::Debug, message)
}

/// Logs `message` at [`Level::Info`].
pub fn info(message: impl Display) {
    log(Level::Info, message)
}

/// Logs `message` at [`Level::Warn`].
pub fn warn(message: impl Display) {
    log(Level::Warn, message)
}

/// Logs `message` at [`Level::Error`].
pub fn error(message: impl Display) {
    log(Level::Error, message)
}

#[cfg(target_arch = "wasm32")]
fn emit(level: Level, message: impl Display) {
    use crate::bindings::rehydra::aggregate::types::LogLevel;

    let level = match level {
        Level::Trace => LogLevel::Trace,
        Level::Debug => LogLevel::Debug,
        Level::Info => LogLevel::Info,
        Level::Warn => LogLevel::Warn,
        Level::Error => LogLevel::Error,
    };
    crate::bindings::log(level, &message.to_string());
}

#[cfg(not(target_arch = "wasm32"))]
fn emit(_level: Level, _message: impl Display) {
    // The `log` import exists only inside a component.
}
