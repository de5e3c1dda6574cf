//! Apply order: kinds in cli-utils' order, then `config.kubernetes.io/depends-on` and implicit edges.
//!
//! The order is a topological sort whose ready set is taken by (kind rank, kind, namespace, name), so the
//! result depends only on the objects, never on file order.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use kube::api::DynamicObject;

use crate::error::EngineError;
use crate::key::ObjectKey;

pub const DEPENDS_ON_ANNOTATION: &str = "config.kubernetes.io/depends-on";

/// sigs.k8s.io/cli-utils `pkg/ordering` (kustomize's legacy order), with Namespace and
/// CustomResourceDefinition moved to the front because everything else may need them.
const FIRST: &[&str] = &[
    "Namespace",
    "CustomResourceDefinition",
    "ResourceQuota",
    "StorageClass",
    "ServiceAccount",
    "PodSecurityPolicy",
    "Role",
    "ClusterRole",
    "RoleBinding",
    "ClusterRoleBinding",
    "ConfigMap",
    "Secret",
    "Endpoints",
    "Service",
    "LimitRange",
    "PriorityClass",
    "PersistentVolume",
    "PersistentVolumeClaim",
    "Deployment",
    "StatefulSet",
    "CronJob",
    "PodDisruptionBudget",
];
/// Webhooks last, so they cannot intercept the objects of the same set.
const LAST: &[&str] = &[
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
];

/// Position in the kind order: the kinds listed first by position, unknown kinds after them, webhook
/// configurations at the end.
pub fn kind_rank(kind: &str) -> usize {
    if let Some(i) = FIRST.iter().position(|k| *k == kind) {
        i
    } else if let Some(i) = LAST.iter().position(|k| *k == kind) {
        FIRST.len() + 1 + i
    } else {
        FIRST.len()
    }
}

/// Parses one depends-on annotation value: comma-separated `group/namespaces/ns/kind/name` (namespaced)
/// or `group/kind/name` (cluster-scoped); the core group is empty.
pub fn parse_depends_on(value: &str) -> Result<Vec<ObjectKey>, EngineError> {
    let mut keys = Vec::new();
    for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let invalid = |reason: &str| EngineError::InvalidDependsOn {
            entry: entry.to_string(),
            reason: reason.to_string(),
        };
        let parts: Vec<&str> = entry.split('/').collect();
        let key = match parts.as_slice() {
            [group, "namespaces", namespace, kind, name] => ObjectKey {
                group: group.to_string(),
                kind: kind.to_string(),
                namespace: Some(namespace.to_string()),
                name: name.to_string(),
            },
            [group, kind, name] => ObjectKey {
                group: group.to_string(),
                kind: kind.to_string(),
                namespace: None,
                name: name.to_string(),
            },
            _ => {
                return Err(invalid(
                    "expected group/namespaces/<namespace>/<kind>/<name> or group/<kind>/<name>",
                ));
            }
        };
        if key.kind.is_empty() || key.name.is_empty() || key.namespace.as_deref() == Some("") {
            return Err(invalid("kind, name and namespace must not be empty"));
        }
        keys.push(key);
    }
    Ok(keys)
}

/// The outcome of ordering `items` (indices refer to the input slice).
#[derive(Debug, Default)]
pub struct OrderPlan {
    /// Objects to apply, in order. Excludes the ones in `failed`.
    pub sequence: Vec<usize>,
    /// For each object, the objects of the set it waits for (explicit and implicit).
    pub dependencies: Vec<Vec<usize>>,
    /// For each object, its `depends-on` targets in the set: as in cli-utils, these must also be ready
    /// (kstatus Current), not merely applied, before the object is applied.
    pub awaits: Vec<Vec<usize>>,
    /// For each object, its `depends-on` targets outside the set: they must exist in the cluster and be
    /// ready.
    pub external: Vec<Vec<ObjectKey>>,
    /// Objects that cannot be applied: invalid depends-on annotation, or part of a dependency cycle.
    pub failed: Vec<(usize, EngineError)>,
}

