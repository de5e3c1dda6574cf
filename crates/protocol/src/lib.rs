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
