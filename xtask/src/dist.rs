//! Release artefacts. `cargo xtask dist`: release builds of kas and agentk copied to `target/dist/` as
//! `<binary>-<version>-<target>`, with `SHA256SUMS` in `sha256sum -c` format. `cargo xtask image`: the
//! container images from `docker/Dockerfile` (`ghcr.io/gitops-rs/{kas,agentk}:<version>`), where a Docker
//! engine answers; elsewhere it fails saying so, before building anything.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail, ensure};
use sha2::{Digest, Sha256};

/// The binaries that make a release, each with its image.
pub const BINARIES: [&str; 2] = ["kas", "agentk"];
/// Where the images are published; the charts and `agentk generate` default to these names.
pub const IMAGE_PREFIX: &str = "ghcr.io/gitops-rs";
/// The workspace version: image tag, charts' appVersion, file names.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}

/// The target triple release builds are for (the host's: `rustc -vV`).
fn host_triple() -> anyhow::Result<String> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let output = Command::new(&rustc)
        .arg("-vV")
        .output()
        .with_context(|| format!("running {rustc} -vV"))?;
    let text = String::from_utf8(output.stdout)?;
    text.lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .context("no `host:` line in rustc -vV")
}

/// `cargo xtask dist [--target <triple>]`: for the host unless a target (installed with `rustup target
/// add`) is named, e.g. `x86_64-unknown-linux-musl` for static binaries.
pub fn dist(target: Option<&str>) -> anyhow::Result<()> {
    let root = crate::repo_root();
    let started = std::time::Instant::now();
    let mut args = vec![
        "build",
        "--release",
        "--locked",
        "-p",
        "kas",
        "-p",
        "agentk",
    ];
    if let Some(target) = target {
        args.extend(["--target", target]);
    }
    eprintln!("==> dist: cargo {}", args.join(" "));
    let status = Command::new(cargo())
        .args(&args)
        .current_dir(&root)
        .status()
        .context("running cargo build --release")?;
    ensure!(status.success(), "cargo build --release failed");
    let (triple, release) = match target {
        Some(target) => (
            target.to_owned(),
            crate::target_dir().join(target).join("release"),
        ),
        None => (host_triple()?, crate::target_dir().join("release")),
    };
    let dist = crate::target_dir().join("dist");
    std::fs::create_dir_all(&dist).with_context(|| format!("creating {}", dist.display()))?;
    let mut files = Vec::new();
    for binary in BINARIES {
        let name = format!("{binary}-{VERSION}-{triple}");
        let to = dist.join(&name);
        std::fs::copy(release.join(binary), &to)
            .with_context(|| format!("copying {binary} to {}", to.display()))?;
        strip_debug_info(&to)?;
        files.push(to);
    }
    let sums = write_checksums(&dist, &files)?;
    eprintln!(
        "==> dist: {} in {:.0?}\n{}",
        dist.display(),
        started.elapsed(),
        std::fs::read_to_string(&sums)?
    );
    Ok(())
}

/// Drops the line tables the release profile keeps (`debug = "line-tables-only"`, for local backtraces):
/// about 80 % of the file. Symbols stay, so a panic's backtrace still names functions.
fn strip_debug_info(binary: &Path) -> anyhow::Result<()> {
    let before = std::fs::metadata(binary)?.len();
    let output = Command::new("strip")
        .arg("--strip-debug")
        .arg(binary)
        .output()
        .context("running strip (binutils) on the release binaries")?;
    ensure!(
        output.status.success(),
        "strip --strip-debug {} failed (for another architecture, use its binutils' strip): {}",
        binary.display(),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let after = std::fs::metadata(binary)?.len();
    eprintln!(
        "==> dist: {}: {} MiB ({} MiB with line tables)",
        binary.display(),
        after >> 20,
        before >> 20
    );
    Ok(())
}

/// Writes `SHA256SUMS` into `dir` for `files` (which are in `dir`): `<hex>  <name>` lines, what
/// `sha256sum -c SHA256SUMS` checks.
pub fn write_checksums(dir: &Path, files: &[PathBuf]) -> anyhow::Result<PathBuf> {
    let mut out = String::new();
    for file in files {
        let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("file name of {}", file.display()))?;
        let _ = writeln!(out, "{}  {name}", hex::encode(Sha256::digest(&bytes)));
    }
    let path = dir.join("SHA256SUMS");
    std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// `cargo xtask image`: one `docker build --target <binary>` per binary.
pub fn image(engine: &str, prefix: &str, push: bool) -> anyhow::Result<()> {
    require_engine(engine)?;
    let root = crate::repo_root();
    let revision = git_revision(&root);
    for binary in BINARIES {
        let tag = format!("{prefix}/{binary}:{VERSION}");
        eprintln!("==> image: {tag}");
        let status = Command::new(engine)
            .args(["build", "--file", "docker/Dockerfile", "--target", binary])
            .args(["--tag", &tag])
            .args(["--build-arg", &format!("VERSION={VERSION}")])
            .args(["--build-arg", &format!("REVISION={revision}")])
            .arg(".")
            .current_dir(&root)
            .status()
            .with_context(|| format!("running {engine} build"))?;
        ensure!(status.success(), "{engine} build of {tag} failed");
        if push {
            let status = Command::new(engine)
                .args(["push", &tag])
                .status()
                .with_context(|| format!("running {engine} push"))?;
            ensure!(status.success(), "{engine} push {tag} failed");
        }
    }
    Ok(())
}

/// Fails with what to do instead when no engine answers (`<engine> info`): here, for one, there is a
/// Docker client but no daemon.
fn require_engine(engine: &str) -> anyhow::Result<()> {
    let output = match Command::new(engine).arg("info").output() {
        Ok(output) => output,
        Err(err) => bail!(
            "cannot build images: `{engine}` is not installed ({err}). Install Docker (or pass --engine podman), \
             or use `cargo xtask dist` for the release binaries"
        ),
    };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let reason = stderr
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no reason given");
        bail!(
            "cannot build images: no container engine answers `{engine} info` ({}). Start the engine, point \
             DOCKER_HOST at one, or use `cargo xtask dist` for the release binaries",
            reason.trim()
        );
    }
    Ok(())
}

/// The checked-out commit, for the images' `org.opencontainers.image.revision` label.
fn git_revision(root: &Path) -> String {
    Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(root)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(
            || "unknown".to_owned(),
            |o| String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        )
}

#[cfg(test)]
mod tests;
