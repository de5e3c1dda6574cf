//! kas's log level at run time, two ways: on SIGHUP kas re-reads `logging.level` from its `kas.yaml`
//! (`kill -HUP <pid>`; nothing else in the file is applied), and the admin-only GraphQL mutation
//! `kasLogLevelSet(level: DEBUG)` sets it directly, for a kas in a container without a shell to send signals
//! from. Either lasts until the next change or restart.

use std::{
    path::{Path, PathBuf},
    sync::Mutex,
};

use gitops_config::{ServerConfig, agent::LogLevel};
use gitops_telemetry::LogHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// The installed logger and the level it runs at.
#[derive(Debug)]
pub struct LogControl {
    handle: LogHandle,
    level: Mutex<LogLevel>,
}

/// Who asked for a level change, for the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Sighup,
    Admin,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Self::Sighup => "SIGHUP",
            Self::Admin => "admin API",
        }
    }
}

impl LogControl {
    pub fn new(handle: LogHandle, level: LogLevel) -> Self {
        Self {
            handle,
            level: Mutex::new(level),
        }
    }

    pub fn level(&self) -> LogLevel {
        *self.level.lock().expect("log level lock")
    }

    /// Switches to `level`; returns the level before.
    pub fn set(
        &self,
        level: LogLevel,
        trigger: Trigger,
    ) -> Result<LogLevel, gitops_telemetry::Error> {
        let mut current = self.level.lock().expect("log level lock");
        let previous = *current;
        // Logged before the switch, so that a change to `warn` or `error` still leaves this line behind.
        info!(
            trigger = trigger.as_str(),
            from = previous.as_str(),
            to = level.as_str(),
            "log level changed"
        );
        self.handle.set_levels(level.as_str(), "error")?;
        *current = level;
        Ok(previous)
    }

    /// Applies `logging.level` of the file at `path` (SIGHUP). A file that cannot be read leaves the level.
    pub fn reload_from(&self, path: &Path) {
        let config = match ServerConfig::load(path) {
            Ok(config) => config,
            Err(e) => {
                error!(config = %path.display(), error = %e, level = self.level().as_str(), "SIGHUP: cannot read kas.yaml; the log level stays");
                return;
            }
        };
        if let Err(e) = self.set(config.logging.level, Trigger::Sighup) {
            error!(error = %e, "SIGHUP: could not switch the log level");
        }
    }
}

/// Re-reads the level from `path` on every SIGHUP until `stop`.
pub async fn on_sighup(
    path: PathBuf,
    logs: std::sync::Arc<LogControl>,
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
                logs.reload_from(&path);
            }
        }
    }
}
