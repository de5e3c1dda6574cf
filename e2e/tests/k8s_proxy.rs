//! The Kubernetes API proxy (CI/CD tunnel and user access) end to end: kas and agentk as processes, the
//! agent's `config.yaml` in the real Gitea, the real apiserver behind agentk, and real kubectl and helm with
//! the kubeconfig `kas kubeconfig` prints. kwok serves exec, logs and port-forward for the fake pods (see
//! `test_support::kwok`). Needs the test environment and `cargo build -p kas -p agentk`.

use std::time::{Duration, Instant};

use e2e::k8s_proxy::{ProxyEnv, Tls, ci_access, status_of, user_access};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::rbac::v1::{RoleBinding, RoleRef, Subject};
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use test_support::cluster::TestNamespace;
use test_support::gitea::Repository;
use test_support::kubectl::{KubectlError, Tool, port_forward};
use test_support::kwok::{
    PodLogFile, create_running_pod, echo_server, set_pod_logs, set_pod_port_forward,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A namespace, a CI project in Gitea and kas with the agent's `config.yaml` built from them.
struct Fixture {
    env: ProxyEnv,
    ns: TestNamespace,
    ci_project: Repository,
}

impl Fixture {
    /// `config`: the agent's `config.yaml` from the CI project's path and the namespace's name.
    async fn start(tls: Tls, config: impl Fn(&str, &str) -> String) -> anyhow::Result<Self> {
        let ns = TestNamespace::create("proxy").await?;
        let gitea = test_support::gitea::Gitea::from_env();
        let ci_project = gitea.create_repository("ci-project").await?;
        let env = ProxyEnv::start(tls, &config(&ci_project.full_name, &ns.name)).await?;
        Ok(Self {
            env,
            ns,
            ci_project,
        })
    }

    async fn finish(self) -> anyhow::Result<()> {
        self.env.gitea.delete_repository(&self.ci_project).await?;
        self.env.cleanup().await?;
        self.ns.delete().await?;
        Ok(())
    }

    /// kubectl through the proxy with a new CI token of the CI project, in the test namespace.
    async fn ci_kubectl(&self) -> anyhow::Result<Tool> {
        let token = self
            .env
            .ci_token(&self.ci_project.full_name, None, None)
            .await?;
        Ok(self
            .env
            .kubectl(&token.secret)
            .await?
            .with_args(&["--namespace", &self.ns.name]))
    }

    /// Binds ClusterRole `view` in the test namespace to `subject` (`Group`/`User`, name).
    async fn bind_view(&self, kind: &str, name: &str) -> anyhow::Result<()> {
        let binding = RoleBinding {
            metadata: ObjectMeta {
                name: Some(format!("view-{}", kind.to_lowercase())),
                ..Default::default()
            },
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "ClusterRole".into(),
                name: "view".into(),
            },
            subjects: Some(vec![Subject {
                api_group: Some("rbac.authorization.k8s.io".into()),
                kind: kind.into(),
                name: name.into(),
                namespace: None,
            }]),
        };
        self.ns
            .api::<RoleBinding>()
            .create(&PostParams::default(), &binding)
            .await?;
        Ok(())
    }

    /// A raw GET through the proxy with `secret`: status code and body.
    async fn raw_get(&self, secret: &str, path: &str) -> anyhow::Result<(u16, String)> {
        let response = self
            .env
            .http()?
            .get(format!("{}{path}", self.env.proxy_url()))
            .header("authorization", self.env.bearer(secret))
            .send()
            .await?;
        Ok((response.status().as_u16(), response.text().await?))
    }
}

/// Retries `attempt` for up to 20 s: kwok learns about new `Logs`/`PortForward` objects through an
/// informer, and RBAC changes reach the authorizer's cache a moment after they are written.
async fn retry<T, E: std::fmt::Display, F, Fut>(what: &str, mut attempt: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let started = Instant::now();
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(err) if started.elapsed() < Duration::from_secs(20) => {
                eprintln!("{what}: {err}; retrying");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(err) => anyhow::bail!("{what}: {err}"),
        }
    }
}

