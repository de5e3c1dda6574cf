//! kas under hostile peers and failing storage, on real sockets on loopback: slowloris and idle connections on
//! both ports, caps of connections and of calls per token, webhook and GraphQL abuse, a full disk (a real
//! tmpfs), a corrupt database, secrets kept out of `Debug`, and the kas chart without a Git password.

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context;
use gitops_config::ServerConfig;
use kas::{RunningKas, cli::AdminClient};
use serde_json::{Value, json};
use test_support::git_http::GitHttpServer;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const ADMIN: &str = "admin-secret-for-hardening";
/// The agents [`Kas::agent`] registers, in order; each has a `config.yaml`.
const AGENT_NAMES: [&str; 4] = [e2e::AGENT_NAME, "second", "third", "fourth"];

/// kas with `listen_extra` (indented `listen:` keys) on loopback, and a Git server with the configuration
/// project.
struct Kas {
    git: GitHttpServer,
    kas: RunningKas,
    admin: AdminClient,
    dir: tempfile::TempDir,
}

fn kas_yaml(dir: &Path, git: &GitHttpServer, listen_extra: &str, data_dir: &Path) -> String {
    format!(
        "listen:\n  agent: 127.0.0.1:0\n  api: 127.0.0.1:0\n{listen_extra}data_dir: {data}\nadmin_token_file: {d}/admin-token\ngit:\n  base_url: {base}\n  username: {user}\n  password_file: {d}/git-password\n  poll_period: 1s\nwebhooks:\n  secret_file: {d}/webhook-secret\nlogging:\n  format: text\n",
        d = dir.display(),
        data = data_dir.display(),
        base = git.base_url(),
        user = git.credentials().0,
    )
}

impl Kas {
    async fn start(listen_extra: &str) -> anyhow::Result<Self> {
        Self::start_with(listen_extra, "", None).await
    }

    async fn start_in(listen_extra: &str, data_dir: Option<&Path>) -> anyhow::Result<Self> {
        Self::start_with(listen_extra, "", data_dir).await
    }

    /// `top_extra`: more top-level `kas.yaml` keys (e.g. `manifests:`).
    async fn start_with(
        listen_extra: &str,
        top_extra: &str,
        data_dir: Option<&Path>,
    ) -> anyhow::Result<Self> {
        test_support::cluster::install_crypto_provider();
        if let Ok(level) = std::env::var("E2E_LOG") {
            let _ = gitops_telemetry::init(gitops_telemetry::Format::Text, &level, "warn");
        }
        let git = GitHttpServer::start().await?;
        git.create_repo(e2e::CONFIG_PROJECT, true)?;
        git.commit_files(
            e2e::CONFIG_PROJECT,
            &[(
                e2e::CONFIG_FILE,
                Some("observability:\n  logging:\n    level: info\n"),
            )],
            "init",
        )?;
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("admin-token"), ADMIN)?;
        std::fs::write(dir.path().join("git-password"), git.credentials().1)?;
        std::fs::write(dir.path().join("webhook-secret"), "hook-secret")?;
        let data = data_dir.map_or_else(|| dir.path().join("data"), Path::to_path_buf);
        let yaml = format!(
            "{top_extra}{}",
            kas_yaml(dir.path(), &git, listen_extra, &data)
        );
        let kas = kas::start(ServerConfig::parse("kas.yaml", &yaml)?).await?;
        let admin = AdminClient::new(&format!("http://{}", kas.api_addr), ADMIN.into());
        Ok(Self {
            git,
            kas,
            admin,
            dir,
        })
    }

    /// A connected, configured agent: [`e2e::AGENT_NAME`] first, then the other [`AGENT_NAMES`].
    async fn agent(&self) -> anyhow::Result<agentk::RunningAgent> {
        let registered = self.admin.list_agents(None).await?;
        let taken = registered.as_array().map_or(0, Vec::len);
        let name = AGENT_NAMES.get(taken).context("out of agent names")?;
        let created = self.admin.create_agent(e2e::CONFIG_PROJECT, name).await?;
        let id = created["clusterAgent"]["id"]
            .as_str()
            .context("agent id")?
            .to_owned();
        let token = self.admin.create_token(&id, "t", "").await?;
        let secret = token["secret"].as_str().context("secret")?.to_owned();
        let address = gitops_tunnel::KasAddress::parse(&format!("grpc://{}", self.kas.agent_addr))?;
        let agent = agentk::start(
            gitops_tunnel::client::ClientConfig::new(address, secret),
            agentk::AgentOptions::default(),
            None,
        )?;
        e2e::wait_for_state(&agent, Duration::from_secs(20), "connected", |s| {
            s.connected && s.config.is_some()
        })
        .await?;
        Ok(agent)
    }

    fn api(&self) -> String {
        format!("http://{}", self.kas.api_addr)
    }

    async fn graphql(&self, body: Value) -> anyhow::Result<(u16, Value)> {
        let response = reqwest::Client::new()
            .post(format!("{}/api/graphql", self.api()))
            .bearer_auth(ADMIN)
            .json(&body)
            .send()
            .await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await?))
    }
}

