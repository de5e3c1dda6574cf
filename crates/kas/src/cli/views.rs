//! What `kas get` and `kas token list` show: records made from the agents' GraphQL answer (printed as they
//! are with `-o json|yaml`) and the kubectl-like table of each.

use std::time::SystemTime;

use serde_json::{Map, Value, json};

use super::output::{Table, age, one_line, short_commit};

/// kubectl's placeholder for an empty cell.
const NONE: &str = "<none>";

/// The widest a message column gets in a table; `-o json|yaml` has the whole text.
const MESSAGE_WIDTH: usize = 80;

fn text(value: &Value) -> &str {
    value.as_str().unwrap_or_default()
}

fn or_none(s: &str) -> String {
    if s.is_empty() {
        NONE.to_owned()
    } else {
        s.to_owned()
    }
}

/// `gid://kas/Clusters::Agent/7` → `7`: tables show the number, which every command accepts.
pub fn short_id(gid: &str) -> String {
    gid.rsplit('/').next().unwrap_or(gid).to_owned()
}

fn projects(agent: &Value) -> impl Iterator<Item = &Value> {
    agent["manifestProjects"].as_array().into_iter().flatten()
}

fn objects(project: &Value) -> impl Iterator<Item = &Value> {
    project["lastSync"]["objects"]
        .as_array()
        .into_iter()
        .flatten()
}

/// Whether a record belongs to `project`, when one is asked for.
fn wanted(project: &Value, only: Option<&str>) -> bool {
    only.is_none_or(|p| text(&project["projectId"]) == p)
}

/// `kas get agents` / `kas get agent <id>`: the agents as kas answered.
pub fn agents_table(agents: &[Value], now: SystemTime) -> Table {
    let mut table = Table::new(&[
        "ID",
        "NAME",
        "PROJECT",
        "CONNECTED",
        "VERSION",
        "CONFIG",
        "SYNCED",
        "AGE",
    ]);
    for agent in agents {
        let mut versions: Vec<&str> = agent["connections"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| text(&c["agentVersion"]))
            .filter(|v| !v.is_empty())
            .collect();
        versions.dedup();
        let config = &agent["configStatus"];
        let config = if !text(&config["error"]).is_empty() {
            "invalid".to_owned()
        } else {
            or_none(&short_commit(text(&config["commitId"])))
        };
        let total = projects(agent).count();
        let synced = projects(agent)
            .filter(|p| text(&p["lastSync"]["outcome"]) == "synced")
            .count();
        table.push(vec![
            short_id(text(&agent["id"])),
            text(&agent["name"]).to_owned(),
            text(&agent["projectPath"]).to_owned(),
            agent["connected"].as_bool().unwrap_or(false).to_string(),
            or_none(&versions.join(",")),
            config,
            format!("{synced}/{total}"),
            age(text(&agent["createdAt"]), now),
        ]);
    }
    table
}

/// `kas get syncs`: one record per (agent, manifest project), its last sync without the objects (those
/// are `kas get objects`), plus their counts by result and health.
pub fn syncs(agents: &[Value], project: Option<&str>) -> Vec<Value> {
    let mut out = Vec::new();
    for agent in agents {
        for p in projects(agent).filter(|p| wanted(p, project)) {
            let mut record = Map::new();
            record.insert("agentId".into(), agent["id"].clone());
            record.insert("agentName".into(), agent["name"].clone());
            for field in [
                "projectId",
                "commitSeen",
                "commitSent",
                "error",
                "updatedAt",
                "reportsReceived",
            ] {
                record.insert(field.into(), p[field].clone());
            }
            let last = match &p["lastSync"] {
                Value::Object(sync) => {
                    let mut sync = sync.clone();
                    sync.remove("objects");
                    sync.insert("objectCount".into(), json!(objects(p).count()));
                    sync.insert("results".into(), counts(objects(p), "result"));
                    sync.insert("health".into(), counts(objects(p), "health"));
                    Value::Object(sync)
                }
                _ => Value::Null,
            };
            record.insert("lastSync".into(), last);
            out.push(Value::Object(record));
        }
    }
    out
}

