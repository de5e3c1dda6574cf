//! What kas sends: Alertmanager's v2 `PostableAlert`s, and the webhook's JSON document with its signature.

use std::{
    collections::BTreeMap,
    time::{Duration, UNIX_EPOCH},
};

use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;

use crate::store::{AgentRecord, network_alerts::NetworkAlertRecord};

/// `alertname` of every alert kas sends.
pub const ALERT_NAME: &str = "NetworkPolicyViolation";

/// One alert of Alertmanager's `POST /api/v2/alerts` body.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PostableAlert {
    pub labels: BTreeMap<&'static str, String>,
    pub annotations: BTreeMap<&'static str, String>,
    pub starts_at: String,
    pub ends_at: String,
    #[serde(rename = "generatorURL", skip_serializing_if = "Option::is_none")]
    pub generator_url: Option<String>,
}

/// RFC 3339 with milliseconds, UTC; dates before 1970 or past 9999 are clamped.
pub fn rfc3339_ms(unix_ms: i64) -> String {
    const LAST_MS: i64 = 253_402_300_799_999;
    let t = UNIX_EPOCH + Duration::from_millis(unix_ms.clamp(0, LAST_MS) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// The alert as Alertmanager gets it: one per dedupe key (the labels carry the whole key), firing from the
/// episode's first drop until `ends_at` (an admin's resolution, or last seen + `resolve_after_ms`).
pub fn alertmanager_alert(
    record: &NetworkAlertRecord,
    agent: &AgentRecord,
    resolve_after_ms: i64,
    dashboard_url: Option<&str>,
) -> PostableAlert {
    let source = record.source.display_name();
    let destination = record.destination.display_name();
    let policy = record.policy.display_name();
    let mut labels = BTreeMap::from([
        ("alertname", ALERT_NAME.to_owned()),
        ("agent", agent.name.clone()),
        // Agent names are unique per project only: the project keeps two agents' alerts apart.
        ("agent_project", agent.project_path.clone()),
        ("policy", record.policy.name.clone()),
        ("policy_kind", record.policy.kind.as_str().to_owned()),
        ("direction", record.direction.as_str().to_owned()),
        ("protocol", record.protocol.as_str().to_owned()),
        ("port", record.port.to_string()),
        ("source", source.clone()),
        ("destination", destination.clone()),
        ("severity", "warning".to_owned()),
    ]);
    // Alertmanager treats an empty label as absent; leave it out rather than send "".
    if !record.namespace().is_empty() {
        labels.insert("namespace", record.namespace().to_owned());
    }
    labels.retain(|_, value| !value.is_empty());
    let target = match record.port {
        0 => record.protocol.as_str().to_owned(),
        port => format!("{}/{port}", record.protocol.as_str()),
    };
    let summary = format!(
        "{} {policy} dropped {} traffic from {source} to {destination} ({target})",
        record.policy.kind.as_str(),
        record.direction.as_str(),
    );
    let description = format!(
        "Agent {} ({}): {} flow(s) from {source} to {destination} on {target} {} by {} {policy}{}.",
        agent.name,
        agent.project_path,
        record.count,
        match record.verdict {
            crate::store::network_alerts::Verdict::Dropped => "were dropped",
            crate::store::network_alerts::Verdict::Audit => "would have been dropped (audit mode)",
        },
        record.policy.kind.as_str(),
        if record.drop_reason.is_empty() {
            String::new()
        } else {
            format!(", reason {}", record.drop_reason)
        },
    );
    let annotations = BTreeMap::from([
        ("summary", summary),
        ("description", description),
        ("count", record.count.to_string()),
        ("first_seen", rfc3339_ms(record.first_seen_ms)),
        ("last_seen", rfc3339_ms(record.last_seen_ms)),
    ]);
    PostableAlert {
        labels,
        annotations,
        starts_at: rfc3339_ms(record.episode_started_ms),
        ends_at: rfc3339_ms(record.ends_at_ms(resolve_after_ms)),
        generator_url: dashboard_url.map(|url| {
            format!(
                "{}/dashboard#/agent/{}",
                url.trim_end_matches('/'),
                agent.id
            )
        }),
    }
}

/// `firing` until `ends_at`, then `resolved`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WebhookStatus {
    Firing,
    Resolved,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WebhookAgent {
    pub id: u64,
    pub name: String,
    pub project: String,
}

/// One alert of the webhook's body: the Alertmanager alert, with kas's id, the agent and the status.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WebhookAlert {
    pub id: u64,
    pub status: WebhookStatus,
    pub agent: WebhookAgent,
    pub count: u64,
    #[serde(flatten)]
    pub alert: PostableAlert,
}

/// The webhook's body: `{"version": 1, "alerts": [...]}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WebhookBody {
    pub version: u32,
    pub alerts: Vec<WebhookAlert>,
}

