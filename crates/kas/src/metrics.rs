//! kas's Prometheus metrics (`kas_*`), served on `listen.observability` at `/metrics` (docs/metrics.md lists
//! them). Labels come from enums, so every label's values are a fixed set: no label carries an agent, a
//! project or an object, which keeps the series count independent of how many agents kas serves.

use std::{sync::Arc, time::Duration};

use gitops_git::{GitObserver, GitOperation};
use gitops_telemetry::prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};
use gitops_tunnel::Scheme;

use crate::{store::SyncOutcome, webhooks::Forge};

/// `{transport}`: how an agent's connection reached kas.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabels {
    pub transport: &'static str,
}

impl From<Scheme> for TransportLabels {
    fn from(scheme: Scheme) -> Self {
        Self {
            transport: scheme.as_str(),
        }
    }
}

/// `{operation, result}` of a Git network operation.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GitLabels {
    pub operation: &'static str,
    pub result: &'static str,
}

/// `{operation}` of a Git network operation.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GitOperationLabels {
    pub operation: &'static str,
}

/// How kas answered a webhook delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WebhookResult {
    /// A verified push: the project's watchers were poked.
    Accepted,
    /// Verified, but not a push event; acknowledged and ignored.
    Ignored,
    /// No or a wrong signature, or webhooks are off (no secret configured).
    Unauthorized,
    /// Verified, but the payload names no repository.
    BadPayload,
    /// The body could not be read (too large, cut off, too slow).
    BadBody,
    /// Too many deliveries in flight; the forge retries.
    Throttled,
}

impl WebhookResult {
    pub const ALL: [Self; 6] = [
        Self::Accepted,
        Self::Ignored,
        Self::Unauthorized,
        Self::BadPayload,
        Self::BadBody,
        Self::Throttled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Ignored => "ignored",
            Self::Unauthorized => "unauthorized",
            Self::BadPayload => "bad_payload",
            Self::BadBody => "bad_body",
            Self::Throttled => "throttled",
        }
    }
}

fn forge_name(forge: Forge) -> &'static str {
    match forge {
        Forge::Gitea => "gitea",
        Forge::GitHub => "github",
        Forge::GitLab => "gitlab",
    }
}

/// `{forge, result}` of a webhook delivery.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookLabels {
    pub forge: &'static str,
    pub result: &'static str,
}

/// `{outcome}` of a sync an agent reported.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

fn outcome_name(outcome: SyncOutcome) -> &'static str {
    match outcome {
        SyncOutcome::Synced => "synced",
        SyncOutcome::Partial => "partial",
        SyncOutcome::Failed => "failed",
    }
}

/// `{verb, code}` of a Kubernetes API proxy request.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProxyLabels {
    /// The Kubernetes verb (`get`, `list`, `watch`, …, `connect` for exec and port-forward).
    pub verb: &'static str,
    /// The HTTP status kas answered with; `0` when the client left before an answer.
    pub code: u16,
}

/// `{verb}` of a Kubernetes API proxy request.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerbLabels {
    pub verb: &'static str,
}

/// `{version}` of the running kas.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// Histograms of durations: 5 ms to about 82 s, doubling.
fn duration_histogram() -> Histogram {
    Histogram::new(
        gitops_telemetry::prometheus_client::metrics::histogram::exponential_buckets(
            0.005, 2.0, 15,
        ),
    )
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// The gauges [`crate::connections::Connections`] keeps current itself.
#[derive(Debug, Clone, Default)]
pub struct ConnectionGauges {
    /// Agents with at least one configuration stream open.
    pub agents_connected: Gauge,
    /// Configuration streams open (one per connected agentk replica).
    pub configuration_streams: Gauge,
    /// Manifest streams open (one per agentk replica × manifest project).
    pub manifest_streams: Gauge,
}

/// The Kubernetes API proxy's metrics, cloned into its audit log (every request ends there).
#[derive(Debug, Clone)]
pub struct ProxyMetrics {
    requests: Family<ProxyLabels, Counter>,
    duration: HistogramFamily<VerbLabels>,
    in_flight: Gauge,
}

impl ProxyMetrics {
    /// A request started.
    pub fn started(&self) {
        self.in_flight.inc();
    }

    /// A request ended (a watch when its stream closed) with `code` after `elapsed`.
    pub fn ended(&self, verb: &'static str, code: u16, elapsed: Duration) {
        self.in_flight.dec();
        self.requests
            .get_or_create(&ProxyLabels { verb, code })
            .inc();
        self.duration
            .get_or_create(&VerbLabels { verb })
            .observe(elapsed.as_secs_f64());
    }
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            in_flight: Gauge::default(),
        }
    }
}