/// How many of `objects` have each value of `field` (`null` health counted as `Unknown`).
fn counts<'a>(objects: impl Iterator<Item = &'a Value>, field: &str) -> Value {
    let mut counts: std::collections::BTreeMap<String, u64> = Default::default();
    for object in objects {
        let key = object[field].as_str().unwrap_or("Unknown").to_owned();
        *counts.entry(key).or_default() += 1;
    }
    json!(counts)
}

pub fn syncs_table(syncs: &[Value], now: SystemTime) -> Table {
    let mut table = Table::new(&[
        "AGENT", "PROJECT", "OUTCOME", "APPLIED", "SEEN", "OBJECTS", "READY", "FINISHED", "MESSAGE",
    ]);
    for record in syncs {
        let sync = &record["lastSync"];
        let health = &sync["health"];
        let pruned = sync["results"]["pruned"].as_u64().unwrap_or(0);
        let count = sync["objectCount"].as_u64().unwrap_or(0);
        let ready = match sync {
            Value::Null => NONE.to_owned(),
            _ => format!(
                "{}/{}",
                health["Current"].as_u64().unwrap_or(0),
                count.saturating_sub(pruned)
            ),
        };
        // A delivery error is what the user must see first; else the sync's own message.
        let message = match text(&record["error"]) {
            "" => text(&sync["message"]),
            error => error,
        };
        table.push(vec![
            short_id(text(&record["agentId"])),
            text(&record["projectId"]).to_owned(),
            or_none(text(&sync["outcome"])),
            or_none(&short_commit(text(&sync["commitApplied"]))),
            or_none(&short_commit(text(&record["commitSeen"]))),
            match sync {
                Value::Null => NONE.to_owned(),
                _ => count.to_string(),
            },
            ready,
            match text(&sync["finishedAt"]) {
                "" => NONE.to_owned(),
                at => age(at, now),
            },
            one_line(message, MESSAGE_WIDTH),
        ]);
    }
    table
}

/// `kas get objects`: every object of the agents' last syncs, with where it came from.
pub fn objects_of(agents: &[Value], project: Option<&str>) -> Vec<Value> {
    let mut out = Vec::new();
    for agent in agents {
        for p in projects(agent).filter(|p| wanted(p, project)) {
            for object in objects(p) {
                let mut record = Map::new();
                record.insert("agentId".into(), agent["id"].clone());
                record.insert("projectId".into(), p["projectId"].clone());
                if let Value::Object(fields) = object {
                    record.extend(fields.clone());
                }
                out.push(Value::Object(record));
            }
        }
    }
    out
}

/// `group/Kind/namespace/name` (group empty for the core group, namespace for cluster-scoped objects)
/// → (`kind.group` as kubectl names a resource type, namespace, name).
fn split_resource_key(key: &str) -> (String, String, String) {
    let mut parts = key.splitn(4, '/');
    let (group, kind, namespace, name) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let kind = match group {
        "" => kind.to_lowercase(),
        group => format!("{}.{group}", kind.to_lowercase()),
    };
    (kind, namespace.to_owned(), name.to_owned())
}

pub fn objects_table(objects: &[Value]) -> Table {
    let mut table = Table::new(&[
        "AGENT",
        "PROJECT",
        "NAMESPACE",
        "KIND",
        "NAME",
        "RESULT",
        "HEALTH",
        "SOURCE",
        "MESSAGE",
    ]);
    for object in objects {
        let (kind, namespace, name) = split_resource_key(text(&object["resourceKey"]));
        table.push(vec![
            short_id(text(&object["agentId"])),
            text(&object["projectId"]).to_owned(),
            or_none(&namespace),
            kind,
            name,
            text(&object["result"]).to_owned(),
            or_none(text(&object["health"])),
            text(&object["source"]).to_owned(),
            one_line(text(&object["message"]), MESSAGE_WIDTH),
        ]);
    }
    table
}