/// Orders objects (with their final keys). Implicit edges: an object waits for its Namespace and a
/// custom resource for its CustomResourceDefinition when those are in the set. A depends-on target
/// outside the set adds no edge; it is listed in [`OrderPlan::external`].
pub fn order(items: &[(ObjectKey, &DynamicObject)]) -> OrderPlan {
    let index_of: HashMap<&ObjectKey, usize> =
        items.iter().enumerate().map(|(i, (k, _))| (k, i)).collect();
    // (group, kind) defined by a CRD in the set → the CRD's index.
    let crd_for: HashMap<(String, String), usize> = items
        .iter()
        .enumerate()
        .filter(|(_, (k, _))| {
            k.group == "apiextensions.k8s.io" && k.kind == "CustomResourceDefinition"
        })
        .filter_map(|(i, (_, o))| {
            let spec = o.data.get("spec")?;
            let group = spec.get("group")?.as_str()?.to_string();
            let kind = spec.get("names")?.get("kind")?.as_str()?.to_string();
            Some(((group, kind), i))
        })
        .collect();

    let mut plan = OrderPlan {
        dependencies: vec![Vec::new(); items.len()],
        awaits: vec![Vec::new(); items.len()],
        external: vec![Vec::new(); items.len()],
        ..Default::default()
    };
    let mut failed = vec![false; items.len()];
    for (i, (key, object)) in items.iter().enumerate() {
        let deps = &mut plan.dependencies[i];
        if let Some(ns) = &key.namespace {
            let ns_key = ObjectKey {
                group: String::new(),
                kind: "Namespace".into(),
                namespace: None,
                name: ns.clone(),
            };
            deps.extend(index_of.get(&ns_key));
        }
        deps.extend(crd_for.get(&(key.group.clone(), key.kind.clone())));
        let annotation = object
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(DEPENDS_ON_ANNOTATION));
        if let Some(value) = annotation {
            match parse_depends_on(value) {
                Ok(targets) => {
                    for target in targets {
                        match index_of.get(&target) {
                            Some(&d) => {
                                deps.push(d);
                                plan.awaits[i].push(d);
                            }
                            None => plan.external[i].push(target),
                        }
                    }
                }
                Err(e) => {
                    failed[i] = true;
                    plan.failed.push((i, e));
                }
            }
        }
        deps.sort_unstable();
        deps.dedup();
    }

    // Kahn's algorithm; what it cannot reach is in or behind a cycle.
    let mut sequence = topological(items, &plan.dependencies, &vec![false; items.len()]);
    if sequence.len() < items.len() {
        let mut placed = vec![false; items.len()];
        sequence.iter().for_each(|&i| placed[i] = true);
        let remaining: Vec<usize> = (0..items.len()).filter(|&i| !placed[i]).collect();
        let mut in_cycle = vec![false; items.len()];
        for &i in &remaining {
            if let Some(cycle) = find_cycle_through(i, &plan.dependencies, &placed) {
                in_cycle[i] = true;
                let path: Vec<String> = cycle.iter().map(|&j| items[j].0.resource_key()).collect();
                if !failed[i] {
                    failed[i] = true;
                    plan.failed
                        .push((i, EngineError::DependencyCycle(path.join(" -> "))));
                }
            }
        }
        // Objects merely behind a cycle are sequenced as if the cycle's objects were done; they are
        // then skipped at apply time because those failed.
        sequence = topological(items, &plan.dependencies, &in_cycle);
    }
    plan.sequence = sequence.into_iter().filter(|&i| !failed[i]).collect();
    plan.failed.sort_by_key(|(i, _)| *i);
    plan
}

