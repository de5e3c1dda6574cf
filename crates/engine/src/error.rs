//! The crate's one error type: whole-sync failures and the per-object reasons carried into results.

use crate::decode::ObjectOrigin;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A document that is not a Kubernetes object; the rest of the file is still used.
    #[error("{origin}{}: {reason}", line.map(|l| format!(", line {l}")).unwrap_or_default())]
    InvalidDocument {
        origin: ObjectOrigin,
        line: Option<u64>,
        reason: String,
    },
    #[error(
        "{origin}: unknown kind {kind} in {api_version} (not served by the cluster and no CustomResourceDefinition for it in this set)"
    )]
    UnknownKind {
        origin: ObjectOrigin,
        api_version: String,
        kind: String,
    },
    #[error("{origin}: the same object is also defined in {first}")]
    DuplicateObject {
        origin: ObjectOrigin,
        first: ObjectOrigin,
    },
    #[error("invalid config.kubernetes.io/depends-on entry {entry:?}: {reason}")]
    InvalidDependsOn { entry: String, reason: String },
    #[error("dependency cycle: {0}")]
    DependencyCycle(String),
    #[error("discovery of the cluster's API resources failed: {0}")]
    Discovery(#[source] kube::Error),
    #[error("{0}")]
    Kube(#[source] kube::Error),
    #[error("reading or writing the inventory failed: {0}")]
    Inventory(#[source] kube::Error),
    /// A set with no objects at all while the inventory holds some: applying it would prune them all.
    #[error(
        "the manifest set is empty (no file yields an object) but inventory {inventory} holds {objects} object(s): refusing to sync, which would prune them all; if the project is meant to be emptied, set `allow_empty: true` on the manifest project"
    )]
    EmptySet { inventory: String, objects: usize },
    #[error("CustomResourceDefinition {name} did not become established: {reason}")]
    CrdNotEstablished { name: String, reason: String },
}

impl EngineError {
    /// The object an error is about, for errors about one object.
    pub fn origin(&self) -> Option<&ObjectOrigin> {
        match self {
            EngineError::InvalidDocument { origin, .. }
            | EngineError::UnknownKind { origin, .. }
            | EngineError::DuplicateObject { origin, .. } => Some(origin),
            _ => None,
        }
    }
}

/// The message an API error carries for a user (the apiserver's own words when it gave some).
pub(crate) fn kube_error_message(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) if !status.message.is_empty() => status.message.clone(),
        other => other.to_string(),
    }
}
