//! A client of Hubble's Observer gRPC API: the flow stream Cilium's agents and hubble-relay serve.
//!
//! The messages are generated from `proto/hubble/`, a subset of Cilium's public API definition written here
//! with Cilium's packages and field numbers (so the wire format is Hubble's); `tests/fresh.rs` fails when the
//! committed code no longer matches it. [`testing::ReplayServer`] serves the same API from flows a test
//! hands it (a stand-in for Cilium's datapath in tests and benchmarks).

#[allow(clippy::all, clippy::pedantic, missing_docs)]
#[rustfmt::skip]
pub mod flow {
    include!("generated/flow.rs");
}

#[allow(clippy::all, clippy::pedantic, missing_docs)]
#[rustfmt::skip]
pub mod observer {
    include!("generated/observer.rs");
}

/// The well-known types the messages use (`Timestamp`).
pub use prost_types;

mod client;
pub mod testing;

pub use client::{RelayConfig, RelayTls, channel, dropped_flows_request};

/// Cilium's monitor event types (`CiliumEventType.type`).
pub mod event_type {
    /// A packet the datapath dropped (`drop_reason_desc` says why).
    pub const DROP: i32 = 1;
    /// A policy decision: the first packet of a connection, allowed or denied (or audited).
    pub const POLICY_VERDICT: i32 = 5;
}

/// Why talking to the relay failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("hubble relay address {address:?}: {reason}")]
    Address { address: String, reason: String },
    #[error("TLS to the hubble relay: {0}")]
    Tls(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}