fn expect_refused(
    result: Result<test_support::kubectl::Output, KubectlError>,
    what: &str,
) -> String {
    match result {
        Ok(output) => panic!("{what} was allowed: {}", output.stdout),
        Err(err) => format!("{err}"),
    }
}

#[tokio::test]
async fn kubectl_verbs_watch_logs_exec_cp_port_forward_and_helm_work_through_the_proxy()
-> anyhow::Result<()> {
    let f = Fixture::start(Tls::Off, |project, ns| ci_access(project, ns, "agent")).await?;
    let _agentk = f.env.agentk("grpc").await?;
    let kubectl = f.ci_kubectl().await?;
    let ns = f.ns.name.clone();
    let dir = tempfile::tempdir()?;

    // get, apply, list, delete.
    let version = kubectl.run(&["get", "--raw", "/version"], None).await?;
    assert!(version.stdout.contains("gitVersion"), "{}", version.stdout);
    let manifest = dir.path().join("cm.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: first\ndata:\n  greeting: hello\n",
    )?;
    kubectl
        .run(&["apply", "-f", &manifest.display().to_string()], None)
        .await?;
    let value = kubectl
        .run(
            &[
                "get",
                "configmap",
                "first",
                "-o",
                "jsonpath={.data.greeting}",
            ],
            None,
        )
        .await?;
    assert_eq!(value.stdout, "hello");
    let configmaps: Api<ConfigMap> = f.ns.api();
    assert_eq!(
        configmaps.get("first").await?.data.unwrap_or_default()["greeting"],
        "hello",
        "the apply reached the cluster"
    );

    // get -w sees an object created while it runs.
    let mut watch = kubectl.stream(&["get", "configmaps", "--watch", "-o", "name"])?;
    watch
        .wait_for_line("the existing ConfigMap", Duration::from_secs(20), |l| {
            l == "configmap/first"
        })
        .await?;
    configmaps
        .create(
            &PostParams::default(),
            &serde_json::from_value(e2e::k8s_proxy::config_map("second", &[("k", "v")]))?,
        )
        .await?;
    watch
        .wait_for_line(
            "the ConfigMap created during the watch",
            Duration::from_secs(20),
            |l| l == "configmap/second",
        )
        .await?;
    watch.child.kill().await?;
    let list = kubectl
        .run(&["get", "configmaps", "-o", "name"], None)
        .await?;
    assert!(list.stdout.contains("configmap/first") && list.stdout.contains("configmap/second"));
    kubectl.run(&["delete", "configmap", "first"], None).await?;
    assert!(
        configmaps.get_opt("first").await?.is_none(),
        "deleted in the cluster"
    );

    // logs -f of a kwok pod: lines appended later arrive.
    create_running_pod(&f.ns.client, &ns, "fake").await?;
    let log = PodLogFile::create(&dir.path().join("fake.log"))?;
    log.append("before follow")?;
    set_pod_logs(&f.ns.client, &ns, "fake", &log.path).await?;
    let logs = retry("kubectl logs through the proxy", || {
        kubectl.run(&["logs", "fake"], None)
    })
    .await?;
    assert_eq!(logs.stdout, "before follow\n");
    let mut follow = kubectl.stream(&["logs", "-f", "fake"])?;
    follow
        .wait_for_line("the existing line", Duration::from_secs(20), |l| {
            l == "before follow"
        })
        .await?;
    log.append("while following")?;
    follow
        .wait_for_line("the appended line", Duration::from_secs(20), |l| {
            l == "while following"
        })
        .await?;
    follow.child.kill().await?;

    // exec with stdin (a WebSocket upgrade through kas and agentk). `head -n 1`, not `cat`: kwok never
    // closes the command's stdin (see xtask/src/cluster/local.rs).
    let echoed = kubectl
        .run(
            &["exec", "-i", "fake", "--", "head", "-n", "1"],
            Some(b"stdin through the tunnel\nnot this\n"),
        )
        .await?;
    assert_eq!(echoed.stdout, "stdin through the tunnel\n");

    // cp both ways (tar over exec); kwok runs the pod's side on this machine.
    let source = dir.path().join("source.txt");
    std::fs::write(&source, "copied through the tunnel\n")?;
    let in_pod = dir.path().join("in-pod");
    std::fs::create_dir(&in_pod)?;
    let pod_file = in_pod.join("copied.txt");
    kubectl
        .run(
            &[
                "cp",
                &source.display().to_string(),
                &format!("fake:{}", pod_file.display()),
            ],
            None,
        )
        .await?;
    assert_eq!(
        std::fs::read_to_string(&pod_file)?,
        "copied through the tunnel\n"
    );
    let back = dir.path().join("back.txt");
    kubectl
        .run(
            &[
                "cp",
                &format!("fake:{}", pod_file.display()),
                &back.display().to_string(),
            ],
            None,
        )
        .await?;
    assert_eq!(
        std::fs::read_to_string(&back)?,
        "copied through the tunnel\n"
    );

    // port-forward to a local echo server.
    let echo = echo_server().await?;
    set_pod_port_forward(&f.ns.client, &ns, "fake", 8080, echo.addr).await?;
    let unscoped = Tool {
        leading: Vec::new(),
        ..kubectl.clone()
    };
    let (mut forward, port) = port_forward(&unscoped, &ns, "pod/fake", 8080).await?;
    let reply = retry("a round trip through port-forward", || async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream.write_all(b"bytes through port-forward").await?;
        let mut buf = vec![0u8; 26];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut buf)).await??;
        anyhow::Ok(buf)
    })
    .await?;
    assert_eq!(reply, b"bytes through port-forward");
    forward.child.kill().await?;

    // helm install of a small chart, then uninstall.
    let chart = dir.path().join("chart");
    std::fs::create_dir_all(chart.join("templates"))?;
    std::fs::write(
        chart.join("Chart.yaml"),
        "apiVersion: v2\nname: greeting\nversion: 0.1.0\n",
    )?;
    std::fs::write(chart.join("values.yaml"), "greeting: hello\n")?;
    std::fs::write(
        chart.join("templates/configmap.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-greeting\ndata:\n  greeting: {{ .Values.greeting | quote }}\n",
    )?;
    let helm = Tool::helm(&kubectl.kubeconfig);
    helm.run(
        &[
            "install",
            "demo",
            &chart.display().to_string(),
            "--namespace",
            &ns,
            "--set",
            "greeting=from-helm",
            "--wait",
            "--timeout=60s",
        ],
        None,
    )
    .await?;
    let installed = configmaps.get("demo-greeting").await?;
    assert_eq!(installed.data.unwrap_or_default()["greeting"], "from-helm");
    let releases = helm.run(&["list", "--namespace", &ns, "-q"], None).await?;
    assert_eq!(releases.stdout.trim(), "demo");
    helm.run(&["uninstall", "demo", "--namespace", &ns, "--wait"], None)
        .await?;
    assert!(configmaps.get_opt("demo-greeting").await?.is_none());

    f.finish().await
}

