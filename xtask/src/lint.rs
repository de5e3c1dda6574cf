//! `cargo xtask lint`: the gate that runs before any test, so a formatting slip, a clippy warning or stale
//! generated code fails the run in minutes instead of after the whole suite.

use std::process::Command;

use anyhow::{Context, bail};

/// `cargo fmt --check`, `cargo clippy --workspace --all-targets --locked -- -D warnings`, then
/// `codegen --check`, in that order (cheapest first); the first failure stops the gate.
pub fn run() -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let root = crate::repo_root();
    let steps: [(&str, &[&str]); 2] = [
        ("cargo fmt --all --check", &["fmt", "--all", "--check"]),
        (
            "cargo clippy --workspace --all-targets --locked -- -D warnings",
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--locked",
                "--quiet",
                "--",
                "-D",
                "warnings",
            ],
        ),
    ];
    for (name, args) in steps {
        let started = std::time::Instant::now();
        eprintln!("==> lint: {name}");
        let status = Command::new(&cargo)
            .args(args)
            .current_dir(&root)
            .status()
            .with_context(|| format!("run {name}"))?;
        if !status.success() {
            bail!("lint failed: {name} (fix it, or run `cargo fmt --all` for formatting)");
        }
        eprintln!("==> lint: {name} passed in {:.1?}", started.elapsed());
    }
    eprintln!("==> lint: codegen --check");
    crate::codegen::run(true)?;
    Ok(())
}