/// `{result}` of a counted event.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// `{sink, result}` of forwarded alerts.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkLabels {
    pub sink: &'static str,
    pub result: &'static str,
}

/// The network-policy alerts' metrics (`kas_network_alerts_*`).
#[derive(Debug, Clone, Default)]
pub struct NetworkAlertMetrics {
    batches: Family<ResultLabels, Counter>,
    received: Family<ResultLabels, Counter>,
    evicted: Counter,
    forwarded: Family<SinkLabels, Counter>,
    forward_pending: Gauge,
}

impl NetworkAlertMetrics {
    /// A `ReportAlerts` batch: a repeat of a stored one, or stored with `stored` entries kept and
    /// `rejected` refused, and `evicted` alerts dropped by the bound.
    pub fn batch(&self, duplicate: bool, stored: usize, rejected: u64, evicted: usize) {
        let result = if duplicate { "duplicate" } else { "accepted" };
        self.batches.get_or_create(&ResultLabels { result }).inc();
        self.received
            .get_or_create(&ResultLabels { result: "stored" })
            .inc_by(stored as u64);
        self.received
            .get_or_create(&ResultLabels { result: "rejected" })
            .inc_by(rejected);
        self.evicted.inc_by(evicted as u64);
    }

    /// `alerts` posted to `sink` in one request.
    pub fn forwarded(
        &self,
        sink: crate::network_alerts::forward::SinkKind,
        ok: bool,
        alerts: usize,
    ) {
        let result = if ok { "ok" } else { "error" };
        self.forwarded
            .get_or_create(&SinkLabels {
                sink: sink.as_str(),
                result,
            })
            .inc_by(alerts as u64);
    }

    /// Alerts waiting to be posted, summed over the receivers.
    pub fn forward_pending(&self, alerts: usize) {
        self.forward_pending.set(alerts as i64);
    }
}

/// Every metric kas exports, and the registry that encodes them.
#[derive(Debug)]
pub struct KasMetrics {
    registry: Arc<Registry>,
    pub connections: ConnectionGauges,
    agent_connections: Family<TransportLabels, Gauge>,
    git_operations: Family<GitLabels, Counter>,
    git_duration: HistogramFamily<GitOperationLabels>,
    webhook_deliveries: Family<WebhookLabels, Counter>,
    sync_reports: Family<OutcomeLabels, Counter>,
    pub proxy: ProxyMetrics,
    pub network_alerts: NetworkAlertMetrics,
}

