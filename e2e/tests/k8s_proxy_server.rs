//! kas's side of the Kubernetes API proxy, in-process on loopback: its listener, the path filter, headers,
//! streaming down a real reverse tunnel over every transport, upgrades, revocation, the per-agent cap, and
//! the audit log. The agent end is a stand-in [`StandIn`] served on real reverse tunnels (see its comment);
//! the requests it forwards go to the real apiserver of the test cluster.
//!
//! Run: `cargo xtask cluster up --dir <dir>`, export the lines it prints, then
//! `cargo test -p e2e --test k8s_proxy_server`.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use e2e::{AGENT_NAME, CONFIG_PROJECT, eventually, register_agent};
use futures::future::BoxFuture;
use gitops_protocol::{
    HttpBodyEnd, HttpHeader, HttpRequestHeader, HttpRequestPart, HttpResponseHeader,
    HttpResponsePart, Impersonation, MAX_MESSAGE_BYTES,
    http_request_part::Part as Up,
    http_response_part::Part as Down,
    kubernetes_api_server::{KubernetesApi, KubernetesApiServer},
    reverse_tunnel_client::ReverseTunnelClient,
};
use gitops_tunnel::{KasAddress, client::ClientConfig};
use http_body_util::BodyExt;
use kas::{
    RunningKas, StartOptions,
    cli::AdminClient,
    k8s_proxy::{
        ProxyError,
        auth::{Authorized, Caller, Credential, ProxyAuthorizer},
    },
    store::audit::Verb,
};
use serde_json::{Value, json};
use test_support::{cluster::TestNamespace, git_http::GitHttpServer};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::mpsc,
};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};

const SECRET: &str = "kasci_test-secret";
const TOKEN_ID: u64 = 42;
const CI_PROJECT: &str = "group/app";

// ---------------------------------------------------------------------------------------------------------
// Stand-ins.

/// What [`TestAuthorizer`] answers for one secret.
#[derive(Clone)]
struct Grant {
    agent_id: u64,
    impersonation: Option<Impersonation>,
    revoked: CancellationToken,
}

/// Stands in for kas's credential checks (CI tokens from the store, Git server tokens, `ci_access` and
/// `user_access` against the agent's configuration), which have their own tests: here a request presenting
/// a known secret for its agent is allowed as its [`Grant`] says, and cancelling the grant's `revoked` is
/// what revoking the token does.
#[derive(Default)]
struct TestAuthorizer {
    grants: Mutex<HashMap<String, Grant>>,
}

impl TestAuthorizer {
    fn grant(&self, secret: &str, grant: Grant) {
        self.grants.lock().unwrap().insert(secret.into(), grant);
    }
}

impl ProxyAuthorizer for TestAuthorizer {
    fn authorize<'a>(
        &'a self,
        credential: &'a Credential,
    ) -> BoxFuture<'a, Result<Authorized, ProxyError>> {
        let grant = self.grants.lock().unwrap().get(&credential.secret).cloned();
        Box::pin(async move {
            let grant = grant.ok_or(ProxyError::InvalidToken)?;
            if grant.agent_id != credential.agent_id {
                return Err(ProxyError::Forbidden("not this agent".into()));
            }
            Ok(Authorized {
                agent_id: grant.agent_id,
                agent_name: AGENT_NAME.into(),
                config_project: CONFIG_PROJECT.into(),
                caller: Caller::CiJob {
                    token_id: TOKEN_ID,
                    project: CI_PROJECT.into(),
                    environment: Some("production".into()),
                },
                impersonation: grant.impersonation,
                default_namespace: None,
                revoked: grant.revoked.child_token(),
                session: None,
            })
        })
    }
}

/// Stands in for agentk's `KubernetesApi` service (written separately, with its own tests against the
/// apiserver), so kas's side can be tested on its own. It forwards to the test cluster's real apiserver with
/// a cluster-admin client, except for requests carrying `x-stand-in`: `echo` answers with the headers it
/// received, `hold` answers one chunk and keeps the body open (a watch with no events); an upgrade is
/// answered `101` and its bytes are echoed back upper-cased.
#[derive(Clone)]
struct StandIn {
    kube: kube::Client,
    seen: Arc<Mutex<Vec<HttpRequestHeader>>>,
}

type Parts = mpsc::Sender<Result<HttpResponsePart, Status>>;

fn down(part: Down) -> Result<HttpResponsePart, Status> {
    Ok(HttpResponsePart { part: Some(part) })
}

fn header_value<'a>(header: &'a HttpRequestHeader, name: &str) -> Option<&'a [u8]> {
    header
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value.as_slice())
}

