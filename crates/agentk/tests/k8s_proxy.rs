//! agentk's side of the Kubernetes API proxy against the real kube-apiserver: the `KubernetesApi` service
//! is served in this process on a loopback gRPC server (and, for the streaming cases, on a real reverse
//! tunnel as agentk serves it) and driven with the generated client, as kas calls it. Needs the test environment (`cargo xtask cluster up`, then export
//! `GITOPS_TEST_ENV` and `KUBECONFIG`).

use std::time::Duration;

use agentk::k8s_proxy::{ApiserverClient, KubernetesApiService};
use futures::StreamExt;
use gitops_protocol::{
    HttpBodyEnd, HttpHeader, HttpRequestHeader, HttpRequestPart, HttpResponseHeader,
    HttpResponsePart, Impersonation, http_request_part::Part as RequestPart,
    http_response_part::Part as ResponsePart, kubernetes_api_client::KubernetesApiClient,
    kubernetes_api_server::KubernetesApiServer,
};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{ObjectMeta, PostParams};
use serde_json::Value;
use test_support::{
    cluster::{TestNamespace, install_crypto_provider},
    env::test_env,
    fault_proxy::{FaultProxy, UpstreamIdentity},
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Streaming, transport::Channel};

const WAIT: Duration = Duration::from_secs(20);

/// A gRPC transport to the service: a loopback connection or a reverse tunnel.
type Transport = tower::util::BoxCloneSyncService<
    http::Request<tonic::body::Body>,
    http::Response<tonic::body::Body>,
    tower::BoxError,
>;

/// The service being served, and a client of it.
struct Proxy {
    api: KubernetesApiClient<Transport>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.tasks.iter().for_each(|task| task.abort());
    }
}

fn service(client: Option<ApiserverClient>) -> KubernetesApiServer<KubernetesApiService> {
    KubernetesApiServer::new(KubernetesApiService::new(client))
        .max_decoding_message_size(gitops_protocol::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(gitops_protocol::MAX_MESSAGE_BYTES)
}

fn client<T>(transport: T) -> KubernetesApiClient<Transport>
where
    T: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
        > + Clone
        + Send
        + Sync
        + 'static,
    T::Error: Into<tower::BoxError>,
    T::Future: Send + 'static,
{
    use tower::ServiceExt;
    KubernetesApiClient::new(Transport::new(transport.map_err(Into::into)))
        .max_decoding_message_size(gitops_protocol::MAX_MESSAGE_BYTES)
}

/// Accepted connections with Nagle's algorithm off, as kas and agentk set it (else each small message
/// waits for the peer's delayed ACK).
fn incoming(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    TcpListenerStream::new(listener).map(|stream| {
        let stream = stream?;
        stream.set_nodelay(true)?;
        Ok(stream)
    })
}

/// The service on a loopback gRPC server.
async fn serve(client: Option<ApiserverClient>) -> Proxy {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service(client))
            .serve_with_incoming(incoming(listener))
            .await
            .unwrap();
    });
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    Proxy {
        api: self::client(channel),
        tasks: vec![server],
    }
}

