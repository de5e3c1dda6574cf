//! kas's durable state in an embedded redb database (`<data_dir>/kas.redb`): agents, token hashes, and the
//! last configuration status of each agent. No external service; everything survives a restart.
//!
//! redb makes an I/O error sticky: after a failed write (a full disk) every later transaction fails with
//! `PreviousIo` until the database is reopened. [`Handle`] reopens it then, so kas recovers by itself once
//! space returns; [`Store::check`] (behind `/healthz`) reports a database that cannot be reopened or read.

pub mod audit;
pub mod ci_tokens;
pub mod network_alerts;

use std::{
    path::{Path, PathBuf},
    sync::RwLock,
};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const AGENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("agents");
/// `"<project>\n<name>"` → agent id; enforces unique names per project.
const AGENT_NAMES: TableDefinition<&str, u64> = TableDefinition::new("agent_names");
const TOKENS: TableDefinition<u64, &[u8]> = TableDefinition::new("tokens");
/// `(agent id, token id)`: an agent's tokens by range scan instead of a full table scan.
const AGENT_TOKENS: TableDefinition<(u64, u64), ()> = TableDefinition::new("agent_tokens");
/// Hash of an active token → token id. Revoking removes the entry.
const TOKEN_HASHES: TableDefinition<&str, u64> = TableDefinition::new("token_hashes");
const CONFIG_STATUS: TableDefinition<u64, &[u8]> = TableDefinition::new("config_status");
/// `(agent id, project)`: projects an admin granted the agent beyond its own owner's.
const GRANTS: TableDefinition<(u64, &str), ()> = TableDefinition::new("grants");
/// `(agent id, manifest project)` → [`ManifestStatus`].
/// `(agent id, manifest project)` → [`SyncRecord`]: what agentk last reported applying.
const SYNC_STATUS: TableDefinition<(u64, &str), &[u8]> = TableDefinition::new("sync_status");
const MANIFEST_STATUS: TableDefinition<(u64, &str), &[u8]> =
    TableDefinition::new("manifest_status");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Database(#[from] redb::Error),
    /// The database file cannot be opened (corrupt, truncated, not a redb file, or unreadable).
    #[error("opening the database {path}: {source}")]
    Open { path: String, source: redb::Error },
    #[error("corrupt record in {table}: {message}")]
    Corrupt {
        table: &'static str,
        message: String,
    },
    #[error("an agent named {name:?} already exists in project {project}")]
    DuplicateAgent { project: String, name: String },
    #[error("agent {0} does not exist")]
    NoSuchAgent(u64),
    #[error("agent {agent_id} already has {limit} active tokens; revoke one first")]
    TooManyTokens { agent_id: u64, limit: usize },
}

macro_rules! db_err {
    ($($t:ty),*) => {$(impl From<$t> for StoreError {
        fn from(e: $t) -> Self { Self::Database(e.into()) }
    })*};
}
db_err!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub id: u64,
    pub project_path: String,
    pub name: String,
    /// Unix seconds.
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: u64,
    pub agent_id: u64,
    pub name: String,
    pub description: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
    /// SHA-256 of the secret; the secret itself is never stored.
    pub token_hash: String,
}

/// What kas last did for one (agent, manifest project).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestStatus {
    /// The newest commit kas saw for the project's ref.
    pub commit_seen: Option<String>,
    /// The commit of the last complete snapshot sent to the agent.
    pub commit_sent: Option<String>,
    /// Digest of the ref and paths `commit_sent` was selected with: a stream asking with that commit but
    /// another selection gets a fresh snapshot. Absent in rows written before it existed.
    #[serde(default)]
    pub selection: Option<String>,
    /// Why the last snapshot could not be sent (permission, limits, Git), naming the project.
    pub error: Option<String>,
    pub updated_at: i64,
}