#[tonic::async_trait]
impl KubernetesApi for StandIn {
    type MakeRequestStream = ReceiverStream<Result<HttpResponsePart, Status>>;

    async fn make_request(
        &self,
        request: tonic::Request<Streaming<HttpRequestPart>>,
    ) -> Result<tonic::Response<Self::MakeRequestStream>, Status> {
        let mut parts = request.into_inner();
        let Some(HttpRequestPart {
            part: Some(Up::Header(header)),
        }) = parts.message().await?
        else {
            return Err(Status::invalid_argument("the header must come first"));
        };
        self.seen.lock().unwrap().push(header.clone());
        let (tx, rx) = mpsc::channel(4);
        let upgrade = header_value(&header, "upgrade").map(<[u8]>::to_vec);
        let mode = header_value(&header, "x-stand-in").map(<[u8]>::to_vec);
        let kube = self.kube.clone();
        tokio::spawn(async move {
            match (upgrade, mode.as_deref()) {
                (Some(protocol), _) => echo_upgrade(protocol, parts, tx).await,
                (None, Some(b"echo")) => echo(header, parts, tx).await,
                (None, Some(b"hold")) => {
                    let _ = tx.send(down(Down::Header(ok_header()))).await;
                    let _ = tx
                        .send(down(Down::Data(b"{\"type\":\"ADDED\"}\n".to_vec())))
                        .await;
                    tx.closed().await;
                }
                _ => {
                    if let Err(e) = to_apiserver(&kube, header, parts, &tx).await {
                        let _ = tx.send(Err(Status::unavailable(e.to_string()))).await;
                    }
                }
            }
        });
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }
}

fn ok_header() -> HttpResponseHeader {
    HttpResponseHeader {
        status: 200,
        headers: vec![HttpHeader {
            name: "content-type".into(),
            value: b"application/json".to_vec(),
        }],
    }
}

/// The request body and how many `data` messages it came in.
async fn read_body(parts: &mut Streaming<HttpRequestPart>) -> Result<(Vec<u8>, usize), Status> {
    let (mut body, mut messages) = (Vec::new(), 0);
    loop {
        match parts.message().await? {
            Some(HttpRequestPart {
                part: Some(Up::Data(data)),
            }) => {
                body.extend(data);
                messages += 1;
            }
            Some(HttpRequestPart {
                part: Some(Up::End(_)),
            }) => return Ok((body, messages)),
            _ => return Err(Status::invalid_argument("the body ended without `end`")),
        }
    }
}

async fn echo(header: HttpRequestHeader, mut parts: Streaming<HttpRequestPart>, tx: Parts) {
    let Ok((body, messages)) = read_body(&mut parts).await else {
        return;
    };
    let headers: Vec<_> = header
        .headers
        .iter()
        .map(|h| json!([h.name, String::from_utf8_lossy(&h.value)]))
        .collect();
    let answer = json!({
        "method": header.method,
        "path": header.path_and_query,
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
        "body_messages": messages,
        "impersonation": header.impersonation.is_some(),
    });
    let _ = tx.send(down(Down::Header(ok_header()))).await;
    let _ = tx
        .send(down(Down::Data(answer.to_string().into_bytes())))
        .await;
    let _ = tx.send(down(Down::End(HttpBodyEnd {}))).await;
}

async fn echo_upgrade(protocol: Vec<u8>, mut parts: Streaming<HttpRequestPart>, tx: Parts) {
    let header = HttpResponseHeader {
        status: 101,
        headers: vec![
            HttpHeader {
                name: "connection".into(),
                value: b"Upgrade".to_vec(),
            },
            HttpHeader {
                name: "upgrade".into(),
                value: protocol,
            },
            HttpHeader {
                name: "x-stream-protocol-version".into(),
                value: b"v4.channel.k8s.io".to_vec(),
            },
        ],
    };
    let _ = tx.send(down(Down::Header(header))).await;
    while let Ok(Some(part)) = parts.message().await {
        match part.part {
            Some(Up::UpgradeData(data)) => {
                let _ = tx
                    .send(down(Down::UpgradeData(data.to_ascii_uppercase())))
                    .await;
            }
            Some(Up::End(_)) => {}
            _ => break,
        }
    }
    // The request stream closed: the client hung up; so does the "apiserver".
}

