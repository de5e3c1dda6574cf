//! kas's log level at run time: on SIGHUP kas re-reads `logging.level` from its `kas.yaml` and switches to
//! it, without a restart and without touching anything else (`kill -HUP <pid>`, or `kubectl exec … kill -HUP 1`
//! in a pod). The rest of the file is only checked: a change there still needs a restart.

use std::path::{Path, PathBuf};

use gitops_config::{ServerConfig, agent::LogLevel};
use gitops_telemetry::LogHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// Applies `logging.level` of the file at `path`; returns the level now in force.
pub fn reload_level(path: &Path, logs: &LogHandle, current: LogLevel) -> LogLevel {
    let config = match ServerConfig::load(path) {
        Ok(config) => config,
        Err(e) => {
            error!(config = %path.display(), error = %e, level = current.as_str(), "SIGHUP: cannot read kas.yaml; the log level stays");
            return current;
        }
    };
    let level = config.logging.level;
    // Logged before the switch, so that a change to `warn` or `error` still leaves this line behind.
    info!(config = %path.display(), from = current.as_str(), to = level.as_str(), "SIGHUP: log level set from logging.level");
    if let Err(e) = logs.set_levels(level.as_str(), "error") {
        error!(error = %e, "SIGHUP: could not switch the log level");
        return current;
    }
    level
}

/// Re-reads the level on every SIGHUP until `stop`.
pub async fn on_sighup(
    path: PathBuf,
    logs: LogHandle,
    mut level: LogLevel,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            received = hangup.recv() => {
                if received.is_none() {
                    return Ok(());
                }
                level = reload_level(&path, &logs, level);
            }
        }
    }
}
