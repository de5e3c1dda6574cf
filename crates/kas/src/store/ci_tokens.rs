//! CI tokens of the Kubernetes API proxy: issued for a project (and optionally one environment), always
//! expiring, stored as SHA-256 hashes only.

/// Creates this module's tables when the database opens.
pub(super) fn create_tables(_txn: &redb::WriteTransaction) -> Result<(), redb::Error> {
    Ok(())
}
