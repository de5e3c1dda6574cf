//! The seed's scenario as a test, so that `cargo xtask test` (CI) runs it too: the `seed` program that
//! `cargo xtask e2e` runs, against the test environment's cluster and Gitea, with a Gitea owner of its own.
//! Its output (every step with its time) is shown when it fails.

use std::process::Command;

use test_support::env::{STATE_ENV_VAR, test_env, unique_name};

#[test]
fn the_seed_scenario_works_through_gitea_and_its_webhook() {
    // Fails with instructions when the environment is missing.
    let _ = test_env();
    let output = Command::new(env!("CARGO_BIN_EXE_seed"))
        .env("SEED_OWNER", unique_name("seed"))
        .env(
            STATE_ENV_VAR,
            std::env::var_os(STATE_ENV_VAR).expect("checked by test_env"),
        )
        .output()
        .expect("run the seed program");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the seed scenario failed:\n{stderr}"
    );
    for line in [
        "Applying resource Deployment/nginx-deployment in cluster: ",
        "\"sync_result\":\"deployment.apps/nginx-deployment created\"",
        "\"sync_result\":\"deployment.apps/nginx-deployment configured\"",
        "\"sync_result\":\"deployment.apps/nginx-deployment pruned\"",
        "Cluster successfully synced",
        "The seed's workflow through Gitea works",
    ] {
        assert!(stderr.contains(line), "no {line:?} in:\n{stderr}");
    }
}
