//! A real Prometheus Alertmanager (built from its Go module into the tools cache by `cargo xtask tools
//! build`), started for one test on free loopback ports with its own storage directory and clustering off,
//! and read back through its own v2 API. Stopped when dropped.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// Routes everything to a receiver that sends nothing: the tests read the alerts through the API.
const CONFIG: &str = "route:\n  receiver: nowhere\n  group_wait: 1h\n  group_interval: 1h\n  \
                      repeat_interval: 24h\nreceivers:\n  - name: nowhere\n";

/// The Alertmanager binary the test environment's state file names; a missing one fails with how to get it.
pub fn binary() -> Result<PathBuf> {
    let env = crate::env::load()?;
    let path = env.tools.alertmanager;
    if path.as_os_str().is_empty() || !path.exists() {
        bail!(
            "Alertmanager is missing ({}): `cargo xtask tools build` builds it into the tools cache, and `cargo \
             xtask cluster up` writes its path into the state file",
            path.display()
        );
    }
    Ok(path)
}

/// One alert as `GET /api/v2/alerts` returns it (the fields the tests read).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GettableAlert {
    pub labels: std::collections::BTreeMap<String, String>,
    pub annotations: std::collections::BTreeMap<String, String>,
    pub starts_at: String,
    pub ends_at: String,
    pub status: AlertStatus,
    pub fingerprint: String,
    #[serde(rename = "generatorURL", default)]
    pub generator_url: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AlertStatus {
    /// `active`, `suppressed` or `unprocessed`.
    pub state: String,
}

/// Which alerts `GET /api/v2/alerts` returns (its query parameters).
#[derive(Debug, Clone)]
pub struct AlertQuery {
    /// Label matchers, e.g. `agent="prod"`.
    pub filter: Vec<String>,
    pub active: bool,
    pub silenced: bool,
}

impl Default for AlertQuery {
    fn default() -> Self {
        Self {
            filter: Vec::new(),
            active: true,
            silenced: true,
        }
    }
}

impl AlertQuery {
    pub fn filter(matcher: impl Into<String>) -> Self {
        Self {
            filter: vec![matcher.into()],
            ..Self::default()
        }
    }
}

#[derive(Debug)]
pub struct Alertmanager {
    /// `http://127.0.0.1:<port>`, what kas's `alerts.alertmanager_url` takes.
    pub url: String,
    child: Child,
    _dir: tempfile::TempDir,
    http: reqwest::Client,
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Alertmanager {
    /// Starts the binary of the test environment ([`binary`]).
    pub async fn start() -> Result<Self> {
        Self::start_binary(&binary()?).await
    }

    /// Starts the test environment's binary on `port` (e.g. one a client was given before Alertmanager
    /// was up).
    pub async fn start_on(port: u16) -> Result<Self> {
        Self::start_binary_on(&binary()?, port).await
    }

    /// Starts `binary` on a free port and waits until `/-/ready` answers.
    pub async fn start_binary(binary: &Path) -> Result<Self> {
        Self::start_binary_on(binary, free_port()?).await
    }

    async fn start_binary_on(binary: &Path, port: u16) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("alertmanager.yml");
        std::fs::write(&config, CONFIG)?;
        let log = std::fs::File::create(dir.path().join("alertmanager.log"))?;
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            // An empty address turns clustering (gossip on :9094) off.
            .arg("--cluster.listen-address=")
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut am = Self {
            url: format!("http://127.0.0.1:{port}"),
            child,
            _dir: dir,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?,
        };
        am.wait_ready().await?;
        Ok(am)
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "Alertmanager exited ({status}) before it was ready; log:\n{}",
                    self.log()
                );
            }
            if let Ok(response) = self.http.get(format!("{}/-/ready", self.url)).send().await
                && response.status().is_success()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("Alertmanager not ready within 30s; log:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Its log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("alertmanager.log")).unwrap_or_default()
    }

    /// `GET /api/v2/alerts` with `query`'s parameters.
    pub async fn alerts(&self, query: &AlertQuery) -> Result<Vec<GettableAlert>> {
        let mut params: Vec<(&str, String)> = vec![
            ("active", query.active.to_string()),
            ("silenced", query.silenced.to_string()),
        ];
        params.extend(query.filter.iter().map(|f| ("filter", f.clone())));
        let url = reqwest::Url::parse_with_params(&format!("{}/api/v2/alerts", self.url), &params)?;
        let response = self.http.get(url).send().await?;
        let status = response.status();
        let text = response.text().await?;
        if !status.is_success() {
            bail!("GET /api/v2/alerts: {status}: {text}");
        }
        serde_json::from_str(&text).with_context(|| format!("GET /api/v2/alerts answered {text}"))
    }

    /// Polls [`Self::alerts`] until `done` holds for the answer, for at most `timeout`; the error shows the
    /// last answer.
    pub async fn wait_for(
        &self,
        query: &AlertQuery,
        timeout: Duration,
        what: &str,
        done: impl Fn(&[GettableAlert]) -> bool,
    ) -> Result<Vec<GettableAlert>> {
        let deadline = Instant::now() + timeout;
        loop {
            let alerts = self.alerts(query).await?;
            if done(&alerts) {
                return Ok(alerts);
            }
            if Instant::now() > deadline {
                bail!("Alertmanager: {what} not within {timeout:?}; it has {alerts:#?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
