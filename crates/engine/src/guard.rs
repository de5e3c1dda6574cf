//! The prune decisions, as pure functions over what the sync saw: whether an empty set may prune a
//! non-empty inventory, what left the set, and whether a Namespace or CRD that left it is still in use.
//! The sync (`apply.rs`) and the prune (`prune.rs`) gather the inputs; these decide.

use std::collections::{BTreeSet, HashSet};

use crate::error::EngineError;
use crate::key::ObjectKey;
use crate::result::SyncReport;

/// Objects named in a "kept: still in use by …" reason before the rest are only counted.
const NAMED_BLOCKERS: usize = 1;

/// `Err` when a set with no objects at all (no object decoded and no document failed: a glob that
/// matched nothing, a repository reduced to a README, every file emptied or commented out) would prune
/// a non-empty inventory and the project does not set `allow_empty`. A set in which documents failed
/// is not empty: failures already stop any prune.
pub(crate) fn refuse_empty_set(
    documents: usize,
    previous: &BTreeSet<ObjectKey>,
    inventory: &str,
    allow_empty: bool,
) -> Result<(), EngineError> {
    if documents == 0 && !previous.is_empty() && !allow_empty {
        return Err(EngineError::EmptySet {
            inventory: inventory.to_string(),
            objects: previous.len(),
        });
    }
    Ok(())
}

/// What the inventory is to hold after the sync's applies, before any prune.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct InventoryPlan {
    /// Every object the set names (applied or not).
    pub in_set: BTreeSet<ObjectKey>,
    /// Objects this inventory owns whatever the prune does: those applied, and those of the set that
    /// were ours before (a failed one may still be in the cluster).
    pub owned: BTreeSet<ObjectKey>,
    /// In the inventory but no longer in the set: to prune, or (when pruning is off or not safe) to keep
    /// recording.
    pub gone: Vec<ObjectKey>,
    /// Pruning is safe: every object of the set was applied (nothing failed or was skipped).
    pub may_prune: bool,
}

/// Splits the previous inventory and the sync's results into what stays owned and what is gone.
pub(crate) fn plan_inventory(previous: &BTreeSet<ObjectKey>, report: &SyncReport) -> InventoryPlan {
    let in_set: BTreeSet<ObjectKey> = report
        .results
        .iter()
        .filter_map(|r| r.key.clone())
        .collect();
    let mut owned: BTreeSet<ObjectKey> = report
        .results
        .iter()
        .filter(|r| r.outcome.is_success())
        .filter_map(|r| r.key.clone())
        .collect();
    owned.extend(in_set.iter().filter(|k| previous.contains(*k)).cloned());
    let gone = previous.difference(&in_set).cloned().collect();
    InventoryPlan {
        in_set,
        owned,
        gone,
        may_prune: report.all_succeeded(),
    }
}

pub(crate) fn is_namespace(key: &ObjectKey) -> bool {
    key.group.is_empty() && key.kind == "Namespace"
}

pub(crate) fn is_crd(key: &ObjectKey) -> bool {
    key.group == crate::resolve::CRD_GROUP && key.kind == crate::resolve::CRD_KIND
}

/// The objects of the set that live in namespace `namespace`: deleting it would delete them too.
pub(crate) fn set_members_in<'a>(
    namespace: &str,
    in_set: &'a BTreeSet<ObjectKey>,
) -> Vec<&'a ObjectKey> {
    in_set
        .iter()
        .filter(|k| k.namespace.as_deref() == Some(namespace))
        .collect()
}

/// One object found in the cluster where a prune would destroy it (in a Namespace, or of a CRD's kind).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LiveObject {
    pub key: ObjectKey,
    /// Being deleted already (`deletionTimestamp`): going anyway.
    pub terminating: bool,
    /// Has `ownerReferences`: its owner decides its fate (a ReplicaSet of a Deployment, a Pod of a Job).
    pub owned_by_object: bool,
}

/// Objects every namespace has or gets by itself, which no user put there: they do not keep a
/// Namespace in use.
fn incidental(key: &ObjectKey) -> bool {
    matches!(
        (key.group.as_str(), key.kind.as_str(), key.name.as_str()),
        ("", "ServiceAccount", "default")
            | ("", "ConfigMap", "kube-root-ca.crt")
            | ("", "Event", _)
            | ("events.k8s.io", "Event", _)
            // Written by the endpoints controller for each Service, without an owner reference.
            | ("", "Endpoints", _)
    )
}

/// The live objects that keep a Namespace or CRD in use: not already terminating, not deleted by this
/// prune (`going`: what it deleted, or in a dry run would delete), not made by an owner object or by the
/// cluster itself.
pub(crate) fn blockers<'a>(
    live: &'a [LiveObject],
    going: &HashSet<ObjectKey>,
) -> Vec<&'a ObjectKey> {
    live.iter()
        .filter(|o| !o.terminating && !o.owned_by_object && !going.contains(&o.key))
        .filter(|o| !incidental(&o.key))
        .map(|o| &o.key)
        .collect()
}

