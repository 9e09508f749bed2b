//! Verifying a new version of a plugin against real history before it
//! serves (`--upgrade-check`).
//!
//! When a file replaces a loaded version of the same aggregate type, the
//! registry asks an [`UpgradeVerifier`] (the actor layer, which knows the
//! resident aggregates and the store) to replay a sample of aggregates
//! through both versions. With the same state schema, the new version's
//! state must equal the current one's after every event; with a new schema,
//! the new version must rebuild every sampled aggregate without failing.
//! The outcome is a [`VerificationReport`]; the policy decides what it
//! does: `enforce` keeps the current version serving and records why the
//! new one was refused, `warn` activates it and keeps the report, `off`
//! skips the check.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;

use super::PluginRef;

/// What a failed verification does (`--upgrade-check`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpgradeCheck {
    /// Refuse a new version that fails; the current one keeps serving.
    #[default]
    Enforce,
    /// Activate it anyway, with the report.
    Warn,
    /// Do not verify.
    Off,
}

impl UpgradeCheck {
    /// The flag's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            UpgradeCheck::Enforce => "enforce",
            UpgradeCheck::Warn => "warn",
            UpgradeCheck::Off => "off",
        }
    }
}

impl std::fmt::Display for UpgradeCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for UpgradeCheck {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "enforce" => Ok(UpgradeCheck::Enforce),
            "warn" => Ok(UpgradeCheck::Warn),
            "off" => Ok(UpgradeCheck::Off),
            other => Err(format!("{other:?}: use enforce, warn or off")),
        }
    }
}

/// Parses a `--plugin-upgrade-check` value: `NAME=enforce|warn|off`.
pub fn parse_plugin_upgrade_check(s: &str) -> Result<(String, UpgradeCheck), String> {
    let (name, policy) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: use NAME=enforce|warn|off, e.g. reports=warn"))?;
    if name.is_empty() {
        return Err(format!("{s:?}: the plugin's name is missing before '='"));
    }
    Ok((name.to_owned(), policy.parse()?))
}

/// How much a verification may replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyBudget {
    /// Aggregates sampled, at most.
    pub aggregates: usize,
    /// Time spent, at most; the aggregates not reached are not checked.
    pub time: Duration,
}

impl Default for VerifyBudget {
    fn default() -> Self {
        VerifyBudget {
            aggregates: 100,
            time: Duration::from_secs(10),
        }
    }
}

/// An aggregate whose state the new version folds differently.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Difference {
    /// The aggregate's id.
    pub aggregate: String,
    /// The first event after which the states differ: its version.
    pub version: u64,
    /// That event's type.
    pub event_type: String,
    /// The current version's state after it (at most 200 characters).
    pub current: String,
    /// The new version's state after it (at most 200 characters).
    pub candidate: String,
}

/// An aggregate the new version could not rebuild.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Failure {
    /// The aggregate's id.
    pub aggregate: String,
    /// What went wrong (a trap, a deadline, a refusal of an event).
    pub error: String,
}

/// A recent command whose outcome the new version would change (reported,
/// never enforced: a new version may well decide differently on purpose).
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct CommandDifference {
    /// The aggregate's id.
    pub aggregate: String,
    /// The command's name.
    pub command: String,
    /// The aggregate's version the command ran at.
    pub version: u64,
    /// What the current version decides (events and reply, or the
    /// refusal), shortened.
    pub current: String,
    /// What the new version decides, shortened.
    pub candidate: String,
}

/// What verifying a new version against stored history found.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct VerificationReport {
    /// The version that served when the check ran.
    pub current_hash: String,
    /// The version checked.
    pub candidate_hash: String,
    /// Whether the two declare the same state schema (states compared) or
    /// not (rebuilds only).
    pub same_state_schema: bool,
    /// Aggregates replayed through the new version.
    pub aggregates_checked: usize,
    /// Events the new version applied.
    pub events_replayed: u64,
    /// How long the check took.
    pub duration_ms: u64,
    /// Whether the budget ended the check before the sample did.
    pub truncated: bool,
    /// States that differ.
    pub differences: Vec<Difference>,
    /// Aggregates the new version failed on.
    pub failures: Vec<Failure>,
    /// Recent commands re-run in dry-run mode through both versions.
    pub commands_rerun: usize,
    /// Those whose outcome differs (not enforced).
    pub command_differences: Vec<CommandDifference>,
    /// The policy the check ran under.
    pub policy: String,
}

impl VerificationReport {
    /// Whether the new version folds the sample as the current one does.
    pub fn passed(&self) -> bool {
        self.differences.is_empty() && self.failures.is_empty()
    }

    /// One line for the log and the load error.
    pub fn summary(&self) -> String {
        let mut text = format!(
            "{} aggregates and {} events replayed in {} ms",
            self.aggregates_checked, self.events_replayed, self.duration_ms
        );
        if let Some(d) = self.differences.first() {
            text.push_str(&format!(
                "; aggregate {:?}: the new version's state differs from the current one's after \
                 event {} ({}): current {} / new {}",
                d.aggregate, d.version, d.event_type, d.current, d.candidate
            ));
        }
        if let Some(f) = self.failures.first() {
            text.push_str(&format!(
                "; aggregate {:?}: the new version cannot rebuild it: {}",
                f.aggregate, f.error
            ));
        }
        let more = (self.differences.len() + self.failures.len()).saturating_sub(1);
        if more > 0 {
            text.push_str(&format!(" (and {more} more; GET /v1/plugins has them)"));
        }
        text
    }
}

/// Replays history through a new plugin version; implemented by the layer
/// that holds the aggregates and the store.
#[async_trait]
pub trait UpgradeVerifier: Send + Sync + 'static {
    /// Verifies `candidate` against `current` within `budget`.
    async fn verify(
        &self,
        current: PluginRef,
        candidate: PluginRef,
        budget: VerifyBudget,
    ) -> VerificationReport;
}

/// `text` cut to `max` characters, with `…` when cut.
pub fn excerpt(text: &str, max: usize) -> String {
    let mut chars = text.chars();
    let cut: String = chars.by_ref().take(max).collect();
    if chars.next().is_some() {
        format!("{cut}…")
    } else {
        cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_parses_and_prints() {
        for p in [UpgradeCheck::Enforce, UpgradeCheck::Warn, UpgradeCheck::Off] {
            assert_eq!(p.as_str().parse::<UpgradeCheck>(), Ok(p));
        }
        assert!("strict".parse::<UpgradeCheck>().is_err());
        assert_eq!(
            parse_plugin_upgrade_check("reports=warn"),
            Ok(("reports".to_owned(), UpgradeCheck::Warn))
        );
        for bad in ["reports", "=warn", "reports=strict"] {
            assert!(parse_plugin_upgrade_check(bad).is_err(), "{bad}");
        }
        assert_eq!(excerpt("abcdef", 3), "abc…");
        assert_eq!(excerpt("abc", 3), "abc");
    }
}