/// `get --raw /version` and an exec with stdin (an upgrade) over one transport.
async fn request_and_upgrade(f: &Fixture, scheme: &str) -> anyhow::Result<()> {
    let agentk = f.env.agentk(scheme).await?;
    let kubectl = f.ci_kubectl().await?;
    let version = kubectl.run(&["get", "--raw", "/version"], None).await?;
    assert!(
        version.stdout.contains("gitVersion"),
        "{scheme}: {}",
        version.stdout
    );
    let pod = format!("fake-{scheme}");
    create_running_pod(&f.ns.client, &f.ns.name, &pod).await?;
    let echoed = kubectl
        .run(
            &["exec", "-i", &pod, "--", "head", "-n", "1"],
            Some(format!("{scheme}\n").as_bytes()),
        )
        .await?;
    assert_eq!(echoed.stdout, format!("{scheme}\n"), "exec over {scheme}");
    drop(agentk);
    f.env.wait_connected(false, Duration::from_secs(30)).await?;
    Ok(())
}

#[tokio::test]
async fn requests_and_upgrades_pass_over_every_transport() -> anyhow::Result<()> {
    let plain = Fixture::start(Tls::Off, |project, ns| ci_access(project, ns, "agent")).await?;
    for scheme in ["grpc", "ws"] {
        request_and_upgrade(&plain, scheme).await?;
    }
    plain.finish().await?;
    // TLS on the agent port and on the proxy: the kubeconfig carries kas's CA.
    let tls = Fixture::start(Tls::On, |project, ns| ci_access(project, ns, "agent")).await?;
    for scheme in ["grpcs", "wss"] {
        request_and_upgrade(&tls, scheme).await?;
    }
    tls.finish().await
}