pub fn webhook_alert(
    record: &NetworkAlertRecord,
    agent: &AgentRecord,
    resolve_after_ms: i64,
    dashboard_url: Option<&str>,
    now_ms: i64,
) -> WebhookAlert {
    WebhookAlert {
        id: record.id,
        status: if record.is_resolved(now_ms, resolve_after_ms) {
            WebhookStatus::Resolved
        } else {
            WebhookStatus::Firing
        },
        agent: WebhookAgent {
            id: agent.id,
            name: agent.name.clone(),
            project: agent.project_path.clone(),
        },
        count: record.count,
        alert: alertmanager_alert(record, agent, resolve_after_ms, dashboard_url),
    }
}

/// `X-Gitops-Signature`'s value: `sha256=` and the hex HMAC-SHA256 of `<timestamp>.<body>` under `secret`.
/// The timestamp is signed too, so a captured delivery cannot be replayed later under a fresh one.
pub fn signature(secret: &str, timestamp: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::network_alerts::{
        Direction, Endpoint, PolicyKind, PolicyRef, Protocol, Verdict,
    };

    fn record() -> NetworkAlertRecord {
        NetworkAlertRecord {
            id: 9,
            agent_id: 1,
            policy: PolicyRef {
                kind: PolicyKind::CiliumClusterwideNetworkPolicy,
                namespace: String::new(),
                name: "no-egress".into(),
            },
            source: Endpoint {
                namespace: "shop".into(),
                pod_name: "web-1".into(),
                ..Default::default()
            },
            destination: Endpoint {
                ip: "203.0.113.7".into(),
                identity: 2,
                ..Default::default()
            },
            port: 443,
            protocol: Protocol::Tcp,
            direction: Direction::Egress,
            verdict: Verdict::Dropped,
            drop_reason: "POLICY_DENIED".into(),
            count: 1000,
            first_seen_ms: 1_700_000_000_000,
            last_seen_ms: 1_700_000_060_000,
            episode_started_ms: 1_700_000_000_000,
            resolved_at_ms: None,
        }
    }

    #[test]
    fn a_clusterwide_egress_alert_is_routed_on_its_sources_namespace() {
        let agent = AgentRecord {
            id: 1,
            project_path: "g/p".into(),
            name: "prod".into(),
            created_at: 0,
        };
        let alert = alertmanager_alert(&record(), &agent, 900_000, None);
        assert_eq!(alert.labels["namespace"], "shop");
        assert_eq!(alert.labels["destination"], "world 203.0.113.7");
        assert_eq!(
            alert.labels["policy_kind"],
            "CiliumClusterwideNetworkPolicy"
        );
        assert_eq!(alert.starts_at, "2023-11-14T22:13:20.000Z");
        assert_eq!(alert.ends_at, "2023-11-14T22:29:20.000Z", "last seen + 15m");
        assert_eq!(alert.annotations["count"], "1000");
        let json = serde_json::to_value(&alert).unwrap();
        assert!(json.get("generatorURL").is_none(), "{json}");
        assert!(json.get("startsAt").is_some(), "{json}");
        let linked = alertmanager_alert(&record(), &agent, 900_000, Some("https://kas.example/"));
        assert_eq!(
            linked.generator_url.as_deref(),
            Some("https://kas.example/dashboard#/agent/1")
        );
    }

    #[test]
    fn the_signature_covers_timestamp_and_body() {
        let a = signature("k", "100", b"{}");
        assert!(a.starts_with("sha256=") && a.len() == 7 + 64, "{a}");
        assert_ne!(a, signature("k", "101", b"{}"));
        assert_ne!(a, signature("k", "100", b"{ }"));
        assert_ne!(a, signature("j", "100", b"{}"));
    }
}