/// A kas that only accepts reverse tunnels (admitting anyone as agent 1), and its registry of them.
async fn tunnel_only_kas() -> (
    std::net::SocketAddr,
    std::sync::Arc<gitops_tunnel::reverse::TunnelRegistry<u64>>,
    tokio::task::JoinHandle<()>,
) {
    use gitops_tunnel::reverse::{ReverseTunnelService, TunnelRegistry};
    let registry = std::sync::Arc::new(TunnelRegistry::<u64>::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let kas = tokio::spawn({
        let registry = registry.clone();
        async move {
            tonic::transport::Server::builder()
                .add_service(ReverseTunnelService::new(
                    registry,
                    std::sync::Arc::new(AnyAgent),
                ))
                .serve_with_incoming(incoming(listener))
                .await
                .unwrap();
        }
    });
    (addr, registry, kas)
}

/// A client of the service on a tunnel that kas holds.
fn over(tunnel: gitops_tunnel::reverse::TunnelChannel) -> KubernetesApiClient<Transport> {
    client(
        tower::ServiceBuilder::new()
            .map_response(|r: http::Response<hyper::body::Incoming>| r.map(tonic::body::Body::new))
            .service(tunnel),
    )
}

/// kas's side of the reverse tunnel, admitting anyone as agent 1.
struct AnyAgent;

impl gitops_tunnel::reverse::TunnelAuthority<u64> for AnyAgent {
    fn admit(
        &self,
        _: &http::Extensions,
    ) -> Result<(u64, tokio_util::sync::CancellationToken), tonic::Status> {
        Ok((1, tokio_util::sync::CancellationToken::new()))
    }
}

/// The service the way agentk serves it in production: on the routes of a reverse tunnel that agentk
/// dialled to a (loopback) kas, called by kas as the HTTP/2 client inside the tunnel.
async fn serve_over_a_reverse_tunnel(client: Option<ApiserverClient>) -> Proxy {
    use gitops_protocol::reverse_tunnel_client::ReverseTunnelClient;
    let (addr, registry, kas) = tunnel_only_kas().await;
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let routes = tonic::service::Routes::new(service(client));
    let agent = tokio::spawn(gitops_tunnel::reverse::serve_tunnels(
        ReverseTunnelClient::new(channel),
        routes,
        1,
        tokio_util::sync::CancellationToken::new(),
    ));
    let tunnel = registry
        .find(&1, WAIT)
        .await
        .expect("agentk opened a tunnel");
    Proxy {
        api: over(tunnel),
        tasks: vec![kas, agent],
    }
}

/// `agentk::start` registers the service on its reverse tunnels, with the client from its options.
#[tokio::test]
async fn a_started_agent_serves_the_proxy_on_its_reverse_tunnels() {
    let (addr, registry, kas) = tunnel_only_kas().await;
    let address = gitops_tunnel::KasAddress::parse(&format!("grpc://{addr}")).unwrap();
    let options = agentk::AgentOptions {
        reverse_tunnels: 1,
        kubernetes_api: Some(admin_client().await),
        ..Default::default()
    };
    // This kas serves nothing else: the agent's configuration stream fails and retries meanwhile.
    let agent = agentk::start(
        gitops_tunnel::client::ClientConfig::new(address, "unused".into()),
        options,
        None,
    )
    .unwrap();
    let tunnel = registry
        .find(&1, WAIT)
        .await
        .expect("agentk opened a tunnel");
    let mut proxy = Proxy {
        api: over(tunnel),
        tasks: vec![kas],
    };
    let (status, body) = get(&mut proxy, header("GET", "/version", &[])).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["gitVersion"].as_str().unwrap().starts_with("v1."));
    agent.shutdown().await;
}

async fn kube_config(kubeconfig: kube::config::Kubeconfig) -> kube::Config {
    install_crypto_provider();
    kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
        .await
        .unwrap()
}

/// A client with the test kubeconfig's (cluster-admin) credentials, as agentk's own.
async fn admin_client() -> ApiserverClient {
    let kubeconfig =
        kube::config::Kubeconfig::read_from(&test_env().kubernetes.kubeconfig).unwrap();
    ApiserverClient::new(&kube_config(kubeconfig).await).unwrap()
}

/// The proxy on loopback with [`admin_client`].
async fn admin_proxy() -> Proxy {
    serve(Some(admin_client().await)).await
}

fn header(method: &str, path: &str, headers: &[(&str, &str)]) -> HttpRequestHeader {
    HttpRequestHeader {
        method: method.into(),
        path_and_query: path.into(),
        headers: headers
            .iter()
            .map(|(name, value)| HttpHeader {
                name: (*name).into(),
                value: value.as_bytes().to_vec(),
            })
            .collect(),
        impersonation: None,
    }
}

fn part(part: RequestPart) -> HttpRequestPart {
    HttpRequestPart { part: Some(part) }
}

/// One `MakeRequest` call in progress.
struct Call {
    requests: Option<mpsc::Sender<HttpRequestPart>>,
    responses: Streaming<HttpResponsePart>,
}

impl Call {
    /// Starts a call with `header` and, if given, the whole `body` followed by `end`.
    async fn start(proxy: &mut Proxy, header: HttpRequestHeader, body: Option<&[&[u8]]>) -> Call {
        let (tx, rx) = mpsc::channel(16);
        tx.send(part(RequestPart::Header(header))).await.unwrap();
        if let Some(chunks) = body {
            for chunk in chunks {
                tx.send(part(RequestPart::Data(chunk.to_vec())))
                    .await
                    .unwrap();
            }
            tx.send(part(RequestPart::End(HttpBodyEnd {})))
                .await
                .unwrap();
        }
        let responses = tokio::time::timeout(WAIT, proxy.api.make_request(ReceiverStream::new(rx)))
            .await
            .expect("the call starts")
            .expect("the call is accepted")
            .into_inner();
        Call {
            requests: Some(tx),
            responses,
        }
    }

