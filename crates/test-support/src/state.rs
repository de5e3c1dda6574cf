//! The test environment's state file: `cargo xtask` writes it after starting the cluster and Gitea, tests read
//! it. xtask includes this very file by path, so both sides share one schema.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Names the state file for test processes; `cargo xtask test` sets it.
pub const STATE_ENV_VAR: &str = "GITOPS_TEST_ENV";

/// Everything a test needs to reach the running infrastructure.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TestEnvState {
    /// `local` (processes built from Go modules) or `docker` (kind and a Gitea container).
    pub backend: String,
    pub kubernetes: ClusterState,
    pub gitea: GiteaState,
    pub tools: ToolPaths,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterState {
    /// A kubeconfig with cluster-admin credentials.
    pub kubeconfig: PathBuf,
    /// The API server URL, e.g. `https://127.0.0.1:34567`.
    pub server: String,
    /// The Kubernetes version, e.g. `v1.34.4`.
    pub version: String,
    /// Names of the fake (kwok) nodes that pods get scheduled to.
    pub nodes: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GiteaState {
    /// Base URL, e.g. `http://127.0.0.1:34568`, reachable from the test process.
    pub url: String,
    pub admin_user: String,
    pub admin_password: String,
    pub version: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ToolPaths {
    pub kubectl: PathBuf,
    pub helm: PathBuf,
    /// `promtool` (Prometheus's exposition linter); empty in a state file written before it was added.
    #[serde(default)]
    pub promtool: PathBuf,
    /// Prometheus Alertmanager, for the network-alerts tests; empty in a state file written before it was
    /// added.
    #[serde(default)]
    pub alertmanager: PathBuf,
}
