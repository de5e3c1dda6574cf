//! What happened to each object in a sync.

use crate::decode::ObjectOrigin;
use crate::key::ObjectKey;

/// What the apply did (or would do, in a dry run) to one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Configured,
    Unchanged,
    /// Deleted because it left the set (it was in the inventory).
    Pruned,
    /// The object is invalid, unknown, in a cycle, or the apiserver refused it.
    Failed(String),
    /// Not attempted because an object it depends on failed or was skipped.
    Skipped(String),
    /// Left the set but not pruned, because deleting it would destroy what is still in use (a Namespace
    /// holding objects, a CRD with custom resources): "kept: still in use by …". It stays in the inventory.
    Kept(String),
}

impl Outcome {
    /// The word kubectl (and GitLab's `sync_result`) uses.
    pub fn verb(&self) -> &'static str {
        match self {
            Outcome::Created => "created",
            Outcome::Configured => "configured",
            Outcome::Unchanged => "unchanged",
            Outcome::Pruned => "pruned",
            Outcome::Failed(_) => "failed",
            Outcome::Skipped(_) => "skipped",
            Outcome::Kept(_) => "kept",
        }
    }

    pub fn is_success(&self) -> bool {
        matches!(
            self,
            Outcome::Created | Outcome::Configured | Outcome::Unchanged
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectResult {
    /// `None` only for documents too broken to name an object.
    pub key: Option<ObjectKey>,
    /// Where the object is in Git; `None` for pruned objects, which are no longer there.
    pub origin: Option<ObjectOrigin>,
    pub outcome: Outcome,
    /// The outcome is what a dry run reported (client: from the object's existence; server: from the
    /// apiserver's dry-run answer); nothing was written.
    pub dry_run: bool,
    /// The API the object was applied through (from discovery), when it got that far: what a caller
    /// needs to read the object back, e.g. to wait for its readiness.
    pub resource: Option<kube::discovery::ApiResource>,
    /// kstatus' verdict on the object as this sync left it (the apply's answer, or the live object when
    /// nothing needed applying): `Current` at once for kinds without a rollout, `InProgress` for a
    /// Deployment still rolling out. `None` when nothing was applied (failures, dry runs, prunes).
    pub health: Option<Health>,
}

/// An object's readiness by kstatus' rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub status: gitops_kstatus::Status,
    pub message: String,
}

impl Health {
    /// kstatus on an object as the apiserver returned it, judged now (grace periods count from now).
    pub fn of(object: &kube::api::DynamicObject) -> Option<Self> {
        let result = gitops_kstatus::compute_at(
            &serde_json::to_value(object).ok()?,
            std::time::SystemTime::now(),
        );
        Some(Self {
            status: result.status,
            message: result.message,
        })
    }

    /// Current or Failed: nothing more will happen by waiting.
    pub fn is_settled(&self) -> bool {
        matches!(
            self.status,
            gitops_kstatus::Status::Current | gitops_kstatus::Status::Failed
        )
    }
}

impl ObjectResult {
    /// See [`ObjectKey::resource_key`]; for unnamed documents, the origin.
    pub fn resource_key(&self) -> String {
        match &self.key {
            Some(key) => key.resource_key(),
            None => self.origin_text(),
        }
    }

    fn origin_text(&self) -> String {
        self.origin
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default()
    }

    /// kubectl-like: `deployment.apps/nginx-deployment configured`, with ` (dry run)` or
    /// ` (server dry run)` as kubectl prints them.
    pub fn sync_result(&self) -> String {
        let name = match &self.key {
            Some(key) => key.kubectl_name(),
            None => self.origin_text(),
        };
        let suffix = if self.dry_run { " (dry run)" } else { "" };
        format!("{name} {}{suffix}", self.outcome.verb())
    }

    /// The failure or skip reason, if any.
    pub fn message(&self) -> Option<&str> {
        match &self.outcome {
            Outcome::Failed(message) | Outcome::Skipped(message) | Outcome::Kept(message) => {
                Some(message)
            }
            _ => None,
        }
    }
}

/// All results of one sync: decode and resolve failures first, then the objects in apply order, then
/// the pruned ones in prune order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub results: Vec<ObjectResult>,
}

impl SyncReport {
    /// The result for a `resource_key`, if the set had that object.
    pub fn get(&self, resource_key: &str) -> Option<&ObjectResult> {
        self.results
            .iter()
            .find(|r| r.resource_key() == resource_key)
    }

    pub fn count(&self, verb: &str) -> usize {
        self.results
            .iter()
            .filter(|r| r.outcome.verb() == verb)
            .count()
    }

    /// True when every object was applied (nothing failed or skipped): the condition for pruning.
    pub fn all_succeeded(&self) -> bool {
        self.results.iter().all(|r| r.outcome.is_success())
    }
}