    async fn send(&self, p: RequestPart) {
        self.requests.as_ref().unwrap().send(part(p)).await.unwrap();
    }

    /// The next response part; `None` when the stream ended.
    async fn next(&mut self) -> Option<ResponsePart> {
        tokio::time::timeout(WAIT, self.responses.message())
            .await
            .expect("a response part in time")
            .expect("no gRPC error")
            .map(|p| p.part.expect("a part"))
    }

    async fn head(&mut self) -> HttpResponseHeader {
        match self.next().await {
            Some(ResponsePart::Header(h)) => h,
            other => panic!("expected the response header, got {other:?}"),
        }
    }

    /// The body's data chunks, up to `end`.
    async fn chunks(&mut self) -> Vec<Vec<u8>> {
        let mut chunks = Vec::new();
        loop {
            match self.next().await {
                Some(ResponsePart::Data(d)) => chunks.push(d),
                Some(ResponsePart::End(_)) => return chunks,
                other => panic!("expected data or end, got {other:?}"),
            }
        }
    }

    async fn json(&mut self) -> Value {
        serde_json::from_slice(&self.chunks().await.concat()).expect("a JSON body")
    }
}

/// Sends a request with an empty body and returns the status and the JSON body.
async fn get(proxy: &mut Proxy, header: HttpRequestHeader) -> (u32, Value) {
    let mut call = Call::start(proxy, header, Some(&[])).await;
    let status = call.head().await.status;
    (status, call.json().await)
}

fn header_value<'a>(head: &'a HttpResponseHeader, name: &str) -> Option<&'a str> {
    head.headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| std::str::from_utf8(&h.value).unwrap())
}

async fn create_config_map(ns: &TestNamespace, name: &str, data: &str) {
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        data: Some([("k".to_owned(), data.to_owned())].into()),
        ..Default::default()
    };
    ns.api::<ConfigMap>()
        .create(&PostParams::default(), &cm)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_get_returns_the_object_and_its_headers() {
    let ns = TestNamespace::create("proxy-get").await.unwrap();
    let mut proxy = admin_proxy().await;
    let path = format!("/api/v1/namespaces/{}", ns.name);
    let mut call = Call::start(
        &mut proxy,
        header("GET", &path, &[("Accept", "application/json")]),
        Some(&[]),
    )
    .await;
    let head = call.head().await;
    assert_eq!(head.status, 200);
    assert_eq!(
        header_value(&head, "content-type"),
        Some("application/json")
    );
    let body = call.json().await;
    assert_eq!(body["kind"], "Namespace");
    assert_eq!(body["metadata"]["name"], ns.name.as_str());
    ns.delete().await.unwrap();
}

#[tokio::test]
async fn a_large_list_streams_in_several_chunks() {
    let ns = TestNamespace::create("proxy-list").await.unwrap();
    const COUNT: usize = 120;
    let data = "x".repeat(4096);
    for i in 0..COUNT {
        create_config_map(&ns, &format!("cm-{i}"), &data).await;
    }
    let mut proxy = admin_proxy().await;
    let mut call = Call::start(
        &mut proxy,
        header(
            "GET",
            &format!("/api/v1/namespaces/{}/configmaps", ns.name),
            &[],
        ),
        Some(&[]),
    )
    .await;
    assert_eq!(call.head().await.status, 200);
    let chunks = call.chunks().await;
    let total: usize = chunks.iter().map(Vec::len).sum();
    assert!(total > COUNT * 4096, "{total} bytes");
    assert!(
        chunks.len() > 1,
        "a list of {total} bytes arrived in {} chunk(s)",
        chunks.len()
    );
    let largest = chunks.iter().map(Vec::len).max().unwrap();
    assert!(largest < total, "no chunk holds the whole body");
    let list: Value = serde_json::from_slice(&chunks.concat()).unwrap();
    let ours = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|cm| cm["metadata"]["name"].as_str().unwrap().starts_with("cm-"))
        .count();
    assert_eq!(ours, COUNT);
    ns.delete().await.unwrap();
}

