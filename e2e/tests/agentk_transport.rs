//! The agentk binary's way to kas, configured only as a user would: trust roots from the system store
//! (`SSL_CERT_FILE`) or `--kas-ca-cert-file`, and proxies from the environment (lower-case `https_proxy`
//! with credentials, `NO_PROXY` with a CIDR range) through a real loopback CONNECT proxy, for gRPC and
//! WebSocket alike.

use std::{
    path::Path,
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use e2e::{CONFIG_PROJECT, Harness, process::Killed, process::sibling_binary};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// What the proxy saw.
#[derive(Default)]
struct ProxyLog {
    /// CONNECTs it accepted and tunnelled.
    tunnels: AtomicUsize,
    /// CONNECTs it refused with 407.
    refused: AtomicUsize,
    /// The CONNECT targets, in order.
    targets: Mutex<Vec<String>>,
}

/// An HTTP CONNECT proxy on loopback that wants `Proxy-Authorization: Basic <credentials>`
/// (`credentials`: base64 of `user:password`); over TLS with `tls` (an `https://` proxy).
async fn authenticating_proxy(
    credentials: &str,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> anyhow::Result<(std::net::SocketAddr, Arc<ProxyLog>)> {
    let expected = format!("basic {credentials}");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let log = Arc::new(ProxyLog::default());
    let seen = log.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let (log, expected, tls) = (seen.clone(), expected.clone(), tls.clone());
            tokio::spawn(async move {
                match tls {
                    Some(tls) => {
                        let client = tls.accept(client).await.ok()?;
                        tunnel(client, &expected, &log).await
                    }
                    None => tunnel(client, &expected, &log).await,
                }
            });
        }
    });
    Ok((addr, log))
}

/// Serves one CONNECT on `client`: refused with 407 unless the credentials are `expected`.
async fn tunnel<S>(client: S, expected: &str, log: &ProxyLog) -> Option<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut reader = BufReader::new(client);
    let mut line = String::new();
    reader.read_line(&mut line).await.ok()?;
    let target = line
        .strip_prefix("CONNECT ")?
        .split_whitespace()
        .next()?
        .to_owned();
    let mut authorized = false;
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).await.ok()?;
        if header == "\r\n" || header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("proxy-authorization")
        {
            authorized = value.trim().eq_ignore_ascii_case(expected);
        }
    }
    let mut client = reader.into_inner();
    if !authorized {
        log.refused.fetch_add(1, Ordering::SeqCst);
        client
            .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"test\"\r\nContent-Length: 0\r\n\r\n")
            .await
            .ok()?;
        return None;
    }
    let mut upstream = tokio::net::TcpStream::connect(&target).await.ok()?;
    log.targets.lock().unwrap().push(target);
    client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await
        .ok()?;
    log.tunnels.fetch_add(1, Ordering::SeqCst);
    tokio::io::copy_bidirectional(&mut client, &mut upstream)
        .await
        .ok()?;
    Some(())
}

/// A new agent in the configuration project, with its token.
async fn new_agent(h: &Harness, name: &str) -> anyhow::Result<(String, String)> {
    let agent = h.admin.create_agent(CONFIG_PROJECT, name).await?;
    let id = agent["clusterAgent"]["id"]
        .as_str()
        .context("agent id")?
        .to_owned();
    let token = h.admin.create_token(&id, "test", "e2e").await?;
    Ok((id, token["secret"].as_str().context("secret")?.to_owned()))
}

/// agentk (the binary) for `address` with `token`, receiving only; no proxy or CA from this test
/// process's environment leaks in, and the system store is the (empty) `SSL_CERT_DIR` of `empty_dir`
/// unless `env` says otherwise. Its log goes to `log`.
fn agentk(
    address: &str,
    token: &str,
    args: &[&str],
    env: &[(&str, &str)],
    empty_dir: &Path,
    log: &Path,
) -> anyhow::Result<Killed> {
    let mut command = std::process::Command::new(sibling_binary("agentk")?);
    command
        .arg(format!("--kas-address={address}"))
        .arg("--no-apply")
        .args(args)
        .env("AGENTK_TOKEN", token)
        .env_remove("KUBECONFIG");
    for var in [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
    ] {
        command.env_remove(var);
    }
    // Nothing from the machine's own trust store: only what the case gives.
    std::fs::write(empty_dir.join("none.pem"), "")?;
    command
        .env("SSL_CERT_FILE", empty_dir.join("none.pem"))
        .env("SSL_CERT_DIR", empty_dir);
    for (name, value) in env {
        command.env(name, value);
    }
    command
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?);
    Ok(Killed(command.spawn().context("starting agentk")?))
}