/// `kas get alerts`: one row per alert (dedupe key), newest last seen first as kas answers.
pub fn alerts_table(alerts: &[Value], now: SystemTime) -> Table {
    let mut table = Table::new(&[
        "ID",
        "POLICY",
        "DIRECTION",
        "SOURCE",
        "DESTINATION",
        "PORT",
        "COUNT",
        "STATE",
        "LAST SEEN",
    ]);
    for alert in alerts {
        let port = match (&alert["port"], text(&alert["protocol"])) {
            (Value::Number(n), protocol) if n.as_u64() != Some(0) => format!("{n}/{protocol}"),
            (_, protocol) => protocol.to_owned(),
        };
        let state = if alert["resolved"].as_bool().unwrap_or(false) {
            "resolved"
        } else {
            "firing"
        };
        table.push(vec![
            short_id(text(&alert["id"])),
            text(&alert["policy"]).to_owned(),
            text(&alert["direction"]).to_lowercase(),
            text(&alert["source"]).to_owned(),
            text(&alert["destination"]).to_owned(),
            port,
            alert["count"].to_string(),
            state.to_owned(),
            age(text(&alert["lastSeen"]), now),
        ]);
    }
    table
}

/// `kas token list`: the tokens of the agents (never secrets: kas does not have them).
pub fn tokens(agents: &[Value]) -> Vec<Value> {
    agents
        .iter()
        .flat_map(|agent| {
            agent["tokens"]
                .as_array()
                .into_iter()
                .flatten()
                .map(move |token| {
                    let mut record = Map::new();
                    record.insert("agentId".into(), agent["id"].clone());
                    record.insert("agentName".into(), agent["name"].clone());
                    if let Value::Object(fields) = token {
                        record.extend(fields.clone());
                    }
                    Value::Object(record)
                })
        })
        .collect()
}