/// Reads data chunks until one mentions `needle`, returning that event (line); fails if the stream ends
/// first. The apiserver flushes after each event and the proxy sends each read on at once, so a chunk ends
/// with a whole event: nothing of the wanted event waits for later data.
async fn chunk_mentioning(call: &mut Call, needle: &str) -> String {
    loop {
        match call.next().await {
            Some(ResponsePart::Data(d)) => {
                let text = String::from_utf8(d).unwrap();
                if let Some(line) = text.lines().find(|line| line.contains(needle)) {
                    assert!(
                        text.ends_with('\n'),
                        "the chunk ends with a whole event: {text}"
                    );
                    return line.to_owned();
                }
            }
            other => panic!("expected a watch event mentioning {needle}, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_watch_delivers_each_event_as_it_happens() {
    watch_delivers_each_event_as_it_happens(admin_proxy().await).await;
}

#[tokio::test]
async fn a_watch_delivers_each_event_as_it_happens_over_a_reverse_tunnel() {
    watch_delivers_each_event_as_it_happens(
        serve_over_a_reverse_tunnel(Some(admin_client().await)).await,
    )
    .await;
}

async fn watch_delivers_each_event_as_it_happens(mut proxy: Proxy) {
    let ns = TestNamespace::create("proxy-watch").await.unwrap();
    let path = format!(
        "/api/v1/namespaces/{}/configmaps?watch=true&allowWatchBookmarks=false",
        ns.name
    );
    let mut call = Call::start(&mut proxy, header("GET", &path, &[]), Some(&[])).await;
    assert_eq!(call.head().await.status, 200);
    // The namespace's root CA ConfigMap may show up first; events for our objects must arrive while the
    // watch stays open, each without waiting for more.
    for name in ["first", "second"] {
        create_config_map(&ns, name, "v").await;
        let event = chunk_mentioning(&mut call, &format!("\"name\":\"{name}\"")).await;
        let event: Value = serde_json::from_str(&event).expect("a whole event");
        assert_eq!(event["type"], "ADDED");
        assert_eq!(event["object"]["metadata"]["name"], name);
    }
    ns.delete().await.unwrap();
}

#[tokio::test]
async fn a_request_body_streams_up_in_chunks() {
    let ns = TestNamespace::create("proxy-post").await.unwrap();
    let mut proxy = admin_proxy().await;
    let object = serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "posted"}, "data": {"k": "y".repeat(100_000)},
    })
    .to_string();
    let chunks: Vec<&[u8]> = object.as_bytes().chunks(16 * 1024).collect();
    assert!(chunks.len() > 3);
    let mut call = Call::start(
        &mut proxy,
        header(
            "POST",
            &format!("/api/v1/namespaces/{}/configmaps", ns.name),
            &[("Content-Type", "application/json")],
        ),
        Some(&chunks),
    )
    .await;
    assert_eq!(call.head().await.status, 201);
    assert_eq!(call.json().await["metadata"]["name"], "posted");
    let stored = ns.api::<ConfigMap>().get("posted").await.unwrap();
    assert_eq!(stored.data.unwrap()["k"].len(), 100_000);
    ns.delete().await.unwrap();
}

#[tokio::test]
async fn paths_outside_the_kubernetes_api_are_not_served() {
    let mut proxy = admin_proxy().await;
    let (status, body) = get(&mut proxy, header("GET", "/metrics", &[])).await;
    assert_eq!(status, 404);
    assert_eq!(body["kind"], "Status");
    assert_eq!(body["code"], 404);
    let (status, body) = get(&mut proxy, header("GET", "/version", &[])).await;
    assert_eq!(status, 200);
    assert!(body["gitVersion"].as_str().unwrap().starts_with("v1."));
}

#[tokio::test]
async fn without_a_kubernetes_client_every_call_is_answered_503() {
    let mut proxy = serve(None).await;
    let (status, body) = get(&mut proxy, header("GET", "/version", &[])).await;
    assert_eq!(status, 503);
    assert_eq!(body["kind"], "Status");
    assert_eq!(body["reason"], "ServiceUnavailable");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("no Kubernetes configuration")
    );
}