async fn to_apiserver(
    kube: &kube::Client,
    header: HttpRequestHeader,
    mut parts: Streaming<HttpRequestPart>,
    tx: &Parts,
) -> anyhow::Result<()> {
    let (body, _) = read_body(&mut parts).await?;
    let mut request = http::Request::builder()
        .method(header.method.as_str())
        .uri(header.path_and_query.as_str());
    for h in &header.headers {
        request = request.header(h.name.as_str(), h.value.as_slice());
    }
    let response = kube
        .send(request.body(kube::client::Body::from(body))?)
        .await?;
    let headers = response
        .headers()
        .iter()
        .map(|(n, v)| HttpHeader {
            name: n.as_str().into(),
            value: v.as_bytes().to_vec(),
        })
        .collect();
    let status = u32::from(response.status().as_u16());
    tx.send(down(Down::Header(HttpResponseHeader { status, headers })))
        .await?;
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            tx.send(down(Down::Data(data.to_vec()))).await?;
        }
    }
    tx.send(down(Down::End(HttpBodyEnd {}))).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// Harness.

/// kas with the proxy listener on loopback (and TLS on the agent and proxy ports when asked), its test
/// authoriser, a Git server with the configuration project, and one registered agent.
struct ProxyHarness {
    _git: GitHttpServer,
    kas: RunningKas,
    admin: AdminClient,
    dir: tempfile::TempDir,
    authorizer: Arc<TestAuthorizer>,
    tls: bool,
    agent_gid: String,
    agent_id: u64,
    agent_secret: String,
    /// The apiserver-forwarding stand-in's record of what it was sent.
    seen: Arc<Mutex<Vec<HttpRequestHeader>>>,
}

impl ProxyHarness {
    async fn start(tls: bool, max_requests_per_agent: usize) -> anyhow::Result<Self> {
        test_support::cluster::install_crypto_provider();
        if let Ok(level) = std::env::var("E2E_LOG") {
            let _ = gitops_telemetry::init(gitops_telemetry::Format::Text, &level, "warn");
        }
        let git = GitHttpServer::start().await?;
        git.create_repo(CONFIG_PROJECT, true)?;
        git.commit_files(CONFIG_PROJECT, &[("README.md", Some("# config\n"))], "init")?;
        let dir = tempfile::tempdir()?;
        let d = dir.path().display().to_string();
        std::fs::write(dir.path().join("admin-token"), "admin-secret")?;
        std::fs::write(dir.path().join("git-password"), git.credentials().1)?;
        let tls_block = if tls {
            let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
            std::fs::write(dir.path().join("tls.crt"), cert.cert.pem())?;
            std::fs::write(dir.path().join("tls.key"), cert.signing_key.serialize_pem())?;
            format!(
                "  agent_tls:\n    cert_file: {d}/tls.crt\n    key_file: {d}/tls.key\n  k8s_proxy_tls:\n    cert_file: {d}/tls.crt\n    key_file: {d}/tls.key\n"
            )
        } else {
            String::new()
        };
        let yaml = format!(
            "listen:\n  agent: 127.0.0.1:0\n  api: 127.0.0.1:0\n  k8s_proxy: 127.0.0.1:0\n{tls_block}data_dir: {d}/data\nadmin_token_file: {d}/admin-token\ngit:\n  base_url: {base}\n  username: {user}\n  password_file: {d}/git-password\n  poll_period: 1s\nk8s_proxy:\n  max_requests_per_agent: {max_requests_per_agent}\nlogging:\n  format: text\n",
            base = git.base_url(),
            user = git.credentials().0,
        );
        let config = gitops_config::ServerConfig::parse("kas.yaml", &yaml)?;
        let authorizer = Arc::new(TestAuthorizer::default());
        let for_kas = authorizer.clone();
        let kas = kas::start_with(
            config,
            StartOptions {
                k8s_proxy_authorizer: Some(Box::new(move |_| for_kas)),
                ..Default::default()
            },
        )
        .await?;
        let admin = AdminClient::new(&format!("http://{}", kas.api_addr), "admin-secret".into());
        let (agent_gid, _, agent_secret) = register_agent(&admin, CONFIG_PROJECT).await?;
        let agent_id = agent_gid.rsplit('/').next().context("gid")?.parse()?;
        Ok(Self {
            _git: git,
            kas,
            admin,
            dir,
            authorizer,
            tls,
            agent_gid,
            agent_id,
            agent_secret,
            seen: Arc::default(),
        })
    }

    /// Allows [`SECRET`] for the agent, impersonating or not; returns its revocation switch.
    fn grant(&self, impersonation: Option<Impersonation>) -> CancellationToken {
        let revoked = CancellationToken::new();
        self.authorizer.grant(
            SECRET,
            Grant {
                agent_id: self.agent_id,
                impersonation,
                revoked: revoked.clone(),
            },
        );
        revoked
    }

    fn proxy_url(&self, path: &str) -> String {
        let addr = self.kas.k8s_proxy_addr.expect("the proxy listens");
        if self.tls {
            format!("https://localhost:{}{path}", addr.port())
        } else {
            format!("http://{addr}{path}")
        }
    }