impl Default for KasMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl KasMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kas");
        let connections = ConnectionGauges::default();
        let agent_connections = Family::<TransportLabels, Gauge>::default();
        let git_operations = Family::<GitLabels, Counter>::default();
        let git_duration: HistogramFamily<GitOperationLabels> =
            Family::new_with_constructor(duration_histogram);
        let webhook_deliveries = Family::<WebhookLabels, Counter>::default();
        let sync_reports = Family::<OutcomeLabels, Counter>::default();
        let proxy = ProxyMetrics::default();
        let network_alerts = NetworkAlertMetrics::default();
        for result in ["accepted", "duplicate"] {
            let _ = network_alerts
                .batches
                .get_or_create(&ResultLabels { result });
        }
        for result in ["stored", "rejected"] {
            let _ = network_alerts
                .received
                .get_or_create(&ResultLabels { result });
        }
        for sink in ["alertmanager", "webhook"] {
            for result in ["ok", "error"] {
                let _ = network_alerts
                    .forwarded
                    .get_or_create(&SinkLabels { sink, result });
            }
        }
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        // Every family of a fixed label set starts at zero, so a rate() over it works from the first scrape.
        for scheme in [Scheme::Grpc, Scheme::Grpcs, Scheme::Ws, Scheme::Wss] {
            let _ = agent_connections.get_or_create(&scheme.into());
        }
        for operation in [GitOperation::LsRefs, GitOperation::Fetch] {
            for result in ["ok", "error"] {
                let _ = git_operations.get_or_create(&GitLabels {
                    operation: operation.as_str(),
                    result,
                });
            }
        }
        for forge in [Forge::Gitea, Forge::GitHub, Forge::GitLab] {
            for result in WebhookResult::ALL {
                let _ = webhook_deliveries.get_or_create(&WebhookLabels {
                    forge: forge_name(forge),
                    result: result.as_str(),
                });
            }
        }
        for outcome in [
            SyncOutcome::Synced,
            SyncOutcome::Partial,
            SyncOutcome::Failed,
        ] {
            let _ = sync_reports.get_or_create(&OutcomeLabels {
                outcome: outcome_name(outcome),
            });
        }

        registry.register(
            "build_info",
            "The running kas's version (always 1)",
            build_info,
        );
        registry.register(
            "agents_connected",
            "Agents with at least one configuration stream open to this kas",
            connections.agents_connected.clone(),
        );
        registry.register(
            "agent_connections",
            "agentk connections (configuration streams) open, by transport: grpc, grpcs, ws, wss",
            agent_connections.clone(),
        );
        registry.register(
            "configuration_streams",
            "GetConfiguration streams open (one per connected agentk replica)",
            connections.configuration_streams.clone(),
        );
        registry.register(
            "manifest_streams",
            "GetObjectsToSynchronize streams open (one per agentk replica and manifest project)",
            connections.manifest_streams.clone(),
        );
        registry.register(
            "git_operations",
            "Git network operations against the Git server, by operation (ls_refs, fetch) and result (ok, error)",
            git_operations.clone(),
        );
        registry.register_with_unit(
            "git_operation_duration",
            "How long Git network operations took, by operation (ls_refs, fetch)",
            Unit::Seconds,
            git_duration.clone(),
        );
        registry.register(
            "webhook_deliveries",
            "Push webhook deliveries, by forge and by how kas answered",
            webhook_deliveries.clone(),
        );
        registry.register(
            "sync_reports",
            "Syncs agents reported (GitopsStatus.ReportSync), by outcome: synced, partial, failed",
            sync_reports.clone(),
        );
        registry.register(
            "proxy_requests",
            "Kubernetes API proxy requests that ended, by Kubernetes verb and HTTP status (0: the client left first)",
            proxy.requests.clone(),
        );
        registry.register_with_unit(
            "proxy_request_duration",
            "Kubernetes API proxy request durations, by Kubernetes verb (a watch or exec lasts as long as its stream)",
            Unit::Seconds,
            proxy.duration.clone(),
        );
        registry.register(
            "proxy_requests_in_flight",
            "Kubernetes API proxy requests in flight (watches, logs and exec sessions included)",
            proxy.in_flight.clone(),
        );
        registry.register(
            "network_alerts_batches",
            "NetworkAlerts.ReportAlerts batches, by result: accepted, duplicate (a re-sent batch id, counted once)",
            network_alerts.batches.clone(),
        );
        registry.register(
            "network_alerts_received",
            "Alert entries in accepted batches, by result: stored, rejected (invalid; named in the log and GraphQL)",
            network_alerts.received.clone(),
        );
        registry.register(
            "network_alerts_evicted",
            "Alerts dropped to stay within alerts.max_per_agent (oldest last seen first)",
            network_alerts.evicted.clone(),
        );
        registry.register(
            "network_alerts_forwarded",
            "Alerts posted to a receiver, by sink (alertmanager, webhook) and result (ok, error)",
            network_alerts.forwarded.clone(),
        );
        registry.register(
            "network_alerts_forward_pending",
            "Alerts waiting to be posted, summed over the receivers",
            network_alerts.forward_pending.clone(),
        );
        Self {
            registry: Arc::new(registry),
            connections,
            agent_connections,
            git_operations,
            git_duration,
            webhook_deliveries,
            sync_reports,
            proxy,
            network_alerts,
        }
    }

    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// Counts an agent connection of `transport` while the guard lives. `None` (an embedder serving the
    /// services without kas's listener) is not counted.
    pub fn agent_connection(&self, transport: Option<Scheme>) -> Option<TransportGuard> {
        let gauge = self
            .agent_connections
            .get_or_create(&TransportLabels::from(transport?))
            .clone();
        gauge.inc();
        Some(TransportGuard(gauge))
    }

    pub fn webhook(&self, forge: Forge, result: WebhookResult) {
        self.webhook_deliveries
            .get_or_create(&WebhookLabels {
                forge: forge_name(forge),
                result: result.as_str(),
            })
            .inc();
    }

    pub fn sync_reported(&self, outcome: SyncOutcome) {
        self.sync_reports
            .get_or_create(&OutcomeLabels {
                outcome: outcome_name(outcome),
            })
            .inc();
    }
}