/// agentk's credentials here are a ServiceAccount token (read from a file, as in a pod) whose only grant is
/// the impersonation ClusterRole of `agentk generate --impersonate`: what the CI job may do is then decided
/// by the RBAC of the impersonated identity alone.
#[tokio::test]
async fn impersonated_requests_are_subject_to_the_identitys_rbac() {
    let ns = TestNamespace::create("proxy-imp").await.unwrap();
    let kubectl = |args: &[&str], stdin: Option<&str>| -> String {
        use std::io::Write;
        let mut child = std::process::Command::new(&test_env().tools.kubectl)
            .args(args)
            .env("KUBECONFIG", &test_env().kubernetes.kubeconfig)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.unwrap_or("").as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    // The ServiceAccount and the impersonation grant, exactly as `agentk generate --impersonate` writes them.
    let manifests = agentk::generate::manifests(&agentk::generate::InstallOptions {
        namespace: ns.name.clone(),
        kas_address: "wss://kas.example".into(),
        agent_token: "unused".into(),
        agent_version: "stable".into(),
        image_repository: "agentk".into(),
        cluster_write: false,
        impersonate: true,
    });
    let wanted: Vec<&str> = manifests
        .split("\n---\n")
        .filter(|d| {
            d.contains("\nkind: ServiceAccount\n") || d.contains("gitlab-agent-impersonate")
        })
        .collect();
    assert_eq!(
        wanted.len(),
        3,
        "ServiceAccount, ClusterRole, ClusterRoleBinding"
    );
    kubectl(&["apply", "-f", "-"], Some(&wanted.join("\n---\n")));
    let token = kubectl(
        &[
            "create",
            "token",
            "gitlab-agent",
            "-n",
            &ns.name,
            "--duration=1h",
        ],
        None,
    );
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token.trim()).unwrap();
    let kubeconfig: kube::config::Kubeconfig = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "c", "cluster": {
            "server": test_env().kubernetes.server,
            "certificate-authority": test_env().kubernetes.kubeconfig.parent().unwrap().join("pki/ca.crt"),
        }}],
        "users": [{"name": "sa", "user": {"tokenFile": token_file}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "sa"}}],
        "current-context": "c",
    }))
    .unwrap();
    let config = kube_config(kubeconfig).await;
    let mut proxy = serve(Some(ApiserverClient::new(&config).unwrap())).await;

    let list = format!("/api/v1/namespaces/{}/configmaps", ns.name);
    let ci_job = || {
        let mut h = header("GET", &list, &[]);
        h.impersonation = Some(Impersonation {
            username: "gitlab:ci_job:1".into(),
            uid: "ci-token-1".into(),
            groups: vec![
                "gitlab:ci_job".into(),
                "gitlab:project:group/project".into(),
            ],
            extra: vec![gitops_protocol::ImpersonationExtra {
                key: "agent.gitlab.com/id".into(),
                values: vec!["1".into()],
            }],
        });
        h
    };
    let (status, body) = get(&mut proxy, ci_job()).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["reason"], "Forbidden");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("\"gitlab:ci_job:1\""),
        "the apiserver names the impersonated user: {message}"
    );

    kubectl(
        &[
            "create",
            "rolebinding",
            "ci-jobs-view",
            "-n",
            &ns.name,
            "--clusterrole=view",
            "--group=gitlab:ci_job",
        ],
        None,
    );
    // The authorizer sees the new binding through its informer, normally within milliseconds.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, body) = get(&mut proxy, ci_job()).await;
        if status == 200 {
            assert_eq!(body["kind"], "ConfigMapList");
            break;
        }
        assert_eq!(status, 403, "{body}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the RoleBinding never took effect"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The ServiceAccount itself (no impersonation) has no such grant: the proxy does not lend agentk's
    // powers to the impersonated request, and the 403 names agentk's own identity.
    let (status, body) = get(&mut proxy, header("GET", &list, &[])).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("serviceaccount"),
        "{body}"
    );
    // Cluster-scoped, so not deleted with the namespace.
    kubectl(
        &[
            "delete",
            &format!("clusterrolebinding/gitlab-agent-impersonate:{}", ns.name),
        ],
        None,
    );
    ns.delete().await.unwrap();
}

