//! `--observability-listen`: `/metrics`, `/livez`, `/readyz` (and GitLab's `/liveness`, `/readiness`).
//! Ready means: connected to kas, a configuration received, and, on the leader, the sync of every manifest
//! project's newest commit finished (whatever its outcome: a failing project is reported, not hidden by a
//! restart loop). A project kas cannot deliver, or whose snapshot agentk refused, has nothing to sync and
//! does not hold readiness back. A follower is ready once connected and configured.

use std::{future::Future, net::SocketAddr, pin::Pin, sync::Arc};

use gitops_telemetry::observability::{NotReady, Observability, ReadinessCheck};
use gitops_tunnel::listener::HttpLimits;
use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;

use crate::{AgentState, gitops::GitopsState, metrics::AgentMetrics};

/// Parses a listen address: `host:port`, `[v6]:port`, or Go's `:port` for every interface (GitLab's
/// `--observability-listen-address` default is `:8080`).
pub fn parse_listen_address(text: &str) -> Result<SocketAddr, String> {
    let full = match text.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => text.to_owned(),
    };
    full.parse()
        .map_err(|e| format!("invalid listen address {text:?} (expected host:port or :port): {e}"))
}

/// What agentk's readiness looks at.
#[derive(Debug, Clone)]
pub struct AgentReadiness {
    pub state: watch::Receiver<AgentState>,
    pub gitops: watch::Receiver<GitopsState>,
    /// Whether this replica leads; `None` when it does not apply at all.
    pub leading: Option<watch::Receiver<bool>>,
    pub metrics: Arc<AgentMetrics>,
}

impl AgentReadiness {
    /// `Ok` when ready, else why not (naming the project and commit that holds it back).
    pub fn evaluate(&self) -> Result<(), NotReady> {
        let state = self.state.borrow();
        if !state.connected {
            return Err(NotReady("not connected to kas".into()));
        }
        if state.config.is_none() {
            return Err(NotReady("no configuration received from kas yet".into()));
        }
        drop(state);
        let leading = self.leading.as_ref().is_some_and(|l| *l.borrow());
        if !leading {
            return Ok(());
        }
        let gitops = self.gitops.borrow();
        for (entry, sync) in gitops.iter() {
            match &sync.snapshot {
                Some(snapshot)
                    if self.metrics.synced_commit(entry).as_deref()
                        != Some(snapshot.commit_id.as_str()) =>
                {
                    return Err(NotReady(format!(
                        "manifest project {}: the sync of commit {} has not finished",
                        entry.project_id, snapshot.commit_id
                    )));
                }
                Some(_) => {}
                None if sync.error.is_none() && sync.refused.is_none() => {
                    return Err(NotReady(format!(
                        "manifest project {}: no manifests received from kas yet",
                        entry.project_id
                    )));
                }
                None => {}
            }
        }
        Ok(())
    }
}

impl ReadinessCheck for AgentReadiness {
    fn check(&self) -> Pin<Box<dyn Future<Output = Result<(), NotReady>> + Send + '_>> {
        let verdict = self.evaluate();
        Box::pin(async move { verdict })
    }
}

/// Binds `addr` and serves the endpoints until `stop`; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    readiness: AgentReadiness,
    stop: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let socket = TcpListener::bind(addr).await?;
    let bound = socket.local_addr()?;
    let endpoints = Observability::new(readiness.metrics.registry(), Arc::new(readiness));
    let service = tower::service_fn(move |request| {
        let endpoints = endpoints.clone();
        async move { Ok::<_, std::convert::Infallible>(endpoints.handle(request).await) }
    });
    let task = tokio::spawn(gitops_tunnel::listener::serve(
        socket,
        service,
        None,
        HttpLimits {
            max_connections: 64,
            ..HttpLimits::default()
        },
        stop,
    ));
    Ok((bound, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_take_gos_port_only_form() {
        assert_eq!(
            parse_listen_address(":8080").unwrap(),
            "0.0.0.0:8080".parse().unwrap()
        );
        assert_eq!(
            parse_listen_address("127.0.0.1:0").unwrap(),
            "127.0.0.1:0".parse().unwrap()
        );
        assert_eq!(
            parse_listen_address("[::1]:9").unwrap(),
            "[::1]:9".parse().unwrap()
        );
        assert!(
            parse_listen_address("8080")
                .unwrap_err()
                .contains("\"8080\"")
        );
    }

    #[test]
    fn readiness_needs_kas_a_configuration_and_on_the_leader_every_sync() {
        let (state_tx, state) = watch::channel(AgentState::default());
        let (_gitops_tx, gitops) = watch::channel(GitopsState::default());
        let (leading_tx, leading) = watch::channel(false);
        let readiness = AgentReadiness {
            state,
            gitops,
            leading: Some(leading),
            metrics: Arc::default(),
        };
        assert_eq!(
            readiness.evaluate(),
            Err(NotReady("not connected to kas".into()))
        );
        state_tx.send_modify(|s| s.connected = true);
        assert!(
            readiness
                .evaluate()
                .unwrap_err()
                .0
                .contains("no configuration")
        );
        state_tx.send_modify(|s| s.config = Some(Arc::default()));
        assert_eq!(readiness.evaluate(), Ok(()), "a follower is ready");
        leading_tx.send_replace(true);
        assert_eq!(readiness.evaluate(), Ok(()), "a leader with no projects");
    }
}
