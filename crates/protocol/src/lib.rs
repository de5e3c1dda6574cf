//! The messages and services between kas and agentk, generated from `proto/` by `cargo xtask codegen`.
//! The generated code is committed; `tests/fresh.rs` fails when it no longer matches `proto/`.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
#[rustfmt::skip]
mod generated {
    include!("generated/gitops.agent.v1.rs");
}

pub use generated::*;

/// The header agentk sends its version in on every call, so kas knows it before any message arrives.
pub const AGENT_VERSION_HEADER: &str = "x-agentk-version";

/// The largest gRPC message either side decodes (tonic's default is 4 MiB). Manifest files, sync reports of
/// 20,000 objects and reverse-tunnel frames all fit; kas refuses at start a `manifests.max_file_size` that
/// would not, so a file is never sent only to be dropped by the receiver.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
