//! The local backend's Kubernetes: etcd, kube-apiserver, kube-controller-manager and kube-scheduler built
//! from Go modules, on 127.0.0.1 with free ports, and kwok standing in for kubelets on fake nodes.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::pki::{self, Pki, SERVICE_CIDR};
use crate::process::{self, Started, free_port, port_open, wait_for};
use crate::state::ClusterState;
use crate::tools::{ETCD, KUBERNETES, KUBERNETES_VERSION, KWOK, KWOK_STAGES};

/// The fake nodes pods get scheduled to.
pub const NODES: &[&str] = &["kwok-node-0", "kwok-node-1"];

/// Starts the control plane and kwok under `dir`; every started process is pushed to `started` as soon as
/// it runs, so a failure half-way still lets the caller stop what is up.
pub fn start(dir: &Path, started: &mut Vec<Started>) -> Result<ClusterState> {
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let pki = pki::generate(&dir.join("pki"))?;

    let etcd_port = free_port()?;
    let etcd = start_etcd(dir, etcd_port, &logs)?;
    started.push(etcd.clone());
    wait_for(&etcd, "etcd to listen", Duration::from_secs(30), || {
        port_open(etcd_port)
    })?;

    let api_port = free_port()?;
    let server = format!("https://127.0.0.1:{api_port}");
    let admin_kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &admin_kubeconfig,
        pki::kubeconfig(&server, &pki.ca_cert, &pki.admin, "admin"),
    )?;
    let apiserver = start_apiserver(&pki, etcd_port, api_port, &logs)?;
    started.push(apiserver.clone());
    let kubectl = Kubectl::new(&admin_kubeconfig);
    wait_for(
        &apiserver,
        "kube-apiserver /readyz",
        Duration::from_secs(90),
        || kubectl.run(&["get", "--raw", "/readyz"]).is_ok(),
    )?;

    let cm_kubeconfig = dir.join("controller-manager.kubeconfig");
    let cm_user = "system:kube-controller-manager";
    std::fs::write(
        &cm_kubeconfig,
        pki::kubeconfig(&server, &pki.ca_cert, &pki.controller_manager, cm_user),
    )?;
    let controller_manager = start_controller_manager(&pki, &cm_kubeconfig, &logs)?;
    started.push(controller_manager.clone());
    let scheduler_kubeconfig = dir.join("scheduler.kubeconfig");
    let scheduler_user = "system:kube-scheduler";
    std::fs::write(
        &scheduler_kubeconfig,
        pki::kubeconfig(&server, &pki.ca_cert, &pki.scheduler, scheduler_user),
    )?;
    started.push(start_scheduler(&scheduler_kubeconfig, &logs)?);

    let kwok = start_kwok(&admin_kubeconfig, &logs)?;
    started.push(kwok.clone());
    register_nodes(&kubectl, dir)?;
    wait_for(
        &kwok,
        "the kwok nodes to be Ready",
        Duration::from_secs(60),
        || {
            kubectl
                .run(&[
                    "wait",
                    "--for=condition=Ready",
                    "node",
                    "--all",
                    "--timeout=1s",
                ])
                .is_ok()
        },
    )?;
    // The service-account controller creates `default` in each namespace; pods cannot be admitted without it,
    // so its presence also shows the controller-manager is working.
    wait_for(
        &controller_manager,
        "the default service account",
        Duration::from_secs(60),
        || {
            kubectl
                .run(&["--namespace", "default", "get", "serviceaccount", "default"])
                .is_ok()
        },
    )?;

    Ok(ClusterState {
        kubeconfig: admin_kubeconfig,
        server,
        version: KUBERNETES_VERSION.to_owned(),
        nodes: NODES.iter().map(|n| n.to_string()).collect(),
    })
}

