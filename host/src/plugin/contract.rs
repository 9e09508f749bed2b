//! What a component must be to load as a plugin: built against a
//! contract version this host speaks, and describing itself with valid
//! names.
use anyhow::bail;

use super::bindings::process_manager::rehydra::aggregate::types as pm;
use super::bindings::rehydra::aggregate::types as wit;
use super::bindings::{WIT_PACKAGE, WIT_VERSION};
use super::types::{Follow, InstanceKey, ProcessInfo};
use super::{CommandMode, CommandSpec, PluginInfo, is_valid_name, is_valid_stream_prefix};

/// The contract version in the name of an imported interface of the
/// contract: `0.1.0` for `rehydra:aggregate/types@0.1.0`.
pub(super) fn imported_contract_version(import: &str) -> Option<&str> {
    let (_, version) = import.strip_prefix("rehydra:aggregate/")?.split_once('@')?;
    Some(version)
}

/// Why a plugin built against contract version `plugin` cannot load on this
/// host, or `None` when it can: the same major version, and for 0.x the
/// same minor version too (the rule in the WIT's header).
pub(super) fn contract_mismatch(plugin: &str) -> Option<String> {
    let (theirs, ours) = (release(plugin), release(WIT_VERSION));
    if let (Some(theirs), Some(ours)) = (theirs, ours)
        && theirs.0 == ours.0
        && (ours.0 != 0 || theirs.1 == ours.1)
    {
        return None;
    }
    let advice = if theirs > ours {
        format!(
            "run a Rehydra host that speaks it, or rebuild the plugin against this host's \
             SDK ({WIT_PACKAGE})"
        )
    } else {
        "rebuild the plugin against the current Rehydra SDK: rehydra-guest for Rust; for \
         JavaScript or Python, this host's rehydra.js or rehydra.py with its \
         wit/aggregate.wit"
            .to_string()
    };
    Some(format!(
        "the plugin was built against the contract rehydra:aggregate@{plugin}, but this host \
         speaks {WIT_PACKAGE}, which cannot run it; {advice}"
    ))
}

/// The major, minor and patch numbers of a semantic version, without its
/// pre-release or build suffix; `None` if it is not one.
fn release(version: &str) -> Option<(u64, u64, u64)> {
    let core = version.split(['-', '+']).next()?;
    let mut numbers = core.split('.').map(|n| n.parse::<u64>().ok());
    let parsed = (numbers.next()??, numbers.next()??, numbers.next()??);
    numbers.next().is_none().then_some(parsed)
}

/// The plugin's description, checked: valid names, commands listed once.
pub(super) fn validate_info(info: wit::Info) -> anyhow::Result<PluginInfo> {
    if !is_valid_name(&info.aggregate_type) {
        bail!(
            "describe() gives an invalid aggregate type {:?}: use 1-64 ASCII letters, digits, '-', '_' or '.', starting with a letter",
            info.aggregate_type
        );
    }
    if !is_valid_stream_prefix(&info.stream_prefix) {
        bail!(
            "describe() gives an invalid stream prefix {:?}: use 1-64 ASCII letters, digits, '_' or '.', starting with a letter, and no '-' (it separates the prefix from the id)",
            info.stream_prefix
        );
    }
    if info.commands.is_empty() {
        bail!("describe() lists no commands");
    }
    let mut commands: Vec<CommandSpec> = Vec::with_capacity(info.commands.len());
    for c in info.commands {
        if !is_valid_name(&c.name) {
            bail!("describe() gives an invalid command name {:?}", c.name);
        }
        if commands.iter().any(|known| known.name == c.name) {
            bail!("describe() lists the command {:?} twice", c.name);
        }
        let mode = match c.mode {
            wit::CommandMode::Create => CommandMode::Create,
            wit::CommandMode::Update => CommandMode::Update,
            wit::CommandMode::Upsert => CommandMode::Upsert,
        };
        commands.push(CommandSpec { name: c.name, mode });
    }
    for t in &info.event_types {
        if !is_valid_name(t) {
            bail!("describe() gives an invalid event type {t:?}");
        }
    }
    Ok(PluginInfo {
        aggregate_type: info.aggregate_type,
        stream_prefix: info.stream_prefix,
        state_schema: info.state_schema,
        commands,
        event_types: info.event_types,
        process: None,
    })
}

