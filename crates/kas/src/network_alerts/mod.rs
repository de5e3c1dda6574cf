//! Network-policy alerts: agentk reports dropped flows matched to annotated policies
//! (`NetworkAlerts.ReportAlerts`, [`service`]); kas keeps them per agent in its store
//! ([`crate::store::network_alerts`]) and forwards new, changed and resolved ones to Alertmanager and a
//! signed webhook from a background task ([`forward`]), so a slow receiver never holds an agent's call.

pub mod forward;
pub mod payload;
pub mod service;

use std::sync::Arc;

use gitops_config::server::AlertsConfig;

/// The alerts module's shared parts. `Debug` leaves the webhook secret out.
pub struct NetworkAlerts {
    pub config: AlertsConfig,
    /// The alerts webhook's HMAC key (`alerts.webhook.secret_file`).
    webhook_secret: Option<String>,
    /// Alerts waiting to be forwarded.
    pub pending: Arc<forward::Pending>,
    /// The latest forwarding outcome per agent.
    pub forwarding: Arc<forward::ForwardStatuses>,
}

impl NetworkAlerts {
    pub fn new(config: AlertsConfig, webhook_secret: Option<String>) -> Self {
        Self {
            config,
            webhook_secret,
            pending: Default::default(),
            forwarding: Default::default(),
        }
    }

    pub fn resolve_after_ms(&self) -> i64 {
        i64::try_from(self.config.resolve_after.as_millis()).unwrap_or(i64::MAX)
    }
}

impl std::fmt::Debug for NetworkAlerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetworkAlerts")
            .field("config", &self.config)
            .field(
                "webhook_secret",
                &self.webhook_secret.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// kas's clock, unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