pub fn tokens_table(tokens: &[Value], now: SystemTime) -> Table {
    let mut table = Table::new(&[
        "ID",
        "AGENT",
        "NAME",
        "STATUS",
        "AGE",
        "REVOKED",
        "DESCRIPTION",
    ]);
    for token in tokens {
        let revoked = token["revoked"].as_bool().unwrap_or(false);
        table.push(vec![
            short_id(text(&token["id"])),
            short_id(text(&token["agentId"])),
            text(&token["name"]).to_owned(),
            if revoked { "revoked" } else { "active" }.to_owned(),
            age(text(&token["createdAt"]), now),
            match text(&token["revokedAt"]) {
                "" => NONE.to_owned(),
                at => format!("{} ago", age(at, now)),
            },
            one_line(text(&token["description"]), MESSAGE_WIDTH),
        ]);
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(2_000_000_000)
    }

    fn ago(secs: u64) -> String {
        humantime::format_rfc3339_seconds(now() - Duration::from_secs(secs)).to_string()
    }

    fn agent() -> Value {
        json!({
            "id": "gid://kas/Clusters::Agent/3", "name": "gitops", "projectPath": "demo/config",
            "createdAt": ago(3 * 3600), "connected": true,
            "connections": [{ "agentVersion": "0.1.0" }, { "agentVersion": "0.1.0" }],
            "configStatus": { "commitId": "0123456789abcdef", "error": null },
            "manifestProjects": [
                { "projectId": "demo/apps", "commitSeen": "aaaaaaaaaaaa", "commitSent": "aaaaaaaaaaaa", "error": null,
                  "lastSync": { "commitSeen": "aaaaaaaaaaaa", "commitApplied": "aaaaaaaaaaaa", "finishedAt": ago(30),
                    "outcome": "synced", "message": "",
                    "objects": [
                      { "resourceKey": "apps/Deployment/web/nginx", "source": "d.yaml#0", "result": "created", "health": "Current", "message": "" },
                      { "resourceKey": "/Namespace//web", "source": "ns.yaml#0", "result": "unchanged", "health": "InProgress", "message": "health: waiting" },
                      { "resourceKey": "/ConfigMap/web/old", "source": "", "result": "pruned", "health": null, "message": "" }
                    ] } },
                { "projectId": "demo/other", "commitSeen": "bbbbbbbbbbbb", "commitSent": null,
                  "error": "project \"demo/other\": not found", "lastSync": null }
            ],
            "tokens": [
                { "id": "gid://kas/Clusters::AgentToken/5", "name": "ci", "description": "for CI", "createdAt": ago(600), "revoked": false, "revokedAt": null },
                { "id": "gid://kas/Clusters::AgentToken/4", "name": "old", "description": "", "createdAt": ago(86400 * 3), "revoked": true, "revokedAt": ago(7200) }
            ]
        })
    }

    #[test]
    fn the_alerts_table_shows_port_with_protocol_and_the_state() {
        let now = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_100);
        let alerts = [
            json!({ "id": "gid://kas/Clusters::NetworkAlert/12", "policy": "shop/deny-db",
                    "direction": "EGRESS", "source": "shop/web-1", "destination": "world 203.0.113.7",
                    "port": 5432, "protocol": "TCP", "count": 1000, "resolved": false,
                    "lastSeen": "2023-11-14T22:13:10.000Z" }),
            json!({ "id": "gid://kas/Clusters::NetworkAlert/13", "policy": "deny-all",
                    "direction": "INGRESS", "source": "10.0.0.1", "destination": "shop/db-0",
                    "port": 0, "protocol": "ICMPV4", "count": 2, "resolved": true,
                    "lastSeen": "2023-11-14T22:00:00.000Z" }),
        ];
        assert_eq!(
            alerts_table(&alerts, now).render(""),
            "ID   POLICY         DIRECTION   SOURCE       DESTINATION         PORT       COUNT   STATE      LAST SEEN\n\
             12   shop/deny-db   egress      shop/web-1   world 203.0.113.7   5432/TCP   1000    firing     110s\n\
             13   deny-all       ingress     10.0.0.1     shop/db-0           ICMPV4     2       resolved   15m\n"
        );
    }

    #[test]
    fn the_agents_table_counts_connections_versions_and_synced_projects() {
        let table = agents_table(&[agent()], now());
        assert_eq!(
            table.rows,
            [[
                "3",
                "gitops",
                "demo/config",
                "true",
                "0.1.0",
                "01234567",
                "1/2",
                "3h"
            ]]
        );
    }

    #[test]
    fn syncs_show_the_delivery_error_first_and_ready_without_pruned_objects() {
        let records = syncs(&[agent()], None);
        assert_eq!(records.len(), 2);
        assert_eq!(records[0]["lastSync"]["objectCount"], 3);
        assert_eq!(records[0]["lastSync"]["results"]["pruned"], 1);
        assert!(records[0]["lastSync"].get("objects").is_none());
        let table = syncs_table(&records, now());
        assert_eq!(
            table.rows[0],
            [
                "3",
                "demo/apps",
                "synced",
                "aaaaaaaa",
                "aaaaaaaa",
                "3",
                "1/2",
                "30s",
                ""
            ]
        );
        assert_eq!(
            table.rows[1],
            [
                "3",
                "demo/other",
                "<none>",
                "<none>",
                "bbbbbbbb",
                "<none>",
                "<none>",
                "<none>",
                "project \"demo/other\": not found"
            ]
        );
        assert_eq!(syncs(&[agent()], Some("demo/other")).len(), 1);
    }

    #[test]
    fn objects_are_named_as_kubectl_names_them() {
        let records = objects_of(&[agent()], Some("demo/apps"));
        let table = objects_table(&records);
        let cells = |i: usize| table.rows[i][2..6].to_vec();
        assert_eq!(cells(0), ["web", "deployment.apps", "nginx", "created"]);
        assert_eq!(cells(1), ["<none>", "namespace", "web", "unchanged"]);
        assert_eq!(table.rows[2][6], "<none>", "a pruned object has no health");
        assert_eq!(records[0]["agentId"], "gid://kas/Clusters::Agent/3");
    }

    #[test]
    fn tokens_show_their_status_and_never_a_secret() {
        let records = tokens(&[agent()]);
        let table = tokens_table(&records, now());
        assert_eq!(
            table.rows,
            [
                ["5", "3", "ci", "active", "10m", "<none>", "for CI"],
                ["4", "3", "old", "revoked", "3d", "2h ago", ""]
            ]
        );
    }
}