    fn http(&self) -> anyhow::Result<reqwest::Client> {
        let mut builder = reqwest::Client::builder();
        if self.tls {
            let pem = std::fs::read(self.dir.path().join("tls.crt"))?;
            builder = builder
                .add_root_certificate(reqwest::Certificate::from_pem(&pem)?)
                .resolve(
                    "localhost",
                    self.kas.k8s_proxy_addr.expect("the proxy listens"),
                );
        }
        Ok(builder.build()?)
    }

    /// A GET through the proxy with the test credential.
    async fn get(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        Ok(self
            .http()?
            .get(self.proxy_url(path))
            .bearer_auth(format!("ci:{}:{SECRET}", self.agent_id))
            .send()
            .await?)
    }

    /// Connects the stand-in agent over `scheme` and waits for its tunnels.
    async fn stand_in_agent(&self, scheme: &str) -> anyhow::Result<CancellationToken> {
        let host = if self.tls { "localhost" } else { "127.0.0.1" };
        let address =
            KasAddress::parse(&format!("{scheme}://{host}:{}", self.kas.agent_addr.port()))?;
        let mut client = ClientConfig::new(address, self.agent_secret.clone());
        if self.tls {
            client.ca_file = Some(self.dir.path().join("tls.crt"));
        }
        let channel = tonic::service::interceptor::InterceptedService::new(
            client.channel()?,
            client.interceptor()?,
        );
        let tunnels = ReverseTunnelClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let service = StandIn {
            kube: test_support::cluster::kube_client().await?,
            seen: self.seen.clone(),
        };
        let routes = tonic::service::Routes::new(
            KubernetesApiServer::new(service)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        );
        let stop = CancellationToken::new();
        tokio::spawn(gitops_tunnel::reverse::serve_tunnels(
            tunnels,
            routes,
            2,
            stop.clone(),
        ));
        let (tunnels, agent) = (self.kas.state.tunnels.clone(), self.agent_id);
        eventually(Duration::from_secs(20), "the stand-in's tunnels", || {
            let n = tunnels.count(&agent);
            async move { Ok(n >= 1) }
        })
        .await?;
        Ok(stop)
    }

    async fn graphql(&self, query: &str) -> anyhow::Result<Value> {
        Ok(self.admin.execute(query, json!({})).await?)
    }
}

async fn status_of(response: reqwest::Response) -> anyhow::Result<(u16, Value)> {
    let code = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body: Value = response.json().await?;
    ensure!(
        content_type == "application/json",
        "content type {content_type}"
    );
    ensure!(body["kind"] == "Status", "not a Status: {body}");
    ensure!(body["code"] == code, "code {code} vs {body}");
    Ok((code, body))
}

// ---------------------------------------------------------------------------------------------------------
// Tests.

/// A plain GET reaches the real apiserver over each transport (and the proxy's TLS listener with the TLS
/// transports); the caller's `Authorization` never reaches the agent, `X-Forwarded-For` does; GitLab's
/// `/k8s-proxy/` prefix works.
#[tokio::test]
async fn get_reaches_the_apiserver_over_every_transport() -> anyhow::Result<()> {
    for (tls, schemes) in [(false, ["grpc", "ws"]), (true, ["grpcs", "wss"])] {
        let h = ProxyHarness::start(tls, 500).await?;
        h.grant(None);
        for scheme in schemes {
            let stop = h.stand_in_agent(scheme).await?;
            let response = h.get("/api/v1/namespaces/default").await?;
            ensure!(response.status() == 200, "{scheme}: {}", response.status());
            let body: Value = response.json().await?;
            ensure!(
                body["kind"] == "Namespace" && body["metadata"]["name"] == "default",
                "{scheme}: {body}"
            );
            let version: Value = h.get("/k8s-proxy/version").await?.json().await?;
            ensure!(version["gitVersion"].is_string(), "{scheme}: {version}");
            stop.cancel();
            let (tunnels, agent) = (h.kas.state.tunnels.clone(), h.agent_id);
            eventually(Duration::from_secs(10), "the tunnels closing", || {
                let n = tunnels.count(&agent);
                async move { Ok(n == 0) }
            })
            .await?;
        }
        let seen = h.seen.lock().unwrap().clone();
        ensure!(seen.len() == 4, "{} requests reached the agent", seen.len());
        for header in &seen {
            ensure!(
                header_value(header, "authorization").is_none(),
                "{header:?}"
            );
            ensure!(header_value(header, "host").is_none(), "{header:?}");
            ensure!(
                header_value(header, "x-forwarded-for") == Some(b"127.0.0.1".as_slice()),
                "{header:?}"
            );
            ensure!(header.impersonation.is_none());
        }
        ensure!(seen[1].path_and_query == "/version", "prefix stripped");
        // Every request ended counts in kas's proxy metrics, by Kubernetes verb and status.
        let state = h.kas.state.clone();
        eventually(Duration::from_secs(10), "4 proxy requests counted", || {
            let text = kas::observability::endpoints(state.clone())
                .encode(gitops_telemetry::observability::Exposition::PrometheusText);
            async move {
                Ok(
                    text.contains("kas_proxy_requests_total{verb=\"get\",code=\"200\"} 4\n")
                        && text.contains("kas_proxy_requests_in_flight 0\n"),
                )
            }
        })
        .await?;
        h.kas.shutdown().await;
    }
    Ok(())
}

