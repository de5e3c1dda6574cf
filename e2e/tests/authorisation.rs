//! kas serves an agent exactly what its current `config.yaml` names (and the owner/grant rule allows), ends
//! streams within a second when that changes, validates requests before anything else, and caps what one
//! agent can open. Requests are made with raw gRPC clients over the agent port, as a token holder could.

use std::time::{Duration, Instant};

use e2e::{CONFIG_FILE, CONFIG_PROJECT, Harness, eventually};
use gitops_protocol::{
    ObjectsToSynchronizeRequest, ObjectsToSynchronizeResponse, PathSelector,
    manifest_delivery_client::ManifestDeliveryClient, objects_to_synchronize_request::Ref,
    objects_to_synchronize_response::Message, path_selector::Selector,
};
use gitops_tunnel::client::HeaderInterceptor;
use tokio_util::sync::CancellationToken;
use tonic::{
    Code, Status, Streaming, service::interceptor::InterceptedService, transport::Channel,
};

type Client = ManifestDeliveryClient<InterceptedService<Channel, HeaderInterceptor>>;

/// A registered agent whose token this test holds.
struct RawAgent {
    gid: String,
    id: u64,
    token_gid: String,
    secret: String,
}

impl RawAgent {
    async fn register(h: &Harness, config_entries: &str) -> anyhow::Result<Self> {
        set_config(h, config_entries)?;
        let (gid, token_gid, secret) = h.register_agent().await?;
        let id = gid.rsplit('/').next().unwrap().parse()?;
        Ok(Self {
            gid,
            id,
            token_gid,
            secret,
        })
    }

    /// A client on a connection of its own.
    fn client(&self, h: &Harness) -> anyhow::Result<Client> {
        let config = h.client_config("grpc", &self.secret);
        Ok(ManifestDeliveryClient::with_interceptor(
            config.channel()?,
            config.interceptor()?,
        ))
    }

    fn rows(&self, h: &Harness) -> anyhow::Result<Vec<String>> {
        Ok(h.kas()
            .state
            .store
            .manifest_statuses(self.id)?
            .into_iter()
            .map(|(project, _)| project)
            .collect())
    }
}

fn set_config(h: &Harness, entries: &str) -> anyhow::Result<String> {
    let yaml = format!("gitops:\n  manifest_projects:\n{entries}");
    h.git
        .commit_files(CONFIG_PROJECT, &[(CONFIG_FILE, Some(&yaml))], "config")
}

fn entry(project: &str, glob: &str) -> String {
    format!("  - id: {project}\n    paths:\n    - glob: '{glob}'\n")
}

fn request(
    project: &str,
    reference: Option<Ref>,
    globs: &[&str],
    have: &str,
) -> ObjectsToSynchronizeRequest {
    ObjectsToSynchronizeRequest {
        project_id: project.into(),
        commit_id: have.into(),
        r#ref: reference,
        paths: globs
            .iter()
            .map(|g| PathSelector {
                selector: Some(Selector::Glob((*g).into())),
            })
            .collect(),
    }
}

/// What a stream did first.
#[derive(Debug)]
enum First {
    Snapshot { commit: String, paths: Vec<String> },
    // Read through Debug in failure messages.
    SnapshotError(#[allow(dead_code)] String),
    Ended(Status),
    Nothing,
}

async fn next_event(
    stream: &mut Streaming<ObjectsToSynchronizeResponse>,
    within: Duration,
) -> First {
    let mut header = None;
    let mut paths = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.message()).await {
            Err(_) => return First::Nothing,
            Ok(Err(status)) => return First::Ended(status),
            Ok(Ok(None)) => return First::Ended(Status::ok("stream closed")),
            Ok(Ok(Some(response))) => match response.message {
                Some(Message::Header(h)) => header = Some(h.commit_id),
                Some(Message::File(f)) => paths.push(f.path),
                Some(Message::Trailer(_)) => {
                    return First::Snapshot {
                        commit: header.take().unwrap_or_default(),
                        paths,
                    };
                }
                Some(Message::Error(e)) => return First::SnapshotError(e.message),
                // Only `kas reconcile` sends these; no test here asks for one.
                Some(Message::Reconcile(_)) | None => {}
            },
        }
    }
}

