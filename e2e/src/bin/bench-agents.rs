//! Memory benchmark: idle RSS of kas and of agentk with one agent connected, then kas's RSS with many agents
//! connected over real sockets. kas and agentk run as separate release processes; the extra agents are
//! agentk's own library, many instances in this process, each with its own TCP connection, configuration
//! stream and two reverse tunnels.
//!
//! Run: `cargo xtask bench agents` (builds release binaries, then runs this with 1000).

use std::time::Duration;

use anyhow::Context;
use e2e::{
    AGENT_NAME, CONFIG_FILE, CONFIG_PROJECT,
    process::{KasProcess, rss_kib},
};
use gitops_tunnel::{KasAddress, client::ClientConfig};
use test_support::git_http::GitHttpServer;

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let many: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(1000);

    let git = GitHttpServer::start().await?;
    git.create_repo(CONFIG_PROJECT, true)?;
    git.commit_files(
        CONFIG_PROJECT,
        &[(
            CONFIG_FILE,
            Some("observability:\n  logging:\n    level: info\n"),
        )],
        "config",
    )?;
    let dir = tempfile::tempdir()?;
    let kas = KasProcess::start(&git, dir.path(), "warn", true).await?;

    let mut tokens = Vec::new();
    for i in 0..=many {
        let name = if i == 0 {
            AGENT_NAME.to_owned()
        } else {
            format!("sim-{i}")
        };
        let agent = kas.admin.create_agent(CONFIG_PROJECT, &name).await?;
        let id = agent["clusterAgent"]["id"]
            .as_str()
            .context("agent id")?
            .to_owned();
        let token = kas.admin.create_token(&id, "bench", "").await?;
        tokens.push(token["secret"].as_str().context("secret")?.to_owned());
    }

    let agentk = kas.agentk("grpc", &tokens[0], true)?;
    kas.wait_connected(1, Duration::from_secs(30)).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let kas_idle = rss_kib(kas.process.pid())?;
    let agentk_idle = rss_kib(agentk.pid())?;

    let own_before = rss_kib(std::process::id())?;
    let address = KasAddress::parse(&format!("grpc://127.0.0.1:{}", kas.agent_port))?;
    let mut agents = Vec::new();
    for token in &tokens[1..] {
        let options = agentk::AgentOptions {
            reverse_tunnels: 2,
            ..Default::default()
        };
        agents.push(agentk::start(
            ClientConfig::new(address.clone(), token.clone()),
            options,
            None,
        )?);
    }
    let took = kas
        .wait_connected(many + 1, Duration::from_secs(300))
        .await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let kas_many = rss_kib(kas.process.pid())?;
    let own_after = rss_kib(std::process::id())?;
    for agent in agents {
        agent.shutdown().await;
    }

    println!("== bench-agents: memory (VmRSS), release build ==");
    println!("kas idle, 1 agentk connected:      {}", mib(kas_idle));
    println!("agentk idle, connected:            {}", mib(agentk_idle));
    println!(
        "kas with {} agents connected:     {}",
        many + 1,
        mib(kas_many)
    );
    println!(
        "kas per extra agent:               {:.1} KiB ({many} agents connected in {:.1} s; each: 1 TCP connection, 1 config stream, 2 reverse tunnels)",
        kas_many.saturating_sub(kas_idle) as f64 / many as f64,
        took.as_secs_f64()
    );
    println!(
        "in-process agentk per agent:       {:.1} KiB",
        own_after.saturating_sub(own_before) as f64 / many as f64
    );
    println!(
        "kas({})/kas(1) RSS ratio:         {:.2}x",
        many + 1,
        kas_many as f64 / kas_idle as f64
    );
    Ok(())
}