/// Reads until the peer closes the connection; how long that took, or an error if it stayed open past
/// `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        let left = within.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => anyhow::bail!("the connection was still open after {within:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(started.elapsed()),
            Ok(Ok(_)) => continue,
        }
    }
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame.
const H2_SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

#[tokio::test]
async fn the_agent_port_closes_silent_slow_and_unauthenticated_connections() -> anyhow::Result<()> {
    let k =
        Kas::start("  auth_timeout: 1s\n  header_read_timeout: 1s\n  keepalive: 300ms\n").await?;
    let agent = k.agent().await?;
    let addr = k.kas.agent_addr;
    let limit = Duration::from_secs(3);

    // [A6] Nothing at all; then 0–23 bytes of the HTTP/2 preface (hyper's version sniffing waits for 24).
    for sent in [0usize, 1, 10, 23] {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(&H2_PREFACE[..sent]).await?;
        let took = closed_within(&mut s, limit)
            .await
            .with_context(|| format!("{sent} bytes of the preface, then silence"))?;
        assert!(
            took >= Duration::from_millis(900),
            "{sent} bytes: closed after {took:?}"
        );
    }
    // A whole HTTP/2 connection that never makes a call, kept alive by the server's own pings.
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(H2_PREFACE).await?;
    s.write_all(H2_SETTINGS).await?;
    closed_within(&mut s, limit)
        .await
        .context("an HTTP/2 connection without calls")?;
    // HTTP/1 headers at one byte every 300 ms.
    let mut s = TcpStream::connect(addr).await?;
    let (mut r, mut w) = s.split();
    let slow = trickle_half(
        &mut w,
        b"GET /agentk HTTP/1.1\r\nHost: kas\r\nUpgrade: websocket\r\n\r\n",
    );
    let closed = closed_within_half(&mut r, limit);
    tokio::select! {
        () = slow => anyhow::bail!("all the slow headers were accepted"),
        result = closed => { result.context("HTTP/1 headers at one byte per 300 ms")?; }
    }

    // The agent's own connection never noticed.
    assert!(agent.state.borrow().connected);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        agent.state.borrow().connected,
        "the agent's connection was cut"
    );
    agent.shutdown().await;
    k.kas.shutdown().await;
    Ok(())
}

