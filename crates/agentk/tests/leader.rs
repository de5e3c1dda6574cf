//! Leader election against the real apiserver: exactly one of several replicas leads, a released lease moves
//! at once, and the lease of a leader that vanished moves once it expires.

use std::time::{Duration, Instant};

use agentk::leader::{LeaseConfig, run};
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::api::{Api, ObjectMeta, PostParams};
use test_support::cluster::{TestNamespace, install_crypto_provider};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

fn config(ns: &str, identity: &str) -> LeaseConfig {
    LeaseConfig {
        lease_duration: Duration::from_secs(3),
        retry_period: Duration::from_millis(300),
        ..LeaseConfig::new(ns, "agentk-leader", identity)
    }
}

fn start(ns: &TestNamespace, identity: &str) -> (watch::Receiver<bool>, CancellationToken) {
    let (tx, rx) = watch::channel(false);
    let stop = CancellationToken::new();
    tokio::spawn(run(
        ns.client.clone(),
        config(&ns.name, identity),
        tx,
        stop.clone(),
    ));
    (rx, stop)
}

#[tokio::test]
async fn exactly_one_replica_leads_and_a_released_lease_moves_at_once() -> anyhow::Result<()> {
    install_crypto_provider();
    let ns = TestNamespace::create("leader").await?;
    let replicas: Vec<_> = ["a", "b", "c"].iter().map(|id| start(&ns, id)).collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let leaders: Vec<usize> = (0..3).filter(|i| *replicas[*i].0.borrow()).collect();
    assert_eq!(leaders.len(), 1, "exactly one leader, got {leaders:?}");
    let first = leaders[0];

    replicas[first].1.cancel();
    let started = Instant::now();
    let next = loop {
        let leading: Vec<usize> = (0..3)
            .filter(|i| *i != first && *replicas[*i].0.borrow())
            .collect();
        if !leading.is_empty() {
            break leading;
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "no replica took over a released 3 s lease within 2 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(next.len(), 1, "two leaders at once: {next:?}");
    replicas.iter().for_each(|(_, stop)| stop.cancel());
    ns.delete().await?;
    Ok(())
}

#[tokio::test]
async fn a_vanished_leaders_lease_is_taken_over_after_it_expires() -> anyhow::Result<()> {
    install_crypto_provider();
    let ns = TestNamespace::create("leader-expiry").await?;
    // A leader that crashed: it holds the lease and will never renew it.
    let api: Api<Lease> = Api::namespaced(ns.client.clone(), &ns.name);
    let ghost = Lease {
        metadata: ObjectMeta {
            name: Some("agentk-leader".into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some("crashed-pod".into()),
            lease_duration_seconds: Some(3),
            renew_time: Some(MicroTime(Timestamp::now())),
            ..Default::default()
        }),
    };
    api.create(&PostParams::default(), &ghost).await?;
    let started = Instant::now();
    let (mut leading, stop) = start(&ns, "survivor");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!*leading.borrow(), "took a lease that had not expired");
    tokio::time::timeout(Duration::from_secs(8), leading.wait_for(|l| *l)).await??;
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "took over after {:?}",
        started.elapsed()
    );
    let lease = api.get("agentk-leader").await?;
    let spec = lease.spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("survivor"));
    assert_eq!(spec.lease_transitions, Some(1));
    stop.cancel();
    ns.delete().await?;
    Ok(())
}