/// A process manager's `process()` answer, checked against what its
/// `describe()` said: valid names, and commands it has.
pub(super) fn validate_process(
    info: &PluginInfo,
    process: pm::ProcessInfo,
) -> anyhow::Result<ProcessInfo> {
    let has = |command: &str| info.command(command).is_some();
    let mut follows = Vec::with_capacity(process.follows.len());
    for f in process.follows {
        if !is_valid_name(&f.aggregate_type) || !is_valid_name(&f.event_type) {
            bail!(
                "process() follows {:?}/{:?}, which is not a valid aggregate type and event type",
                f.aggregate_type,
                f.event_type
            );
        }
        if !has(&f.command) {
            bail!(
                "process() sends {}/{} events to the command {:?}, which describe() does not list",
                f.aggregate_type,
                f.event_type,
                f.command
            );
        }
        let instance = match f.instance {
            pm::InstanceKey::AggregateId => InstanceKey::AggregateId,
            pm::InstanceKey::CorrelationId => InstanceKey::CorrelationId,
            pm::InstanceKey::ScheduledBy => InstanceKey::ScheduledBy,
            pm::InstanceKey::DataField(field) if !field.is_empty() => InstanceKey::DataField(field),
            pm::InstanceKey::DataField(_) => {
                bail!(
                    "process() routes {}/{} by a data field with an empty name",
                    f.aggregate_type,
                    f.event_type
                )
            }
        };
        if follows.iter().any(|known: &Follow| {
            known.aggregate_type == f.aggregate_type && known.event_type == f.event_type
        }) {
            bail!(
                "process() follows {}/{} twice",
                f.aggregate_type,
                f.event_type
            );
        }
        follows.push(Follow {
            aggregate_type: f.aggregate_type,
            event_type: f.event_type,
            instance,
            command: f.command,
        });
    }
    if let Some(command) = &process.on_refused
        && !has(command)
    {
        bail!(
            "process() sends refusals to the command {command:?}, which describe() does not list"
        );
    }
    for event_type in &process.finished_by {
        if !info.event_types.contains(event_type) {
            bail!(
                "process() says {event_type:?} finishes an instance, but describe() does not list \
                 that event type ({})",
                info.event_types.join(", ")
            );
        }
    }
    Ok(ProcessInfo {
        follows,
        on_refused: process.on_refused,
        finished_by: process.finished_by,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_contract_version_is_read_from_an_import_name() {
        assert_eq!(
            imported_contract_version("rehydra:aggregate/types@0.1.0"),
            Some("0.1.0")
        );
        assert_eq!(imported_contract_version("wasi:io/streams@0.2.6"), None);
        assert_eq!(imported_contract_version("rehydra:aggregate/types"), None);
        assert_eq!(imported_contract_version("log"), None);
    }

    #[test]
    fn only_a_compatible_contract_version_loads() {
        assert_eq!(contract_mismatch(WIT_VERSION), None);
        let (major, minor, patch) = release(WIT_VERSION).expect("the host's version parses");
        assert_eq!(major, 0, "the cases below assume a 0.x contract");
        assert_eq!(contract_mismatch(&format!("0.{minor}.{}", patch + 1)), None);

        let older = contract_mismatch("0.1.0").expect("0.1.0 is refused");
        assert!(
            older.contains("built against the contract rehydra:aggregate@0.1.0"),
            "{older}"
        );
        assert!(older.contains(&format!("speaks {WIT_PACKAGE}")), "{older}");
        assert!(
            older.contains("rebuild the plugin against the current"),
            "{older}"
        );

        for newer in [format!("0.{}.0", minor + 1), "1.0.0".to_string()] {
            let message = contract_mismatch(&newer).expect("a newer contract is refused");
            assert!(message.contains(&format!("@{newer},")), "{message}");
            assert!(
                message.contains("run a Rehydra host that speaks it"),
                "{message}"
            );
        }
        let garbled = contract_mismatch("next").expect("an unreadable version is refused");
        assert!(garbled.contains("rehydra:aggregate@next"), "{garbled}");
    }

    #[test]
    fn release_numbers_parse() {
        assert_eq!(release("0.2.0"), Some((0, 2, 0)));
        assert_eq!(release("1.2.3-rc.1+build"), Some((1, 2, 3)));
        assert_eq!(release("1.2"), None);
        assert_eq!(release("1.2.3.4"), None);
        assert_eq!(release("x.2.3"), None);
    }
}
