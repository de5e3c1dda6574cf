//! Generates the protocol crate's Rust code from `proto/` with protox (a pure-Rust protobuf compiler, so no
//! `protoc` is needed) and tonic-prost-build. Shared by `cargo xtask codegen` and the
//! freshness tests of the crates it generates for (`gitops-protocol` from `proto/`, `gitops-hubble` from
//! `proto/hubble/`).

use std::{fs, io, path::Path};

/// Why generation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("compiling the .proto files: {0}")]
    Compile(String),
    #[error("io on {path}: {source}")]
    Io { path: String, source: io::Error },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Every `.proto` under `proto_dir`, sorted so the output is deterministic.
fn proto_files(proto_dir: &Path) -> Result<Vec<std::path::PathBuf>, Error> {
    let mut files: Vec<_> = fs::read_dir(proto_dir)
        .map_err(io_err(proto_dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "proto"))
        .collect();
    files.sort();
    Ok(files)
}

/// Writes the generated modules into `out_dir` (created if missing).
pub fn generate(proto_dir: &Path, out_dir: &Path) -> Result<(), Error> {
    let files = proto_files(proto_dir)?;
    let descriptors =
        protox::compile(&files, [proto_dir]).map_err(|e| Error::Compile(e.to_string()))?;
    fs::create_dir_all(out_dir).map_err(io_err(out_dir))?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .emit_rerun_if_changed(false)
        .out_dir(out_dir)
        .compile_fds(descriptors)
        .map_err(|e| Error::Compile(e.to_string()))
}

/// Regenerates into a scratch directory and returns the names of committed files that differ or are missing.
pub fn stale_files(proto_dir: &Path, committed_dir: &Path) -> Result<Vec<String>, Error> {
    // Unique per call: two crates' freshness tests may run at once.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let scratch =
        std::env::temp_dir().join(format!("protocol-codegen-{}-{call}", std::process::id()));
    let _ = fs::remove_dir_all(&scratch);
    generate(proto_dir, &scratch)?;
    let mut stale = Vec::new();
    for entry in fs::read_dir(&scratch).map_err(io_err(&scratch))? {
        let entry = entry.map_err(io_err(&scratch))?;
        let fresh = fs::read(entry.path()).map_err(io_err(&entry.path()))?;
        let committed = fs::read(committed_dir.join(entry.file_name())).ok();
        if committed.as_deref() != Some(fresh.as_slice()) {
            stale.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    let _ = fs::remove_dir_all(&scratch);
    stale.sort();
    Ok(stale)
}
