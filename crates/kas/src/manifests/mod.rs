//! GitOps manifest delivery: for each `gitops.manifest_projects[]` entry, the files its `paths` select, at the
//! commit its `ref` names, streamed to agentk as complete snapshots whenever that commit changes.

pub mod access;
pub mod reconcile;
pub mod report;
pub mod request;
pub mod select;
pub mod service;

pub use select::{ManifestLimits, PathSelector, SelectError};