/// "kept: still in use by apps/Deployment/ns/x and 3 more", or `None` when nothing uses it.
pub(crate) fn kept_reason(users: &[&ObjectKey]) -> Option<String> {
    let (named, rest) = users.split_at(users.len().min(NAMED_BLOCKERS));
    if named.is_empty() {
        return None;
    }
    let names: Vec<String> = named.iter().map(|k| k.resource_key()).collect();
    let more = if rest.is_empty() {
        String::new()
    } else {
        format!(" and {} more", rest.len())
    };
    Some(format!("kept: still in use by {}{more}", names.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::result::{ObjectResult, Outcome};

    fn key(group: &str, kind: &str, namespace: Option<&str>, name: &str) -> ObjectKey {
        ObjectKey {
            group: group.into(),
            kind: kind.into(),
            namespace: namespace.map(Into::into),
            name: name.into(),
        }
    }

    fn result(key: ObjectKey, outcome: Outcome) -> ObjectResult {
        ObjectResult {
            key: Some(key),
            origin: None,
            outcome,
            dry_run: false,
            resource: None,
            health: None,
        }
    }

    #[test]
    fn an_empty_set_never_prunes_a_non_empty_inventory_unless_allowed() {
        let previous: BTreeSet<ObjectKey> = [key("", "ConfigMap", Some("ns"), "a")].into();
        let e = refuse_empty_set(0, &previous, "agents/inv", false).unwrap_err();
        let message = e.to_string();
        assert!(message.contains("empty"), "{message}");
        assert!(message.contains("agents/inv holds 1 object"), "{message}");
        assert!(message.contains("allow_empty: true"), "{message}");
        assert!(refuse_empty_set(0, &previous, "agents/inv", true).is_ok());
        // Not empty: one document (even a failed one) is a set.
        assert!(refuse_empty_set(1, &previous, "agents/inv", false).is_ok());
        // Nothing to lose.
        assert!(refuse_empty_set(0, &BTreeSet::new(), "agents/inv", false).is_ok());
    }

    #[test]
    fn what_left_the_set_is_gone_and_failures_forbid_pruning() {
        let a = key("", "ConfigMap", Some("ns"), "a");
        let b = key("", "ConfigMap", Some("ns"), "b");
        let c = key("", "ConfigMap", Some("ns"), "c");
        let previous: BTreeSet<ObjectKey> = [a.clone(), b.clone()].into();
        let report = SyncReport {
            results: vec![
                result(a.clone(), Outcome::Unchanged),
                result(c.clone(), Outcome::Created),
            ],
        };
        let plan = plan_inventory(&previous, &report);
        assert_eq!(plan.gone, std::slice::from_ref(&b));
        assert_eq!(plan.owned, [a.clone(), c.clone()].into());
        assert!(plan.may_prune);

        // A failed object of the set stays owned if it was ours, and nothing may be pruned.
        let report = SyncReport {
            results: vec![
                result(a.clone(), Outcome::Failed("boom".into())),
                result(c.clone(), Outcome::Failed("boom".into())),
            ],
        };
        let plan = plan_inventory(&previous, &report);
        assert_eq!(plan.owned, [a.clone()].into());
        assert_eq!(plan.gone, [b]);
        assert!(!plan.may_prune);

        // Every document failed to decode: nothing names an object, yet nothing may be pruned.
        let undecodable = SyncReport {
            results: vec![ObjectResult {
                key: None,
                ..result(a, Outcome::Failed("not YAML".into()))
            }],
        };
        let plan = plan_inventory(&previous, &undecodable);
        assert_eq!(plan.gone.len(), 2);
        assert!(!plan.may_prune);
    }

    #[test]
    fn a_namespace_the_set_still_uses_is_kept() {
        let in_set: BTreeSet<ObjectKey> = [
            key("apps", "Deployment", Some("team"), "web"),
            key("", "ConfigMap", Some("team"), "settings"),
            key("", "ConfigMap", Some("other"), "x"),
            key("", "Namespace", None, "team-2"),
        ]
        .into();
        let users = set_members_in("team", &in_set);
        assert_eq!(
            kept_reason(&users).unwrap(),
            "kept: still in use by /ConfigMap/team/settings and 1 more"
        );
        assert!(set_members_in("gone", &in_set).is_empty());
        assert_eq!(kept_reason(&[]), None);
    }

    #[test]
    fn only_objects_left_behind_block_a_prune() {
        let live = |key, terminating, owned_by_object| LiveObject {
            key,
            terminating,
            owned_by_object,
        };
        let ours_pruned = key("", "ConfigMap", Some("ns"), "ours");
        let foreign = key("", "Secret", Some("ns"), "someone-elses");
        let objects = vec![
            live(ours_pruned.clone(), false, false),
            live(
                key("apps", "Deployment", Some("ns"), "deleting"),
                true,
                false,
            ),
            live(
                key("apps", "ReplicaSet", Some("ns"), "web-1234"),
                false,
                true,
            ),
            live(
                key("", "ServiceAccount", Some("ns"), "default"),
                false,
                false,
            ),
            live(
                key("", "ConfigMap", Some("ns"), "kube-root-ca.crt"),
                false,
                false,
            ),
            live(key("", "Event", Some("ns"), "web.1"), false, false),
            live(key("", "Endpoints", Some("ns"), "web"), false, false),
            live(foreign.clone(), false, false),
        ];
        let going: HashSet<ObjectKey> = [ours_pruned].into();
        assert_eq!(blockers(&objects, &going), [&foreign]);
        assert!(blockers(&objects[..7], &going).is_empty());
        // A custom resource outside the set blocks its CRD's prune; one pruned with it does not.
        let widget = key("example.com", "Widget", Some("ns"), "w");
        let crs = vec![live(widget.clone(), false, false)];
        assert_eq!(blockers(&crs, &HashSet::new()), [&widget]);
        assert!(blockers(&crs, &[widget].into()).is_empty());
    }
}
