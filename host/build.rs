//! Build script:
//!
//! - generates the gRPC server and client code of `proto/rehydra/v1/*.proto`
//!   (the host's own API). No `protoc` is needed: `protox` parses the files
//!   in pure Rust and hands a `FileDescriptorSet` to tonic-build;
//! - turns on the KurrentDB real-server conformance tests when
//!   `REHYDRA_KURRENTDB_URL` is set at build time (they do not exist
//!   otherwise, so they can neither run nor pass by accident).

use std::path::PathBuf;

fn main() {
    generate_grpc();

    println!("cargo::rerun-if-env-changed=REHYDRA_KURRENTDB_URL");
    println!("cargo::rustc-check-cfg=cfg(kurrentdb_real_server)");
    if std::env::var_os("REHYDRA_KURRENTDB_URL").is_some_and(|v| !v.is_empty()) {
        println!("cargo::rustc-cfg=kurrentdb_real_server");
    }
}

fn generate_grpc() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(|p| p.join("proto"))
        .unwrap_or_else(|| panic!("the host crate is not inside the workspace"));
    let files = [
        "rehydra/v1/events.proto",
        "rehydra/v1/commands.proto",
        "rehydra/v1/aggregates.proto",
        "rehydra/v1/streams.proto",
        "rehydra/v1/plugins.proto",
        "rehydra/v1/timers.proto",
    ];
    println!("cargo::rerun-if-changed=build.rs");
    for f in &files {
        println!("cargo::rerun-if-changed={}", root.join(f).display());
    }
    let descriptors = protox::compile(files, [&root])
        .unwrap_or_else(|e| panic!("cannot parse the protos in {}: {e}", root.display()));
    tonic_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)
        .unwrap_or_else(|e| panic!("cannot generate the gRPC code: {e}"));
}
