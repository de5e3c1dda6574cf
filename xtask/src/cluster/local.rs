//! The local backend's Kubernetes: etcd, kube-apiserver, kube-controller-manager and kube-scheduler built
//! from Go modules, on 127.0.0.1 with free ports, and kwok standing in for kubelets on fake nodes.
//!
//! kwok also serves the kubelet's streaming API for its fake pods, so `kubectl exec`, `logs` and
//! `port-forward` work against them: the nodes advertise kwok's server as their kubelet endpoint
//! (127.0.0.1 and kwok's port), and the apiserver dials the InternalIP. What each of them does is
//! kwok's own configuration:
//! - exec: the `ClusterExec` in [`KWOK_CONFIG`] runs the requested command on this machine (in the run
//!   directory's `kwok-exec`), so `exec -i … -- head -n 1` echoes stdin and `kubectl cp` works through
//!   `tar`. kwok v0.8.0 never closes the command's stdin when the client's ends (its `utils/exec` copies
//!   into the pipe and leaves it open), so a command that reads to end of input never finishes; for `kubectl
//!   cp` into a pod, kwok finds a `tar` of ours first on its `PATH` ([`TAR_WRAPPER`]) that ends the input
//!   at the archive's end marker;
//! - logs and port-forward: per pod, through kwok's namespaced `Logs` and `PortForward` resources (CRDs
//!   installed here), which a test creates next to its pod: a `Logs` names a file in the CRI log format
//!   that the test writes (and appends to, for `logs -f`), a `PortForward` names a local address the
//!   test listens on.

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

    install_kwok_crds(&kubectl, dir)?;
    let kwok = start_kwok(dir, &admin_kubeconfig, &logs)?;
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
        // The kwok nodes' names do not resolve; their InternalIP is kwok's server on loopback. kwok serves
        // a self-signed certificate, which the apiserver does not verify without --kubelet-certificate-authority.
        "--kubelet-preferred-address-types=InternalIP",
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

/// kwok's configuration besides the stages: exec runs the command on this machine for every fake pod.
/// `{exec_dir}` is replaced with the working directory of those commands.
const KWOK_CONFIG: &str = "apiVersion: kwok.x-k8s.io/v1alpha1
kind: ClusterExec
metadata:
  name: local-exec
spec:
  execs:
  - local:
      workDir: {exec_dir}
";

/// The kwok kinds tests create per pod (namespaced; name = the pod's name).
const KWOK_CRDS: &[(&str, &str, &str)] = &[
    ("Logs", "logs", "logs"),
    ("PortForward", "portforwards", "portforward"),
];

/// Minimal CRDs for [`KWOK_CRDS`]: kwok's own carry the full schema; the apiserver here only has to store
/// the objects for kwok to read, so the schema preserves whatever fields they have.
fn install_kwok_crds(kubectl: &Kubectl, dir: &Path) -> Result<()> {
    let mut manifest = String::new();
    for (kind, plural, singular) in KWOK_CRDS {
        manifest.push_str(&format!(
            "---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: {plural}.kwok.x-k8s.io
spec:
  group: kwok.x-k8s.io
  names: {{kind: {kind}, listKind: {kind}List, plural: {plural}, singular: {singular}}}
  scope: Namespaced
  versions:
  - name: v1alpha1
    served: true
    storage: true
    subresources: {{status: {{}}}}
    schema:
      openAPIV3Schema: {{type: object, x-kubernetes-preserve-unknown-fields: true}}
"
        ));
    }
    let path = dir.join("kwok-crds.yaml");
    std::fs::write(&path, manifest)?;
    kubectl.run(&["apply", "-f", &path.display().to_string()])?;
    for (_, plural, _) in KWOK_CRDS {
        kubectl.run(&[
            "wait",
            "--for=condition=Established",
            &format!("crd/{plural}.kwok.x-k8s.io"),
            "--timeout=30s",
        ])?;
    }
    Ok(())
}

/// `tar` for kwok's exec (see the module comment): extraction reads the archive block by block and closes
/// the real tar's input after the two zero blocks that end it; anything else runs the real tar as is.
/// `{real_tar}` is replaced with its path.
const TAR_WRAPPER: &str = r#"#!/usr/bin/env python3
import os, subprocess, sys

REAL = "{real_tar}"
args = sys.argv[1:]
short = [a for a in args if a.startswith("-") and not a.startswith("--")]
extracting = "--extract" in args or any("x" in a for a in short) or (
    bool(args) and not args[0].startswith("-") and "x" in args[0])
if not extracting:
    os.execv(REAL, [REAL] + args)
tar = subprocess.Popen([REAL] + args, stdin=subprocess.PIPE)
source = sys.stdin.buffer

def block():
    data = b""
    while len(data) < 512:
        chunk = source.read(512 - len(data))
        if not chunk:
            return None
        data += chunk
    return data

zero_blocks = 0
while True:
    header = block()
    if header is None:
        break
    tar.stdin.write(header)
    if header == bytes(512):
        zero_blocks += 1
        if zero_blocks == 2:
            break
        continue
    zero_blocks = 0
    size = int(header[124:136].strip(b"\0 ").decode() or "0", 8)
    for _ in range((size + 511) // 512):
        data = block()
        if data is None:
            break
        tar.stdin.write(data)
tar.stdin.close()
sys.exit(tar.wait())
"#;

/// The first `name` on `PATH`.
fn on_path(name: &str) -> Result<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .with_context(|| format!("{name} is not on PATH (kwok's exec needs it for kubectl cp)"))
}

/// A directory holding [`TAR_WRAPPER`] as `tar`, to put first on kwok's `PATH`.
fn write_tar_wrapper(dir: &Path) -> Result<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    on_path("python3")?;
    let real_tar = on_path("tar")?;
    let bin = dir.join("kwok-bin");
    std::fs::create_dir_all(&bin)?;
    let wrapper = bin.join("tar");
    std::fs::write(
        &wrapper,
        TAR_WRAPPER.replace("{real_tar}", &real_tar.display().to_string()),
    )?;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
    Ok(bin)
}

fn start_kwok(dir: &Path, kubeconfig: &Path, logs: &Path) -> Result<Started> {
    let exec_dir = dir.join("kwok-exec");
    std::fs::create_dir_all(&exec_dir)?;
    let wrapper_dir = write_tar_wrapper(dir)?;
    let path = std::env::var_os("PATH").unwrap_or_default();
    let kwok_path =
        std::env::join_paths(std::iter::once(wrapper_dir).chain(std::env::split_paths(&path)))?;
    let config = dir.join("kwok.yaml");
    std::fs::write(
        &config,
        KWOK_CONFIG.replace("{exec_dir}", &exec_dir.display().to_string()),
    )?;
    // The port the nodes advertise as their kubelet endpoint is the one kwok's server listens on.
    let server_port = free_port()?;
    let crds: Vec<&str> = KWOK_CRDS.iter().map(|(kind, _, _)| *kind).collect();
    let mut command = Command::new(KWOK.bin("kwok"));
    command.env("PATH", kwok_path);
    command.args([
        &format!("--kubeconfig={}", kubeconfig.display()),
        "--manage-all-nodes=false",
        "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
        // Fake addresses only appear in status; loopback ones guarantee nothing is ever sent off the machine.
        "--node-ip=127.0.0.1",
        "--cidr=127.64.0.0/16",
        &format!("--node-port={server_port}"),
        &format!("--server-address=127.0.0.1:{server_port}"),
        &format!("--enable-crds={}", crds.join(",")),
        &format!("--config={}", config.display()),
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