/// Opens a stream and returns it with its first event (`Ended` if the call itself was refused).
async fn open(
    client: &mut Client,
    request: ObjectsToSynchronizeRequest,
    within: Duration,
) -> (Option<Streaming<ObjectsToSynchronizeResponse>>, First) {
    match tokio::time::timeout(within, client.get_objects_to_synchronize(request)).await {
        Err(_) => (None, First::Nothing),
        Ok(Err(status)) => (None, First::Ended(status)),
        Ok(Ok(response)) => {
            let mut stream = response.into_inner();
            let first = next_event(&mut stream, within).await;
            (Some(stream), first)
        }
    }
}

#[track_caller]
fn assert_refused(first: &First, code: Code, needle: &str) {
    match first {
        First::Ended(status) if status.code() == code => assert!(
            status.message().contains(needle),
            "{code:?} should mention {needle:?}: {}",
            status.message()
        ),
        other => panic!("expected {code:?} mentioning {needle:?}, got {other:?}"),
    }
}

#[tokio::test]
async fn a_same_owner_project_not_in_config_is_denied_and_never_read() -> anyhow::Result<()> {
    let h = Harness::start(false).await?;
    for project in ["group/manifests", "group/secrets"] {
        h.git.create_repo(project, true)?;
        h.git
            .commit_files(project, &[("a.yaml", Some("kind: Secret\n"))], "init")?;
    }
    let agent = RawAgent::register(&h, &entry("group/manifests", "*.yaml")).await?;
    let mut client = agent.client(&h)?;
    h.git.reset_request_count("group/secrets");

    let (_, first) = open(
        &mut client,
        request("group/secrets", None, &["*.yaml"], ""),
        Duration::from_secs(10),
    )
    .await;
    assert_refused(&first, Code::PermissionDenied, "config.yaml");
    let counts = h.git.request_count("group/secrets");
    assert_eq!(
        (counts.ls_refs, counts.fetches),
        (0, 0),
        "kas read an unconfigured project: {counts:?}"
    );
    assert!(
        agent.rows(&h)?.is_empty(),
        "no status row for an unconfigured project"
    );

    let (_, first) = open(
        &mut client,
        request("group/manifests", None, &["*.yaml"], ""),
        Duration::from_secs(10),
    )
    .await;
    assert!(
        matches!(first, First::Snapshot { .. }),
        "the configured one is delivered: {first:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_configured_project_at_another_ref_or_with_other_paths_is_denied() -> anyhow::Result<()> {
    let h = Harness::start(false).await?;
    h.git.create_repo("group/manifests", true)?;
    let commit = h.git.commit_files(
        "group/manifests",
        &[
            ("a.yaml", Some("kind: ConfigMap\n")),
            ("secret.yaml", Some("kind: Secret\n")),
        ],
        "init",
    )?;
    h.git.create_branch("group/manifests", "staging", &commit)?;
    let agent = RawAgent::register(&h, &entry("group/manifests", "a.yaml")).await?;
    let mut client = agent.client(&h)?;
    let within = Duration::from_secs(10);

    let staging = Some(Ref::Branch("staging".into()));
    let (_, first) = open(
        &mut client,
        request("group/manifests", staging, &["a.yaml"], ""),
        within,
    )
    .await;
    assert_refused(&first, Code::PermissionDenied, "another ref");
    let (_, first) = open(
        &mut client,
        request("group/manifests", None, &["*.yaml"], ""),
        within,
    )
    .await;
    assert_refused(&first, Code::PermissionDenied, "other paths");
    let (_, first) = open(
        &mut client,
        request("group/manifests", None, &["a.yaml", "secret.yaml"], ""),
        within,
    )
    .await;
    assert_refused(&first, Code::PermissionDenied, "other paths");

    let (_, first) = open(
        &mut client,
        request("group/manifests", None, &["a.yaml"], ""),
        within,
    )
    .await;
    match first {
        First::Snapshot { paths, .. } => assert_eq!(paths, vec!["a.yaml"]),
        other => panic!("the configured selection is delivered: {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn removing_a_project_from_config_ends_its_stream_within_a_second() -> anyhow::Result<()> {
    let h = Harness::start(false).await?;
    for project in ["group/manifests", "group/other"] {
        h.git.create_repo(project, false)?;
        h.git
            .commit_files(project, &[("a.yaml", Some("kind: ConfigMap\n"))], "init")?;
    }
    let both = format!(
        "{}{}",
        entry("group/manifests", "*.yaml"),
        entry("group/other", "*.yaml")
    );
    let agent = RawAgent::register(&h, &both).await?;
    let mut client = agent.client(&h)?;
    let within = Duration::from_secs(10);
    let (stream, first) = open(
        &mut client,
        request("group/manifests", None, &["*.yaml"], ""),
        within,
    )
    .await;
    assert!(matches!(first, First::Snapshot { .. }), "{first:?}");
    let (other, first) = open(
        &mut client,
        request("group/other", None, &["*.yaml"], ""),
        within,
    )
    .await;
    assert!(matches!(first, First::Snapshot { .. }), "{first:?}");
    let (mut stream, mut other) = (stream.unwrap(), other.unwrap());

    set_config(&h, &entry("group/other", "*.yaml"))?;
    // A push webhook would do this; without it the next poll (1 s here) does.
    h.kas().state.watchers.poke(CONFIG_PROJECT);
    let started = Instant::now();
    let ended = next_event(&mut stream, Duration::from_secs(3)).await;
    let took = started.elapsed();
    assert_refused(
        &ended,
        Code::PermissionDenied,
        "no gitops.manifest_projects entry",
    );
    eprintln!("removed from config.yaml: the stream ended {took:?} after the poke");
    assert!(
        took < Duration::from_secs(1),
        "the stream ended after {took:?}"
    );
    assert!(
        matches!(
            next_event(&mut other, Duration::from_millis(500)).await,
            First::Nothing
        ),
        "the project still configured keeps its stream"
    );
    Ok(())
}

#[tokio::test]
async fn revoking_a_grant_ends_the_stream_permission_denied_within_a_second() -> anyhow::Result<()>
{
    let h = Harness::start(false).await?;
    h.git.create_repo("other/manifests", true)?;
    h.git.commit_files(
        "other/manifests",
        &[("a.yaml", Some("kind: ConfigMap\n"))],
        "init",
    )?;
    let agent = RawAgent::register(&h, &entry("other/manifests", "*.yaml")).await?;
    h.admin.grant_project(&agent.gid, "other/manifests").await?;
    let mut client = agent.client(&h)?;
    let (stream, first) = open(
        &mut client,
        request("other/manifests", None, &["*.yaml"], ""),
        Duration::from_secs(10),
    )
    .await;
    assert!(matches!(first, First::Snapshot { .. }), "{first:?}");
    let mut stream = stream.unwrap();

    let started = Instant::now();
    h.admin
        .revoke_project(&agent.gid, "other/manifests")
        .await?;
    let ended = next_event(&mut stream, Duration::from_secs(3)).await;
    let took = started.elapsed();
    assert_refused(&ended, Code::PermissionDenied, "was not granted");
    eprintln!("grant revoked: the stream ended {took:?} after the mutation was sent");
    assert!(
        took < Duration::from_secs(1),
        "the stream ended after {took:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_token_revoked_between_authentication_and_the_call_ends_every_stream()
-> anyhow::Result<()> {
    use gitops_protocol::{
        ConfigurationRequest, agent_configuration_server::AgentConfiguration,
        manifest_delivery_server::ManifestDelivery,
    };
    use gitops_tunnel::reverse::TunnelAuthority;
    use kas::{
        agent_config::AgentConfigurationService, auth::AgentIdentity,
        manifests::service::ManifestDeliveryService,
    };

    let h = Harness::start(false).await?;
    h.git.create_repo("group/manifests", false)?;
    h.git.commit_files(
        "group/manifests",
        &[("a.yaml", Some("kind: ConfigMap\n"))],
        "init",
    )?;
    let agent = RawAgent::register(&h, &entry("group/manifests", "*.yaml")).await?;
    let state = h.kas().state.clone();
    // Step 1, authentication: what the agent listener puts into the request.
    let (token, record) = state
        .store
        .active_token(&kas::tokens::hash(&agent.secret))?
        .expect("active token");
    let identity = AgentIdentity {
        agent_id: record.id,
        token_id: token.id,
        project_path: record.project_path,
        agent_name: record.name,
    };
    // The revocation lands in the window.
    h.admin.revoke_token(&agent.token_gid).await?;
    // Step 2: the handlers run with the identity authenticated before the revocation.
    fn with<T>(identity: &AgentIdentity, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.extensions_mut().insert(identity.clone());
        request
    }
    let manifests = ManifestDeliveryService::new(state.clone());
    let call = manifests
        .get_objects_to_synchronize(with(
            &identity,
            request("group/manifests", None, &["*.yaml"], ""),
        ))
        .await;
    assert_stream_ends_unauthenticated(call.map(|r| r.into_inner())).await;

    let config = AgentConfigurationService::new(state.clone());
    let call = config
        .get_configuration(with(&identity, ConfigurationRequest::default()))
        .await;
    assert_stream_ends_unauthenticated(call.map(|r| r.into_inner())).await;

    let mut extensions = http::Extensions::new();
    extensions.insert(identity.clone());
    let authority = kas::auth::AgentTunnelAuthority {
        connections: state.connections.clone(),
        tunnels: state.tunnels.clone(),
    };
    match authority.admit(&extensions) {
        Err(status) => assert_eq!(status.code(), Code::Unauthenticated),
        Ok((_, cancel)) => assert!(cancel.is_cancelled(), "a tunnel would outlive its token"),
    }
    Ok(())
}

async fn assert_stream_ends_unauthenticated<S, T>(call: Result<S, Status>)
where
    S: futures_core_stream::Stream<Item = Result<T, Status>> + Unpin,
    T: std::fmt::Debug,
{
    use futures_core_stream::StreamExt;
    let mut stream = match call {
        Err(status) => return assert_eq!(status.code(), Code::Unauthenticated, "{status:?}"),
        Ok(stream) => stream,
    };
    // The first message decides: it must be the refusal.
    match tokio::time::timeout(Duration::from_secs(1), stream.next()).await {
        Err(_) => panic!("the stream outlived its revoked token"),
        Ok(None) => panic!("the stream ended without saying why"),
        Ok(Some(Err(status))) => assert_eq!(status.code(), Code::Unauthenticated, "{status:?}"),
        Ok(Some(Ok(message))) => panic!("a revoked token still got {message:?}"),
    }
}

/// `futures::Stream`, through tonic's re-export.
mod futures_core_stream {
    pub use tonic::codegen::tokio_stream::{Stream, StreamExt};
}

#[tokio::test]
async fn a_thousand_requests_for_random_projects_leave_no_rows_and_no_watchers()
-> anyhow::Result<()> {
    let h = Harness::start(false).await?;
    h.git.create_repo("group/manifests", false)?;
    h.git.commit_files(
        "group/manifests",
        &[("a.yaml", Some("kind: ConfigMap\n"))],
        "init",
    )?;
    let agent = RawAgent::register(&h, &entry("group/manifests", "*.yaml")).await?;
    let mut client = agent.client(&h)?;
    // One legitimate stream stays open, as agentk's would.
    let (_legit, first) = open(
        &mut client,
        request("group/manifests", None, &["*.yaml"], ""),
        Duration::from_secs(10),
    )
    .await;
    assert!(matches!(first, First::Snapshot { .. }), "{first:?}");
    let watchers_before = h.kas().state.watchers.count();
    let rows_before = agent.rows(&h)?;

    let mut refused = 0;
    for i in 0..1000u32 {
        let random = format!("{:08x}", i.wrapping_mul(2_654_435_761));
        let project = match i % 4 {
            0 | 1 => format!("group/r-{random}"),
            2 => format!("other-{random}/x"),
            _ => format!("group/../{random}"),
        };
        let (_, first) = open(
            &mut client,
            request(&project, None, &["*.yaml"], ""),
            Duration::from_secs(10),
        )
        .await;
        match first {
            First::Ended(s)
                if matches!(s.code(), Code::PermissionDenied | Code::InvalidArgument) =>
            {
                refused += 1
            }
            other => panic!("{project}: expected a refusal, got {other:?}"),
        }
    }
    assert_eq!(refused, 1000);
    assert_eq!(
        agent.rows(&h)?,
        rows_before,
        "no status rows for unconfigured projects"
    );
    assert_eq!(
        h.kas().state.watchers.count(),
        watchers_before,
        "no watchers for unconfigured projects"
    );
    Ok(())
}

#[tokio::test]
async fn manifest_streams_and_reverse_tunnels_are_capped_per_agent() -> anyhow::Result<()> {
    let h = Harness::start(false).await?;
    h.git.create_repo("group/manifests", false)?;
    h.git.commit_files(
        "group/manifests",
        &[("a.yaml", Some("kind: ConfigMap\n"))],
        "init",
    )?;
    let agent = RawAgent::register(&h, &entry("group/manifests", "*.yaml")).await?;
    let limits = h.kas().state.connections.limits.clone();
    let within = Duration::from_secs(20);

    // Several connections, so HTTP/2's per-connection stream limit is not what stops us.
    let mut clients = (0..4)
        .map(|_| agent.client(&h))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut open_streams = Vec::new();
    for i in 0..limits.max_manifest_streams {
        let client = &mut clients[i % 4];
        let (stream, first) = open(
            client,
            request("group/manifests", None, &["*.yaml"], ""),
            within,
        )
        .await;
        assert!(
            matches!(first, First::Snapshot { .. }),
            "stream {i}: {first:?}"
        );
        open_streams.push(stream.unwrap());
    }
    let (_, first) = open(
        &mut clients[0],
        request("group/manifests", None, &["*.yaml"], ""),
        within,
    )
    .await;
    assert_refused(&first, Code::ResourceExhausted, "max_manifest_streams");
    // Closing one frees its slot.
    drop(open_streams.pop());
    eventually(Duration::from_secs(5), "the slot freed", || async {
        Ok(h.kas().state.connections.manifest_streams(agent.id).0 < limits.max_manifest_streams)
    })
    .await?;
    let (_, first) = open(
        &mut clients[1],
        request("group/manifests", None, &["*.yaml"], ""),
        within,
    )
    .await;
    assert!(matches!(first, First::Snapshot { .. }), "{first:?}");
    drop(open_streams);

    // Reverse tunnels: ask for more than the cap.
    let stop = tokio_util_cancel();
    let config = h.client_config("grpc", &agent.secret);
    let tunnel_client = gitops_protocol::reverse_tunnel_client::ReverseTunnelClient::new(
        InterceptedService::new(config.channel()?, config.interceptor()?),
    );
    let routes = tonic::service::Routes::new(
        gitops_protocol::agent_info_server::AgentInfoServer::new(Silent),
    );
    tokio::spawn(gitops_tunnel::reverse::serve_tunnels(
        tunnel_client,
        routes,
        limits.max_reverse_tunnels + 8,
        stop.clone(),
    ));
    eventually(Duration::from_secs(10), "tunnels up to the cap", || async {
        Ok(h.kas().state.tunnels.count(&agent.id) == limits.max_reverse_tunnels)
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        h.kas().state.tunnels.count(&agent.id),
        limits.max_reverse_tunnels
    );
    stop.cancel();
    Ok(())
}

fn tokio_util_cancel() -> CancellationToken {
    CancellationToken::new()
}

/// An agent's `AgentInfo` that never answers.
struct Silent;

#[tonic::async_trait]
impl gitops_protocol::agent_info_server::AgentInfo for Silent {
    async fn get_info(
        &self,
        _: tonic::Request<gitops_protocol::GetInfoRequest>,
    ) -> Result<tonic::Response<gitops_protocol::GetInfoResponse>, Status> {
        std::future::pending().await
    }
}

#[tokio::test]
async fn invalid_ids_refs_and_selectors_are_invalid_argument_and_leave_nothing()
-> anyhow::Result<()> {
    let h = Harness::start(false).await?;
    h.git.create_repo("group/manifests", false)?;
    h.git.commit_files(
        "group/manifests",
        &[("a.yaml", Some("kind: ConfigMap\n"))],
        "init",
    )?;
    let agent = RawAgent::register(&h, &entry("group/manifests", "*.yaml")).await?;
    let mut client = agent.client(&h)?;
    let watchers_before = h.kas().state.watchers.count();
    let huge = format!("group/{}", "a".repeat(1 << 20));
    let long_ref = "x".repeat(10 * 1024);
    let mut cases: Vec<(String, ObjectsToSynchronizeRequest)> = Vec::new();
    for project in [
        "acme/../other/x",
        "/acme/x",
        "acme/x.git",
        "acme/.hidden",
        huge.as_str(),
    ] {
        cases.push((
            format!("project {:.40}", project),
            request(project, None, &["*.yaml"], ""),
        ));
    }
    for branch in ["main:refs/heads/x", "*", "a..b", "-x", long_ref.as_str()] {
        cases.push((
            format!("branch {branch:.40}"),
            request(
                "group/manifests",
                Some(Ref::Branch(branch.into())),
                &["*.yaml"],
                "",
            ),
        ));
        cases.push((
            format!("tag {branch:.40}"),
            request(
                "group/manifests",
                Some(Ref::Tag(branch.into())),
                &["*.yaml"],
                "",
            ),
        ));
    }
    cases.push((
        "commit main".into(),
        request(
            "group/manifests",
            Some(Ref::Commit("main".into())),
            &["*.yaml"],
            "",
        ),
    ));
    cases.push(("no paths".into(), request("group/manifests", None, &[], "")));
    let mut unset = request("group/manifests", None, &["*.yaml"], "");
    unset.paths.push(PathSelector { selector: None });
    cases.push(("an unset selector".into(), unset));
    cases.push((
        "an empty glob".into(),
        request("group/manifests", None, &[""], ""),
    ));
    cases.push((
        "a bad have".into(),
        request("group/manifests", None, &["*.yaml"], "HEAD"),
    ));

    for (what, case) in cases {
        let (_, first) = open(&mut client, case, Duration::from_secs(10)).await;
        match first {
            First::Ended(s) if s.code() == Code::InvalidArgument => {
                assert!(s.message().len() < 1024, "{what}: the message is bounded");
            }
            other => panic!("{what}: expected INVALID_ARGUMENT, got {other:?}"),
        }
    }
    assert!(
        agent.rows(&h)?.is_empty(),
        "no status rows for invalid requests"
    );
    assert_eq!(
        h.kas().state.watchers.count(),
        watchers_before,
        "no watchers for invalid requests"
    );
    Ok(())
}

#[tokio::test]
async fn a_changed_selection_is_sent_at_once_although_the_commit_did_not_move() -> anyhow::Result<()>
{
    let h = Harness::start(false).await?;
    h.git.create_repo("group/manifests", false)?;
    let commit = h.git.commit_files(
        "group/manifests",
        &[
            ("a/x.yaml", Some("kind: ConfigMap\n")),
            ("b/y.yaml", Some("kind: ConfigMap\n")),
        ],
        "init",
    )?;
    let agent = RawAgent::register(&h, &entry("group/manifests", "a/*.yaml")).await?;
    let mut client = agent.client(&h)?;
    let within = Duration::from_secs(10);
    let (stream, first) = open(
        &mut client,
        request("group/manifests", None, &["a/*.yaml"], ""),
        within,
    )
    .await;
    match &first {
        First::Snapshot { commit: c, paths } => {
            assert_eq!((c, paths), (&commit, &vec!["a/x.yaml".to_owned()]))
        }
        other => panic!("{other:?}"),
    }
    drop(stream);

    // config.yaml now selects other paths; the manifest project's commit stays. agentk (an old one, or one
    // that kept its snapshot) asks with the commit it has.
    set_config(&h, &entry("group/manifests", "b/*.yaml"))?;
    // Until kas has read the new config.yaml the new selection is refused; then it must be sent although
    // the agent already has this commit.
    let mut sent = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while sent.is_none() && Instant::now() < deadline {
        let (_, first) = open(
            &mut client,
            request("group/manifests", None, &["b/*.yaml"], &commit),
            Duration::from_secs(3),
        )
        .await;
        match first {
            First::Snapshot { commit: c, paths } => sent = Some((c, paths)),
            First::Ended(s) if s.code() == Code::PermissionDenied => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!(
                "the new selection must be sent although the agent has commit {commit}: {other:?}"
            ),
        }
    }
    assert_eq!(sent, Some((commit.clone(), vec!["b/y.yaml".to_owned()])));
    // The same selection and commit again: nothing to send.
    let (_, first) = open(
        &mut client,
        request("group/manifests", None, &["b/*.yaml"], &commit),
        Duration::from_secs(2),
    )
    .await;
    assert!(matches!(first, First::Nothing), "{first:?}");
    Ok(())
}

#[tokio::test]
async fn a_git_outage_that_ends_at_the_same_commit_clears_the_manifest_error() -> anyhow::Result<()>
{
    let h = Harness::start(false).await?;
    h.git.create_repo("group/manifests", false)?;
    let commit = h.git.commit_files(
        "group/manifests",
        &[("a.yaml", Some("kind: ConfigMap\n"))],
        "init",
    )?;
    set_config(&h, &entry("group/manifests", "*.yaml"))?;
    let (gid, _, secret) = h.register_agent().await?;
    let agent = h.agent(h.client_config("grpc", &secret))?;
    let wait = |what: &'static str, check: fn(&agentk::gitops::ProjectSync, &str) -> bool| {
        let mut gitops = agent.gitops.clone();
        let commit = commit.clone();
        async move {
            tokio::time::timeout(
                Duration::from_secs(15),
                gitops.wait_for(|s| s.get("group/manifests").is_some_and(|p| check(p, &commit))),
            )
            .await
            .map_err(|_| anyhow::anyhow!("agentk never saw {what}"))?
            .map_err(|_| anyhow::anyhow!("agent stopped"))?;
            anyhow::Ok(())
        }
    };
    wait("the snapshot", |p, c| {
        p.snapshot.as_ref().is_some_and(|s| s.commit_id == c)
    })
    .await?;
    let error_in_graphql = || async {
        let view = h
            .graphql(&format!(r#"{{ clusterAgent(id: "{gid}") {{ manifestProjects {{ projectId error commitSent }} }} }}"#))
            .await?;
        Ok::<_, anyhow::Error>(view["data"]["clusterAgent"]["manifestProjects"][0].clone())
    };

    let repo = h.git.repo_dir("group/manifests");
    let hidden = repo.with_extension("hidden");
    std::fs::rename(&repo, &hidden)?;
    wait("the outage", |p, _| p.error.is_some()).await?;
    eventually(Duration::from_secs(10), "the outage in GraphQL", || async {
        Ok(error_in_graphql().await?["error"].is_string())
    })
    .await?;

    std::fs::rename(&hidden, &repo)?;
    wait("the error cleared", |p, c| {
        p.error.is_none() && p.snapshot.as_ref().is_some_and(|s| s.commit_id == c)
    })
    .await?;
    eventually(
        Duration::from_secs(10),
        "the error cleared in GraphQL",
        || async {
            let status = error_in_graphql().await?;
            Ok(status["error"].is_null() && status["commitSent"] == commit.as_str())
        },
    )
    .await?;
    agent.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn live_info_of_an_agent_that_never_answers_is_an_error_within_seconds() -> anyhow::Result<()>
{
    let h = Harness::start(false).await?;
    let agent = RawAgent::register(&h, "").await?;
    let stop = tokio_util_cancel();
    let config = h.client_config("grpc", &agent.secret);
    let tunnel_client = gitops_protocol::reverse_tunnel_client::ReverseTunnelClient::new(
        InterceptedService::new(config.channel()?, config.interceptor()?),
    );
    let routes = tonic::service::Routes::new(
        gitops_protocol::agent_info_server::AgentInfoServer::new(Silent),
    );
    tokio::spawn(gitops_tunnel::reverse::serve_tunnels(
        tunnel_client,
        routes,
        1,
        stop.clone(),
    ));
    eventually(Duration::from_secs(10), "the tunnel", || async {
        Ok(h.kas().state.tunnels.count(&agent.id) == 1)
    })
    .await?;

    let started = Instant::now();
    let query = format!(
        r#"{{ clusterAgent(id: "{}") {{ liveInfo {{ version }} }} }}"#,
        agent.gid
    );
    let view = tokio::time::timeout(Duration::from_secs(20), h.graphql(&query))
        .await
        .map_err(|_| anyhow::anyhow!("liveInfo hung for 20 s"))??;
    let took = started.elapsed();
    eprintln!("liveInfo of a silent agent failed after {took:?}");
    assert!(took < Duration::from_secs(8), "liveInfo took {took:?}");
    assert!(view["data"]["clusterAgent"]["liveInfo"].is_null(), "{view}");
    assert!(
        view["errors"][0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("GetInfo")),
        "{view}"
    );
    stop.cancel();
    Ok(())
}

#[tokio::test]
async fn sync_reports_on_unconfigured_projects_are_refused_and_store_nothing() -> anyhow::Result<()>
{
    use gitops_protocol::{SyncReport, gitops_status_client::GitopsStatusClient};

    let h = Harness::start(false).await?;
    h.git.create_repo("group/manifests", false)?;
    h.git.commit_files(
        "group/manifests",
        &[("a.yaml", Some("kind: ConfigMap\n"))],
        "init",
    )?;
    let agent = RawAgent::register(&h, &entry("group/manifests", "*.yaml")).await?;
    let config = h.client_config("grpc", &agent.secret);
    let mut client = GitopsStatusClient::with_interceptor(config.channel()?, config.interceptor()?);
    let report = |project: &str| SyncReport {
        project_id: project.into(),
        commit_seen: "a".repeat(40),
        commit_applied: "a".repeat(40),
        finished_at_unix: 1_700_000_000,
        outcome: gitops_protocol::SyncOutcome::Synced.into(),
        message: String::new(),
        objects: vec![],
    };
    for project in ["group/unconfigured", "group/r-1", "group/r-2"] {
        let refused = client.report_sync(report(project)).await.unwrap_err();
        assert_eq!(
            refused.code(),
            Code::PermissionDenied,
            "{project}: {refused:?}"
        );
        assert!(refused.message().contains("config.yaml"), "{refused:?}");
        assert_eq!(
            h.kas().state.store.sync_record(agent.id, project)?,
            None,
            "{project}"
        );
    }
    client.report_sync(report("group/manifests")).await?;
    assert!(
        h.kas()
            .state
            .store
            .sync_record(agent.id, "group/manifests")?
            .is_some()
    );
    Ok(())
}