async fn trickle_half(w: &mut tokio::net::tcp::WriteHalf<'_>, bytes: &[u8]) {
    for byte in bytes {
        if w.write_all(&[*byte]).await.is_err() {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn closed_within_half(
    r: &mut tokio::net::tcp::ReadHalf<'_>,
    within: Duration,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        let left = within.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, r.read(&mut buf)).await {
            Err(_) => anyhow::bail!("the connection was still open after {within:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(started.elapsed()),
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test]
async fn idle_connections_beyond_the_cap_are_closed_at_once_and_agents_keep_working()
-> anyhow::Result<()> {
    // [A7] A flood of idle, unauthenticated connections.
    let k = Kas::start("  auth_timeout: 2s\n  max_unauthenticated_connections: 20\n").await?;
    let agent = k.agent().await?;
    let addr = k.kas.agent_addr;
    let mut idle = Vec::new();
    for _ in 0..60 {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(H2_PREFACE).await?;
        idle.push(s);
    }
    // Past the cap, connections are closed at once (long before the 2 s timeout).
    let mut closed_at_once = 0;
    for s in idle.iter_mut().skip(20) {
        if closed_within(s, Duration::from_millis(500)).await.is_ok() {
            closed_at_once += 1;
        }
    }
    assert_eq!(closed_at_once, 40, "connections over the cap stayed open");
    // The rest are closed by the timeout.
    for s in idle.iter_mut().take(20) {
        closed_within(s, Duration::from_secs(4)).await?;
    }
    assert!(agent.state.borrow().connected);
    // A new agent connects once the flood is gone.
    let second = k.agent().await?;
    assert!(agent.state.borrow().connected);
    second.shutdown().await;
    agent.shutdown().await;
    k.kas.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn calls_in_flight_are_capped_per_token() -> anyhow::Result<()> {
    use gitops_protocol::{
        ConfigurationRequest, agent_configuration_client::AgentConfigurationClient,
    };
    let k = Kas::start("  max_calls_per_token: 3\n").await?;
    let (_, _, secret) = e2e::register_agent(&k.admin, e2e::CONFIG_PROJECT).await?;
    let (_, _, other) = {
        let agent = k.admin.create_agent(e2e::CONFIG_PROJECT, "other").await?;
        let id = agent["clusterAgent"]["id"]
            .as_str()
            .context("id")?
            .to_owned();
        let token = k.admin.create_token(&id, "t", "").await?;
        (
            id,
            (),
            token["secret"].as_str().context("secret")?.to_owned(),
        )
    };
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", k.kas.agent_addr))?
        .connect()
        .await?;
    let call = |token: String| {
        let mut client = AgentConfigurationClient::new(channel.clone());
        async move {
            let mut request = tonic::Request::new(ConfigurationRequest::default());
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse()?);
            let mut stream = client.get_configuration(request).await?.into_inner();
            // The first message proves the call was admitted.
            stream.message().await?;
            anyhow::Ok(stream)
        }
    };
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(call(secret.clone()).await?);
    }
    let refused = call(secret.clone()).await.unwrap_err();
    let status = refused
        .downcast_ref::<tonic::Status>()
        .with_context(|| format!("{refused:#}"))?;
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("listen.max_calls_per_token"));
    // Another token is not affected.
    let _other_stream = call(other).await?;
    // Ending a call frees its slot.
    drop(held.pop());
    e2e::eventually(Duration::from_secs(5), "a freed call slot", || {
        let call = call(secret.clone());
        async move { Ok(call.await.is_ok()) }
    })
    .await?;
    k.kas.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn the_api_port_cuts_off_slow_headers_slow_bodies_and_idle_connections() -> anyhow::Result<()>
{
    // [G8]
    let k = Kas::start(
        "  header_read_timeout: 1s\n  body_read_timeout: 2s\n  max_api_connections: 8\n",
    )
    .await?;
    let agent = k.agent().await?;
    let addr = k.kas.api_addr;
    let limit = Duration::from_secs(4);

    // Idle: connected, nothing sent.
    let mut s = TcpStream::connect(addr).await?;
    let took = closed_within(&mut s, limit)
        .await
        .context("an idle API connection")?;
    assert!(took >= Duration::from_millis(900), "closed after {took:?}");

    // Headers at one byte every 300 ms.
    let mut s = TcpStream::connect(addr).await?;
    let (mut r, mut w) = s.split();
    tokio::select! {
        () = trickle_half(&mut w, b"GET /healthz HTTP/1.1\r\nHost: kas\r\nX-Slow: aaaaaaaaaaaaaaaa\r\n\r\n") =>
            anyhow::bail!("all the slow headers were accepted"),
        result = closed_within_half(&mut r, limit) => { result.context("slow API headers")?; }
    }

    // A body at one byte every 300 ms: refused when body_read_timeout passes.
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        b"POST /api/webhooks/gitea HTTP/1.1\r\nHost: kas\r\nContent-Length: 1000\r\nX-Gitea-Event: push\r\n\r\n",
    )
    .await?;
    let (mut r, mut w) = s.split();
    let started = Instant::now();
    tokio::select! {
        () = trickle_half(&mut w, &[b'x'; 1000]) => anyhow::bail!("the whole slow body was accepted"),
        result = closed_within_half(&mut r, Duration::from_secs(6)) => { result.context("a slow API body")?; }
    }
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "cut after {:?}",
        started.elapsed()
    );

    // More connections than max_api_connections: the ones over the cap are closed at once.
    let mut idle = Vec::new();
    for _ in 0..12 {
        idle.push(TcpStream::connect(addr).await?);
    }
    let mut closed_at_once = 0;
    for s in &mut idle {
        if closed_within(s, Duration::from_millis(500)).await.is_ok() {
            closed_at_once += 1;
        }
    }
    assert!(
        closed_at_once >= 4,
        "only {closed_at_once} of 12 closed at once"
    );
    drop(idle);

    // The API and the agent still work.
    e2e::eventually(Duration::from_secs(5), "healthz", || async {
        Ok(reqwest::get(format!("{}/healthz", k.api())).await?.status() == 200)
    })
    .await?;
    assert!(agent.state.borrow().connected);
    agent.shutdown().await;
    k.kas.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn webhook_abuse_is_refused_with_the_right_status() -> anyhow::Result<()> {
    let k = Kas::start("").await?;
    let http = reqwest::Client::new();
    let url = |forge: &str| format!("{}/api/webhooks/{forge}", k.api());
    // [W4] An unknown forge.
    let response = http.post(url("bitbucket")).body("{}").send().await?;
    assert_eq!(response.status(), 404);
    // [W3] GitLab's token with another case.
    for token in ["hook-secret", "HOOK-SECRET", "Hook-Secret"] {
        let response = http
            .post(url("gitlab"))
            .header("x-gitlab-event", "Push Hook")
            .header("x-gitlab-token", token)
            .body(r#"{"project":{"path_with_namespace":"group/config"}}"#)
            .send()
            .await?;
        let expected = if token == "hook-secret" { 202 } else { 401 };
        assert_eq!(response.status(), expected, "token {token:?}");
    }
    // [W6] One byte over 5 MiB.
    let response = http
        .post(url("gitea"))
        .header("x-gitea-event", "push")
        .header("x-gitea-signature", "00")
        .body(vec![b' '; kas::api::MAX_WEBHOOK_BODY + 1])
        .send()
        .await?;
    assert_eq!(response.status(), 413);
    // [W7] Signed, but not JSON / no repository name / absurd values.
    for body in [
        &b"not json"[..],
        b"{}",
        b"{\"repository\":{\"full_name\":1e999999}}",
        b"{\"repository\":{\"full_name\":\"\xff\xfe\"}}",
    ] {
        let response = http
            .post(url("gitea"))
            .header("x-gitea-event", "push")
            .header("x-gitea-signature", hmac(b"hook-secret", body))
            .body(body.to_vec())
            .send()
            .await?;
        assert_eq!(
            response.status(),
            400,
            "{:?}",
            String::from_utf8_lossy(body)
        );
    }
    // [W5] A signed event that is not a push.
    let body = br#"{"repository":{"full_name":"group/config"}}"#;
    let response = http
        .post(url("gitea"))
        .header("x-gitea-event", "issues")
        .header("x-gitea-signature", hmac(b"hook-secret", body))
        .body(body.to_vec())
        .send()
        .await?;
    assert_eq!(response.status(), 202);
    assert!(response.text().await?.contains("not a push"));

    // [W9] Unsigned bodies trickling in: only MAX_CONCURRENT_WEBHOOKS are read at once, the rest get 503.
    let mut slow = Vec::new();
    for _ in 0..kas::api::MAX_CONCURRENT_WEBHOOKS {
        let mut s = TcpStream::connect(k.kas.api_addr).await?;
        s.write_all(
            b"POST /api/webhooks/gitea HTTP/1.1\r\nHost: kas\r\nContent-Length: 5000000\r\n\r\nx",
        )
        .await?;
        slow.push(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let response = http
        .post(url("gitea"))
        .header("x-gitea-event", "push")
        .body("{}")
        .send()
        .await?;
    assert_eq!(response.status(), 503);
    drop(slow);
    e2e::eventually(
        Duration::from_secs(5),
        "webhooks accepted again",
        || async {
            let response = http.post(url("gitea")).body("{}").send().await?;
            Ok(response.status() == 401)
        },
    )
    .await?;
    k.kas.shutdown().await;
    Ok(())
}

fn hmac(secret: &[u8], body: &[u8]) -> String {
    // HMAC-SHA256 by hand would need a crate; kas's own verification is unit-tested, so the e2e case goes
    // through a signature kas computed for the same body.
    kas::webhooks::signature_hex(std::str::from_utf8(secret).expect("ascii secret"), body)
}

#[tokio::test]
async fn graphql_abuse_gets_errors_and_nothing_runs() -> anyhow::Result<()> {
    let k = Kas::start("").await?;
    // [G5] Depth 13 (`__type` + 11 × `ofType` + `name`) is refused, depth 12 runs.
    let nested = |levels: usize| {
        let mut inner = String::from("name");
        for _ in 0..levels {
            inner = format!("ofType {{ {inner} }}");
        }
        format!(r#"{{ __type(name: "Query") {{ {inner} }} }}"#)
    };
    let (_, body) = k.graphql(json!({ "query": nested(10) })).await?;
    assert!(body["errors"].is_null(), "depth 12: {body}");
    let (_, body) = k.graphql(json!({ "query": nested(11) })).await?;
    let message = body["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(
        message.to_lowercase().contains("depth") || message.to_lowercase().contains("nested"),
        "{body}"
    );
    assert!(body["data"].is_null(), "{body}");
    // [G6] 501 aliases.
    let aliases: Vec<String> = (0..501)
        .map(|i| format!("a{i}: clusterAgents {{ id }}"))
        .collect();
    let (_, body) = k
        .graphql(json!({ "query": format!("{{ {} }}", aliases.join(" ")) }))
        .await?;
    let message = body["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(message.to_lowercase().contains("complex"), "{body}");
    // A mutation inside an over-complex document did not run.
    let mutations: Vec<String> = (0..501)
        .map(|i| format!(r#"m{i}: createClusterAgent(input: {{ projectPath: "group/config", name: "bomb{i}" }}) {{ clusterAgent {{ id }} }}"#))
        .collect();
    let (_, body) = k
        .graphql(json!({ "query": format!("mutation {{ {} }}", mutations.join(" ")) }))
        .await?;
    assert!(!body["errors"].is_null(), "{body}");
    let listed = k.admin.list_agents(None).await?;
    assert!(
        !listed.to_string().contains("bomb"),
        "a refused document created agents: {listed}"
    );
    // [G7] Malformed JSON and a batch array: 400.
    let http = reqwest::Client::new();
    for raw in [
        "{\"query\": ",
        "[{\"query\": \"{ __typename }\"}]",
        "[\"{ __typename }\"]",
        "\u{0}",
        "",
    ] {
        let response = http
            .post(format!("{}/api/graphql", k.api()))
            .bearer_auth(ADMIN)
            .header("content-type", "application/json")
            .body(raw)
            .send()
            .await?;
        assert_eq!(response.status(), 400, "{raw:?}");
        let body: Value = response.json().await?;
        assert!(body["errors"][0]["message"].is_string(), "{body}");
    }
    k.kas.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn secrets_stay_out_of_debug_output() -> anyhow::Result<()> {
    // [F23]
    let k = Kas::start("").await?;
    let state = format!("{:?}", k.kas.state);
    assert!(!state.contains(ADMIN), "{state}");
    assert!(!state.contains("hook-secret"), "{state}");
    assert!(state.contains("<redacted>"), "{state}");
    let running = format!("{:?}", k.kas);
    assert!(!running.contains(ADMIN));
    let client = format!("{:?}", k.admin);
    assert!(!client.contains(ADMIN), "{client}");
    k.kas.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_blank_admin_token_file_or_a_corrupt_database_stops_kas_at_start() -> anyhow::Result<()> {
    test_support::cluster::install_crypto_provider();
    let git = GitHttpServer::start().await?;
    git.create_repo(e2e::CONFIG_PROJECT, true)?;
    git.commit_files(
        e2e::CONFIG_PROJECT,
        &[("README.md", Some("# config\n"))],
        "init",
    )?;
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("git-password"), git.credentials().1)?;
    std::fs::write(dir.path().join("webhook-secret"), "hook-secret")?;
    let data = dir.path().join("data");
    // [G4] Empty and whitespace-only admin token files.
    for text in ["", "  \n\t\n"] {
        std::fs::write(dir.path().join("admin-token"), text)?;
        let yaml = kas_yaml(dir.path(), &git, "", &data);
        let err = kas::start(ServerConfig::parse("kas.yaml", &yaml)?)
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains(&format!(
                "{}/admin-token: file is empty",
                dir.path().display()
            )),
            "{err}"
        );
    }
    std::fs::write(dir.path().join("admin-token"), ADMIN)?;
    // [P6] A database that is garbage, truncated, or empty.
    let yaml = kas_yaml(dir.path(), &git, "", &data);
    let kas = kas::start(ServerConfig::parse("kas.yaml", &yaml)?).await?;
    let admin = AdminClient::new(&format!("http://{}", kas.api_addr), ADMIN.into());
    e2e::register_agent(&admin, e2e::CONFIG_PROJECT).await?;
    kas.shutdown().await;
    let file = data.join("kas.redb");
    let good = std::fs::read(&file)?;
    for (what, bytes) in [
        ("garbage", vec![0x5a; good.len()]),
        ("truncated", good[..good.len() / 3].to_vec()),
        ("header only", good[..64.min(good.len())].to_vec()),
    ] {
        std::fs::write(&file, &bytes)?;
        let started = Instant::now();
        let err = kas::start(ServerConfig::parse("kas.yaml", &yaml)?)
            .await
            .map(|_| ())
            .unwrap_err();
        assert!(
            err.to_string().contains(&file.display().to_string()),
            "{what}: {err}"
        );
        assert!(
            !err.to_string().to_lowercase().contains("already open"),
            "{what}: {err}"
        );
        assert!(started.elapsed() < Duration::from_secs(5), "{what}");
        eprintln!("{what}: {err}");
    }
    Ok(())
}

/// A real full disk: kas's data directory on a 4 MiB tmpfs filled up with a ballast file. Writes fail with
/// the I/O error, and once the ballast is gone kas writes again without a restart (redb's sticky
/// `PreviousIo` is cleared by reopening the database).
#[tokio::test]
async fn a_full_disk_fails_writes_clearly_and_kas_recovers_when_space_returns() -> anyhow::Result<()>
{
    // [P5]
    let mount = tempfile::tempdir()?;
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(mount.path())
        .status()
        .context("running mount (the test needs root to mount a small tmpfs)")?;
    anyhow::ensure!(
        mounted.success(),
        "mounting a 4 MiB tmpfs at {} failed: this test needs root (CAP_SYS_ADMIN)",
        mount.path().display()
    );
    let _unmount = Unmount(mount.path().to_path_buf());
    full_disk(mount.path()).await
}

struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

async fn full_disk(mount: &Path) -> anyhow::Result<()> {
    let data = mount.join("data");
    let k = Kas::start_in("", Some(&data)).await?;
    let agent = k.agent().await?;
    // Fill the file system.
    let ballast = mount.join("ballast");
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&ballast)?;
        let chunk = vec![0u8; 64 * 1024];
        while file.write_all(&chunk).is_ok() {}
        let _ = file.sync_all();
    }
    // Writes fail, with the reason.
    let mut failure = None;
    for i in 0..200 {
        let name = format!("full-{i}");
        match k.admin.create_agent(e2e::CONFIG_PROJECT, &name).await {
            Ok(_) => continue,
            Err(e) => {
                failure = Some(e.to_string());
                break;
            }
        }
    }
    let failure = failure.context("writes kept succeeding on a full disk")?;
    eprintln!("write on a full disk: {failure}");
    assert!(
        failure.contains("No space left")
            || failure.contains("I/O")
            || failure.contains("database"),
        "{failure}"
    );
    // Space returns.
    std::fs::remove_file(&ballast)?;
    e2e::eventually(
        Duration::from_secs(10),
        "a write after space returned",
        || async {
            Ok(k.admin
                .create_agent(e2e::CONFIG_PROJECT, "after-the-disk-was-full")
                .await
                .is_ok())
        },
    )
    .await?;
    let health = reqwest::get(format!("{}/healthz", k.api())).await?;
    assert_eq!(health.status(), 200);
    // The agent stayed connected, or reconnects with the same token.
    e2e::wait_for_state(&agent, Duration::from_secs(20), "connected", |s| {
        s.connected
    })
    .await?;
    agent.shutdown().await;
    k.kas.shutdown().await;
    drop(k.dir);
    Ok(())
}

/// The kas chart without a Git password renders a kas.yaml kas starts with (anonymous Git).
#[tokio::test]
async fn the_kas_chart_starts_without_a_git_password() -> anyhow::Result<()> {
    // [P10]
    test_support::cluster::install_crypto_provider();
    let render = |values: &str, template: &str| -> anyhow::Result<Value> {
        let out = std::process::Command::new(&test_support::env::test_env().tools.helm)
            .args([
                "template",
                "r",
                "kas",
                "--set",
                values,
                "--show-only",
                template,
            ])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../charts"))
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "helm: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_saphyr::from_str(&String::from_utf8(out.stdout)?)?)
    };
    for (values, expect_password) in [
        ("adminToken=x,git.baseUrl=http://127.0.0.1:1", false),
        (
            "adminToken=x,gitPassword=p,git.baseUrl=http://127.0.0.1:1",
            true,
        ),
    ] {
        let configmap = render(values, "templates/configmap.yaml")?;
        let secret = render(values, "templates/secret.yaml")?;
        let dir = tempfile::tempdir()?;
        let secrets = dir.path().join("secrets");
        std::fs::create_dir_all(&secrets)?;
        for (key, value) in secret["stringData"].as_object().context("stringData")? {
            std::fs::write(secrets.join(key), value.as_str().unwrap_or_default())?;
        }
        let kas_yaml = configmap["data"]["kas.yaml"]
            .as_str()
            .context("kas.yaml")?
            .replace("/etc/kas/secrets", &secrets.display().to_string());
        let mut config = ServerConfig::parse("charts/kas ConfigMap", &kas_yaml)?;
        assert_eq!(
            config.git.password_file.is_some(),
            expect_password,
            "{values}"
        );
        config.listen.agent = SocketAddr::from(([127, 0, 0, 1], 0));
        config.listen.api = SocketAddr::from(([127, 0, 0, 1], 0));
        config.data_dir = dir.path().join("data");
        let kas = kas::start(config)
            .await
            .with_context(|| format!("kas with the chart's kas.yaml for {values}"))?;
        kas.shutdown().await;
    }
    Ok(())
}

/// `listen.api_tls`: the API (admin token, new agent secrets) is served over TLS, HTTP/1.1 only.
#[tokio::test]
async fn the_api_listener_serves_tls_when_configured() -> anyhow::Result<()> {
    let cert_dir = tempfile::tempdir()?;
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
    let (crt, key) = (
        cert_dir.path().join("api.crt"),
        cert_dir.path().join("api.key"),
    );
    std::fs::write(&crt, cert.cert.pem())?;
    std::fs::write(&key, cert.signing_key.serialize_pem())?;
    let k = Kas::start(&format!(
        "  api_tls:\n    cert_file: {}\n    key_file: {}\n",
        crt.display(),
        key.display()
    ))
    .await?;
    let port = k.kas.api_addr.port();
    let roots = reqwest::Certificate::from_pem_bundle(cert.cert.pem().as_bytes())?;
    let https = reqwest::Client::builder().tls_certs_merge(roots).build()?;
    let health = https
        .get(format!("https://localhost:{port}/healthz"))
        .send()
        .await?;
    assert_eq!(health.status(), 200);
    assert_eq!(health.version(), http::Version::HTTP_11);
    let admin = AdminClient::new(&format!("https://localhost:{port}"), ADMIN.into());
    // The admin client uses the system roots, which do not hold the test CA: the handshake is refused,
    // and plain HTTP on the TLS port gets nothing.
    assert!(admin.list_agents(None).await.is_err());
    let plain = reqwest::get(format!("http://127.0.0.1:{port}/healthz")).await;
    assert!(plain.is_err() || plain.is_ok_and(|r| r.status() != 200));
    k.kas.shutdown().await;
    Ok(())
}

/// [M12] A 5 MiB manifest with `manifests.max_file_size: 8MiB` is delivered: kas's services (and agentk's
/// client) take messages up to `MAX_MESSAGE_BYTES`, past tonic's 4 MiB default.
#[tokio::test]
async fn a_five_mib_manifest_is_delivered_when_the_limit_allows_it() -> anyhow::Result<()> {
    let k = Kas::start_with("", "manifests:\n  max_file_size: 8388608\n", None).await?;
    k.git.create_repo("group/big", true)?;
    let big = format!(
        "kind: ConfigMap\ndata:\n  blob: {}\n",
        "x".repeat(5 * 1024 * 1024)
    );
    let commit = k
        .git
        .commit_files("group/big", &[("big.yaml", Some(&big))], "big")?;
    k.git.commit_files(
        e2e::CONFIG_PROJECT,
        &[(
            e2e::CONFIG_FILE,
            Some("gitops:\n  manifest_projects:\n  - id: group/big\n    paths:\n    - glob: '*.yaml'\n"),
        )],
        "config",
    )?;
    let agent = k.agent().await?;
    let mut rx = agent.gitops.clone();
    let delivered = tokio::time::timeout(
        Duration::from_secs(30),
        rx.wait_for(|s| {
            s.get("group/big")
                .and_then(|p| p.snapshot.as_ref())
                .is_some_and(|snap| snap.commit_id == commit)
        }),
    )
    .await;
    anyhow::ensure!(
        delivered.is_ok(),
        "the 5 MiB file never arrived: {:?}",
        agent.gitops.borrow().get("group/big").map(|p| (
            p.error.clone(),
            p.snapshot.as_ref().map(|s| s.commit_id.clone())
        ))
    );
    let size = agent
        .gitops
        .borrow()
        .get("group/big")
        .expect("group/big")
        .snapshot
        .as_ref()
        .map(|s| s.files[0].data.len());
    assert_eq!(size, Some(big.len()));
    agent.shutdown().await;
    k.kas.shutdown().await;
    Ok(())
}

/// [A1, A3, A4] Calls without a token, with a malformed one, and a WebSocket with our subprotocol and a bad
/// token: refused before anything is served, and the connection that only made refused calls is closed.
#[tokio::test]
async fn bad_credentials_are_refused_before_anything_is_served() -> anyhow::Result<()> {
    use gitops_protocol::{
        ConfigurationRequest, agent_configuration_client::AgentConfigurationClient,
    };
    let k = Kas::start("  auth_timeout: 1s\n").await?;
    let agent = k.agent().await?;
    let addr = k.kas.agent_addr;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    for header in [
        None,
        Some("Bearer "),
        Some("bearer kasagent_x"),
        Some("kasagent_x"),
        Some("Bearer kasagent_unknown"),
        Some("Bearer \u{7f}"),
    ] {
        let mut request = tonic::Request::new(ConfigurationRequest::default());
        if let Some(Ok(value)) = header.map(str::parse) {
            request.metadata_mut().insert("authorization", value);
        }
        let status = AgentConfigurationClient::new(channel.clone())
            .get_configuration(request)
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            tonic::Code::Unauthenticated,
            "{header:?}: {status:?}"
        );
    }
    let ws = reqwest::Client::new()
        .get(format!("http://{addr}/agentk"))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header(
            "sec-websocket-protocol",
            gitops_tunnel::WEBSOCKET_SUBPROTOCOL,
        )
        .bearer_auth("kasagent_wrong")
        .send()
        .await?;
    assert_eq!(ws.status(), 401);
    // The channel made only refused calls: kas closes its connection after auth_timeout.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut request = tonic::Request::new(ConfigurationRequest::default());
    request
        .metadata_mut()
        .insert("authorization", "Bearer kasagent_unknown".parse()?);
    let _ = AgentConfigurationClient::new(channel)
        .get_configuration(request)
        .await;
    assert!(agent.state.borrow().connected);
    agent.shutdown().await;
    k.kas.shutdown().await;
    Ok(())
}

/// [F16a] kas's memory while 3 agents receive a 48 MB set (48 files of 1 MB, under the default 1 MiB per
/// file and 50 MiB in all), kas in its own process. kas reads each agent stream's whole selection before
/// sending it, so the bound is the agents streaming at once × `manifests.max_total_size` on top of its base.
#[tokio::test]
async fn kas_memory_with_three_agents_receiving_a_48_mb_set() -> anyhow::Result<()> {
    use e2e::process::{KasProcess, peak_rss_kib, rss_kib};
    test_support::cluster::install_crypto_provider();
    let git = GitHttpServer::start().await?;
    git.create_repo(e2e::CONFIG_PROJECT, true)?;
    git.create_repo("group/big", true)?;
    let agents = ["m0", "m1", "m2"];
    let config =
        "gitops:\n  manifest_projects:\n  - id: group/big\n    paths:\n    - glob: '*.yaml'\n";
    let configs: Vec<String> = agents
        .iter()
        .map(|a| format!(".gitlab/agents/{a}/config.yaml"))
        .collect();
    let files: Vec<(&str, Option<&str>)> =
        configs.iter().map(|p| (p.as_str(), Some(config))).collect();
    git.commit_files(e2e::CONFIG_PROJECT, &files, "config")?;
    let bodies: Vec<(String, String)> = (0..48)
        .map(|i| {
            (
                format!("cm-{i:02}.yaml"),
                format!(
                    "kind: ConfigMap\ndata:\n  blob: {}\n",
                    format!("{i:02}").repeat(499_980)
                ),
            )
        })
        .collect();
    let files: Vec<(&str, Option<&str>)> = bodies
        .iter()
        .map(|(p, c)| (p.as_str(), Some(c.as_str())))
        .collect();
    let commit = git.commit_files("group/big", &files, "48 MB")?;

    let dir = tempfile::tempdir()?;
    let kas = KasProcess::start(&git, dir.path(), "warn", true).await?;
    let pid = kas.process.pid();
    let base = rss_kib(pid)?;
    let mut running = Vec::new();
    for name in agents {
        let created = kas.admin.create_agent(e2e::CONFIG_PROJECT, name).await?;
        let id = created["clusterAgent"]["id"]
            .as_str()
            .context("id")?
            .to_owned();
        let token = kas.admin.create_token(&id, "t", "").await?;
        let secret = token["secret"].as_str().context("secret")?.to_owned();
        let address =
            gitops_tunnel::KasAddress::parse(&format!("grpc://127.0.0.1:{}", kas.agent_port))?;
        running.push(agentk::start(
            gitops_tunnel::client::ClientConfig::new(address, secret),
            agentk::AgentOptions::default(),
            None,
        )?);
    }
    let started = Instant::now();
    for agent in &running {
        let mut rx = agent.gitops.clone();
        tokio::time::timeout(
            Duration::from_secs(180),
            rx.wait_for(|s| {
                s.get("group/big")
                    .and_then(|p| p.snapshot.as_ref())
                    .is_some_and(|snap| snap.commit_id == commit && snap.files.len() == 48)
            }),
        )
        .await
        .with_context(|| {
            format!(
                "the set never arrived: {:?}",
                agent
                    .gitops
                    .borrow()
                    .get("group/big")
                    .map(|p| p.error.clone())
            )
        })??;
    }
    let peak = peak_rss_kib(pid)?;
    eprintln!(
        "kas RSS: {} MiB at start, peak {} MiB with 3 agents receiving 48 MB ({:?}); bound 3 × 50 MiB over the base",
        base / 1024,
        peak / 1024,
        started.elapsed()
    );
    assert!(
        peak.saturating_sub(base) < 3 * 50 * 1024 + 100 * 1024,
        "kas grew by {} MiB",
        peak.saturating_sub(base) / 1024
    );
    for agent in running {
        agent.shutdown().await;
    }
    Ok(())
}