/// Topological order of the objects not `excluded`, treating edges to excluded objects as satisfied.
fn topological(
    items: &[(ObjectKey, &DynamicObject)],
    deps: &[Vec<usize>],
    excluded: &[bool],
) -> Vec<usize> {
    let mut waiting_on = vec![0usize; items.len()];
    let mut dependents = vec![Vec::new(); items.len()];
    for (i, ds) in deps.iter().enumerate() {
        if excluded[i] {
            continue;
        }
        for &d in ds.iter().filter(|&&d| !excluded[d]) {
            waiting_on[i] += 1;
            dependents[d].push(i);
        }
    }
    let priority = |i: usize| {
        let key = &items[i].0;
        Reverse((
            kind_rank(&key.kind),
            key.kind.clone(),
            key.namespace.clone(),
            key.name.clone(),
            i,
        ))
    };
    let mut ready: BinaryHeap<_> = (0..items.len())
        .filter(|&i| !excluded[i] && waiting_on[i] == 0)
        .map(priority)
        .collect();
    let mut sequence = Vec::with_capacity(items.len());
    while let Some(Reverse((.., i))) = ready.pop() {
        sequence.push(i);
        for &j in &dependents[i] {
            waiting_on[j] -= 1;
            if waiting_on[j] == 0 {
                ready.push(priority(j));
            }
        }
    }
    sequence
}

