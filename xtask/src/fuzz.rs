//! `cargo xtask fuzz --seconds N [--target NAME]`: runs each cargo-fuzz target of `fuzz/` for N seconds,
//! starting from the seeds committed in `fuzz/seeds/<target>` plus the corpus earlier runs grew (kept under the
//! target directory), and prints per target how many inputs it ran and whether it found anything. A crash,
//! panic, timeout or out-of-memory input fails the command; libFuzzer leaves it in `fuzz/artifacts/<target>/`.
//!
//! cargo-fuzz passes nightly-only `-Z` flags to rustc; the stable toolchain accepts them with
//! `RUSTC_BOOTSTRAP=1`, which is set for these builds only. The targets are built without a sanitizer: the
//! project's code is safe Rust, and what the fuzzers look for are panics, hangs and unbounded memory.

use std::process::Command;

use anyhow::{Context, Result, bail};

pub const TARGETS: [&str; 4] = [
    "config_yaml",
    "manifest_decode",
    "glob_select",
    "webhook_payload",
];

pub fn run(seconds: u64, only: Option<&str>) -> Result<()> {
    ensure_cargo_fuzz()?;
    let root = crate::repo_root();
    let target_dir = crate::target_dir().join("fuzz");
    let targets: Vec<&str> = match only {
        Some(name) if TARGETS.contains(&name) => vec![name],
        Some(name) => bail!(
            "no fuzz target {name:?}; the targets are {}",
            TARGETS.join(", ")
        ),
        None => TARGETS.to_vec(),
    };
    let mut summary = Vec::new();
    let mut failed = Vec::new();
    for target in targets {
        let corpus = target_dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        let seeds = root.join("fuzz/seeds").join(target);
        eprintln!("==> fuzz {target}: building");
        let built = Command::new("cargo")
            .args(["fuzz", "build", "--sanitizer", "none", "--debug-assertions"])
            .arg("--target-dir")
            .arg(&target_dir)
            .arg(target)
            .env("RUSTC_BOOTSTRAP", "1")
            .current_dir(&root)
            .status()
            .with_context(|| format!("run cargo fuzz build for {target}"))?;
        if !built.success() {
            bail!("could not build the fuzz target {target} (see the compiler output above)");
        }
        eprintln!("==> fuzz {target} for {seconds} s");
        let output = Command::new("cargo")
            .args(["fuzz", "run", "--sanitizer", "none", "--debug-assertions"])
            .arg("--target-dir")
            .arg(&target_dir)
            .arg(target)
            .arg(&corpus)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .args(["-rss_limit_mb=2048", "-timeout=10", "-print_final_stats=1"])
            .env("RUSTC_BOOTSTRAP", "1")
            .current_dir(&root)
            .output()
            .with_context(|| format!("run cargo fuzz for {target}"))?;
        let log = String::from_utf8_lossy(&output.stderr);
        let runs = final_stat(&log, "stat::number_of_executed_units:").unwrap_or(0);
        let corpus_size = std::fs::read_dir(&corpus).map_or(0, |d| d.count());
        let line = format!(
            "{target}: {runs} inputs in {seconds} s ({} per second), corpus {corpus_size} inputs, {}",
            runs / seconds.max(1),
            if output.status.success() {
                "nothing found"
            } else {
                "FOUND A FAILURE"
            }
        );
        eprintln!("    {line}");
        if !output.status.success() {
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
            failed.push(target);
        }
        summary.push(line);
    }
    println!("fuzzing summary:");
    for line in &summary {
        println!("  {line}");
    }
    if !failed.is_empty() {
        bail!(
            "fuzzing found failures in {}; the inputs are in {}",
            failed.join(", "),
            root.join("fuzz/artifacts").display()
        );
    }
    Ok(())
}

/// A number from libFuzzer's `-print_final_stats` block.
fn final_stat(log: &str, name: &str) -> Option<u64> {
    log.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().parse().ok())
}

fn ensure_cargo_fuzz() -> Result<()> {
    let installed = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if installed {
        return Ok(());
    }
    eprintln!("==> installing cargo-fuzz from crates.io (first time only)");
    let status = Command::new("cargo")
        .args(["install", "cargo-fuzz", "--locked"])
        .status()
        .context("run cargo install cargo-fuzz")?;
    if !status.success() {
        bail!("could not install cargo-fuzz (`cargo install cargo-fuzz --locked` failed)");
    }
    Ok(())
}
