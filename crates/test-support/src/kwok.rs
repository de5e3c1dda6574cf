//! The kubelet side of kwok's fake pods, as the cluster harness configures it (see
//! `xtask/src/cluster/local.rs`): `exec` runs the command on this machine, and per pod a `Logs` object
//! names the file `kubectl logs` streams and a `PortForward` object the local address `kubectl
//! port-forward` reaches. Helpers here create those objects, a running fake pod, a log file in the CRI
//! format kwok reads, and a TCP echo server to forward to.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ObjectMeta, PostParams};
use kube::{Api, Client};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Why a kwok fixture could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum KwokError {
    #[error("Kubernetes request failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("cannot write the log file: {0}")]
    Io(#[from] std::io::Error),
    #[error("pod {namespace}/{name} was not Running within {within:?} (phase {phase:?})")]
    NotRunning {
        namespace: String,
        name: String,
        within: Duration,
        phase: Option<String>,
    },
}

/// The container name of [`create_running_pod`]'s pods.
pub const CONTAINER: &str = "main";

fn kwok_resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("kwok.x-k8s.io", "v1alpha1", kind),
        plural,
    )
}

/// Creates pod `name` in `namespace` (one container, [`CONTAINER`]) and waits until kwok reports it
/// Running.
pub async fn create_running_pod(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<Pod, KwokError> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            containers: vec![Container {
                name: CONTAINER.to_owned(),
                image: Some("registry.invalid/fake:1".to_owned()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    pods.create(&PostParams::default(), &pod).await?;
    let within = Duration::from_secs(60);
    let started = Instant::now();
    loop {
        let pod = pods.get(name).await?;
        let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
        if phase.as_deref() == Some("Running") {
            return Ok(pod);
        }
        if started.elapsed() > within {
            return Err(KwokError::NotRunning {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                within,
                phase,
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A container log file in the CRI format kwok reads (`<RFC 3339 time> stdout F <line>`), which a `Logs`
/// object points `kubectl logs` at; lines appended later reach `logs -f`.
pub struct PodLogFile {
    pub path: PathBuf,
}

impl PodLogFile {
    /// Creates (truncates) `path`.
    pub fn create(path: &Path) -> Result<Self, KwokError> {
        std::fs::File::create(path)?;
        Ok(Self {
            path: path.to_owned(),
        })
    }

    /// Appends `line` (without its newline) as one stdout log line.
    pub fn append(&self, line: &str) -> Result<(), KwokError> {
        let mut file = std::fs::OpenOptions::new().append(true).open(&self.path)?;
        file.write_all(cri_line(line).as_bytes())?;
        Ok(())
    }

    /// Appends many lines in one write, for big logs.
    pub fn append_all<'a>(
        &self,
        lines: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), KwokError> {
        let mut out = String::new();
        for line in lines {
            out.push_str(&cri_line(line));
        }
        let mut file = std::fs::OpenOptions::new().append(true).open(&self.path)?;
        file.write_all(out.as_bytes())?;
        Ok(())
    }
}

/// One CRI log line (stdout, full). The time is fixed: nothing here reads it, and computing it per line would
/// slow down big logs.
pub fn cri_line(line: &str) -> String {
    format!("2026-01-01T00:00:00.000000000Z stdout F {line}\n")
}

/// Points `kubectl logs` of pod `name` (every container) at `file`, following it.
pub async fn set_pod_logs(
    client: &Client,
    namespace: &str,
    name: &str,
    file: &Path,
) -> Result<(), KwokError> {
    let resource = kwok_resource("Logs", "logs");
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource);
    let mut object = DynamicObject::new(name, &resource).within(namespace);
    object.data = json!({
        "spec": { "logs": [ { "logsFile": file.display().to_string(), "follow": true } ] }
    });
    api.create(&PostParams::default(), &object).await?;
    Ok(())
}

/// Forwards port `pod_port` of pod `name` to `target` (e.g. an [`echo_server`]).
pub async fn set_pod_port_forward(
    client: &Client,
    namespace: &str,
    name: &str,
    pod_port: u16,
    target: std::net::SocketAddr,
) -> Result<(), KwokError> {
    let resource = kwok_resource("PortForward", "portforwards");
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource);
    let mut object = DynamicObject::new(name, &resource).within(namespace);
    object.data = json!({
        "spec": { "forwards": [ {
            "ports": [pod_port],
            "target": { "address": target.ip().to_string(), "port": target.port() },
        } ] }
    });
    api.create(&PostParams::default(), &object).await?;
    Ok(())
}

/// A TCP server on loopback that writes back everything it reads, on every connection, until dropped.
pub struct EchoServer {
    pub addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn echo_server() -> Result<EchoServer, KwokError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if stream.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    Ok(EchoServer { addr, task })
}