#[tokio::test]
async fn ci_job_identity_is_bound_by_rbac_and_bad_tokens_are_refused() -> anyhow::Result<()> {
    let other = test_support::gitea::Gitea::from_env()
        .create_repository("other-project")
        .await?;
    let other_path = other.full_name.clone();
    let f = Fixture::start(Tls::Off, |project, ns| {
        format!(
            "{}  - id: {other_path}\n    access_as:\n      agent: {{}}\n",
            ci_access(project, ns, "ci_job")
        )
    })
    .await?;
    let _agentk = f.env.agentk("grpc").await?;
    let token = f
        .env
        .ci_token(&f.ci_project.full_name, Some("production"), None)
        .await?;
    let kubectl = f
        .env
        .kubectl(&token.secret)
        .await?
        .with_args(&["--namespace", &f.ns.name]);

    // The documented identity (docs/k8s-proxy.md), as the apiserver sees it.
    let whoami = kubectl.run(&["auth", "whoami", "-o", "json"], None).await?;
    let review: serde_json::Value = serde_json::from_str(&whoami.stdout)?;
    let user = &review["status"]["userInfo"];
    assert!(
        user["username"]
            .as_str()
            .is_some_and(|u| u.starts_with("gitlab:ci_job:")),
        "{user}"
    );
    let groups: Vec<&str> = user["groups"]
        .as_array()
        .map(|g| g.iter().filter_map(|g| g.as_str()).collect())
        .unwrap_or_default();
    let project_group = format!("gitlab:project:{}", f.ci_project.full_name);
    let env_group = format!("gitlab:project_env:{}:production", f.ci_project.full_name);
    for expected in ["gitlab:ci_job", project_group.as_str(), env_group.as_str()] {
        assert!(
            groups.contains(&expected),
            "{expected} missing in {groups:?}"
        );
    }

    // Forbidden by RBAC until a RoleBinding for the group `gitlab:ci_job`.
    let refused = expect_refused(
        kubectl.run(&["get", "configmaps"], None).await,
        "get as ci_job",
    );
    assert!(
        refused.contains("Forbidden") || refused.contains("forbidden"),
        "{refused}"
    );
    f.bind_view("Group", "gitlab:ci_job").await?;
    retry("get configmaps after the RoleBinding", || {
        kubectl.run(&["get", "configmaps"], None)
    })
    .await?;

    // The client's own impersonation is refused outside `access_as: agent` (400).
    let refused = expect_refused(
        kubectl
            .run(&["get", "configmaps", "--as=system:admin"], None)
            .await,
        "--as under ci_job",
    );
    assert!(
        refused.contains("BadRequest") || refused.contains("400"),
        "{refused}"
    );
    let (code, body) = {
        let response = f
            .env
            .http()?
            .get(format!(
                "{}/api/v1/namespaces/{}/configmaps",
                f.env.proxy_url(),
                f.ns.name
            ))
            .header("authorization", f.env.bearer(&token.secret))
            .header("impersonate-user", "system:admin")
            .send()
            .await?;
        (response.status().as_u16(), response.text().await?)
    };
    assert_eq!(code, 400, "{body}");
    assert_eq!(
        status_of(&body).map(|s| s["code"].clone()),
        Some(400.into()),
        "{body}"
    );

    // A project that `ci_access` no longer lists (config.yaml is read on every request).
    let other_token = f.env.ci_token(&other_path, None, None).await?;
    let path = format!("/api/v1/namespaces/{}/configmaps", f.ns.name);
    let (code, _) = f.raw_get(&other_token.secret, &path).await?;
    assert_eq!(code, 200, "allowed while listed");
    f.env
        .set_agent_config(&ci_access(&f.ci_project.full_name, &f.ns.name, "ci_job"))
        .await?;
    let (code, body) = f.raw_get(&other_token.secret, &path).await?;
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains(&other_path),
        "the refusal names the project: {body}"
    );

    // Expired, revoked and forged tokens.
    let short = f
        .env
        .ci_token(&f.ci_project.full_name, None, Some("2s"))
        .await?;
    let (code, _) = f.raw_get(&short.secret, &path).await?;
    assert_eq!(code, 200, "valid before it expires");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (code, body) = f.raw_get(&short.secret, &path).await?;
    assert_eq!(code, 401, "expired: {body}");
    assert_eq!(
        status_of(&body).map(|s| s["code"].clone()),
        Some(401.into()),
        "{body}"
    );
    f.env.revoke_ci_token(&token).await?;
    let refused = expect_refused(kubectl.run(&["get", "configmaps"], None).await, "revoked");
    // kubectl shows a 401 as "You must be logged in to the server (<kas's message>)".
    assert!(
        refused.contains("You must be logged in") && refused.contains("revoked"),
        "{refused}"
    );
    let forged = format!("kasci_{}", "x".repeat(40));
    let (code, body) = f.raw_get(&forged, &path).await?;
    assert_eq!(code, 401, "forged: {body}");
    assert!(
        !body.contains(&forged),
        "the refusal does not echo the token"
    );

    test_support::gitea::Gitea::from_env()
        .delete_repository(&other)
        .await?;
    f.finish().await
}

