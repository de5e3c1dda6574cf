//! The Kubernetes API proxy's audit log: one record per proxied request, bounded per agent.

/// Creates this module's tables when the database opens.
pub(super) fn create_tables(_txn: &redb::WriteTransaction) -> Result<(), redb::Error> {
    Ok(())
}