#[tokio::test]
async fn client_impersonation_headers_are_refused_when_impersonation_is_set_and_pass_otherwise() {
    let ns = TestNamespace::create("proxy-climp").await.unwrap();
    let mut proxy = admin_proxy().await;
    let list = format!("/api/v1/namespaces/{}/configmaps", ns.name);
    let mut h = header("GET", &list, &[("Impersonate-User", "system:admin")]);
    h.impersonation = Some(Impersonation {
        username: "gitlab:ci_job:1".into(),
        groups: vec!["gitlab:ci_job".into()],
        ..Default::default()
    });
    let (status, body) = get(&mut proxy, h).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["reason"], "BadRequest");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("impersonate-user")
    );

    // access_as: agent: the client's own Impersonate-User reaches the apiserver, which applies it.
    let (status, body) = get(
        &mut proxy,
        header(
            "GET",
            &list,
            &[("Impersonate-User", "nobody-in-particular")],
        ),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("nobody-in-particular"),
        "{body}"
    );
    ns.delete().await.unwrap();
}

/// A minimal WebSocket frame reader for the server's (unmasked) frames: (opcode, payload) once complete.
fn parse_frame(buffer: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    if buffer.len() < 2 {
        return None;
    }
    let opcode = buffer[0] & 0x0f;
    let (len, start) = match buffer[1] & 0x7f {
        126 if buffer.len() >= 4 => (usize::from(u16::from_be_bytes([buffer[2], buffer[3]])), 4),
        127 if buffer.len() >= 10 => (
            usize::try_from(u64::from_be_bytes(buffer[2..10].try_into().unwrap())).unwrap(),
            10,
        ),
        126 | 127 => return None,
        n => (usize::from(n), 2),
    };
    (buffer.len() >= start + len)
        .then(|| (opcode, buffer[start..start + len].to_vec(), start + len))
}

/// The apiserver serves watches over WebSocket: the 101 passes through, the apiserver's frames come back as
/// `upgrade_data`, and a close frame sent up as `upgrade_data` is answered, after which the apiserver closes
/// and the response stream ends.
#[tokio::test]
async fn an_upgrade_passes_through_with_bytes_both_ways() {
    upgrade_passes_through_with_bytes_both_ways(admin_proxy().await).await;
}

#[tokio::test]
async fn an_upgrade_passes_through_with_bytes_both_ways_over_a_reverse_tunnel() {
    upgrade_passes_through_with_bytes_both_ways(
        serve_over_a_reverse_tunnel(Some(admin_client().await)).await,
    )
    .await;
}

async fn upgrade_passes_through_with_bytes_both_ways(mut proxy: Proxy) {
    let ns = TestNamespace::create("proxy-ws").await.unwrap();
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    let path = format!("/api/v1/namespaces/{}/configmaps?watch=true", ns.name);
    let mut call = Call::start(
        &mut proxy,
        header(
            "GET",
            &path,
            &[
                ("Connection", "Upgrade"),
                ("Upgrade", "websocket"),
                ("Sec-WebSocket-Version", "13"),
                ("Sec-WebSocket-Key", key),
                // The apiserver's WebSocket handshake (golang.org/x/net/websocket) refuses a missing Origin.
                ("Origin", "http://localhost"),
            ],
        ),
        Some(&[]),
    )
    .await;
    let head = call.head().await;
    assert_eq!(head.status, 101, "{head:?}");
    assert_eq!(
        header_value(&head, "upgrade")
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("websocket")
    );
    assert_eq!(
        header_value(&head, "sec-websocket-accept"),
        Some(tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes()).as_str())
    );

    create_config_map(&ns, "over-websocket", "v").await;
    let mut buffer = Vec::new();
    // One read may hold several frames (the namespace's root CA ConfigMap comes first) or part of one.
    let event = 'frames: loop {
        match call.next().await {
            Some(ResponsePart::UpgradeData(d)) => buffer.extend_from_slice(&d),
            other => panic!("expected upgrade_data, got {other:?}"),
        }
        while let Some((opcode, payload, used)) = parse_frame(&buffer) {
            buffer.drain(..used);
            let text = String::from_utf8(payload).unwrap();
            assert!(
                opcode == 1 || opcode == 2,
                "a data frame, got opcode {opcode}"
            );
            if text.contains("over-websocket") {
                break 'frames text;
            }
        }
    };
    let event: Value = serde_json::from_str(&event).unwrap();
    assert_eq!(event["type"], "ADDED");

    // A masked close frame (status 1000), sent up; then the client half-closes.
    let mask = [1u8, 2, 3, 4];
    let payload = 1000u16.to_be_bytes();
    let mut close = vec![0x88, 0x80 | 2];
    close.extend_from_slice(&mask);
    close.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    call.send(RequestPart::UpgradeData(close)).await;
    call.requests = None;
    let mut saw_close = false;
    loop {
        match call.next().await {
            Some(ResponsePart::UpgradeData(d)) => buffer.extend_from_slice(&d),
            None => break,
            other => panic!("expected upgrade_data or the end, got {other:?}"),
        }
        while let Some((opcode, _, used)) = parse_frame(&buffer) {
            buffer.drain(..used);
            saw_close |= opcode == 8;
        }
    }
    assert!(
        saw_close,
        "the apiserver answered the close frame before closing"
    );
    ns.delete().await.unwrap();
}