/// A path `start -> ... -> start` along dependency edges among unplaced objects, if there is one.
fn find_cycle_through(start: usize, deps: &[Vec<usize>], placed: &[bool]) -> Option<Vec<usize>> {
    let mut visited = vec![false; deps.len()];
    let mut stack = vec![(start, vec![start])];
    while let Some((node, path)) = stack.pop() {
        for &next in deps[node].iter().filter(|&&n| !placed[n]) {
            if next == start {
                let mut cycle = path.clone();
                cycle.push(start);
                return Some(cycle);
            }
            if !visited[next] {
                visited[next] = true;
                let mut p = path.clone();
                p.push(next);
                stack.push((next, p));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(
        api_version: &str,
        kind: &str,
        ns: Option<&str>,
        name: &str,
        depends_on: Option<&str>,
    ) -> (ObjectKey, DynamicObject) {
        let mut value =
            json!({"apiVersion": api_version, "kind": kind, "metadata": {"name": name}});
        if let Some(d) = depends_on {
            value["metadata"]["annotations"] = json!({ DEPENDS_ON_ANNOTATION: d });
        }
        let object: DynamicObject = serde_json::from_value(value).unwrap();
        let group = crate::key::split_api_version(api_version).0.to_string();
        let key = ObjectKey {
            group,
            kind: kind.into(),
            namespace: ns.map(Into::into),
            name: name.into(),
        };
        (key, object)
    }

    fn names(items: &[(ObjectKey, DynamicObject)]) -> Vec<String> {
        let refs: Vec<(ObjectKey, &DynamicObject)> =
            items.iter().map(|(k, o)| (k.clone(), o)).collect();
        order(&refs)
            .sequence
            .iter()
            .map(|&i| items[i].0.name.clone())
            .collect()
    }

    #[test]
    fn kinds_in_cli_utils_order_whatever_the_input_order() {
        let items = vec![
            object(
                "admissionregistration.k8s.io/v1",
                "ValidatingWebhookConfiguration",
                None,
                "hook",
                None,
            ),
            object("apps/v1", "Deployment", Some("ns"), "deploy", None),
            object("example.com/v1", "Widget", Some("ns"), "widget", None),
            object("v1", "ConfigMap", Some("ns"), "cm", None),
            object("v1", "Service", Some("ns"), "svc", None),
            object(
                "apiextensions.k8s.io/v1",
                "CustomResourceDefinition",
                None,
                "crd",
                None,
            ),
            object("v1", "Namespace", None, "ns", None),
            object("v1", "ServiceAccount", Some("ns"), "sa", None),
        ];
        assert_eq!(
            names(&items),
            ["ns", "crd", "sa", "cm", "svc", "deploy", "widget", "hook"]
        );
    }

    #[test]
    fn depends_on_overrides_kind_order_and_implicit_edges_hold() {
        let items = vec![
            // The ConfigMap waits for the Deployment although ConfigMaps normally go first.
            object(
                "v1",
                "ConfigMap",
                Some("late"),
                "cm",
                Some("apps/namespaces/late/Deployment/deploy"),
            ),
            object("apps/v1", "Deployment", Some("late"), "deploy", None),
            // A Namespace that waits for a cluster role still precedes its own objects.
            object(
                "v1",
                "Namespace",
                None,
                "late",
                Some("rbac.authorization.k8s.io/ClusterRole/reader"),
            ),
            object(
                "rbac.authorization.k8s.io/v1",
                "ClusterRole",
                None,
                "reader",
                None,
            ),
        ];
        assert_eq!(names(&items), ["reader", "late", "deploy", "cm"]);
    }

    #[test]
    fn custom_resources_wait_for_their_crd() {
        let mut crd = object(
            "apiextensions.k8s.io/v1",
            "CustomResourceDefinition",
            None,
            "widgets.example.com",
            Some("/Namespace/z-last-ns"),
        );
        crd.1.data = json!({"spec": {"group": "example.com", "names": {"kind": "Widget"}}});
        let items = vec![
            object("example.com/v1", "Widget", None, "w", None),
            crd,
            object(
                "v1",
                "Namespace",
                None,
                "z-last-ns",
                Some("apps/namespaces/x/Deployment/d"),
            ),
            object("apps/v1", "Deployment", Some("x"), "d", None),
        ];
        assert_eq!(
            names(&items),
            ["d", "z-last-ns", "widgets.example.com", "w"]
        );
    }

    #[test]
    fn cycles_fail_their_members_and_the_rest_is_still_ordered() {
        let items = [
            object(
                "v1",
                "ConfigMap",
                Some("ns"),
                "a",
                Some("/namespaces/ns/ConfigMap/b"),
            ),
            object(
                "v1",
                "ConfigMap",
                Some("ns"),
                "b",
                Some("/namespaces/ns/ConfigMap/a"),
            ),
            object(
                "v1",
                "ConfigMap",
                Some("ns"),
                "behind",
                Some("/namespaces/ns/ConfigMap/a"),
            ),
            object("v1", "ConfigMap", Some("ns"), "free", None),
            object(
                "v1",
                "ConfigMap",
                Some("ns"),
                "self",
                Some("/namespaces/ns/ConfigMap/self"),
            ),
            object("v1", "ConfigMap", Some("ns"), "bad", Some("nonsense")),
        ];
        let refs: Vec<(ObjectKey, &DynamicObject)> =
            items.iter().map(|(k, o)| (k.clone(), o)).collect();
        let plan = order(&refs);
        let failed: Vec<usize> = plan.failed.iter().map(|(i, _)| *i).collect();
        assert_eq!(failed, [0, 1, 4, 5]);
        assert!(
            plan.failed[0]
                .1
                .to_string()
                .contains("/ConfigMap/ns/a -> /ConfigMap/ns/b -> /ConfigMap/ns/a")
        );
        assert!(matches!(
            plan.failed[3].1,
            EngineError::InvalidDependsOn { .. }
        ));
        // "behind" is sequenced (and will be skipped at apply time since "a" failed).
        assert_eq!(plan.sequence, [2, 3]);
        assert_eq!(plan.dependencies[2], [0]);
    }

    #[test]
    fn parses_depends_on() {
        let keys = parse_depends_on("apps/namespaces/ns/Deployment/d, /Namespace/ns").unwrap();
        assert_eq!(keys[0].resource_key(), "apps/Deployment/ns/d");
        assert_eq!(keys[1].resource_key(), "/Namespace//ns");
        assert!(parse_depends_on("a/b").is_err());
        assert!(parse_depends_on("g/namespaces//K/n").is_err());
    }
}