/// Whether GraphQL shows `agent` connected within `within`.
async fn connects(h: &Harness, agent: &str, within: Duration) -> anyhow::Result<bool> {
    let deadline = Instant::now() + within;
    loop {
        if h.agent_view(agent).await?["connected"] == true {
            return Ok(true);
        }
        if Instant::now() > deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn read(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

#[tokio::test]
async fn kas_is_trusted_through_the_system_store_or_the_ca_flag_and_nothing_else()
-> anyhow::Result<()> {
    let h = Harness::start(true).await?;
    let dir = tempfile::tempdir()?;
    let cert = h.dir.path().join("tls.crt");
    let cert = cert.to_str().context("path")?;
    let address = format!("grpcs://localhost:{}", h.kas().agent_addr.port());

    // The system store (here SSL_CERT_FILE, as rustls-native-certs reads it) holds kas's CA.
    let (system, token) = new_agent(&h, "system-store").await?;
    let log = dir.path().join("system.log");
    let _a = agentk(
        &address,
        &token,
        &[],
        &[("SSL_CERT_FILE", cert)],
        dir.path(),
        &log,
    )?;
    assert!(
        connects(&h, &system, Duration::from_secs(20)).await?,
        "SSL_CERT_FILE's CA was not trusted: {}",
        read(&log)
    );

    // The flag, GitLab's name, with nothing in the system store.
    let (flag, token) = new_agent(&h, "ca-flag").await?;
    let log = dir.path().join("flag.log");
    let _b = agentk(
        &address,
        &token,
        &[&format!("--kas-ca-cert-file={cert}")],
        &[],
        dir.path(),
        &log,
    )?;
    assert!(
        connects(&h, &flag, Duration::from_secs(20)).await?,
        "--kas-ca-cert-file was not trusted: {}",
        read(&log)
    );

    // Control: neither. agentk says why and never connects.
    let (neither, token) = new_agent(&h, "untrusted").await?;
    let log = dir.path().join("untrusted.log");
    let _c = agentk(&address, &token, &[], &[], dir.path(), &log)?;
    assert!(
        !connects(&h, &neither, Duration::from_secs(4)).await?,
        "connected to kas with no root that trusts it"
    );
    let text = read(&log);
    assert!(
        text.contains("no trust roots"),
        "agentk did not say why it cannot connect: {text}"
    );
    Ok(())
}

#[tokio::test]
async fn grpc_and_websocket_go_through_the_proxy_from_the_environment_unless_no_proxy_says_not()
-> anyhow::Result<()> {
    let h = Harness::start(true).await?;
    let dir = tempfile::tempdir()?;
    let cert = h.dir.path().join("tls.crt");
    let ca_flag = format!("--kas-ca-cert-file={}", cert.display());
    let port = h.kas().agent_addr.port();
    // base64("agent:s3cret:@")
    let (proxy, log) = authenticating_proxy("YWdlbnQ6czNjcmV0OkA=", None).await?;
    // The password percent-encoded, as a URL needs it.
    let https_proxy = format!("http://agent:s3cret%3A%40@{proxy}");
    // By IP, so NO_PROXY's CIDR range can match; the certificate names localhost.
    let by_ip = ["--kas-tls-server-name=localhost"];

    for (i, scheme) in ["grpcs", "wss"].into_iter().enumerate() {
        let (agent, token) = new_agent(&h, &format!("proxied-{scheme}")).await?;
        let agent_log = dir.path().join(format!("{scheme}.log"));
        let before = log.tunnels.load(Ordering::SeqCst);
        let _a = agentk(
            &format!("{scheme}://127.0.0.1:{port}"),
            &token,
            &[&ca_flag, by_ip[0]],
            // Lower-case, and a NO_PROXY range that does not cover kas.
            &[
                ("https_proxy", &https_proxy),
                ("NO_PROXY", "10.0.0.0/8,example.com"),
            ],
            dir.path(),
            &agent_log,
        )?;
        assert!(
            connects(&h, &agent, Duration::from_secs(20)).await?,
            "{scheme}: not connected through the proxy: {}",
            read(&agent_log)
        );
        assert!(
            log.tunnels.load(Ordering::SeqCst) > before,
            "{scheme}: the connection bypassed the proxy"
        );
        assert_eq!(
            log.targets.lock().unwrap()[i],
            format!("127.0.0.1:{port}"),
            "the CONNECT target is kas"
        );
    }
    assert_eq!(
        log.refused.load(Ordering::SeqCst),
        0,
        "agentk sent the credentials"
    );

    // NO_PROXY with a CIDR range covering kas: straight to kas, the proxy sees nothing.
    let (direct, token) = new_agent(&h, "no-proxy-cidr").await?;
    let agent_log = dir.path().join("direct.log");
    let before = log.tunnels.load(Ordering::SeqCst);
    let _d = agentk(
        &format!("grpcs://127.0.0.1:{port}"),
        &token,
        &[&ca_flag, by_ip[0]],
        &[("https_proxy", &https_proxy), ("no_proxy", "127.0.0.0/8")],
        dir.path(),
        &agent_log,
    )?;
    assert!(
        connects(&h, &direct, Duration::from_secs(20)).await?,
        "not connected directly: {}",
        read(&agent_log)
    );
    assert_eq!(
        log.tunnels.load(Ordering::SeqCst),
        before,
        "NO_PROXY=127.0.0.0/8 did not bypass the proxy"
    );

    // A wrong password: the proxy refuses, agentk does not connect and says the proxy wants credentials.
    let (refused, token) = new_agent(&h, "wrong-password").await?;
    let agent_log = dir.path().join("refused.log");
    let _e = agentk(
        &format!("grpcs://127.0.0.1:{port}"),
        &token,
        &[&ca_flag, by_ip[0]],
        &[("HTTPS_PROXY", &format!("http://agent:b4dpass@{proxy}"))],
        dir.path(),
        &agent_log,
    )?;
    assert!(
        !connects(&h, &refused, Duration::from_secs(4)).await?,
        "connected although the proxy refused"
    );
    assert!(log.refused.load(Ordering::SeqCst) >= 1);
    let text = read(&agent_log);
    assert!(
        text.contains("proxy authorization required") && !text.contains("b4dpass"),
        "the error does not name the cause, or shows the password: {text}"
    );

    // An https:// proxy: TLS to the proxy (its certificate verified against the same roots), then the
    // tunnel, then TLS to kas inside it.
    let proxy_cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
    let acceptor = gitops_tunnel::server::http1_tls_acceptor(
        proxy_cert.cert.pem().as_bytes(),
        proxy_cert.signing_key.serialize_pem().as_bytes(),
    )?;
    let (tls_proxy, tls_log) = authenticating_proxy("YWdlbnQ6czNjcmV0OkA=", Some(acceptor)).await?;
    let roots = dir.path().join("roots.pem");
    std::fs::write(
        &roots,
        format!(
            "{}{}",
            std::fs::read_to_string(&cert)?,
            proxy_cert.cert.pem()
        ),
    )?;
    let (over_tls, token) = new_agent(&h, "https-proxy").await?;
    let agent_log = dir.path().join("https-proxy.log");
    let _f = agentk(
        &format!("wss://127.0.0.1:{port}"),
        &token,
        &[by_ip[0]],
        &[
            ("SSL_CERT_FILE", roots.to_str().context("path")?),
            (
                "HTTPS_PROXY",
                &format!("https://agent:s3cret%3A%40@localhost:{}", tls_proxy.port()),
            ),
        ],
        dir.path(),
        &agent_log,
    )?;
    assert!(
        connects(&h, &over_tls, Duration::from_secs(20)).await?,
        "not connected through the https:// proxy: {}",
        read(&agent_log)
    );
    assert_eq!(tls_log.tunnels.load(Ordering::SeqCst), 1);
    Ok(())
}

/// `--kubeconfig` / `--context` name the cluster; one that cannot be used stops agentk with the reason
/// (instead of running on without a cluster, as it does when nothing was asked for).
#[tokio::test]
async fn a_kubeconfig_context_that_does_not_exist_stops_agentk_by_name() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: 'https://127.0.0.1:1'}\nusers:\n- name: u\n  user: {token: t}\ncontexts:\n- name: present\n  context: {cluster: c, user: u}\ncurrent-context: present\n",
    )?;
    let output = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new(sibling_binary("agentk")?)
            .args(["--kas-address=grpc://127.0.0.1:1", "--context=absent"])
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .env("AGENTK_TOKEN", "t")
            .output(),
    )
    .await
    .context("agentk did not stop")??;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "agentk ran on: {stderr}");
    assert!(
        stderr.contains("absent") && stderr.contains("kubeconfig"),
        "the error does not name the context and the file: {stderr}"
    );
    Ok(())
}