/// kas dropping the response stream (its client went away) ends the apiserver request: the watch's
/// connection to the apiserver, seen by a proxy in between, closes.
#[tokio::test]
async fn dropping_the_response_stream_ends_the_apiserver_watch() {
    let ns = TestNamespace::create("proxy-cancel").await.unwrap();
    let apiserver =
        FaultProxy::in_front_of_apiserver(UpstreamIdentity::KubeconfigClientCertificate)
            .await
            .unwrap();
    let kubeconfig =
        kube::config::Kubeconfig::from_yaml(&apiserver.kubeconfig(None).unwrap()).unwrap();
    let config = kube_config(kubeconfig).await;
    let mut proxy = serve(Some(ApiserverClient::new(&config).unwrap())).await;
    let path = format!("/api/v1/namespaces/{}/configmaps?watch=true", ns.name);
    let mut call = Call::start(&mut proxy, header("GET", &path, &[]), Some(&[])).await;
    assert_eq!(call.head().await.status, 200);
    assert_eq!(apiserver.stats().open, 1, "the watch holds one connection");

    drop(call);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while apiserver.stats().open != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the apiserver connection stayed open after the call ended: {:?}",
            apiserver.stats()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ns.delete().await.unwrap();
}

/// kas cancelling mid-body (its request stream breaks) aborts the request: nothing half-sent is created.
#[tokio::test]
async fn a_request_stream_that_ends_before_end_aborts_the_request() {
    let ns = TestNamespace::create("proxy-abort").await.unwrap();
    let mut proxy = admin_proxy().await;
    let object = serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "half"}, "data": {"k": "v"},
    })
    .to_string();
    let (first, _) = object.as_bytes().split_at(20);
    let mut call = Call::start(
        &mut proxy,
        header(
            "POST",
            &format!("/api/v1/namespaces/{}/configmaps", ns.name),
            &[("Content-Type", "application/json")],
        ),
        None,
    )
    .await;
    call.send(RequestPart::Data(first.to_vec())).await;
    call.requests = None;
    let outcome = tokio::time::timeout(WAIT, call.responses.message())
        .await
        .expect("an answer in time");
    assert!(outcome.is_err(), "the call fails as a whole: {outcome:?}");
    assert!(
        ns.api::<ConfigMap>()
            .get_opt("half")
            .await
            .unwrap()
            .is_none()
    );
    ns.delete().await.unwrap();
}

