//! Host-side bindings generated from `wit/aggregate.wit`, the one contract
//! between the host and every plugin.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "aggregate",
});

/// The WIT package this host speaks. A plugin built against another major
/// version (for 0.x: another minor version) fails to instantiate.
pub const WIT_PACKAGE: &str = "rehydra:aggregate@0.1.0";
