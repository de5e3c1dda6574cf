//! The connection between agentk and kas, both ways.
//!
//! agentk always dials: gRPC over HTTP/2 (`grpc://`, `grpcs://`), or the same HTTP/2 byte stream carried in
//! binary WebSocket messages (`ws://`, `wss://`) for HTTP/1.1-only proxies and load balancers. One kas
//! listener accepts both. Every call carries the agent token as a bearer credential. kas calls services that
//! agentk serves through [`reverse`] tunnels: HTTP/2 connections nested in a gRPC stream that agentk opened.
//!
//! This crate knows nothing about GitOps or Kubernetes: kas plugs its token check in through
//! [`server::Authenticator`] and both sides plug in ordinary tonic services.

pub mod address;
pub mod backoff;
pub mod client;
pub mod io;
pub mod listener;
pub mod reverse;
pub mod server;

pub use address::{KasAddress, Scheme};

/// The WebSocket subprotocol agentk asks for and kas insists on, so a stray WebSocket client is refused.
pub const WEBSOCKET_SUBPROTOCOL: &str = "gitops-agent-grpc.v1";
/// The path kas serves WebSocket agent connections on.
pub const WEBSOCKET_PATH: &str = "/agentk";

/// What went wrong in the transport.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid kas address {address:?}: {reason}")]
    InvalidAddress { address: String, reason: String },
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("reading {path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid header {name:?}: {reason}")]
    InvalidHeader { name: String, reason: String },
    #[error("connecting to {address}: {source}")]
    Connect {
        address: String,
        source: std::io::Error,
    },
    #[error("proxy {proxy}: {reason}")]
    Proxy { proxy: String, reason: String },
    #[error("WebSocket handshake with {address}: {reason}")]
    WebSocket { address: String, reason: String },
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
}