impl GitObserver for KasMetrics {
    fn observe(&self, operation: GitOperation, succeeded: bool, elapsed: Duration) {
        let result = if succeeded { "ok" } else { "error" };
        self.git_operations
            .get_or_create(&GitLabels {
                operation: operation.as_str(),
                result,
            })
            .inc();
        self.git_duration
            .get_or_create(&GitOperationLabels {
                operation: operation.as_str(),
            })
            .observe(elapsed.as_secs_f64());
    }
}

/// Decrements its transport's connection gauge when dropped.
#[derive(Debug)]
pub struct TransportGuard(Gauge);

impl Drop for TransportGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use gitops_telemetry::observability::{Exposition, NotReady, Observability, ReadinessCheck};

    use super::*;

    struct Ready;
    impl ReadinessCheck for Ready {
        fn check(
            &self,
        ) -> std::pin::Pin<Box<dyn Future<Output = Result<(), NotReady>> + Send + '_>> {
            Box::pin(async { Ok(()) })
        }
    }

    /// The metric names `# TYPE` lines declare in `exposition`.
    pub(crate) fn declared(exposition: &str) -> std::collections::BTreeSet<String> {
        exposition
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_owned)
            .collect()
    }

    /// The names in the first column of docs/metrics.md's rows that start with `prefix`.
    pub(crate) fn documented(prefix: &str) -> std::collections::BTreeSet<String> {
        include_str!("../../../docs/metrics.md")
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split('`').next())
            .filter(|name| name.starts_with(prefix))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn docs_list_every_metric_and_no_other() {
        // A family shows in the exposition once it has a series: give every one a sample.
        let metrics = KasMetrics::new();
        metrics.observe(GitOperation::LsRefs, true, Duration::from_millis(3));
        metrics.proxy.started();
        metrics.proxy.ended("get", 200, Duration::from_millis(8));
        let text = Observability::new(metrics.registry(), Arc::new(Ready))
            .encode(Exposition::PrometheusText);
        assert_eq!(
            declared(&text),
            documented("kas_"),
            "docs/metrics.md vs kas"
        );
    }

    #[test]
    fn fixed_label_sets_start_at_zero_and_guards_count_down() {
        let metrics = KasMetrics::new();
        let guard = metrics.agent_connection(Some(Scheme::Wss));
        metrics.webhook(Forge::Gitea, WebhookResult::Accepted);
        metrics.observe(GitOperation::Fetch, false, Duration::from_millis(30));
        let text = Observability::new(metrics.registry(), Arc::new(Ready))
            .encode(Exposition::PrometheusText);
        for line in [
            "kas_agent_connections{transport=\"wss\"} 1",
            "kas_agent_connections{transport=\"grpc\"} 0",
            "kas_webhook_deliveries_total{forge=\"gitea\",result=\"accepted\"} 1",
            "kas_git_operations_total{operation=\"fetch\",result=\"error\"} 1",
            "kas_git_operations_total{operation=\"ls_refs\",result=\"ok\"} 0",
            "kas_sync_reports_total{outcome=\"partial\"} 0",
            "kas_git_operation_duration_seconds_count{operation=\"fetch\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
        drop(guard);
        let text = Observability::new(metrics.registry(), Arc::new(Ready))
            .encode(Exposition::PrometheusText);
        assert!(text.contains("kas_agent_connections{transport=\"wss\"} 0"));
    }
}