/// HTTP/2 in plain text (h2c), which the auto-detecting listener accepts besides HTTP/1.1.
#[tokio::test]
async fn h2c_requests_are_served() -> anyhow::Result<()> {
    let h = ProxyHarness::start(false, 500).await?;
    h.grant(None);
    let _stop = h.stand_in_agent("grpc").await?;
    let tcp = tokio::net::TcpStream::connect(h.kas.k8s_proxy_addr.unwrap()).await?;
    let (mut send, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await?;
    tokio::spawn(connection);
    let request = http::Request::get(h.proxy_url("/api/v1/namespaces/default"))
        .header(
            "authorization",
            format!("Bearer ci:{}:{SECRET}", h.agent_id),
        )
        .body(http_body_util::Empty::<Bytes>::new())?;
    let response = send.send_request(request).await?;
    ensure!(response.status() == 200, "{}", response.status());
    ensure!(response.version() == http::Version::HTTP_2);
    let body: Value = serde_json::from_slice(&response.into_body().collect().await?.to_bytes())?;
    ensure!(body["kind"] == "Namespace", "{body}");
    Ok(())
}

/// A watch through kas gets the event of an object created after it started, and ends within a second of
/// its credential being revoked. Its audit record (verb `watch`) then appears in the store and GraphQL.
#[tokio::test]
async fn a_watch_receives_events_and_ends_when_revoked() -> anyhow::Result<()> {
    let h = ProxyHarness::start(false, 500).await?;
    let revoked = h.grant(None);
    let _stop = h.stand_in_agent("grpc").await?;
    let ns = TestNamespace::create("proxy-watch").await?;
    let mut watch = h
        .get(&format!(
            // Only ours: the controller-manager adds `kube-root-ca.crt` to new namespaces at its own pace.
            "/api/v1/namespaces/{}/configmaps?watch=true&labelSelector=proxy-test%3Dwatched",
            ns.name
        ))
        .await?;
    ensure!(watch.status() == 200, "{}", watch.status());
    let configmaps: kube::Api<k8s_openapi::api::core::v1::ConfigMap> = ns.api();
    let cm: k8s_openapi::api::core::v1::ConfigMap = serde_json::from_value(json!({
        "metadata": { "name": "watched", "labels": { "proxy-test": "watched" } }
    }))?;
    configmaps.create(&Default::default(), &cm).await?;
    let mut received = String::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        // Watch events are newline-delimited; a chunk may hold part of one.
        while !(received.contains("\"watched\"") && received.ends_with('\n')) {
            match watch.chunk().await? {
                Some(chunk) => received.push_str(&String::from_utf8_lossy(&chunk)),
                None => bail!("the watch ended before the event: {received}"),
            }
        }
        anyhow::Ok(())
    })
    .await
    .context("no event within 10 s")??;
    ensure!(received.contains("\"ADDED\""), "{received}");
    // Control: the watch stays open (and quiet) while the credential is valid.
    let quiet = tokio::time::timeout(Duration::from_millis(500), watch.chunk()).await;
    ensure!(quiet.is_err(), "the watch did not stay open: {quiet:?}");
    let cancelled_at = tokio::time::Instant::now();
    revoked.cancel();
    let ended = tokio::time::timeout(Duration::from_secs(1), async {
        // Until it ends, cleanly or not.
        while let Ok(Some(_)) = watch.chunk().await {}
    })
    .await;
    ensure!(
        ended.is_ok(),
        "the watch was still open 1 s after revocation"
    );
    println!("watch ended {:?} after revocation", cancelled_at.elapsed());

    let (store, agent) = (h.kas.state.store.clone(), h.agent_id);
    eventually(Duration::from_secs(5), "the watch's audit record", || {
        let records = store.proxy_audit(agent, 10);
        async move { Ok(records?.iter().any(|(_, r)| r.verb == Verb::Watch)) }
    })
    .await?;
    let record = h
        .kas
        .state
        .store
        .proxy_audit(h.agent_id, 10)?
        .into_iter()
        .find(|(_, r)| r.verb == Verb::Watch)
        .unwrap()
        .1;
    ensure!(
        record.resource.as_deref() == Some("configmaps"),
        "{record:?}"
    );
    ensure!(
        record.namespace.as_deref() == Some(ns.name.as_str()),
        "{record:?}"
    );
    ensure!(
        record.status_code == 200 && record.duration_ms >= 500,
        "{record:?}"
    );
    let audit = h
        .graphql(&format!(
            r#"{{ clusterAgent(id: "{}") {{ proxyAudit(last: 5) {{ at caller tokenId project environment username verb resource subresource namespace name statusCode durationMs }} }} }}"#,
            h.agent_gid
        ))
        .await?;
    let entries = audit["clusterAgent"]["proxyAudit"]
        .as_array()
        .context(audit.to_string())?;
    let entry = entries
        .iter()
        .find(|e| e["verb"] == "WATCH")
        .context(audit.to_string())?;
    ensure!(entry["caller"] == "CI_JOB", "{entry}");
    ensure!(
        entry["tokenId"].as_str()
            == Some(format!("gid://kas/Clusters::CiToken/{TOKEN_ID}").as_str()),
        "{entry}"
    );
    ensure!(entry["project"] == CI_PROJECT, "{entry}");
    ensure!(entry["environment"] == "production", "{entry}");
    ensure!(entry["username"].is_null(), "{entry}");
    ensure!(entry["resource"] == "configmaps", "{entry}");
    ensure!(entry["namespace"] == ns.name.as_str(), "{entry}");
    ensure!(entry["statusCode"] == 200, "{entry}");
    ns.delete().await?;
    Ok(())
}

