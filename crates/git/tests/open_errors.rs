//! Opening a cached repository while the process is out of file descriptors. A test binary of its own:
//! exhausting descriptors would break any test running beside it.

use gitops_git::{Error, GitRef, GitServerConfig, RepoCache};
use test_support::git_http::GitHttpServer;

const PROJECT: &str = "group/project";

/// A transient error (`EMFILE`) while opening a project's cache fails that call only: the cache is not
/// deleted, and once descriptors are free again it is read without fetching anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_file_descriptors_keeps_the_cache() -> anyhow::Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let server = GitHttpServer::start().await?;
    server.create_repo(PROJECT, false)?;
    let commit = server.commit_files(PROJECT, &[("a.yaml", Some("a: 1\n"))], "first")?;
    let cache_dir = tempfile::tempdir()?;
    let config = GitServerConfig {
        base_url: server.base_url(),
        username: None,
        password: None,
        extra_ca_pem: None,
    };
    let first = RepoCache::new(config.clone(), cache_dir.path().to_path_buf());
    first.snapshot(PROJECT, &GitRef::DefaultBranch).await?;
    drop(first);
    let fetches = server.request_count(PROJECT).fetches;

    // kas restarted: the project's repository is opened on first use, while no descriptor is left.
    let restarted = RepoCache::new(config, cache_dir.path().to_path_buf());
    let mut hoard = Vec::new();
    loop {
        match std::fs::File::open("/dev/null") {
            Ok(file) => hoard.push(file),
            Err(err) if err.raw_os_error() == Some(24) => break,
            Err(err) => anyhow::bail!("expected EMFILE, got {err}"),
        }
    }
    let starved = restarted.read_file(PROJECT, &commit, "a.yaml", 100).await;
    drop(hoard);
    let err = starved.expect_err("no descriptor was left to open the repository");
    assert!(
        matches!(&err, Error::Repository { project, .. } if project == PROJECT),
        "{err:?}"
    );
    assert!(
        cache_dir.path().join("group/project.git/objects").is_dir(),
        "the cache was deleted for a transient error"
    );

    assert_eq!(
        restarted.read_file(PROJECT, &commit, "a.yaml", 100).await?,
        Some(b"a: 1\n".to_vec())
    );
    restarted
        .ensure_commit(PROJECT, &GitRef::DefaultBranch, &commit)
        .await?;
    assert_eq!(server.request_count(PROJECT).fetches, fetches);
    Ok(())
}
