//! CI tokens of the Kubernetes API proxy: issued for a project (and optionally one environment), always
//! expiring, stored as SHA-256 hashes only. Ids come from the store's counters and are never reused, so a
//! revoked id stays revoked for the proxy's switches.

use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{Store, StoreError, decode, encode, next_id, now};

const CI_TOKENS: TableDefinition<u64, &[u8]> = TableDefinition::new("ci_tokens");
/// SHA-256 of an active (not revoked) token → its id. Revoking moves the entry to [`RETIRED_HASHES`].
const CI_TOKEN_HASHES: TableDefinition<&str, u64> = TableDefinition::new("ci_token_hashes");
/// SHA-256 of a revoked token → its id, so that the proxy can say *when* it was revoked instead of only
/// "invalid".
const RETIRED_HASHES: TableDefinition<&str, u64> = TableDefinition::new("ci_token_retired_hashes");
/// `(project path, token id)`: a project's tokens by range scan.
const PROJECT_CI_TOKENS: TableDefinition<(&str, u64), ()> =
    TableDefinition::new("project_ci_tokens");

/// Creates this module's tables when the database opens.
pub(super) fn create_tables(txn: &redb::WriteTransaction) -> Result<(), redb::Error> {
    txn.open_table(CI_TOKENS)?;
    txn.open_table(CI_TOKEN_HASHES)?;
    txn.open_table(RETIRED_HASHES)?;
    txn.open_table(PROJECT_CI_TOKENS)?;
    Ok(())
}

/// One CI token; the secret itself is never stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CiTokenRecord {
    pub id: u64,
    /// The project whose CI jobs present it (`owner/name`).
    pub project_path: String,
    /// Only jobs of this environment, when set.
    pub environment: Option<String>,
    pub description: Option<String>,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds; every CI token expires.
    pub expires_at: i64,
    pub revoked_at: Option<i64>,
    /// SHA-256 (hex) of the secret.
    pub token_hash: String,
}

impl CiTokenRecord {
    /// Neither revoked nor expired at `at` (unix seconds).
    pub fn is_active_at(&self, at: i64) -> bool {
        self.revoked_at.is_none() && at < self.expires_at
    }
}

/// What a new CI token is issued for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewCiToken {
    pub project_path: String,
    pub environment: Option<String>,
    pub description: Option<String>,
    /// Unix seconds.
    pub expires_at: i64,
    pub token_hash: String,
}

impl Store {
    pub fn create_ci_token(&self, new: NewCiToken) -> Result<CiTokenRecord, StoreError> {
        let txn = self.db.begin_write()?;
        let record = {
            let id = next_id(&txn, "ci_token")?;
            let record = CiTokenRecord {
                id,
                project_path: new.project_path,
                environment: new.environment,
                description: new.description,
                created_at: now(),
                expires_at: new.expires_at,
                revoked_at: None,
                token_hash: new.token_hash,
            };
            txn.open_table(CI_TOKENS)?
                .insert(id, encode(&record).as_slice())?;
            txn.open_table(CI_TOKEN_HASHES)?
                .insert(record.token_hash.as_str(), id)?;
            txn.open_table(PROJECT_CI_TOKENS)?
                .insert((record.project_path.as_str(), id), ())?;
            record
        };
        txn.commit()?;
        Ok(record)
    }

