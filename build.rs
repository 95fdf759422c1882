//! Build script: compiles the demo environment server (`demo/server.rs`, std
//! only) into a static executable at `$OUT_DIR/demo-server`, which
//! `src/demo.rs` embeds with `include_bytes!`.
//!
//! It uses the same `rustc` cargo uses (`$RUSTC`) directly rather than a
//! second crate, so the demo binary needs no dependencies and no workspace.
//! `+crt-static` gives a static-pie executable that runs in a `FROM scratch`
//! image; stripping symbols keeps it near 1 MiB.

use std::env;
use std::path::PathBuf;
use std::process::Command;

/// How the demo server is compiled (one flag per word).
const DEMO_FLAGS: &str = "-O -C target-feature=+crt-static -C strip=symbols \
    --edition 2021 --crate-type bin --crate-name demo_server";

fn main() {
    println!("cargo:rerun-if-changed=demo/server.rs");
    println!("cargo:rerun-if-changed=build.rs");

    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let out = out_dir.join("demo-server");

    let output = Command::new(&rustc)
        .args(DEMO_FLAGS.split_whitespace())
        .arg("demo/server.rs")
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {rustc:?} to build the demo server (demo/server.rs): {e}")
        });

    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        panic!(
            "building the demo server failed ({}): {rustc:?} could not compile demo/server.rs \
             as a static executable; a static build needs the C library's static archive \
             (libc.a, Debian package libc6-dev)\n{stderr}",
            output.status
        );
    }
    // Surface compiler warnings: clippy and `-D warnings` do not see this file.
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        println!("cargo:warning=demo/server.rs: {line}");
    }
}
