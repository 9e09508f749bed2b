//! Generates the server side of the KurrentDB gRPC API from the `.proto`
//! files that ship inside the `kurrentdb` client crate, so that the double
//! speaks exactly the protocol of the client version Rehydra uses.
//!
//! No `protoc` is needed: `protox` parses the files in pure Rust and hands a
//! `FileDescriptorSet` to tonic-build.

use std::path::{Path, PathBuf};

/// The `kurrentdb` crate whose protos we compile. Keep it equal to the
/// `kurrentdb = "=…"` requirement in this crate's Cargo.toml.
const KURRENTDB_VERSION: &str = "1.2.0";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=KURRENTDB_PROTO_DIR");
    let dir = match proto_dir() {
        Ok(dir) => dir,
        Err(message) => panic!("{message}"),
    };
    let files = ["streams.proto", "gossip.proto", "serverfeatures.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={}", dir.join(f).display());
    }
    let descriptors = protox::compile(files, [&dir]).unwrap_or_else(|e| {
        panic!(
            "cannot parse the KurrentDB protos in {}: {e}",
            dir.display()
        )
    });
    tonic_build::configure()
        .build_client(false)
        .build_server(true)
        .compile_fds(descriptors)
        .unwrap_or_else(|e| panic!("cannot generate the KurrentDB server code: {e}"));
}

/// Where the `kurrentdb` crate's `protos/` directory is: `KURRENTDB_PROTO_DIR`
/// if set, else the crate's unpacked source in Cargo's registry (Cargo has
/// downloaded it already, since this crate depends on it).
fn proto_dir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("KURRENTDB_PROTO_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .ok_or("neither CARGO_HOME nor HOME is set; set KURRENTDB_PROTO_DIR to the kurrentdb crate's protos/ directory")?;
    let registry = cargo_home.join("registry").join("src");
    let wanted = format!("kurrentdb-{KURRENTDB_VERSION}");
    let mut found = Vec::new();
    if let Ok(indexes) = std::fs::read_dir(&registry) {
        for index in indexes.flatten() {
            let candidate = index.path().join(&wanted).join("protos");
            if candidate.join("streams.proto").is_file() {
                found.push(candidate);
            }
        }
    }
    found.sort();
    found.pop().ok_or_else(|| {
        format!(
            "cannot find {wanted}/protos under {}; run `cargo fetch`, or set KURRENTDB_PROTO_DIR to the kurrentdb crate's protos/ directory",
            registry.display()
        )
    })
}
