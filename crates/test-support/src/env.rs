//! Finds the running test environment through the state file named by `GITOPS_TEST_ENV`.
//!
//! Tests that need the cluster or Gitea call [`test_env`]; without the variable they fail with a message
//! that says how to run them, never skip: a test that silently passes without its infrastructure proves nothing.

use std::sync::OnceLock;

pub use crate::state::{ClusterState, GiteaState, STATE_ENV_VAR, TestEnvState, ToolPaths};

/// Why the test environment could not be found.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error(
        "{STATE_ENV_VAR} is not set: these tests need the Kubernetes cluster and Gitea; run them via `cargo xtask test` \
         (or start them with `cargo xtask cluster up` and export {STATE_ENV_VAR}=<the state file it prints>)"
    )]
    Missing,
    #[error("cannot read the test environment state file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the test environment state file {path} is malformed: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
}

/// Reads the state file named by `GITOPS_TEST_ENV`.
pub fn load() -> Result<TestEnvState, EnvError> {
    let path = std::env::var_os(STATE_ENV_VAR).ok_or(EnvError::Missing)?;
    let path_text = path.to_string_lossy().into_owned();
    let text = std::fs::read_to_string(&path).map_err(|source| EnvError::Read {
        path: path_text.clone(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| EnvError::Parse {
        path: path_text,
        source,
    })
}

/// The running test environment, read once per test binary. Panics (fails the test) with instructions when
/// it is not there.
pub fn test_env() -> &'static TestEnvState {
    static ENV: OnceLock<TestEnvState> = OnceLock::new();
    ENV.get_or_init(|| load().unwrap_or_else(|err| panic!("{err}")))
}

/// A name unique to this test process and call, for namespaces and repositories: `<prefix>-<random>`,
/// lowercase and DNS-label safe.
pub fn unique_name(prefix: &str) -> String {
    use rand::Rng;
    let suffix: u32 = rand::rng().random();
    let prefix: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    format!("{}-{suffix:08x}", prefix.trim_matches('-'))
}