/// The last sync agentk reported for one manifest project.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRecord {
    pub commit_seen: String,
    pub commit_applied: String,
    pub finished_at: i64,
    pub outcome: SyncOutcome,
    pub message: String,
    pub objects: Vec<ObjectRecord>,
}

/// How a sync ended. Stored as the words the previous version wrote as strings (`"synced"`, …), so its
/// records still read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncOutcome {
    Synced,
    Partial,
    Failed,
}

/// What a sync did to one object; stored as kubectl's verbs, as the previous version did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectResult {
    Created,
    Configured,
    Unchanged,
    Pruned,
    Failed,
    Skipped,
    Kept,
}

/// kstatus' verdict on an object; stored in kstatus' spelling (`"InProgress"`), as the previous version did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Health {
    Current,
    InProgress,
    Failed,
    Terminating,
    NotFound,
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRecord {
    pub resource_key: String,
    pub source: String,
    pub result: ObjectResult,
    /// `None` until known; the previous version stored that as `""`.
    #[serde(default, deserialize_with = "health_or_empty")]
    pub health: Option<Health>,
    pub message: String,
}

/// Reads `""` (how the previous version stored "not known yet") as `None`.
fn health_or_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Health>, D::Error> {
    match Option::<String>::deserialize(d)?.as_deref() {
        None | Some("") => Ok(None),
        Some(word) => {
            Health::deserialize(serde::de::value::StrDeserializer::<D::Error>::new(word)).map(Some)
        }
    }
}

#[cfg(test)]
mod sync_record_tests {
    use super::*;

    #[test]
    fn records_written_with_strings_by_the_previous_version_still_read() {
        let old = br#"{"commit_seen":"c2","commit_applied":"c1","finished_at":1700000000,"outcome":"partial",
            "message":"","objects":[
            {"resource_key":"/ConfigMap/default/a","source":"a.yaml#0","result":"created","health":"Current","message":""},
            {"resource_key":"/ConfigMap/default/b","source":"b.yaml#0","result":"failed","health":"","message":"refused"},
            {"resource_key":"apps/Deployment/default/c","source":"c.yaml#0","result":"configured","health":"InProgress","message":""}]}"#;
        let record: SyncRecord = decode("sync_status", old).unwrap();
        assert_eq!(record.outcome, SyncOutcome::Partial);
        let read: Vec<_> = record
            .objects
            .iter()
            .map(|o| (o.result, o.health))
            .collect();
        assert_eq!(
            read,
            [
                (ObjectResult::Created, Some(Health::Current)),
                (ObjectResult::Failed, None),
                (ObjectResult::Configured, Some(Health::InProgress)),
            ]
        );
        // And what this version writes reads back the same.
        let again: SyncRecord = decode("sync_status", &encode(&record)).unwrap();
        assert_eq!(again, record);
        assert!(
            decode::<SyncRecord>("sync_status", old.as_slice().strip_suffix(b"]}").unwrap())
                .is_err()
        );
    }
}

/// The outcome of the last attempt to read an agent's configuration from Git.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigStatus {
    pub commit_id: Option<String>,
    /// Set when the configuration at `commit_id` (or fetching it) failed; names the file and line.
    pub error: Option<String>,
    pub updated_at: i64,
}

#[derive(Clone)]
pub struct Store {
    db: std::sync::Arc<Handle>,
}

/// The open database, reopened when redb reports an earlier I/O failure (`PreviousIo`).
struct Handle {
    path: PathBuf,
    /// The generation counts reopenings, so concurrent callers that all saw `PreviousIo` reopen it once.
    db: RwLock<(u64, Option<Database>)>,
}

fn is_previous_io(e: &redb::TransactionError) -> bool {
    matches!(
        e,
        redb::TransactionError::Storage(redb::StorageError::PreviousIo)
    )
}

impl Handle {
    fn open(path: PathBuf) -> Result<Self, StoreError> {
        let db = open_database(&path)?;
        Ok(Self {
            path,
            db: RwLock::new((0, Some(db))),
        })
    }

