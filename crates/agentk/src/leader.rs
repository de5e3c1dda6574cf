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
use tokio::{sync::watch, time::Instant};
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
    /// How long the holder keeps leading without a successful renewal: two thirds of the lease duration
    /// (client-go's 10 s of 15 s), so it stops before anyone else may start.
    pub fn renew_deadline(&self) -> Duration {
        self.lease_duration * 2 / 3
    }

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

/// The Lease of the agent with `agent_id`, as GitLab names it: replicas of one agent share it, and two
/// agents in one namespace do not.
pub fn lease_name(agent_id: i64) -> String {
    format!("agent-{agent_id}-lock")
}

/// What of a Lease changes when its holder renews it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    lease_duration_seconds: Option<i32>,
    resource_version: Option<String>,
}

impl Record {
    fn of(lease: &Lease) -> Self {
        let spec = lease.spec.clone().unwrap_or_default();
        Self {
            holder: spec.holder_identity.filter(|h| !h.is_empty()),
            renew_time: spec.renew_time,
            lease_duration_seconds: spec.lease_duration_seconds,
            resource_version: lease.metadata.resource_version.clone(),
        }
    }
}

/// Decides expiry as client-go does, without comparing clocks of different machines: the holder's
/// `renewTime` is only a token that changes on each renewal. The time that counts is this replica's own
/// (monotonic) clock when it saw the lease change; the lease is expired once `leaseDurationSeconds` have
/// passed on that clock without a change.
#[derive(Debug, Default)]
pub struct Observer {
    last: Option<(Record, Instant)>,
}

impl Observer {
    /// Records `lease` as read at `now`; whether another replica may take it.
    fn expired(&mut self, lease: &Lease, now: Instant) -> bool {
        let record = Record::of(lease);
        if record.holder.is_none() {
            // Released (or never held).
            return true;
        }
        let duration =
            Duration::from_secs(record.lease_duration_seconds.unwrap_or(15).max(1) as u64);
        let seen = match &self.last {
            Some((last, seen)) if *last == record => *seen,
            _ => {
                self.last = Some((record, now));
                now
            }
        };
        now.duration_since(seen) >= duration
    }
}

/// One attempt to hold the lease; `Ok(true)` when this replica holds it afterwards.
async fn try_hold(
    api: &Api<Lease>,
    config: &LeaseConfig,
    observer: &mut Observer,
) -> Result<bool, kube::Error> {
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
    let expired = observer.expired(&lease, Instant::now());
    let spec = lease.spec.get_or_insert_with(Default::default);
    let mine = spec.holder_identity.as_deref() == Some(config.identity.as_str());
    if !mine && !expired {
        return Ok(false);
    }
    if !mine {
        spec.holder_identity = Some(config.identity.clone());
        spec.acquire_time = Some(now());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    // Only a token for the others (they time their own clocks from seeing it change); its value is ours.
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

/// Tells the sync loops only about a change: every renewal sending `true` again would wake them into a
/// re-check every retry period (2 s) instead of every drift-check interval.
fn set_leading(leading: &watch::Sender<bool>, now: bool) {
    leading.send_if_modified(|was| std::mem::replace(was, now) != now);
}

/// Campaigns for the lease of the agent this replica turns out to be ([`lease_name`]) until `stop`; the
/// agent id arrives with the first configuration from kas, and nothing is applied before that anyway.
pub async fn run_for_agent(
    client: Client,
    namespace: String,
    identity: String,
    mut agent: watch::Receiver<crate::AgentState>,
    leading: watch::Sender<bool>,
    stop: CancellationToken,
) {
    let agent_id = tokio::select! {
        _ = stop.cancelled() => return,
        state = agent.wait_for(|s| s.agent_id != 0) => match state {
            Ok(state) => state.agent_id,
            Err(_) => return,
        },
    };
    let config = LeaseConfig::new(&namespace, &lease_name(agent_id), &identity);
    run(client, config, leading, stop).await;
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
    let mut observer = Observer::default();
    let mut last_renewal = Instant::now();
    loop {
        let attempt = Instant::now();
        match try_hold(&api, &config, &mut observer).await {
            Ok(true) => {
                last_renewal = attempt;
                if !*leading.borrow() {
                    info!(lease = %config.name, identity = %config.identity, "became the leader: this replica applies manifests");
                }
                set_leading(&leading, true);
            }
            Ok(false) => {
                if *leading.borrow() {
                    info!(lease = %config.name, "lost the lease to another replica");
                }
                set_leading(&leading, false);
            }
            Err(e) => {
                warn!(lease = %config.name, error = %e, "leader election failed");
                // Step down before the others may take over: they wait a full lease duration from when
                // they saw our last renewal, which was no earlier than we made it.
                if *leading.borrow() && last_renewal.elapsed() >= config.renew_deadline() {
                    warn!(lease = %config.name, "could not renew the lease in time: no longer the leader");
                    set_leading(&leading, false);
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
        set_leading(&leading, false);
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::SignedDuration;

    use super::*;

    fn lease(holder: &str, renewed: Timestamp, version: u32) -> Lease {
        Lease {
            metadata: ObjectMeta {
                resource_version: Some(version.to_string()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                renew_time: Some(MicroTime(renewed)),
                lease_duration_seconds: Some(15),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn a_holder_whose_clock_is_30_s_off_keeps_its_lease_while_it_renews() {
        let start = Instant::now();
        for skew in [-30, 30] {
            let mut observer = Observer::default();
            // Renewed every 2 s by our clock, each renewTime 30 s off ours.
            for i in 0..60u32 {
                let at = start + Duration::from_secs(2 * u64::from(i));
                let renewed = Timestamp::now() + SignedDuration::from_secs(skew);
                assert!(
                    !observer.expired(&lease("other", renewed, i), at),
                    "skew {skew} s: stolen at renewal {i}"
                );
            }
        }
    }

    #[test]
    fn a_holder_that_stops_renewing_expires_after_the_lease_duration_on_our_clock() {
        let start = Instant::now();
        let mut observer = Observer::default();
        // renewTime an hour in the future: by wall clocks it would never expire.
        let stale = lease("other", Timestamp::now() + SignedDuration::from_hours(1), 1);
        assert!(!observer.expired(&stale, start), "first sight");
        assert!(!observer.expired(&stale, start + Duration::from_secs(14)));
        assert!(observer.expired(&stale, start + Duration::from_secs(15)));
        // A renewal seen later restarts the count from when we saw it.
        let renewed = lease("other", Timestamp::now() - SignedDuration::from_hours(1), 2);
        let later = start + Duration::from_secs(20);
        assert!(!observer.expired(&renewed, later));
        assert!(!observer.expired(&renewed, later + Duration::from_secs(14)));
        assert!(observer.expired(&renewed, later + Duration::from_secs(15)));
    }

    #[test]
    fn a_released_lease_is_free_at_once() {
        let mut released = lease("x", Timestamp::now(), 1);
        released.spec.as_mut().unwrap().holder_identity = None;
        assert!(Observer::default().expired(&released, Instant::now()));
        assert!(Observer::default().expired(&Lease::default(), Instant::now()));
    }

    #[test]
    fn leases_are_named_per_agent() {
        assert_eq!(lease_name(7), "agent-7-lock");
        assert_ne!(lease_name(7), lease_name(8));
    }
}