/// An upgrade (exec over SPDY, as older kubectl does) is answered `101` with the agent's headers, then
/// bytes flow both ways; the client hanging up ends the agent's side, and the record says `connect`.
#[tokio::test]
async fn an_upgrade_pipes_bytes_both_ways() -> anyhow::Result<()> {
    let h = ProxyHarness::start(false, 500).await?;
    h.grant(None);
    let _stop = h.stand_in_agent("ws").await?;
    let mut tcp = tokio::net::TcpStream::connect(h.kas.k8s_proxy_addr.unwrap()).await?;
    let request = format!(
        "POST /api/v1/namespaces/app/pods/web/exec?command=sh&stdin=true HTTP/1.1\r\nHost: kas\r\n\
         Authorization: Bearer ci:{}:{SECRET}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\
         X-Stream-Protocol-Version: v4.channel.k8s.io\r\nContent-Length: 0\r\n\r\n",
        h.agent_id
    );
    tcp.write_all(request.as_bytes()).await?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        ensure!(tcp.read(&mut byte).await? == 1, "closed: {head:?}");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head)?.to_ascii_lowercase();
    ensure!(head.starts_with("http/1.1 101"), "{head}");
    ensure!(head.contains("upgrade: spdy/3.1"), "{head}");
    ensure!(
        head.contains("x-stream-protocol-version: v4.channel.k8s.io"),
        "{head}"
    );
    for message in ["hello agent", "and again"] {
        tcp.write_all(message.as_bytes()).await?;
        let mut answer = vec![0u8; message.len()];
        tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut answer)).await??;
        ensure!(
            answer == message.to_ascii_uppercase().as_bytes(),
            "{answer:?}"
        );
    }
    tcp.shutdown().await?;
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest))
        .await
        .context("the agent's side did not end after the client hung up")??;
    let (store, agent) = (h.kas.state.store.clone(), h.agent_id);
    eventually(Duration::from_secs(5), "the exec's audit record", || {
        let records = store.proxy_audit(agent, 10);
        async move {
            Ok(records?.iter().any(|(_, r)| {
                r.verb == Verb::Connect
                    && r.subresource.as_deref() == Some("exec")
                    && r.status_code == 101
            }))
        }
    })
    .await?;
    ensure!(
        h.kas.state.k8s_proxy.sessions.in_flight(h.agent_id) == 0,
        "the session still counts against the cap"
    );
    Ok(())
}

