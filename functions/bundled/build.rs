//! Builds the guest workspace (`functions/`) for `wasm32-wasip2` and tells
//! the crate where the components are.
//!
//! The guest build uses its own target directory next to the host's, so it
//! neither waits on nor invalidates the host build.

use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "wasm32-wasip2";
const COMPONENTS: &[&str] = &["echo", "faulty", "authorizer", "chat", "router"];

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let functions = manifest_dir
        .parent()
        .expect("functions/bundled has a parent")
        .to_path_buf();
    for watched in [
        "Cargo.toml",
        "Cargo.lock",
        "wit",
        "sdk",
        "echo",
        "faulty",
        "authorizer",
        "chat",
        "router",
    ] {
        println!(
            "cargo:rerun-if-changed={}",
            functions.join(watched).display()
        );
    }

    let target_dir = guest_target_dir();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .current_dir(&functions)
        .args(["build", "--release", "--locked", "--target", TARGET])
        .arg("--target-dir")
        .arg(&target_dir);
    // The host build's settings must not leak into the guest build.
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_LLVM_COV",
        "CARGO_LLVM_COV_TARGET_DIR",
    ] {
        build.env_remove(var);
    }
    let status = build
        .status()
        .unwrap_or_else(|e| panic!("could not run cargo to build functions/: {e}"));
    if !status.success() {
        panic!(
            "building the guest functions in {} failed (cargo's output is above); if the \
             {TARGET} target is missing, add it with `rustup target add {TARGET}`",
            functions.display()
        );
    }

    let out = target_dir.join(TARGET).join("release");
    for component in COMPONENTS {
        let path = out.join(format!("{component}.wasm"));
        assert!(
            path.exists(),
            "the guest build did not produce {}",
            path.display()
        );
    }
    println!("cargo:rustc-env=TIDEGATE_FUNCTIONS_DIR={}", out.display());
}

/// `<host target dir>/wasm-functions`, found from OUT_DIR
/// (`<target>/<profile>/build/<pkg>-<hash>/out`).
fn guest_target_dir() -> PathBuf {
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo"));
    let target = out_dir
        .ancestors()
        .find(|dir| dir.file_name().is_some_and(|name| name == "build"))
        .and_then(Path::parent)
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| out_dir.join("target"));
    target.join("wasm-functions")
}