/// Back-pressure: while kas reads nothing, the apiserver's response stops flowing once the bounded buffers
/// on the way (TCP, HTTP/2 windows, agentk's few queued messages) are full, far short of the whole body;
/// then the rest arrives when kas reads again. A proxy that buffered whole bodies would pull it all at once.
#[tokio::test]
async fn a_reader_that_stops_reading_holds_the_apiserver_response_back() {
    let ns = TestNamespace::create("proxy-slow").await.unwrap();
    const COUNT: usize = 48;
    const SIZE: usize = 1_000_000;
    let data = "z".repeat(SIZE);
    let (namespace, data) = (&ns, &data);
    let creates = (0..COUNT).map(|i| async move {
        create_config_map(namespace, &format!("big-{i}"), data).await;
    });
    futures::stream::iter(creates)
        .buffer_unordered(4)
        .collect::<Vec<()>>()
        .await;
    let apiserver =
        FaultProxy::in_front_of_apiserver(UpstreamIdentity::KubeconfigClientCertificate)
            .await
            .unwrap();
    let kubeconfig =
        kube::config::Kubeconfig::from_yaml(&apiserver.kubeconfig(None).unwrap()).unwrap();
    let config = kube_config(kubeconfig).await;
    let mut proxy = serve(Some(ApiserverClient::new(&config).unwrap())).await;
    let mut call = Call::start(
        &mut proxy,
        header(
            "GET",
            &format!("/api/v1/namespaces/{}/configmaps", ns.name),
            &[],
        ),
        Some(&[]),
    )
    .await;
    assert_eq!(call.head().await.status, 200);
    let mut received = match call.next().await {
        Some(ResponsePart::Data(d)) => d.len(),
        other => panic!("expected data, got {other:?}"),
    };
    // Wait until the flow has stopped: the byte count stands still.
    let mut held = apiserver.stats().bytes_to_client;
    loop {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let now = apiserver.stats().bytes_to_client;
        if now == held {
            break;
        }
        held = now;
    }
    let total = COUNT * SIZE;
    println!("held back after {held} of at least {total} bytes");
    assert!(
        (held as usize) < total / 2,
        "the apiserver sent {held} of {total} bytes to a reader that read nothing"
    );
    loop {
        match call.next().await {
            Some(ResponsePart::Data(d)) => received += d.len(),
            Some(ResponsePart::End(_)) => break,
            other => panic!("expected data or end, got {other:?}"),
        }
    }
    assert!(received > total, "{received} bytes");
    ns.delete().await.unwrap();
}

/// A stand-in for the kubelet behind `pods/exec` over SPDY (the test cluster's kwok nodes serve no exec
/// here): a bare HTTP/1.1 server that switches to `SPDY/3.1`, reads the upgraded connection to its end and
/// only then answers with what it read, and closes. It shows the SPDY upgrade passing unchanged, the
/// client's stream end arriving as a half-close (EOF at the server while the other direction still
/// works), the server's close ending the response stream, and the client's `Authorization` never reaching
/// the server.
#[tokio::test]
async fn a_spdy_upgrade_half_closes_and_streams_back_after_the_client_is_done() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            socket.read_exact(&mut byte).await.unwrap();
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
        socket
            .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\r\n")
            .await
            .unwrap();
        let mut received = Vec::new();
        socket.read_to_end(&mut received).await.unwrap();
        socket.write_all(b"got:").await.unwrap();
        socket.write_all(&received).await.unwrap();
        socket.shutdown().await.unwrap();
        head
    });
    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    let mut proxy = serve(Some(ApiserverClient::new(&config).unwrap())).await;
    let mut call = Call::start(
        &mut proxy,
        header(
            "POST",
            "/api/v1/namespaces/n/pods/p/exec?command=cat&stdin=true&stdout=true",
            &[
                ("Connection", "Upgrade"),
                ("Upgrade", "SPDY/3.1"),
                ("X-Stream-Protocol-Version", "v4.channel.k8s.io"),
                ("Authorization", "Bearer ci:1:client-secret"),
            ],
        ),
        Some(&[]),
    )
    .await;
    let head = call.head().await;
    assert_eq!(head.status, 101);
    assert_eq!(header_value(&head, "upgrade"), Some("SPDY/3.1"));
    call.send(RequestPart::UpgradeData(b"hello ".to_vec()))
        .await;
    call.send(RequestPart::UpgradeData(b"world".to_vec())).await;
    call.requests = None;
    let mut answer = Vec::new();
    loop {
        match call.next().await {
            Some(ResponsePart::UpgradeData(d)) => answer.extend_from_slice(&d),
            None => break,
            other => panic!("expected upgrade_data or the end, got {other:?}"),
        }
    }
    assert_eq!(String::from_utf8(answer).unwrap(), "got:hello world");
    let head = server.await.unwrap();
    assert!(
        head.starts_with("post /api/v1/namespaces/n/pods/p/exec?command=cat"),
        "{head}"
    );
    assert!(head.contains("\r\nupgrade: spdy/3.1\r\n"), "{head}");
    assert!(
        head.contains("\r\nx-stream-protocol-version: v4.channel.k8s.io\r\n"),
        "{head}"
    );
    assert!(!head.contains("client-secret"), "{head}");
}
