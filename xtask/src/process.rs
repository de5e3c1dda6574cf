//! Starting the long-running infrastructure processes detached from xtask, and stopping them by pid.

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// A started process, as recorded in the run directory so `down` can stop it later.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Started {
    pub name: String,
    pub pid: u32,
    pub log: String,
}

/// `cluster up` and `up` leave the environment running after xtask exits, so they put each process in a
/// session of its own: a later Ctrl-C or hang-up in that terminal does not reach them. `cargo xtask test`
/// leaves them in its group, so a Ctrl-C while it sets up stops them together with xtask.
static DETACH: AtomicBool = AtomicBool::new(false);

pub fn detach_started_processes() {
    DETACH.store(true, Ordering::Relaxed);
}

/// Starts `command` with output to `<logs>/<name>.log`.
pub fn spawn(name: &str, command: Command, logs: &Path) -> Result<Started> {
    let log_path = logs.join(format!("{name}.log"));
    let log = std::fs::File::create(&log_path)?;
    let mut command = if DETACH.load(Ordering::Relaxed) {
        eprintln!("  starting {name} (log {})", log_path.display());
        in_own_session(&command)
    } else {
        command
    };
    command
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let child = command
        .spawn()
        .with_context(|| format!("start {name} ({:?})", command.get_program()))?;
    Ok(Started {
        name: name.to_owned(),
        pid: child.id(),
        log: log_path.display().to_string(),
    })
}

/// `command` run through `setsid(1)`, in a session of its own: neither a Ctrl-C nor the terminal closing
/// reaches it. setsid execs the program in the same process (a child of ours never leads a process group),
/// so the pid stays the program's. (`unsafe` is forbidden here, so no `pre_exec(setsid)`.)
fn in_own_session(command: &Command) -> Command {
    let mut wrapped = Command::new("setsid");
    wrapped.arg(command.get_program()).args(command.get_args());
    for (key, value) in command.get_envs() {
        match value {
            Some(value) => wrapped.env(key, value),
            None => wrapped.env_remove(key),
        };
    }
    if let Some(dir) = command.get_current_dir() {
        wrapped.current_dir(dir);
    }
    wrapped
}

pub fn is_alive(pid: u32) -> bool {
    // /proc/<pid> of an exited child that nobody reaped stays as a zombie; read its state.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// SIGTERM, then SIGKILL after `grace`.
pub fn stop(process: &Started, grace: Duration) {
    if !is_alive(process.pid) {
        return;
    }
    let _ = Command::new("kill")
        .args(["-TERM", &process.pid.to_string()])
        .status();
    let deadline = Instant::now() + grace;
    while is_alive(process.pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    if is_alive(process.pid) {
        let _ = Command::new("kill")
            .args(["-KILL", &process.pid.to_string()])
            .status();
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Waits until `check` succeeds, failing early when `process` dies; the error names its log.
pub fn wait_for(
    process: &Started,
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return Ok(());
        }
        if !is_alive(process.pid) {
            bail!(
                "{} exited while waiting for {what}; last lines of {}:\n{}",
                process.name,
                process.log,
                log_tail(&process.log)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "timed out after {timeout:?} waiting for {what}; last lines of {}:\n{}",
                process.log,
                log_tail(&process.log)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok()
}

pub fn log_tail(path: &str) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
