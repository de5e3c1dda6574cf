//! Leader election against the real apiserver: exactly one of several replicas leads, a released lease moves
//! at once, the lease of a leader that vanished moves once it expires, and clock skew between replicas
//! neither steals a renewed lease nor keeps an abandoned one.

use std::time::{Duration, Instant};

use k8s_openapi::jiff::SignedDuration;

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

/// A holder on another machine whose clock is `skew` off ours: it renews every 300 ms, writing its own time
/// as `renewTime`, until `stop`.
fn skewed_holder(
    api: Api<Lease>,
    skew: SignedDuration,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while !stop.is_cancelled() {
            if let Ok(mut lease) = api.get("agentk-leader").await {
                let spec = lease.spec.get_or_insert_with(Default::default);
                if spec.holder_identity.as_deref() != Some("skewed-pod") {
                    return; // taken over
                }
                spec.renew_time = Some(MicroTime(Timestamp::now() + skew));
                let _ = api
                    .replace("agentk-leader", &PostParams::default(), &lease)
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
}

/// Corpus K7: expiry is timed on the candidate's clock from when it saw the lease change, so a holder 30 s
/// ahead or behind keeps a lease it renews, and loses it a lease duration after it stops.
#[tokio::test]
async fn a_holder_with_a_clock_30_s_off_keeps_its_lease_while_renewing_and_loses_it_when_it_stops()
-> anyhow::Result<()> {
    install_crypto_provider();
    for skew in [
        SignedDuration::from_secs(-30),
        SignedDuration::from_secs(30),
    ] {
        let ns = TestNamespace::create("leader-skew").await?;
        let api: Api<Lease> = Api::namespaced(ns.client.clone(), &ns.name);
        let holder = Lease {
            metadata: ObjectMeta {
                name: Some("agentk-leader".into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some("skewed-pod".into()),
                lease_duration_seconds: Some(3),
                renew_time: Some(MicroTime(Timestamp::now() + skew)),
                ..Default::default()
            }),
        };
        api.create(&PostParams::default(), &holder).await?;
        let renewing = CancellationToken::new();
        let renewer = skewed_holder(api.clone(), skew, renewing.clone());
        let (mut leading, stop) = start(&ns, "candidate");
        // Three lease durations of renewals: never stolen.
        let stolen = tokio::time::timeout(Duration::from_secs(9), leading.wait_for(|l| *l))
            .await
            .is_ok();
        assert!(!stolen, "skew {skew}: a renewed lease was stolen");
        renewing.cancel();
        renewer.await?;
        let stopped = Instant::now();
        tokio::time::timeout(Duration::from_secs(8), leading.wait_for(|l| *l)).await??;
        let after = stopped.elapsed();
        assert!(
            after >= Duration::from_millis(2500),
            "skew {skew}: taken over {after:?} after the last renewal"
        );
        assert_eq!(
            api.get("agentk-leader")
                .await?
                .spec
                .unwrap()
                .holder_identity
                .as_deref(),
            Some("candidate")
        );
        stop.cancel();
        ns.delete().await?;
    }
    Ok(())
}

/// Two agents in one namespace each lead their own Lease (`agent-<id>-lock`, named once the agent id
/// arrives with the configuration), instead of one of them never applying.
#[tokio::test]
async fn two_agents_in_one_namespace_each_lead_their_own_lease() -> anyhow::Result<()> {
    install_crypto_provider();
    let ns = TestNamespace::create("leader-per-agent").await?;
    let stop = CancellationToken::new();
    let mut leaders = Vec::new();
    let mut states = Vec::new();
    for agent_id in [41, 42] {
        let (state_tx, state_rx) = watch::channel(agentk::AgentState::default());
        let (tx, rx) = watch::channel(false);
        tokio::spawn(agentk::leader::run_for_agent(
            ns.client.clone(),
            ns.name.clone(),
            "same-pod-name".into(),
            state_rx,
            tx,
            stop.clone(),
        ));
        states.push((agent_id, state_tx));
        leaders.push(rx);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        leaders.iter().all(|l| !*l.borrow()),
        "led before the agent id was known"
    );
    for (agent_id, state) in &states {
        state.send_modify(|s| s.agent_id = *agent_id);
    }
    for leading in &mut leaders {
        tokio::time::timeout(Duration::from_secs(5), leading.wait_for(|l| *l)).await??;
    }
    let api: Api<Lease> = Api::namespaced(ns.client.clone(), &ns.name);
    for name in ["agent-41-lock", "agent-42-lock"] {
        assert!(api.get_opt(name).await?.is_some(), "{name}");
    }
    stop.cancel();
    ns.delete().await?;
    Ok(())
}
