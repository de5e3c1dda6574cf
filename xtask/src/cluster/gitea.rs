//! The local backend's Gitea, built from its Go module: SQLite, loopback only, an admin user, and webhooks
//! allowed to loopback addresses (where the tests' receivers listen).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::process::{self, Started, free_port, wait_for};
use crate::state::GiteaState;
use crate::tools::{GITEA, GITEA_VERSION};

pub const ADMIN_USER: &str = "gitops-admin";

/// `gitea admin user create ...` for the admin user, shared by both backends.
pub fn admin_user_create_args(password: &str) -> Vec<String> {
    [
        "admin",
        "user",
        "create",
        "--admin",
        "--username",
        ADMIN_USER,
        "--password",
        password,
        "--email",
        "gitops-admin@example.invalid",
        "--must-change-password=false",
    ]
    .map(str::to_owned)
    .to_vec()
}

pub fn start(dir: &Path, started: &mut Vec<Started>) -> Result<GiteaState> {
    let work = dir.join("gitea");
    let logs = dir.join("logs");
    std::fs::create_dir_all(work.join("custom/conf"))?;
    let port = free_port()?;
    let url = format!("http://127.0.0.1:{port}");
    let password = random_token();
    let config = work.join("custom/conf/app.ini");
    std::fs::write(&config, app_ini(&work, port, &random_token()))?;

    gitea(&work, &config, &["migrate"])?;
    gitea(
        &work,
        &config,
        &admin_user_create_args(&password)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    )?;
    let mut command = base_command(&work, &config);
    command.arg("web");
    let web = process::spawn("gitea", command, &logs)?;
    started.push(web.clone());
    wait_for(&web, "Gitea /api/healthz", Duration::from_secs(60), || {
        http_get_ok(port, "/api/healthz")
    })?;
    Ok(GiteaState {
        url,
        admin_user: ADMIN_USER.to_owned(),
        admin_password: password,
        version: GITEA_VERSION.to_owned(),
    })
}

fn app_ini(work: &Path, port: u16, secret_key: &str) -> String {
    let work = work.display();
    // Templates and options come from the tools cache (a build without the `bindata` tag reads them from
    // disk); everything written goes under the run directory.
    let static_root = GITEA.dir();
    let static_root = static_root.display();
    format!(
        "APP_NAME = gitops test
RUN_MODE = prod
WORK_PATH = {work}

[server]
PROTOCOL = http
HTTP_ADDR = 127.0.0.1
HTTP_PORT = {port}
ROOT_URL = http://127.0.0.1:{port}/
DISABLE_SSH = true
START_SSH_SERVER = false
OFFLINE_MODE = true
LFS_START_SERVER = false
APP_DATA_PATH = {work}/data
STATIC_ROOT_PATH = {static_root}

[database]
DB_TYPE = sqlite3
PATH = {work}/data/gitea.db

[repository]
ROOT = {work}/repositories
DEFAULT_BRANCH = main

[security]
INSTALL_LOCK = true
SECRET_KEY = {secret_key}

[service]
DISABLE_REGISTRATION = true

[webhook]
; The tests' webhook receivers listen on 127.0.0.1; Gitea refuses to deliver there unless allowed.
ALLOWED_HOST_LIST = loopback
DELIVER_TIMEOUT = 10

[queue.webhook_sender]
; Gitea's default on-disk queue is polled with a backoff of up to 2 s when idle, which alone delays each
; webhook by about a second (measured by `cargo xtask bench gitops`); an in-memory queue hands it to a
; worker at once. The same setting is recommended to users in the README.
TYPE = channel

[session]
PROVIDER = memory

[cache]
ADAPTER = memory

[log]
MODE = console
LEVEL = Warn
ROOT_PATH = {work}/log

[mailer]
ENABLED = false

[actions]
ENABLED = false

[packages]
ENABLED = false

[indexer]
ISSUE_INDEXER_TYPE = db
"
    )
}

fn base_command(work: &Path, config: &Path) -> Command {
    let mut command = Command::new(GITEA.bin("gitea"));
    command
        .arg(format!("--work-path={}", work.display()))
        .arg(format!("--config={}", config.display()))
        // CI runs as root, which Gitea refuses unless told this; it only ever serves loopback here.
        .env("GITEA_I_AM_BEING_UNSAFE_RUNNING_AS_ROOT", "true")
        .env_remove("GITEA_WORK_DIR")
        .env_remove("GITEA_CUSTOM");
    command
}

fn gitea(work: &Path, config: &Path, args: &[&str]) -> Result<()> {
    let output = base_command(work, config)
        .args(args)
        .output()
        .context("run gitea")?;
    if !output.status.success() {
        bail!(
            "gitea {} failed: {}{}",
            args.first().unwrap_or(&""),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// A plain-HTTP GET to loopback, enough for a health check without an HTTP client.
pub fn http_get_ok(port: u16, path: &str) -> bool {
    let Ok(mut stream) =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500))
    else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    let mut response = String::new();
    stream.write_all(request.as_bytes()).is_ok()
        && stream.read_to_string(&mut response).is_ok()
        && response.starts_with("HTTP/1.")
        && response.split(' ').nth(1) == Some("200")
}

/// 32 hex characters from the kernel's random source; for throwaway credentials.
pub fn random_token() -> String {
    let mut bytes = [0u8; 16];
    if let Ok(mut file) = std::fs::File::open("/dev/urandom") {
        let _ = file.read_exact(&mut bytes);
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