    fn begin_write(&self) -> Result<redb::WriteTransaction, StoreError> {
        self.begin(Database::begin_write)
    }

    fn begin_read(&self) -> Result<redb::ReadTransaction, StoreError> {
        self.begin(|db| db.begin_read())
    }

    fn begin<T>(
        &self,
        begin: impl Fn(&Database) -> Result<T, redb::TransactionError>,
    ) -> Result<T, StoreError> {
        let generation = {
            let guard = self.db.read().expect("database lock");
            match &guard.1 {
                Some(db) => match begin(db) {
                    Err(e) if is_previous_io(&e) => guard.0,
                    other => return other.map_err(Into::into),
                },
                None => guard.0,
            }
        };
        self.reopen(generation)?;
        let guard = self.db.read().expect("database lock");
        match &guard.1 {
            Some(db) => begin(db).map_err(Into::into),
            None => Err(StoreError::Database(redb::Error::PreviousIo)),
        }
    }

    /// Closes and reopens the database, unless another caller already did since `seen`.
    fn reopen(&self, seen: u64) -> Result<(), StoreError> {
        let mut guard = self.db.write().expect("database lock");
        if guard.0 != seen && guard.1.is_some() {
            return Ok(());
        }
        // redb holds a lock on the file: the old handle must be closed before the new one opens it.
        drop(guard.1.take());
        guard.0 += 1;
        tracing::warn!(path = %self.path.display(), "reopening the database after an I/O error");
        let db = open_database(&self.path)?;
        guard.1 = Some(db);
        tracing::info!(path = %self.path.display(), "database reopened");
        Ok(())
    }
}

/// Opens (creating if needed) the database file, with every table, so readers never see "table does not
/// exist". Errors name the file.
fn open_database(path: &Path) -> Result<Database, StoreError> {
    let named = |source: redb::Error| StoreError::Open {
        path: path.display().to_string(),
        source,
    };
    let db = Database::create(path).map_err(|e| named(e.into()))?;
    let create_tables = || -> Result<(), redb::Error> {
        let txn = db.begin_write()?;
        txn.open_table(COUNTERS)?;
        txn.open_table(AGENTS)?;
        txn.open_table(AGENT_NAMES)?;
        txn.open_table(TOKENS)?;
        txn.open_table(AGENT_TOKENS)?;
        txn.open_table(TOKEN_HASHES)?;
        txn.open_table(CONFIG_STATUS)?;
        txn.open_table(GRANTS)?;
        txn.open_table(MANIFEST_STATUS)?;
        txn.open_table(SYNC_STATUS)?;
        ci_tokens::create_tables(&txn)?;
        audit::create_tables(&txn)?;
        network_alerts::create_tables(&txn)?;
        txn.commit()?;
        Ok(())
    };
    create_tables().map_err(named)?;
    Ok(db)
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records serialize")
}

fn decode<T: DeserializeOwned>(table: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        table,
        message: e.to_string(),
    })
}

fn name_key(project: &str, name: &str) -> String {
    format!("{project}\n{name}")
}

