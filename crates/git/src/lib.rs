//! Git access for kas: resolve refs on a Git server over smart HTTP, keep a local cache of the needed
//! commits, and read files from them.
//!
//! Network access uses gitoxide's blocking HTTP transport (reqwest + rustls with the process's aws-lc-rs
//! provider) on tokio's blocking thread pool. Each project has exactly one cached bare repository under the
//! cache directory, shared by all callers; fetches of one project are serialized so concurrent callers
//! wait for a running fetch instead of starting another one.
//!
//! Credentials are given to gitoxide through a credentials callback, never through the URL, so they can't
//! end up in error messages or logs.

mod cache;
mod error;
mod read;
mod remote;
mod server;

pub use cache::{GitObserver, GitOperation, RepoCache};
pub use error::Error;
pub use server::{GitRef, GitServerConfig, Limits, check_ca_certificates};