fn start_etcd(dir: &Path, port: u16, logs: &Path) -> Result<Started> {
    let peer_port = free_port()?;
    let client_url = format!("http://127.0.0.1:{port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let mut command = Command::new(ETCD.bin("etcd"));
    command.args([
        "--name=test",
        &format!("--data-dir={}", dir.join("etcd").display()),
        &format!("--listen-client-urls={client_url}"),
        &format!("--advertise-client-urls={client_url}"),
        &format!("--listen-peer-urls={peer_url}"),
        &format!("--initial-advertise-peer-urls={peer_url}"),
        &format!("--initial-cluster=test={peer_url}"),
        // Throwaway data: durability costs fsyncs the test run does not need.
        "--unsafe-no-fsync",
        "--log-level=warn",
    ]);
    process::spawn("etcd", command, logs)
}

fn start_apiserver(pki: &Pki, etcd_port: u16, port: u16, logs: &Path) -> Result<Started> {
    let mut command = Command::new(KUBERNETES.bin("kube-apiserver"));
    command.args([
        &format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
        "--bind-address=127.0.0.1",
        "--advertise-address=127.0.0.1",
        &format!("--secure-port={port}"),
        &format!("--tls-cert-file={}", pki.serving_cert.display()),
        &format!("--tls-private-key-file={}", pki.serving_key.display()),
        &format!("--client-ca-file={}", pki.ca_cert.display()),
        &format!(
            "--service-account-key-file={}",
            pki.service_account_public_key.display()
        ),
        &format!(
            "--service-account-signing-key-file={}",
            pki.service_account_key.display()
        ),
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        &format!("--service-cluster-ip-range={SERVICE_CIDR}"),
        "--authorization-mode=Node,RBAC",
        "--allow-privileged=true",
        // Endpoints may not hold loopback addresses, so the `kubernetes` Service's endpoints cannot name this
        // server; nothing in the tests reaches the API through that Service.
        "--endpoint-reconciler-type=none",
        "--profiling=false",
        "--v=0",
    ]);
    process::spawn("kube-apiserver", command, logs)
}

fn start_controller_manager(pki: &Pki, kubeconfig: &Path, logs: &Path) -> Result<Started> {
    let mut command = component_command("kube-controller-manager", kubeconfig)?;
    command.args([
        &format!("--root-ca-file={}", pki.ca_cert.display()),
        &format!(
            "--service-account-private-key-file={}",
            pki.service_account_key.display()
        ),
        "--use-service-account-credentials=true",
        &format!("--service-cluster-ip-range={SERVICE_CIDR}"),
    ]);
    process::spawn("kube-controller-manager", command, logs)
}

fn start_scheduler(kubeconfig: &Path, logs: &Path) -> Result<Started> {
    let command = component_command("kube-scheduler", kubeconfig)?;
    process::spawn("kube-scheduler", command, logs)
}

/// The flags the controller-manager and the scheduler share: their kubeconfig for everything, loopback on a
/// free port, no leader election (one of each), no profiling.
fn component_command(binary: &str, kubeconfig: &Path) -> Result<Command> {
    let kubeconfig = kubeconfig.display();
    let mut command = Command::new(KUBERNETES.bin(binary));
    command.args([
        &format!("--kubeconfig={kubeconfig}"),
        &format!("--authentication-kubeconfig={kubeconfig}"),
        &format!("--authorization-kubeconfig={kubeconfig}"),
        "--bind-address=127.0.0.1",
        &format!("--secure-port={}", free_port()?),
        "--leader-elect=false",
        "--profiling=false",
    ]);
    Ok(command)
}

fn start_kwok(kubeconfig: &Path, logs: &Path) -> Result<Started> {
    let mut command = Command::new(KWOK.bin("kwok"));
    command.args([
        &format!("--kubeconfig={}", kubeconfig.display()),
        "--manage-all-nodes=false",
        "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
        // Fake addresses only appear in status; loopback ones guarantee nothing is ever sent off the machine.
        "--node-ip=127.0.0.1",
        "--cidr=127.64.0.0/16",
        &format!("--server-address=127.0.0.1:{}", free_port()?),
    ]);
    for stage in KWOK_STAGES {
        let name = Path::new(stage).file_name().context("stage file name")?;
        command.arg(format!(
            "--config={}",
            KWOK.dir().join("stages").join(name).display()
        ));
    }
    process::spawn("kwok", command, logs)
}

fn register_nodes(kubectl: &Kubectl, dir: &Path) -> Result<()> {
    let mut manifest = String::new();
    for node in NODES {
        manifest.push_str(&format!(
            "---
apiVersion: v1
kind: Node
metadata:
  name: {node}
  annotations:
    kwok.x-k8s.io/node: fake
    node.alpha.kubernetes.io/ttl: \"0\"
  labels:
    kubernetes.io/hostname: {node}
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    type: kwok
status:
  allocatable: {{cpu: \"32\", memory: 256Gi, pods: \"110\"}}
  capacity: {{cpu: \"32\", memory: 256Gi, pods: \"110\"}}
"
        ));
    }
    let path = dir.join("nodes.yaml");
    std::fs::write(&path, manifest)?;
    kubectl.run(&["apply", "-f", &path.display().to_string()])?;
    Ok(())
}

/// Runs the cached kubectl against the test cluster.
pub struct Kubectl {
    kubeconfig: std::path::PathBuf,
}

impl Kubectl {
    pub fn new(kubeconfig: &Path) -> Self {
        Self {
            kubeconfig: kubeconfig.to_owned(),
        }
    }

    pub fn run(&self, args: &[&str]) -> Result<String> {
        let output = Command::new(KUBERNETES.bin("kubectl"))
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(args)
            .output()
            .context("run kubectl")?;
        if !output.status.success() {
            bail!(
                "kubectl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}