impl Store {
    /// Opens (creating if needed) the database in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|e| StoreError::Open {
            path: data_dir.display().to_string(),
            source: redb::Error::Io(e),
        })?;
        Ok(Self {
            db: std::sync::Arc::new(Handle::open(data_dir.join("kas.redb"))?),
        })
    }

    /// A real read and the start of a write, for `/healthz`: fails while the database can be neither used
    /// nor reopened.
    pub fn check(&self) -> Result<(), StoreError> {
        drop(self.db.begin_write()?);
        let txn = self.db.begin_read()?;
        txn.open_table(COUNTERS)?.get("agent")?;
        Ok(())
    }

    pub fn create_agent(&self, project_path: &str, name: &str) -> Result<AgentRecord, StoreError> {
        let txn = self.db.begin_write()?;
        let record = {
            let mut names = txn.open_table(AGENT_NAMES)?;
            let key = name_key(project_path, name);
            if names.get(key.as_str())?.is_some() {
                return Err(StoreError::DuplicateAgent {
                    project: project_path.into(),
                    name: name.into(),
                });
            }
            let id = next_id(&txn, "agent")?;
            let record = AgentRecord {
                id,
                project_path: project_path.into(),
                name: name.into(),
                created_at: now(),
            };
            names.insert(key.as_str(), id)?;
            txn.open_table(AGENTS)?
                .insert(id, encode(&record).as_slice())?;
            record
        };
        txn.commit()?;
        Ok(record)
    }

    pub fn agent(&self, id: u64) -> Result<Option<AgentRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(AGENTS)?;
        table
            .get(id)?
            .map(|v| decode("agents", v.value()))
            .transpose()
    }

    pub fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(AGENTS)?;
        table
            .iter()?
            .map(|entry| decode("agents", entry?.1.value()))
            .collect()
    }

    /// Deletes the agent, its tokens and its status; returns what was deleted.
    pub fn delete_agent(
        &self,
        id: u64,
    ) -> Result<Option<(AgentRecord, Vec<TokenRecord>)>, StoreError> {
        let txn = self.db.begin_write()?;
        let deleted = {
            let mut agents = txn.open_table(AGENTS)?;
            let Some(agent) = agents
                .remove(id)?
                .map(|v| decode::<AgentRecord>("agents", v.value()))
                .transpose()?
            else {
                return Ok(None);
            };
            txn.open_table(AGENT_NAMES)?
                .remove(name_key(&agent.project_path, &agent.name).as_str())?;
            txn.open_table(CONFIG_STATUS)?.remove(id)?;
            remove_agent_rows(&mut txn.open_table(GRANTS)?, id)?;
            remove_agent_rows(&mut txn.open_table(MANIFEST_STATUS)?, id)?;
            remove_agent_rows(&mut txn.open_table(SYNC_STATUS)?, id)?;
            network_alerts::remove_agent(&txn, id)?;
            let mut tokens = txn.open_table(TOKENS)?;
            let mut hashes = txn.open_table(TOKEN_HASHES)?;
            let mut index = txn.open_table(AGENT_TOKENS)?;
            let ids: Vec<u64> = index
                .range((id, 0)..=(id, u64::MAX))?
                .map(|entry| entry.map(|(k, _)| k.value().1))
                .collect::<Result<_, _>>()?;
            let mut mine = Vec::new();
            for token_id in ids {
                index.remove((id, token_id))?;
                if let Some(token) = tokens
                    .remove(token_id)?
                    .map(|v| decode::<TokenRecord>("tokens", v.value()))
                    .transpose()?
                {
                    hashes.remove(token.token_hash.as_str())?;
                    mine.push(token);
                }
            }
            (agent, mine)
        };
        txn.commit()?;
        Ok(Some(deleted))
    }

    /// Stores a new token for `agent_id` unless it already has `max_active` active ones.
    pub fn create_token(
        &self,
        agent_id: u64,
        name: &str,
        description: &str,
        token_hash: &str,
        max_active: usize,
    ) -> Result<TokenRecord, StoreError> {
        let txn = self.db.begin_write()?;
        let record = {
            if txn.open_table(AGENTS)?.get(agent_id)?.is_none() {
                return Err(StoreError::NoSuchAgent(agent_id));
            }
            let mut tokens = txn.open_table(TOKENS)?;
            let mut index = txn.open_table(AGENT_TOKENS)?;
            let mut active = 0;
            for entry in index.range((agent_id, 0)..=(agent_id, u64::MAX))? {
                let token_id = entry?.0.value().1;
                if let Some(v) = tokens.get(token_id)?
                    && decode::<TokenRecord>("tokens", v.value())?
                        .revoked_at
                        .is_none()
                {
                    active += 1;
                }
            }
            if active >= max_active {
                return Err(StoreError::TooManyTokens {
                    agent_id,
                    limit: max_active,
                });
            }
            let id = next_id(&txn, "token")?;
            let record = TokenRecord {
                id,
                agent_id,
                name: name.into(),
                description: description.into(),
                created_at: now(),
                revoked_at: None,
                token_hash: token_hash.into(),
            };
            tokens.insert(id, encode(&record).as_slice())?;
            index.insert((agent_id, id), ())?;
            txn.open_table(TOKEN_HASHES)?.insert(token_hash, id)?;
            record
        };
        txn.commit()?;
        Ok(record)
    }

    /// The active token with this hash, and its agent.
    pub fn active_token(
        &self,
        token_hash: &str,
    ) -> Result<Option<(TokenRecord, AgentRecord)>, StoreError> {
        let txn = self.db.begin_read()?;
        let Some(id) = txn
            .open_table(TOKEN_HASHES)?
            .get(token_hash)?
            .map(|v| v.value())
        else {
            return Ok(None);
        };
        let Some(token) = txn
            .open_table(TOKENS)?
            .get(id)?
            .map(|v| decode::<TokenRecord>("tokens", v.value()))
            .transpose()?
        else {
            return Ok(None);
        };
        let agent = txn
            .open_table(AGENTS)?
            .get(token.agent_id)?
            .map(|v| decode("agents", v.value()))
            .transpose()?;
        Ok(agent.map(|agent| (token, agent)))
    }

    pub fn token(&self, id: u64) -> Result<Option<TokenRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(TOKENS)?;
        table
            .get(id)?
            .map(|v| decode("tokens", v.value()))
            .transpose()
    }

    pub fn tokens_of(&self, agent_id: u64) -> Result<Vec<TokenRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let index = txn.open_table(AGENT_TOKENS)?;
        let tokens = txn.open_table(TOKENS)?;
        let mut out = Vec::new();
        for entry in index.range((agent_id, 0)..=(agent_id, u64::MAX))? {
            if let Some(v) = tokens.get(entry?.0.value().1)? {
                out.push(decode("tokens", v.value())?);
            }
        }
        Ok(out)
    }

    /// Marks the token revoked; returns it, or None if it does not exist. Revoking twice is harmless.
    pub fn revoke_token(&self, id: u64) -> Result<Option<TokenRecord>, StoreError> {
        let txn = self.db.begin_write()?;
        let revoked = {
            let mut tokens = txn.open_table(TOKENS)?;
            let Some(mut token) = tokens
                .get(id)?
                .map(|v| decode::<TokenRecord>("tokens", v.value()))
                .transpose()?
            else {
                return Ok(None);
            };
            if token.revoked_at.is_none() {
                token.revoked_at = Some(now());
                tokens.insert(id, encode(&token).as_slice())?;
                txn.open_table(TOKEN_HASHES)?
                    .remove(token.token_hash.as_str())?;
            }
            token
        };
        txn.commit()?;
        Ok(Some(revoked))
    }

    pub fn set_config_status(
        &self,
        agent_id: u64,
        status: &ConfigStatus,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            // Only for agents that still exist: a stream may outlive a deleted agent by a moment.
            if txn.open_table(AGENTS)?.get(agent_id)?.is_none() {
                return Ok(());
            }
            txn.open_table(CONFIG_STATUS)?
                .insert(agent_id, encode(status).as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Lets `agent_id` read `project` although it belongs to another owner.
    pub fn grant_project(&self, agent_id: u64, project: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            if txn.open_table(AGENTS)?.get(agent_id)?.is_none() {
                return Err(StoreError::NoSuchAgent(agent_id));
            }
            txn.open_table(GRANTS)?.insert((agent_id, project), ())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Returns whether there was such a grant.
    pub fn revoke_project(&self, agent_id: u64, project: &str) -> Result<bool, StoreError> {
        let txn = self.db.begin_write()?;
        let existed = txn
            .open_table(GRANTS)?
            .remove((agent_id, project))?
            .is_some();
        txn.commit()?;
        Ok(existed)
    }

    pub fn granted_projects(&self, agent_id: u64) -> Result<Vec<String>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(GRANTS)?;
        let mut out = Vec::new();
        for entry in table.range((agent_id, "")..)? {
            let (key, _) = entry?;
            let (agent, project) = key.value();
            if agent != agent_id {
                break;
            }
            out.push(project.to_owned());
        }
        Ok(out)
    }

    pub fn is_granted(&self, agent_id: u64, project: &str) -> Result<bool, StoreError> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(GRANTS)?.get((agent_id, project))?.is_some())
    }

    pub fn set_manifest_status(
        &self,
        agent_id: u64,
        project: &str,
        status: &ManifestStatus,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            if txn.open_table(AGENTS)?.get(agent_id)?.is_none() {
                return Ok(());
            }
            txn.open_table(MANIFEST_STATUS)?
                .insert((agent_id, project), encode(status).as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    pub fn set_sync_record(
        &self,
        agent_id: u64,
        project: &str,
        record: &SyncRecord,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            if txn.open_table(AGENTS)?.get(agent_id)?.is_none() {
                return Ok(());
            }
            txn.open_table(SYNC_STATUS)?
                .insert((agent_id, project), encode(record).as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    pub fn sync_record(
        &self,
        agent_id: u64,
        project: &str,
    ) -> Result<Option<SyncRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SYNC_STATUS)?;
        table
            .get((agent_id, project))?
            .map(|v| decode("sync_status", v.value()))
            .transpose()
    }

    pub fn manifest_status(
        &self,
        agent_id: u64,
        project: &str,
    ) -> Result<Option<ManifestStatus>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(MANIFEST_STATUS)?;
        table
            .get((agent_id, project))?
            .map(|v| decode("manifest_status", v.value()))
            .transpose()
    }

    pub fn manifest_statuses(
        &self,
        agent_id: u64,
    ) -> Result<Vec<(String, ManifestStatus)>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(MANIFEST_STATUS)?;
        let mut out = Vec::new();
        for entry in table.range((agent_id, "")..)? {
            let (key, value) = entry?;
            let (agent, project) = key.value();
            if agent != agent_id {
                break;
            }
            out.push((
                project.to_owned(),
                decode("manifest_status", value.value())?,
            ));
        }
        Ok(out)
    }

    pub fn config_status(&self, agent_id: u64) -> Result<Option<ConfigStatus>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(CONFIG_STATUS)?;
        table
            .get(agent_id)?
            .map(|v| decode("config_status", v.value()))
            .transpose()
    }
}

