//! Annotated network policies as agentk matches flows to them: which endpoints each selects, in which
//! directions, read from the objects' JSON (Kubernetes `NetworkPolicy`, Cilium's `CiliumNetworkPolicy` and
//! `CiliumClusterwideNetworkPolicy`).

use std::collections::BTreeMap;

use gitops_protocol::{NetworkPolicyKind, NetworkPolicyRef};
use serde_json::Value;

/// The annotation that marks a policy for alerting (GitLab's).
pub const ALERT_ANNOTATION: &str = "app.gitlab.com/alert";

/// Which traffic a selector's rules govern.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Directions {
    pub ingress: bool,
    pub egress: bool,
}

/// One label requirement (Kubernetes' `matchExpressions` operators).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    Equals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A label selector; empty selects every endpoint (in the policy's namespace, for namespaced kinds).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    pub requirements: Vec<Requirement>,
}

/// An annotated policy.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchedPolicy {
    pub kind: NetworkPolicyKind,
    /// Empty for a clusterwide policy.
    pub namespace: String,
    pub name: String,
    /// The rules' subjects: the endpoints the policy isolates, and for which directions.
    pub rules: Vec<(Selector, Directions)>,
}

impl WatchedPolicy {
    pub fn reference(&self) -> NetworkPolicyRef {
        NetworkPolicyRef {
            kind: self.kind as i32,
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
}

/// Whether `object` (any of the three kinds) carries the alert annotation set to "true".
pub fn is_annotated(object: &Value) -> bool {
    object
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(ALERT_ANNOTATION))
        .and_then(Value::as_str)
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// Reads an annotated policy; `Err` says what in it cannot be matched (logged and shown in the status,
/// the policy is then left out rather than guessed at).
pub fn parse(kind: NetworkPolicyKind, object: &Value) -> Result<WatchedPolicy, String> {
    let meta = |field: &str| {
        object
            .pointer(&format!("/metadata/{field}"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let name = meta("name");
    let namespace = if kind == NetworkPolicyKind::CiliumClusterwideNetworkPolicy {
        String::new()
    } else {
        meta("namespace")
    };
    let spec = object.get("spec");
    let rules = match kind {
        NetworkPolicyKind::NetworkPolicy => vec![kubernetes_rule(spec)?],
        _ => cilium_rules(object)?,
    };
    Ok(WatchedPolicy {
        kind,
        namespace,
        name,
        rules,
    })
}

/// `spec.podSelector` and `spec.policyTypes` (absent: Ingress, plus Egress when `spec.egress` is set, as
/// Kubernetes defaults it).
fn kubernetes_rule(spec: Option<&Value>) -> Result<(Selector, Directions), String> {
    let spec = spec.ok_or("no spec")?;
    let selector =
        selector(spec.get("podSelector")).map_err(|e| format!("spec.podSelector: {e}"))?;
    let directions = match spec.get("policyTypes").and_then(Value::as_array) {
        Some(types) => Directions {
            ingress: types.iter().any(|t| t == "Ingress"),
            egress: types.iter().any(|t| t == "Egress"),
        },
        None => Directions {
            ingress: true,
            egress: spec.get("egress").is_some_and(|e| !e.is_null()),
        },
    };
    Ok((selector, directions))
}

/// `spec` and `specs[]`: each rule's `endpointSelector` with the directions it has rules for. Rules with a
/// `nodeSelector` (host policies) select nodes, not pods, and are left out.
fn cilium_rules(object: &Value) -> Result<Vec<(Selector, Directions)>, String> {
    let mut specs: Vec<(String, &Value)> = Vec::new();
    if let Some(spec) = object.get("spec").filter(|s| !s.is_null()) {
        specs.push(("spec".into(), spec));
    }
    if let Some(list) = object.get("specs").and_then(Value::as_array) {
        specs.extend(
            list.iter()
                .enumerate()
                .map(|(i, s)| (format!("specs[{i}]"), s)),
        );
    }
    let mut rules = Vec::new();
    for (path, spec) in specs {
        let Some(endpoint_selector) = spec.get("endpointSelector") else {
            continue;
        };
        let selector = selector(Some(endpoint_selector))
            .map_err(|e| format!("{path}.endpointSelector: {e}"))?;
        let has = |key: &str| spec.get(key).is_some_and(|v| !v.is_null());
        let directions = Directions {
            ingress: has("ingress") || has("ingressDeny"),
            egress: has("egress") || has("egressDeny"),
        };
        rules.push((selector, directions));
    }
    if rules.is_empty() {
        return Err("no rule with an endpointSelector".into());
    }
    Ok(rules)
}

/// A Kubernetes `LabelSelector` (Cilium's endpoint selectors have the same shape).
fn selector(value: Option<&Value>) -> Result<Selector, String> {
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok(Selector::default());
    };
    let mut requirements = Vec::new();
    if let Some(labels) = value.get("matchLabels").and_then(Value::as_object) {
        for (key, v) in labels {
            let v = v
                .as_str()
                .ok_or_else(|| format!("matchLabels.{key}: not a string"))?;
            requirements.push(Requirement::Equals(key.clone(), v.to_owned()));
        }
    }
    for (i, e) in value
        .get("matchExpressions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let key = e
            .get("key")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("matchExpressions[{i}].key: missing"))?
            .to_owned();
        let values: Vec<String> = e
            .get("values")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect();
        let requirement = match e.get("operator").and_then(Value::as_str) {
            Some("In") => Requirement::In(key, values),
            Some("NotIn") => Requirement::NotIn(key, values),
            Some("Exists") => Requirement::Exists(key),
            Some("DoesNotExist") => Requirement::DoesNotExist(key),
            other => {
                return Err(format!(
                    "matchExpressions[{i}].operator: {other:?} is not In, NotIn, Exists or DoesNotExist"
                ));
            }
        };
        requirements.push(requirement);
    }
    Ok(Selector { requirements })
}

/// An endpoint's labels as Hubble reports them (`source:key=value`), looked up the way Cilium's selectors
/// do: a key with a source prefix (`k8s:app`) matches only that source, `any:app` and a bare `app` match
/// any source.
#[derive(Debug, Default)]
pub struct EndpointLabels {
    by_key: BTreeMap<String, String>,
}

impl EndpointLabels {
    pub fn parse(labels: &[String]) -> Self {
        let mut by_key = BTreeMap::new();
        for label in labels {
            let (full_key, value) = label.split_once('=').unwrap_or((label.as_str(), ""));
            by_key.insert(full_key.to_owned(), value.to_owned());
            if let Some((_, bare)) = full_key.split_once(':') {
                by_key
                    .entry(bare.to_owned())
                    .or_insert_with(|| value.to_owned());
            }
        }
        Self { by_key }
    }

    fn get(&self, selector_key: &str) -> Option<&str> {
        let key = selector_key.strip_prefix("any:").unwrap_or(selector_key);
        self.by_key.get(key).map(String::as_str)
    }

    /// The namespace label Cilium gives every pod's endpoint.
    pub fn namespace(&self) -> Option<&str> {
        self.get("k8s:io.kubernetes.pod.namespace")
    }
}

impl Selector {
    pub fn matches(&self, labels: &EndpointLabels) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v.as_str()),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.iter().any(|x| x == v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| vs.iter().all(|x| x != v)),
            Requirement::Exists(k) => labels.get(k).is_some(),
            Requirement::DoesNotExist(k) => labels.get(k).is_none(),
        })
    }
}