    pub fn ci_token(&self, id: u64) -> Result<Option<CiTokenRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(CI_TOKENS)?;
        table
            .get(id)?
            .map(|v| decode("ci_tokens", v.value()))
            .transpose()
    }

    /// The token with this hash, active, expired or revoked (callers check which).
    pub fn ci_token_by_hash(&self, token_hash: &str) -> Result<Option<CiTokenRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let id = match txn.open_table(CI_TOKEN_HASHES)?.get(token_hash)? {
            Some(id) => Some(id.value()),
            None => txn
                .open_table(RETIRED_HASHES)?
                .get(token_hash)?
                .map(|v| v.value()),
        };
        let Some(id) = id else {
            return Ok(None);
        };
        txn.open_table(CI_TOKENS)?
            .get(id)?
            .map(|v| decode("ci_tokens", v.value()))
            .transpose()
    }

    /// Every CI token, or those of one project, by id.
    pub fn ci_tokens(&self, project_path: Option<&str>) -> Result<Vec<CiTokenRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let tokens = txn.open_table(CI_TOKENS)?;
        let Some(project) = project_path else {
            return tokens
                .iter()?
                .map(|entry| decode("ci_tokens", entry?.1.value()))
                .collect();
        };
        let index = txn.open_table(PROJECT_CI_TOKENS)?;
        let mut out = Vec::new();
        for entry in index.range((project, 0)..=(project, u64::MAX))? {
            if let Some(v) = tokens.get(entry?.0.value().1)? {
                out.push(decode("ci_tokens", v.value())?);
            }
        }
        Ok(out)
    }

    /// Marks the token revoked; returns it, or None if it does not exist. Revoking twice is harmless and
    /// keeps the first time.
    pub fn revoke_ci_token(&self, id: u64) -> Result<Option<CiTokenRecord>, StoreError> {
        let txn = self.db.begin_write()?;
        let revoked = {
            let mut tokens = txn.open_table(CI_TOKENS)?;
            let Some(mut token) = tokens
                .get(id)?
                .map(|v| decode::<CiTokenRecord>("ci_tokens", v.value()))
                .transpose()?
            else {
                return Ok(None);
            };
            if token.revoked_at.is_none() {
                token.revoked_at = Some(now());
                tokens.insert(id, encode(&token).as_slice())?;
                txn.open_table(CI_TOKEN_HASHES)?
                    .remove(token.token_hash.as_str())?;
                txn.open_table(RETIRED_HASHES)?
                    .insert(token.token_hash.as_str(), id)?;
            }
            token
        };
        txn.commit()?;
        Ok(Some(revoked))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_token(project: &str, hash: &str, expires_at: i64) -> NewCiToken {
        NewCiToken {
            project_path: project.into(),
            environment: Some("production".into()),
            description: None,
            expires_at,
            token_hash: hash.into(),
        }
    }

    #[test]
    fn ci_tokens_survive_reopening_and_are_found_by_hash() {
        let dir = tempfile::tempdir().unwrap();
        let created = {
            let store = Store::open(dir.path()).unwrap();
            store
                .create_ci_token(new_token("group/app", "h1", now() + 60))
                .unwrap()
        };
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.ci_token(created.id).unwrap(), Some(created.clone()));
        let found = store.ci_token_by_hash("h1").unwrap().unwrap();
        assert_eq!(found, created);
        assert!(found.is_active_at(now()));
        assert!(
            !found.is_active_at(found.expires_at),
            "expired at expires_at"
        );
        assert_eq!(store.ci_token_by_hash("nope").unwrap(), None);
    }

    #[test]
    fn ids_are_not_reused_and_lists_are_per_project() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = store
            .create_ci_token(new_token("group/app", "h1", 10))
            .unwrap();
        let b = store
            .create_ci_token(new_token("group/other", "h2", 10))
            .unwrap();
        let c = store
            .create_ci_token(new_token("group/app", "h3", 10))
            .unwrap();
        assert!(a.id < b.id && b.id < c.id);
        // Agents count separately: a CI token id is not an agent id, and neither is reused.
        let agent = store.create_agent("group/app", "a").unwrap();
        assert_eq!(agent.id, 1);
        let ids = |v: Vec<CiTokenRecord>| v.into_iter().map(|t| t.id).collect::<Vec<_>>();
        assert_eq!(
            ids(store.ci_tokens(Some("group/app")).unwrap()),
            [a.id, c.id]
        );
        assert_eq!(ids(store.ci_tokens(Some("group/ap")).unwrap()), [0u64; 0]);
        assert_eq!(ids(store.ci_tokens(None).unwrap()), [a.id, b.id, c.id]);
    }

    #[test]
    fn revoking_keeps_the_record_and_the_time_it_was_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let token = store
            .create_ci_token(new_token("group/app", "h1", now() + 60))
            .unwrap();
        let revoked = store.revoke_ci_token(token.id).unwrap().unwrap();
        let at = revoked.revoked_at.expect("revoked");
        assert!(!revoked.is_active_at(now()));
        // Still found by hash, so the proxy can say it was revoked (and when).
        assert_eq!(store.ci_token_by_hash("h1").unwrap(), Some(revoked.clone()));
        let again = store.revoke_ci_token(token.id).unwrap().unwrap();
        assert_eq!(
            again.revoked_at,
            Some(at),
            "the first revocation time stays"
        );
        assert_eq!(store.revoke_ci_token(999).unwrap(), None);
        // The active index no longer holds it.
        let txn = store.db.begin_read().unwrap();
        assert!(
            txn.open_table(CI_TOKEN_HASHES)
                .unwrap()
                .get("h1")
                .unwrap()
                .is_none()
        );
    }
}