/// Deletes every `(agent_id, _)` row of a table keyed by agent and project.
fn remove_agent_rows<V: redb::Value + 'static>(
    table: &mut redb::Table<(u64, &'static str), V>,
    agent_id: u64,
) -> Result<(), StoreError> {
    let mut keys = Vec::new();
    for entry in table.range((agent_id, "")..)? {
        let (key, _) = entry?;
        let (agent, project) = key.value();
        if agent != agent_id {
            break;
        }
        keys.push(project.to_owned());
    }
    for project in keys {
        table.remove((agent_id, project.as_str()))?;
    }
    Ok(())
}

fn next_id(txn: &redb::WriteTransaction, kind: &str) -> Result<u64, StoreError> {
    let mut counters = txn.open_table(COUNTERS)?;
    let id = counters.get(kind)?.map_or(1, |v| v.value() + 1);
    counters.insert(kind, id)?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agents_and_tokens_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let (agent, token) = {
            let store = Store::open(dir.path()).unwrap();
            let agent = store.create_agent("group/config", "gitops").unwrap();
            let token = store
                .create_token(agent.id, "t", "demo", "hash-1", 2)
                .unwrap();
            (agent, token)
        };
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.agent(agent.id).unwrap(), Some(agent.clone()));
        assert_eq!(store.active_token("hash-1").unwrap(), Some((token, agent)));
    }

    #[test]
    fn names_are_unique_per_project_and_ids_are_not_reused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = store.create_agent("g/p", "gitops").unwrap();
        assert!(matches!(
            store.create_agent("g/p", "gitops"),
            Err(StoreError::DuplicateAgent { .. })
        ));
        let b = store.create_agent("g/other", "gitops").unwrap();
        assert_ne!(a.id, b.id);
        store.delete_agent(a.id).unwrap();
        let c = store.create_agent("g/p", "gitops").unwrap();
        assert!(c.id > b.id, "ids are never reused");
    }

    #[test]
    fn at_most_two_active_tokens_and_revoking_frees_a_slot() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let agent = store.create_agent("g/p", "a").unwrap();
        let t1 = store.create_token(agent.id, "1", "", "h1", 2).unwrap();
        store.create_token(agent.id, "2", "", "h2", 2).unwrap();
        assert!(matches!(
            store.create_token(agent.id, "3", "", "h3", 2),
            Err(StoreError::TooManyTokens { .. })
        ));
        let revoked = store.revoke_token(t1.id).unwrap().unwrap();
        assert!(revoked.revoked_at.is_some());
        assert_eq!(
            store.active_token("h1").unwrap(),
            None,
            "a revoked token no longer authenticates"
        );
        store.create_token(agent.id, "3", "", "h3", 2).unwrap();
        assert_eq!(store.tokens_of(agent.id).unwrap().len(), 3);
    }

    #[test]
    fn grants_and_manifest_statuses_belong_to_their_agent() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = store.create_agent("g/p", "a").unwrap();
        let b = store.create_agent("g/p", "b").unwrap();
        store.grant_project(a.id, "other/x").unwrap();
        store.grant_project(a.id, "other/y").unwrap();
        store.grant_project(b.id, "other/z").unwrap();
        assert_eq!(
            store.granted_projects(a.id).unwrap(),
            vec!["other/x", "other/y"]
        );
        assert!(
            store.is_granted(b.id, "other/z").unwrap()
                && !store.is_granted(b.id, "other/x").unwrap()
        );
        assert!(matches!(
            store.grant_project(99, "x/y"),
            Err(StoreError::NoSuchAgent(99))
        ));
        let status = ManifestStatus {
            commit_seen: Some("c".into()),
            commit_sent: None,
            selection: None,
            error: Some("e".into()),
            updated_at: 1,
        };
        store.set_manifest_status(a.id, "g/m", &status).unwrap();
        assert_eq!(
            store.manifest_statuses(a.id).unwrap(),
            vec![("g/m".to_owned(), status.clone())]
        );
        assert_eq!(store.manifest_status(a.id, "g/m").unwrap(), Some(status));
        assert_eq!(store.manifest_status(b.id, "g/m").unwrap(), None);
        assert!(store.revoke_project(a.id, "other/x").unwrap());
        store.delete_agent(a.id).unwrap();
        assert!(store.granted_projects(a.id).unwrap().is_empty());
        assert!(store.manifest_statuses(a.id).unwrap().is_empty());
        assert_eq!(store.granted_projects(b.id).unwrap(), vec!["other/z"]);
    }

    #[test]
    fn deleting_an_agent_removes_its_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let agent = store.create_agent("g/p", "a").unwrap();
        store.create_token(agent.id, "1", "", "h1", 2).unwrap();
        let (_, tokens) = store.delete_agent(agent.id).unwrap().unwrap();
        assert_eq!(tokens.len(), 1);
        assert_eq!(store.active_token("h1").unwrap(), None);
        assert_eq!(store.delete_agent(agent.id).unwrap(), None);
    }
}
