//! kas reading Git from an `https://` server behind a private CA (`git.ca_file`), as self-hosted forges
//! often are; a file that holds no certificate stops kas at start with a message naming it.

use std::time::{Duration, Instant};

use e2e::{CONFIG_FILE, CONFIG_PROJECT};
use gitops_config::ServerConfig;
use kas::cli::AdminClient;
use test_support::git_http::GitHttpServer;

fn kas_yaml(dir: &std::path::Path, git: &GitHttpServer, ca_file: &std::path::Path) -> String {
    format!(
        "listen:\n  agent: 127.0.0.1:0\n  api: 127.0.0.1:0\ndata_dir: {d}/data\nadmin_token_file: {d}/admin\ngit:\n  base_url: {}\n  username: {}\n  password_file: {d}/git-password\n  ca_file: {}\n  poll_period: 1s\n",
        git.base_url(),
        git.credentials().0,
        ca_file.display(),
        d = dir.display(),
    )
}

#[tokio::test]
async fn configuration_comes_from_an_https_git_server_with_a_private_ca() -> anyhow::Result<()> {
    test_support::cluster::install_crypto_provider();
    let git = GitHttpServer::start_tls().await?;
    assert!(git.base_url().starts_with("https://"));
    git.create_repo(CONFIG_PROJECT, true)?;
    let commit = git.commit_files(
        CONFIG_PROJECT,
        &[(
            CONFIG_FILE,
            Some("observability:\n  logging:\n    level: debug\n"),
        )],
        "config",
    )?;
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("admin"), "admin")?;
    std::fs::write(dir.path().join("git-password"), git.credentials().1)?;
    let ca_file = dir.path().join("git-ca.pem");

    // Not a certificate: kas refuses to start and says which file.
    std::fs::write(&ca_file, "not a certificate\n")?;
    let config = ServerConfig::parse("kas.yaml", &kas_yaml(dir.path(), &git, &ca_file))?;
    let Err(err) = kas::start(config).await else {
        anyhow::bail!("kas must refuse a CA file without certificates");
    };
    assert!(
        err.to_string().contains("git.ca_file") && err.to_string().contains("git-ca.pem"),
        "{err}"
    );

    std::fs::write(&ca_file, git.tls_certificate().expect("TLS"))?;
    let config = ServerConfig::parse("kas.yaml", &kas_yaml(dir.path(), &git, &ca_file))?;
    let kas = kas::start(config).await?;
    let admin = AdminClient::new(&format!("http://{}", kas.api_addr), "admin".into());
    let agent = e2e::connect_new_agent(&kas, &admin, CONFIG_PROJECT).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while agent.state.borrow().commit_id != commit {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the configuration never arrived over HTTPS: {:?}",
            agent.state.borrow()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let config = agent.state.borrow().config.clone().expect("config");
    assert_eq!(config.observability.logging.level.as_str(), "debug");
    agent.shutdown().await;
    kas.shutdown().await;
    Ok(())
}