/// Revoking the credential cuts an open upgraded session at once.
#[tokio::test]
async fn revocation_cuts_an_upgraded_session() -> anyhow::Result<()> {
    let h = ProxyHarness::start(false, 500).await?;
    let revoked = h.grant(None);
    let _stop = h.stand_in_agent("grpc").await?;
    let mut tcp = tokio::net::TcpStream::connect(h.kas.k8s_proxy_addr.unwrap()).await?;
    let request = format!(
        "GET /api/v1/namespaces/app/pods/web/exec?command=sh HTTP/1.1\r\nHost: kas\r\n\
         Authorization: Bearer ci:{}:{SECRET}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        h.agent_id
    );
    tcp.write_all(request.as_bytes()).await?;
    let mut buf = vec![0u8; 4096];
    let n = tcp.read(&mut buf).await?;
    ensure!(
        buf[..n].starts_with(b"HTTP/1.1 101"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    tcp.write_all(b"x").await?;
    let n = tcp.read(&mut buf).await?;
    ensure!(&buf[..n] == b"X");
    revoked.cancel();
    let closed = tokio::time::timeout(Duration::from_secs(1), tcp.read(&mut buf)).await;
    ensure!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the session was still open 1 s after revocation: {closed:?}"
    );
    Ok(())
}

/// Refusals are Kubernetes `Status` objects with their code: a path outside the API, no credential, a
/// client's `Impersonate-*` while kas impersonates; hop-by-hop headers never reach the agent.
#[tokio::test]
async fn refusals_are_status_objects_and_hop_by_hop_headers_stay_behind() -> anyhow::Result<()> {
    let h = ProxyHarness::start(false, 500).await?;
    h.grant(None);
    let _stop = h.stand_in_agent("grpc").await?;
    let client = h.http()?;

    let (code, body) = status_of(h.get("/metrics").await?).await?;
    ensure!(
        code == 404 && body["message"].as_str().unwrap().contains("/metrics"),
        "{body}"
    );
    let (code, _) = status_of(h.get("/k8s-proxy/debug/pprof").await?).await?;
    ensure!(code == 404);
    let (code, _) = status_of(client.get(h.proxy_url("/api")).send().await?).await?;
    ensure!(code == 401, "no credential");
    let wrong = client
        .get(h.proxy_url("/api"))
        .bearer_auth(format!("ci:{}:wrong", h.agent_id))
        .send()
        .await?;
    ensure!(status_of(wrong).await?.0 == 401);

    // Hop-by-hop headers, and those `Connection` names, stay with the client's connection.
    let echoed: Value = client
        .post(h.proxy_url("/api/v1/namespaces/a/configmaps"))
        .bearer_auth(format!("ci:{}:{SECRET}", h.agent_id))
        .header("x-stand-in", "echo")
        .header("connection", "keep-alive, x-per-hop")
        .header("x-per-hop", "1")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("proxy-authorization", "Basic eDp5")
        .header("impersonate-user", "allowed-when-acting-as-agent")
        .header("accept", "application/json")
        .body("{\"kind\":\"ConfigMap\"}")
        .send()
        .await?
        .json()
        .await?;
    let names: Vec<&str> = echoed["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h[0].as_str().unwrap())
        .collect();
    for gone in [
        "authorization",
        "connection",
        "x-per-hop",
        "keep-alive",
        "te",
        "proxy-authorization",
        "host",
    ] {
        ensure!(!names.contains(&gone), "{gone} was forwarded: {names:?}");
    }
    for kept in ["x-stand-in", "accept", "impersonate-user", "content-length"] {
        ensure!(names.contains(&kept), "{kept} was not forwarded: {names:?}");
    }
    ensure!(echoed["body"] == "{\"kind\":\"ConfigMap\"}", "{echoed}");
    ensure!(echoed["method"] == "POST");

    // When kas impersonates, the client's own impersonation is refused.
    h.grant(Some(Impersonation {
        username: "gitlab:ci_job:42".into(),
        ..Default::default()
    }));
    let refused = client
        .get(h.proxy_url("/api/v1/pods"))
        .bearer_auth(format!("ci:{}:{SECRET}", h.agent_id))
        .header("Impersonate-User", "system:admin")
        .send()
        .await?;
    let (code, body) = status_of(refused).await?;
    ensure!(code == 400, "{body}");
    ensure!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("impersonate-user"),
        "{body}"
    );
    let echoed: Value = client
        .get(h.proxy_url("/api/v1/pods"))
        .bearer_auth(format!("ci:{}:{SECRET}", h.agent_id))
        .header("x-stand-in", "echo")
        .send()
        .await?
        .json()
        .await?;
    ensure!(echoed["impersonation"] == true, "{echoed}");
    Ok(())
}

/// An agent with no tunnel: 503 naming it, "never connected" before its first connection and the time it
/// was last seen after agentk (the real one) disconnected.
#[tokio::test]
async fn agent_not_connected_names_the_agent_and_when_it_was_last_seen() -> anyhow::Result<()> {
    let h = ProxyHarness::start(false, 500).await?;
    h.grant(None);
    let (code, body) = status_of(h.get("/api/v1/pods").await?).await?;
    let message = body["message"].as_str().unwrap();
    ensure!(code == 503, "{body}");
    ensure!(
        message.contains(&format!("agent \"{AGENT_NAME}\" (id {})", h.agent_id))
            && message.contains("never connected"),
        "{message}"
    );

    let address = KasAddress::parse(&format!("grpc://{}", h.kas.agent_addr))?;
    let agent = agentk::start(
        ClientConfig::new(address, h.agent_secret.clone()),
        agentk::AgentOptions::default(),
        None,
    )?;
    e2e::wait_for_state(&agent, Duration::from_secs(20), "connected", |s| {
        s.connected
    })
    .await?;
    agent.shutdown().await;
    let connections = h.kas.state.connections.clone();
    let agent_id = h.agent_id;
    eventually(Duration::from_secs(10), "kas seeing agentk go", || {
        let gone = connections.of_agent(agent_id).is_empty();
        async move { Ok(gone) }
    })
    .await?;
    let (code, body) = status_of(h.get("/api/v1/pods").await?).await?;
    let message = body["message"].as_str().unwrap();
    ensure!(code == 503, "{body}");
    let year = &humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()[..4];
    ensure!(message.contains(&format!("last seen {year}-")), "{message}");
    Ok(())
}

/// `k8s_proxy.max_requests_per_agent` open requests (watches) at once; one more is answered 429 until one
/// ends.
#[tokio::test]
async fn requests_in_flight_are_capped_per_agent() -> anyhow::Result<()> {
    let h = ProxyHarness::start(false, 2).await?;
    h.grant(None);
    let _stop = h.stand_in_agent("grpc").await?;
    let client = h.http()?;
    let hold = || {
        client
            .get(h.proxy_url("/api/v1/pods?watch=true"))
            .bearer_auth(format!("ci:{}:{SECRET}", h.agent_id))
            .header("x-stand-in", "hold")
            .send()
    };
    let first = hold().await?;
    let second = hold().await?;
    ensure!(first.status() == 200 && second.status() == 200);
    ensure!(h.kas.state.k8s_proxy.sessions.in_flight(h.agent_id) == 2);
    let (code, body) = status_of(hold().await?).await?;
    ensure!(code == 429, "{body}");
    ensure!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("max_requests_per_agent"),
        "{body}"
    );
    drop(first);
    let (state, agent) = (h.kas.state.clone(), h.agent_id);
    eventually(Duration::from_secs(5), "the slot freed", || {
        let n = state.k8s_proxy.sessions.in_flight(agent);
        async move { Ok(n < 2) }
    })
    .await?;
    let third = hold().await?;
    ensure!(third.status() == 200, "{}", third.status());
    drop(second);
    Ok(())
}

