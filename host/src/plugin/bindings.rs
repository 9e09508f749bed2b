//! Host-side bindings generated from `wit/aggregate.wit`, the one contract
//! between the host and every plugin.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "aggregate",
});

/// Bindings of the `process-manager` world: the aggregate's exports plus
/// `process`. Only its `process` export is called through them (at load);
/// the aggregate's exports go through the `aggregate` world's bindings.
pub mod process_manager {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "process-manager",
    });
}

/// The contract version, written once for both constants below (`concat!`
/// takes only literals).
macro_rules! wit_version {
    () => {
        "0.3.0"
    };
}

/// The version of the WIT package this host speaks.
pub const WIT_VERSION: &str = wit_version!();

/// The WIT package this host speaks. A plugin built against another major
/// version (for 0.x: another minor version) is refused at load.
pub const WIT_PACKAGE: &str = concat!("rehydra:aggregate@", wit_version!());

#[cfg(test)]
mod tests {
    use super::WIT_PACKAGE;

    /// The constant names the package the bindings are generated from.
    #[test]
    fn the_constant_matches_the_wit_file() {
        let wit = include_str!("../../../wit/aggregate.wit");
        assert!(
            wit.contains(&format!("\npackage {WIT_PACKAGE};\n")),
            "wit/aggregate.wit does not declare {WIT_PACKAGE}"
        );
    }
}
