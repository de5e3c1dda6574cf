//! The Kubernetes API proxy's audit log: one record per proxied request, bounded per agent.
//!
//! Records are keyed by (agent id, sequence). Sequences of an agent are contiguous (only the oldest are ever
//! removed), so the agent's first and last keys tell how many it has without counting them.

use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{Store, StoreError, decode, encode};

/// `(agent id, sequence)` → [`AuditRecord`] as JSON.
const PROXY_AUDIT: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("proxy_audit");

/// Creates this module's tables when the database opens.
pub(super) fn create_tables(txn: &redb::WriteTransaction) -> Result<(), redb::Error> {
    txn.open_table(PROXY_AUDIT)?;
    Ok(())
}

/// Who made a proxied request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum AuditCaller {
    /// A CI job, by the CI token it presented.
    CiJob {
        token_id: u64,
        project: String,
        environment: Option<String>,
    },
    /// A person, by their Git server username.
    User { username: String },
}

/// The Kubernetes verb of a request, as the apiserver's authoriser would name it (`connect` for an
/// upgraded connection: exec, attach, port-forward).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verb {
    Get,
    List,
    Watch,
    Create,
    Update,
    Patch,
    Delete,
    DeleteCollection,
    Connect,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Get => "get",
            Self::List => "list",
            Self::Watch => "watch",
            Self::Create => "create",
            Self::Update => "update",
            Self::Patch => "patch",
            Self::Delete => "delete",
            Self::DeleteCollection => "deletecollection",
            Self::Connect => "connect",
        }
    }
}

/// One proxied request, written when it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub agent_id: u64,
    /// Unix seconds when the request arrived.
    pub at: i64,
    pub caller: AuditCaller,
    pub verb: Verb,
    /// `pods`, `deployments`, …; `None` for non-resource paths (`/version`, `/healthz`, …).
    pub resource: Option<String>,
    pub subresource: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// The status answered to the client (kas's own refusals included).
    pub status_code: u16,
    pub duration_ms: u64,
}

impl Store {
    /// Appends `records` in one transaction, then drops each touched agent's oldest until at most `keep`
    /// remain.
    pub fn append_proxy_audit(
        &self,
        records: &[AuditRecord],
        keep: usize,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(PROXY_AUDIT)?;
            for record in records {
                let agent = record.agent_id;
                let next = table
                    .range((agent, 0)..=(agent, u64::MAX))?
                    .next_back()
                    .transpose()?
                    .map_or(0, |(key, _)| key.value().1 + 1);
                table.insert((agent, next), encode(record).as_slice())?;
            }
            let mut agents: Vec<u64> = records.iter().map(|r| r.agent_id).collect();
            agents.sort_unstable();
            agents.dedup();
            for agent in agents {
                trim(&mut table, agent, keep)?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// The agent's last `last` records, oldest first, with their sequence numbers.
    pub fn proxy_audit(
        &self,
        agent_id: u64,
        last: usize,
    ) -> Result<Vec<(u64, AuditRecord)>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(PROXY_AUDIT)?;
        let mut out = table
            .range((agent_id, 0)..=(agent_id, u64::MAX))?
            .rev()
            .take(last)
            .map(|entry| {
                let (key, value) = entry?;
                Ok((key.value().1, decode("proxy_audit", value.value())?))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        out.reverse();
        Ok(out)
    }
}

/// Removes the agent's oldest records beyond `keep`.
fn trim(
    table: &mut redb::Table<(u64, u64), &[u8]>,
    agent: u64,
    keep: usize,
) -> Result<(), StoreError> {
    let bounds =
        |table: &redb::Table<(u64, u64), &[u8]>| -> Result<Option<(u64, u64)>, StoreError> {
            let mut range = table.range((agent, 0)..=(agent, u64::MAX))?;
            let first = range.next().transpose()?.map(|(k, _)| k.value().1);
            let last = range.next_back().transpose()?.map(|(k, _)| k.value().1);
            Ok(first.map(|first| (first, last.unwrap_or(first))))
        };
    let Some((first, last)) = bounds(table)? else {
        return Ok(());
    };
    let count = last - first + 1;
    let excess = count.saturating_sub(keep as u64);
    if excess > 0 {
        table.retain_in((agent, first)..(agent, first + excess), |_, _| false)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(agent_id: u64, name: &str) -> AuditRecord {
        AuditRecord {
            agent_id,
            at: 1_700_000_000,
            caller: AuditCaller::CiJob {
                token_id: 3,
                project: "group/app".into(),
                environment: Some("production".into()),
            },
            verb: Verb::Get,
            resource: Some("configmaps".into()),
            subresource: None,
            namespace: Some("default".into()),
            name: Some(name.into()),
            status_code: 200,
            duration_ms: 4,
        }
    }

    #[test]
    fn each_agent_keeps_its_newest_records_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for batch in [["a", "b"], ["c", "d"], ["e", "f"]] {
            let records: Vec<_> = batch.iter().map(|n| record(1, n)).collect();
            store.append_proxy_audit(&records, 3).unwrap();
        }
        store.append_proxy_audit(&[record(2, "other")], 3).unwrap();
        let names = |agent, last| -> Vec<String> {
            store
                .proxy_audit(agent, last)
                .unwrap()
                .into_iter()
                .map(|(_, r)| r.name.unwrap())
                .collect()
        };
        assert_eq!(
            names(1, 10),
            ["d", "e", "f"],
            "the oldest are dropped first"
        );
        assert_eq!(names(1, 2), ["e", "f"], "`last` takes the newest");
        assert_eq!(names(2, 10), ["other"], "per agent");
        assert!(names(3, 10).is_empty());
        let seqs: Vec<u64> = store
            .proxy_audit(1, 10)
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(seqs, [3, 4, 5], "sequences keep counting after a trim");
        // And it survives a reopen.
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.proxy_audit(1, 10).unwrap()[0].1, record(1, "d"));
    }
}