/// A watch whose agent goes away (its tunnels close) ends cleanly for the client, so it re-lists; it does
/// not hang.
#[tokio::test]
async fn a_watch_ends_cleanly_when_the_agents_tunnel_closes() -> anyhow::Result<()> {
    let h = ProxyHarness::start(false, 500).await?;
    h.grant(None);
    let stop = h.stand_in_agent("grpc").await?;
    let mut watch = h
        .http()?
        .get(h.proxy_url("/api/v1/pods?watch=true"))
        .bearer_auth(format!("ci:{}:{SECRET}", h.agent_id))
        .header("x-stand-in", "hold")
        .send()
        .await?;
    ensure!(watch.status() == 200);
    ensure!(watch.chunk().await?.is_some(), "the first event");
    stop.cancel();
    let end = tokio::time::timeout(Duration::from_secs(10), watch.chunk())
        .await
        .context("the watch hung after its agent went away")?;
    ensure!(
        matches!(end, Ok(None)),
        "the watch did not end cleanly: {end:?}"
    );
    Ok(())
}

/// A request body of several MiB goes up in chunks (never one message of the whole) and arrives whole.
#[tokio::test]
async fn a_large_request_body_streams_up_in_chunks() -> anyhow::Result<()> {
    let h = ProxyHarness::start(false, 500).await?;
    h.grant(None);
    let _stop = h.stand_in_agent("grpc").await?;
    let body: String = (0..3 * 1024 * 1024)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let echoed: Value = h
        .http()?
        .put(h.proxy_url("/api/v1/namespaces/a/configmaps/big"))
        .bearer_auth(format!("ci:{}:{SECRET}", h.agent_id))
        .header("x-stand-in", "echo")
        .body(body.clone())
        .send()
        .await?
        .json()
        .await?;
    ensure!(
        echoed["body"].as_str() == Some(body.as_str()),
        "the body changed on the way"
    );
    let messages = echoed["body_messages"].as_u64().unwrap_or_default();
    ensure!(
        messages >= 12,
        "3 MiB came in {messages} messages; chunks are at most 256 KiB"
    );
    Ok(())
}