#[tokio::test]
async fn user_identity_from_a_gitea_token_is_bound_by_rbac() -> anyhow::Result<()> {
    let gitea = test_support::gitea::Gitea::from_env();
    let project = gitea.create_private_repository("user-project").await?;
    let project_path = project.full_name.clone();
    let f = Fixture::start(Tls::Off, |ci, ns| {
        format!(
            "{}{}",
            ci_access(ci, ns, "agent"),
            user_access(&project_path, "user")
        )
    })
    .await?;
    let _agentk = f.env.agentk("grpc").await?;
    let password = "proxy-user-password-1";
    let member = gitea.create_user("member", password).await?;
    gitea.add_collaborator(&project, &member, "write").await?;
    let (token_name, pat) = gitea.create_access_token(&member, password).await?;
    let kubectl = f
        .env
        .kubectl(&pat)
        .await?
        .with_args(&["--namespace", &f.ns.name]);

    let whoami = kubectl.run(&["auth", "whoami", "-o", "json"], None).await?;
    let review: serde_json::Value = serde_json::from_str(&whoami.stdout)?;
    let user = &review["status"]["userInfo"];
    assert_eq!(user["username"], format!("gitlab:user:{member}"), "{user}");
    let groups = user["groups"].to_string();
    assert!(groups.contains("\"gitlab:user\""), "{groups}");
    assert!(
        groups.contains(&format!("gitlab:project_role:{project_path}:")),
        "a role group for the project: {groups}"
    );

    let refused = expect_refused(
        kubectl.run(&["get", "configmaps"], None).await,
        "get as user",
    );
    assert!(
        refused.contains("Forbidden") || refused.contains("forbidden"),
        "{refused}"
    );
    f.bind_view("User", &format!("gitlab:user:{member}"))
        .await?;
    retry("get configmaps after the RoleBinding", || {
        kubectl.run(&["get", "configmaps"], None)
    })
    .await?;
    let refused = expect_refused(
        kubectl
            .run(&["get", "configmaps", "--as=someone"], None)
            .await,
        "--as under user",
    );
    assert!(
        refused.contains("BadRequest") || refused.contains("400"),
        "{refused}"
    );

    // Someone who is not a member of any allowed project.
    let stranger = gitea.create_user("stranger", password).await?;
    let (_, stranger_pat) = gitea.create_access_token(&stranger, password).await?;
    let path = format!("/api/v1/namespaces/{}/configmaps", f.ns.name);
    let (code, body) = f.raw_get(&stranger_pat, &path).await?;
    assert_eq!(code, 403, "{body}");

    // A PAT deleted in Gitea stops working within the cache time (≤ 10 s).
    gitea
        .delete_access_token(&member, password, &token_name)
        .await?;
    let deleted = Instant::now();
    loop {
        let (code, _) = f.raw_get(&pat, &path).await?;
        if code == 401 {
            break;
        }
        assert!(
            deleted.elapsed() < Duration::from_secs(12),
            "the deleted token still worked after {:?}",
            deleted.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!("deleted PAT refused after {:?}", deleted.elapsed());

    gitea.delete_repository(&project).await?;
    f.finish().await
}

#[tokio::test]
async fn a_ci_token_revoked_during_a_watch_ends_it_within_a_second() -> anyhow::Result<()> {
    let f = Fixture::start(Tls::Off, |project, ns| ci_access(project, ns, "agent")).await?;
    let _agentk = f.env.agentk("grpc").await?;
    let token = f.env.ci_token(&f.ci_project.full_name, None, None).await?;
    let kubectl = f
        .env
        .kubectl(&token.secret)
        .await?
        .with_args(&["--namespace", &f.ns.name]);
    kubectl
        .run(
            &["create", "configmap", "watched", "--from-literal=k=v"],
            None,
        )
        .await?;
    let mut watch = kubectl.stream(&["get", "configmaps", "--watch", "-o", "name"])?;
    watch
        .wait_for_line("the watch's first event", Duration::from_secs(20), |l| {
            l == "configmap/watched"
        })
        .await?;
    let revoking = Instant::now();
    f.env.revoke_ci_token(&token).await?;
    // The revocation is in effect once the CLI returned; the watch may well have ended before that.
    let revoked = Instant::now();
    watch.wait_exit(Duration::from_secs(5)).await?;
    let took = revoked.elapsed();
    eprintln!(
        "watch ended {took:?} after `kas ci-token revoke` returned ({:?} after it started)",
        revoking.elapsed()
    );
    assert!(
        took <= Duration::from_secs(1),
        "the watch lasted {took:?} after the revocation"
    );
    f.finish().await
}

#[tokio::test]
async fn no_agent_connected_is_a_503_naming_it_and_an_agentk_restart_ends_watches_cleanly()
-> anyhow::Result<()> {
    let f = Fixture::start(Tls::Off, |project, ns| ci_access(project, ns, "agent")).await?;
    let token = f.env.ci_token(&f.ci_project.full_name, None, None).await?;
    let path = format!("/api/v1/namespaces/{}/configmaps", f.ns.name);

    // Never connected.
    let (code, body) = f.raw_get(&token.secret, &path).await?;
    assert_eq!(code, 503, "{body}");
    let status = status_of(&body).unwrap_or_else(|| panic!("not a Status: {body}"));
    let message = status["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(e2e::k8s_proxy::AGENT) || message.contains(&f.env.agent_id.to_string()),
        "the message names the agent: {message}"
    );

    // A watch open while agentk is killed ends (no hang) and cleanly; the next agentk serves again.
    let agentk = f.env.agentk("grpc").await?;
    let kubectl = f
        .env
        .kubectl(&token.secret)
        .await?
        .with_args(&["--namespace", &f.ns.name]);
    kubectl
        .run(
            &["create", "configmap", "watched", "--from-literal=k=v"],
            None,
        )
        .await?;
    let mut watch = kubectl.stream(&["get", "configmaps", "--watch", "-o", "name"])?;
    watch
        .wait_for_line("the watch's first event", Duration::from_secs(20), |l| {
            l == "configmap/watched"
        })
        .await?;
    drop(agentk);
    let killed = Instant::now();
    watch.wait_exit(Duration::from_secs(15)).await?;
    eprintln!("watch ended {:?} after agentk was killed", killed.elapsed());
    let stderr = watch.stderr();
    assert!(
        !stderr.contains("unexpected EOF") && !stderr.contains("INTERNAL_ERROR"),
        "the stream was cut, not ended: {stderr}"
    );
    f.env.wait_connected(false, Duration::from_secs(30)).await?;
    let (code, body) = f.raw_get(&token.secret, &path).await?;
    assert_eq!(code, 503, "while disconnected: {body}");
    let _agentk = f.env.agentk("grpc").await?;
    retry("get after agentk came back", || {
        kubectl.run(&["get", "configmaps"], None)
    })
    .await?;
    f.finish().await
}
