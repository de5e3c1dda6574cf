//! Leader election among agentk replicas with a `coordination.k8s.io/v1` Lease: one replica applies manifests,
//! all of them keep their connection to kas (so reverse calls and configuration keep working on every one).
//!
//! Optimistic concurrency does the locking: every write carries the Lease's `resourceVersion`, so of two
//! replicas racing for an expired lease exactly one write succeeds.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica, e.g. its pod name.
    pub identity: String,
    /// How long a lease holds without renewal.
    pub lease_duration: Duration,
    /// How often the holder renews and the others check.
    pub retry_period: Duration,
}

impl LeaseConfig {
    pub fn new(namespace: &str, name: &str, identity: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            identity: identity.to_owned(),
            lease_duration: Duration::from_secs(15),
            retry_period: Duration::from_secs(2),
        }
    }
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

fn expired(spec: &LeaseSpec, at: Timestamp) -> bool {
    let Some(MicroTime(renewed)) = &spec.renew_time else {
        return true;
    };
    let duration = spec.lease_duration_seconds.unwrap_or(15).max(1) as i64;
    at.as_second() - renewed.as_second() > duration
}

/// One attempt to hold the lease; `Ok(true)` when this replica holds it afterwards.
async fn try_hold(api: &Api<Lease>, config: &LeaseConfig) -> Result<bool, kube::Error> {
    let seconds = config.lease_duration.as_secs().max(1) as i32;
    let Some(mut lease) = api.get_opt(&config.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(config.name.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(config.identity.clone()),
                lease_duration_seconds: Some(seconds),
                acquire_time: Some(now()),
                renew_time: Some(now()),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    let mine = spec.holder_identity.as_deref() == Some(config.identity.as_str());
    if !mine && !expired(spec, Timestamp::now()) {
        return Ok(false);
    }
    if !mine {
        spec.holder_identity = Some(config.identity.clone());
        spec.acquire_time = Some(now());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.renew_time = Some(now());
    spec.lease_duration_seconds = Some(seconds);
    // `replace` sends the resourceVersion we read: a concurrent writer makes this fail with 409.
    match api
        .replace(&config.name, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Gives the lease up so another replica can take over at once instead of waiting for it to expire.
async fn release(api: &Api<Lease>, config: &LeaseConfig) -> Result<(), kube::Error> {
    if let Some(mut lease) = api.get_opt(&config.name).await?
        && let Some(spec) = lease.spec.as_mut()
        && spec.holder_identity.as_deref() == Some(config.identity.as_str())
    {
        spec.holder_identity = None;
        spec.renew_time = None;
        api.replace(&config.name, &PostParams::default(), &lease)
            .await?;
    }
    Ok(())
}

/// Campaigns until `stop`, publishing whether this replica leads. A replica that cannot reach the API server
/// stops leading once its lease would have expired, so two replicas never apply at once for long.
pub async fn run(
    client: Client,
    config: LeaseConfig,
    leading: watch::Sender<bool>,
    stop: CancellationToken,
) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let mut last_renewal = tokio::time::Instant::now();
    loop {
        match try_hold(&api, &config).await {
            Ok(true) => {
                last_renewal = tokio::time::Instant::now();
                if !*leading.borrow() {
                    info!(lease = %config.name, identity = %config.identity, "became the leader: this replica applies manifests");
                }
                leading.send_replace(true);
            }
            Ok(false) => {
                if *leading.borrow() {
                    info!(lease = %config.name, "lost the lease to another replica");
                }
                leading.send_replace(false);
            }
            Err(e) => {
                warn!(lease = %config.name, error = %e, "leader election failed");
                if last_renewal.elapsed() >= config.lease_duration {
                    leading.send_replace(false);
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(config.retry_period) => {}
        }
    }
    if *leading.borrow() {
        if let Err(e) = release(&api, &config).await {
            warn!(error = %e, "could not release the lease");
        }
        leading.send_replace(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_expire_after_their_duration() {
        let at = Timestamp::now();
        let spec = |renewed_ago: i64| LeaseSpec {
            renew_time: Some(MicroTime(
                at - k8s_openapi::jiff::SignedDuration::from_secs(renewed_ago),
            )),
            lease_duration_seconds: Some(15),
            ..Default::default()
        };
        assert!(!expired(&spec(5), at));
        assert!(expired(&spec(16), at));
        assert!(expired(&LeaseSpec::default(), at), "never renewed");
    }
}
