//! Build script: turns on the KurrentDB real-server conformance tests when
//! `REHYDRA_KURRENTDB_URL` is set at build time (they do not exist
//! otherwise, so they can neither run nor pass by accident).

fn main() {
    println!("cargo::rerun-if-env-changed=REHYDRA_KURRENTDB_URL");
    println!("cargo::rustc-check-cfg=cfg(kurrentdb_real_server)");
    if std::env::var_os("REHYDRA_KURRENTDB_URL").is_some_and(|v| !v.is_empty()) {
        println!("cargo::rustc-cfg=kurrentdb_real_server");
    }
}
