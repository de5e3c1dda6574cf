//! The Helm charts against the real cluster and the real `helm`: `helm lint --strict`, the rendered objects
//! accepted by the apiserver's server-side dry run (the pods by Pod Security "restricted" too), and a
//! `helm install` of both charts whose configuration is then run.
//!
//! Pods' containers cannot run here: the nodes are kwok's, which fake them. So after `helm install`, kas and
//! agentk run as local processes built from exactly what the charts put into the cluster: the Deployment's
//! args and env, its volumes read back from the cluster (the ConfigMap, the Secrets) and laid out as the
//! container would see them, and a token of the Deployment's ServiceAccount (TokenRequest, as the kubelet
//! mounts one). [`ContainerAsProcess`] is that stand-in; the rest (apiserver, RBAC, Gitea, the binaries) is
//! real. The seed sync must then work: a Deployment committed to Gitea is applied by the leader of the two
//! agentk replicas, under the chart's least-privilege RBAC.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, bail, ensure};
use e2e::{
    eventually,
    process::{Killed, free_port, sibling_binary},
};
use k8s_openapi::{
    ByteString,
    api::{
        apps::v1::Deployment,
        coordination::v1::Lease,
        core::v1::{ConfigMap, Container, PodSpec, Secret, Volume},
    },
};
use kube::Api;
use serde_json::Value;
use test_support::{
    cluster::TestNamespace,
    env::{test_env, unique_name},
    gitea::{Gitea, push_files},
};

const CHARTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts");

fn run(command: Command, stdin: Option<&str>) -> anyhow::Result<String> {
    e2e::process::run_against_cluster(command, &test_env().kubernetes.kubeconfig, stdin)
}

fn helm(args: &[&str]) -> anyhow::Result<String> {
    let mut command = Command::new(&test_env().tools.helm);
    command.args(args).current_dir(CHARTS);
    run(command, None)
}

fn kubectl(args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    let mut command = Command::new(&test_env().tools.kubectl);
    command.args(args);
    run(command, stdin)
}

/// The objects of a multi-document YAML stream (helm's output), as JSON.
fn documents(yaml: &str) -> anyhow::Result<Vec<Value>> {
    let mut objects = Vec::new();
    for document in yaml.split("\n---\n") {
        let value: Value = serde_saphyr::from_str(document).context("a rendered document")?;
        if !value.is_null() {
            objects.push(value);
        }
    }
    Ok(objects)
}

fn find<'a>(objects: &'a [Value], kind: &str) -> anyhow::Result<&'a Value> {
    objects
        .iter()
        .find(|o| o["kind"] == kind)
        .with_context(|| format!("no {kind} rendered"))
}

/// Values that turn on every optional part of each chart (TLS, Ingress, webhooks, CA bundles, headers,
/// scheduling), so lint and the dry run see all the templates' branches.
const KAS_FULL: &str = "adminToken=a,gitPassword=p,webhooks.enabled=true,webhookSecret=w,agentTls.secretName=kas-tls,apiTls.secretName=kas-api-tls,ingress.enabled=true,ingress.host=kas.example,ingress.className=nginx,git.caCert=CA,nodeSelector.disk=ssd,extraEnv[0].name=HTTPS_PROXY,extraEnv[0].value=http://proxy:3128";
const AGENTK_FULL: &str = "config.token=t,config.kasAddress=wss://kas.example/-/kubernetes-agent/,config.kasCaCert=CA,config.kasHeaders[0]=Cookie: lb=1,config.kasTlsServerName=kas.internal,rbac.clusterWrite=true,rbac.impersonate=true,serviceAccount.annotations.team=a,extraEnv[0].name=HTTPS_PROXY,extraEnv[0].value=http://proxy:3128,extraArgs[0]=--keepalive=10s,tolerations[0].operator=Exists,nodeSelector.disk=ssd";

#[test]
fn both_charts_pass_helm_lint_strict() -> anyhow::Result<()> {
    for (chart, values) in [
        ("kas", "adminToken=a"),
        ("kas", KAS_FULL),
        ("agentk", "config.token=t,config.kasAddress=grpc://kas:8150"),
        ("agentk", AGENTK_FULL),
    ] {
        let out = helm(&["lint", "--strict", chart, "--set", values])
            .with_context(|| format!("helm lint --strict {chart} --set {values}"))?;
        assert!(
            out.contains("1 chart(s) linted, 0 chart(s) failed"),
            "{out}"
        );
    }
    Ok(())
}

/// The schema and the templates refuse what would otherwise deploy a broken agent, naming the value.
#[test]
fn charts_refuse_bad_values_naming_them() -> anyhow::Result<()> {
    for (chart, values, message) in [
        ("agentk", "config.token=t", "config.kasAddress is required"),
        (
            "agentk",
            "config.token=t,config.kasaddress=grpc://kas",
            "additional properties 'kasaddress' not allowed",
        ),
        (
            "agentk",
            "config.token=t,config.kasAddress=https://kas",
            "/config/kasAddress",
        ),
        (
            "agentk",
            "config.kasAddress=grpc://kas",
            "config.token (or config.secretName",
        ),
        (
            "agentk",
            "config.token=t,config.kasAddress=grpc://kas,serviceMonitor.enabled=true",
            "need the monitoring.coreos.com/v1 API",
        ),
        (
            "kas",
            "gitPassword=p",
            "adminToken (or adminTokenSecretRef.name",
        ),
        (
            "kas",
            "adminToken=a,webhooks.enabled=true",
            "webhookSecret (or webhooks.secretRef.name",
        ),
        (
            "kas",
            "adminToken=a,git.baseUrl=git.example",
            "/git/baseUrl",
        ),
    ] {
        let err = helm(&["template", "r", chart, "--set", values])
            .err()
            .with_context(|| format!("{chart} --set {values} rendered"))?;
        assert!(
            err.to_string().contains(message),
            "{chart} --set {values}: {message:?} missing from {err}"
        );
    }
    Ok(())
}

/// Every rendered object passes the apiserver's validation (server-side dry run), and the pods the
/// Deployments would create pass Pod Security admission at level "restricted", enforced: a Pod built from
/// each pod template is dry-run into a namespace that enforces it (a Pod without seccomp is refused there,
/// so the check can fail).
#[tokio::test]
async fn rendered_charts_pass_server_side_dry_run_and_restricted_pod_security() -> anyhow::Result<()>
{
    let ns = TestNamespace::create("charts-dry").await?;
    let n = ns.name.clone();
    kubectl(
        &[
            "label",
            "namespace",
            &n,
            "pod-security.kubernetes.io/enforce=restricted",
        ],
        None,
    )?;
    for (chart, values) in [
        ("kas", "adminToken=a"),
        ("kas", KAS_FULL),
        ("agentk", "config.token=t,config.kasAddress=grpc://kas:8150"),
        ("agentk", AGENTK_FULL),
    ] {
        let rendered = helm(&["template", "r", chart, "--namespace", &n, "--set", values])?;
        let out = kubectl(
            &["apply", "--dry-run=server", "-n", &n, "-f", "-"],
            Some(&rendered),
        )
        .with_context(|| format!("server-side dry run of {chart} --set {values}"))?;
        assert!(
            out.contains(&format!(
                "deployment.apps/r-{chart} created (server dry run)"
            )),
            "{chart}: {out}"
        );
        let objects = documents(&rendered)?;
        let pod = pod_from_template(find(&objects, "Deployment")?, &n)?;
        let out = kubectl(
            &["apply", "--dry-run=server", "-f", "-"],
            Some(&pod.to_string()),
        )
        .with_context(|| format!("{chart}'s pod under Pod Security \"restricted\""))?;
        assert!(out.contains("created (server dry run)"), "{out}");
    }
    // `agentk generate`'s Deployment too.
    let generated = agentk::generate::manifests(&agentk::generate::InstallOptions {
        namespace: n.clone(),
        kas_address: "grpc://kas:8150".into(),
        agent_token: "t".into(),
        agent_version: agentk::generate::DEFAULT_IMAGE_TAG.into(),
        image_repository: agentk::generate::DEFAULT_IMAGE_REPOSITORY.into(),
        cluster_write: false,
        impersonate: false,
    });
    let pod = pod_from_template(find(&documents(&generated)?, "Deployment")?, &n)?;
    let out = kubectl(
        &["apply", "--dry-run=server", "-f", "-"],
        Some(&pod.to_string()),
    )
    .context("agentk generate's pod under Pod Security \"restricted\"")?;
    assert!(out.contains("created (server dry run)"), "{out}");
    // The check has teeth: the same pod without its seccomp profile is refused.
    let rendered = helm(&[
        "template",
        "r",
        "agentk",
        "--namespace",
        &n,
        "--set",
        "config.token=t,config.kasAddress=grpc://kas:8150,podSecurityContext.seccompProfile=null",
    ])?;
    let pod = pod_from_template(find(&documents(&rendered)?, "Deployment")?, &n)?;
    let refused = kubectl(
        &["apply", "--dry-run=server", "-f", "-"],
        Some(&pod.to_string()),
    )
    .expect_err("a pod without seccomp under restricted");
    assert!(refused.to_string().contains("seccompProfile"), "{refused}");
    ns.delete().await?;
    Ok(())
}

/// A Pod with the Deployment's pod template, in namespace `ns`. Its ServiceAccount is the namespace's
/// default one: the dry run creates none of the chart's objects, and Pod Security does not look at it.
fn pod_from_template(deployment: &Value, ns: &str) -> anyhow::Result<Value> {
    let template = &deployment["spec"]["template"];
    ensure!(template.is_object(), "no pod template in {deployment}");
    let mut spec = template["spec"].clone();
    spec.as_object_mut()
        .context("pod spec")?
        .remove("serviceAccountName");
    Ok(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": unique_name("pss"), "namespace": ns, "labels": template["metadata"]["labels"] },
        "spec": spec,
    }))
}

/// With the Prometheus Operator's API present the monitors render, and they scrape what the chart serves:
/// the ServiceMonitor selects the Service (by its labels) on its `http-metrics` port, the PodMonitor the
/// pods on the container port of that name. (The operator's CRDs are not in this cluster, so these two
/// objects get no dry run.)
#[test]
fn monitors_point_at_the_observability_ports() -> anyhow::Result<()> {
    let rendered = helm(&[
        "template",
        "r",
        "agentk",
        "--api-versions",
        "monitoring.coreos.com/v1",
        "--set",
        "config.token=t,config.kasAddress=grpc://kas:8150,serviceMonitor.enabled=true,podMonitor.enabled=true",
    ])?;
    let objects = documents(&rendered)?;
    let service = find(&objects, "Service")?;
    let monitor = find(&objects, "ServiceMonitor")?;
    let selector = monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .context("ServiceMonitor selector")?;
    for (key, value) in selector {
        assert_eq!(&service["metadata"]["labels"][key], value, "{key}");
    }
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "http-metrics");
    assert_eq!(service["spec"]["ports"][0]["name"], "http-metrics");
    let deployment = find(&objects, "Deployment")?;
    let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let pod_monitor = find(&objects, "PodMonitor")?;
    for (key, value) in pod_monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .context("PodMonitor selector")?
    {
        assert_eq!(&pod_labels[key], value, "{key}");
    }
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["ports"][0]["name"], "http-metrics");
    assert_eq!(container["ports"][0]["containerPort"], 8080);
    assert_eq!(
        pod_monitor["spec"]["podMetricsEndpoints"][0]["port"],
        "http-metrics"
    );

    let kas = helm(&[
        "template",
        "r",
        "kas",
        "--api-versions",
        "monitoring.coreos.com/v1",
        "--set",
        "adminToken=a,metrics.serviceMonitor.enabled=true",
    ])?;
    let objects = documents(&kas)?;
    let ports = &find(&objects, "Service")?["spec"]["ports"];
    assert!(
        ports
            .as_array()
            .context("ports")?
            .iter()
            .any(|p| p["name"] == "http-metrics" && p["port"] == 8151),
        "{ports}"
    );
    assert_eq!(
        find(&objects, "ServiceMonitor")?["spec"]["endpoints"][0]["port"],
        "http-metrics"
    );
    Ok(())
}

/// The agentk chart's RBAC choices render what they say: least privilege by default (the built-in `admin`
/// role in the release namespace only), write-all, an existing ClusterRole, or no RBAC at all.
#[test]
fn agentk_rbac_modes_render_what_they_say() -> anyhow::Result<()> {
    let render = |extra: &str| -> anyhow::Result<Vec<Value>> {
        documents(&helm(&[
            "template",
            "r",
            "agentk",
            "--set",
            &format!("config.token=t,config.kasAddress=grpc://kas:8150{extra}"),
        ])?)
    };
    let write_grants = |objects: &[Value]| -> Vec<String> {
        objects
            .iter()
            .filter(|o| o["kind"] == "RoleBinding" || o["kind"] == "ClusterRoleBinding")
            .filter(|o| {
                o["roleRef"]["name"] != "r-agentk-state"
                    && o["roleRef"]["name"] != "r-agentk-read-all"
            })
            .map(|o| {
                format!(
                    "{}/{}",
                    o["kind"].as_str().unwrap_or("?"),
                    o["roleRef"]["name"].as_str().unwrap_or("?")
                )
            })
            .collect()
    };
    assert_eq!(write_grants(&render("")?), ["RoleBinding/admin"]);
    assert_eq!(
        write_grants(&render(",rbac.clusterWrite=true")?),
        ["ClusterRoleBinding/r-agentk-write-all"]
    );
    assert_eq!(
        write_grants(&render(
            ",rbac.clusterWrite=true,rbac.useExistingRole=cluster-admin"
        )?),
        ["ClusterRoleBinding/cluster-admin"]
    );
    let bare = render(",rbac.create=false,serviceAccount.create=false,serviceAccount.name=mine")?;
    let kinds: Vec<&str> = bare.iter().filter_map(|o| o["kind"].as_str()).collect();
    assert_eq!(kinds, ["Secret", "Deployment"], "rbac.create=false");
    assert_eq!(
        find(&bare, "Deployment")?["spec"]["template"]["spec"]["serviceAccountName"],
        "mine"
    );
    Ok(())
}

/// One container of a Deployment, run as a local process: the stand-in for a pod (kwok runs no
/// containers). Its volumes are read back from the cluster and written under `root` at their mount
/// paths; every mount path in the args, the env and the mounted files is rewritten to that local copy (the
/// container's filesystem view). Each container port is moved to a free loopback port (its network
/// namespace), in `0.0.0.0:<port>` and `:<port>` listen addresses.
struct ContainerAsProcess {
    /// From the image name: `ghcr.io/gitops-rs/kas:0.1.0` runs `kas`.
    binary: String,
    root: tempfile::TempDir,
    /// Container port name -> the local port it listens on.
    ports: BTreeMap<String, u16>,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl ContainerAsProcess {
    async fn from_deployment(
        deployment: &Deployment,
        ns: &TestNamespace,
        pod_name: &str,
    ) -> anyhow::Result<Self> {
        let spec = deployment
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .context("Deployment without a pod spec")?;
        let [container] = spec.containers.as_slice() else {
            bail!("expected one container in {:?}", deployment.metadata.name);
        };
        ensure!(
            container.command.is_none(),
            "the container overrides the image's entrypoint: {:?}",
            container.command
        );
        let image = container.image.as_deref().context("container image")?;
        let binary = image_binary(image)?;
        let root = tempfile::tempdir()?;
        let mut mounts = Vec::new();
        for mount in container.volume_mounts.iter().flatten() {
            let volume = spec
                .volumes
                .iter()
                .flatten()
                .find(|v| v.name == mount.name)
                .with_context(|| format!("volume {} not in the pod spec", mount.name))?;
            let local = root.path().join(mount.mount_path.trim_start_matches('/'));
            std::fs::create_dir_all(&local)?;
            write_volume(volume, &local, ns).await?;
            mounts.push((mount.mount_path.clone(), local.display().to_string()));
        }
        let mut ports = BTreeMap::new();
        for port in container.ports.iter().flatten() {
            let name = port.name.clone().context("unnamed container port")?;
            ports.insert(name, (port.container_port, free_port()?));
        }
        let rewrite = |text: &str| rewrite(text, &mounts, ports.values());
        // The mounted files see the container's paths and ports too (kas.yaml names both).
        for (_, local) in &mounts {
            rewrite_files(Path::new(local), &rewrite)?;
        }
        let args = container
            .args
            .iter()
            .flatten()
            .map(|a| rewrite(a))
            .collect();
        let env = environment(container, spec, pod_name, ns)
            .await?
            .into_iter()
            .map(|(k, v)| (k, rewrite(&v)))
            .collect();
        Ok(Self {
            binary,
            root,
            ports: ports
                .into_iter()
                .map(|(n, (_, local))| (n, local))
                .collect(),
            args,
            env,
        })
    }

    fn port(&self, name: &str) -> anyhow::Result<u16> {
        self.ports
            .get(name)
            .copied()
            .with_context(|| format!("no container port {name}: {:?}", self.ports))
    }

    /// The local copy of `path` in the container's filesystem.
    fn file(&self, path: &str) -> PathBuf {
        self.root.path().join(path.trim_start_matches('/'))
    }

    /// The image's entrypoint, run here as the binary of the same name built beside the tests (the
    /// container sets no `command`, so the image's ENTRYPOINT would run with the container's args).
    fn command(&self) -> anyhow::Result<Command> {
        let mut command = Command::new(sibling_binary(&self.binary)?);
        command
            .args(&self.args)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        Ok(command)
    }
}

/// The binary an image of this project runs: the last path segment of its repository (`ghcr.io/gitops-rs/kas`
/// -> `kas`), which must be the project's image for it (the images are built from `docker/Dockerfile`).
fn image_binary(image: &str) -> anyhow::Result<String> {
    let (repository, tag) = image.rsplit_once(':').context("an image without a tag")?;
    let binary = repository.rsplit('/').next().unwrap_or(repository);
    ensure!(
        repository == format!("ghcr.io/gitops-rs/{binary}") && tag == env!("CARGO_PKG_VERSION"),
        "{image} is not the project's image at the crate version"
    );
    Ok(binary.to_owned())
}

/// Replaces the container's mount paths by their local copies and its listen ports by the local ones.
fn rewrite<'a>(
    text: &str,
    mounts: &[(String, String)],
    ports: impl Iterator<Item = &'a (i32, u16)>,
) -> String {
    let mut out = text.to_owned();
    for (container, local) in mounts {
        out = replace_path(&out, container, local);
    }
    for (container, local) in ports {
        out = out.replace(
            &format!("0.0.0.0:{container}"),
            &format!("127.0.0.1:{local}"),
        );
        if let Some(flag) = out.strip_suffix(&format!("=:{container}")) {
            out = format!("{flag}=127.0.0.1:{local}");
        }
    }
    out
}

/// Replaces `from` where it starts a path (at the start, or after a space, `=`, `:` or a quote), so a mount
/// path inside an already rewritten local path (`/tmp/x/etc/kas/...`) is left alone.
fn replace_path(text: &str, from: &str, to: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(from) {
        let before = match at {
            0 => out.chars().next_back(),
            _ => rest[..at].chars().next_back(),
        };
        let starts_path =
            before.is_none_or(|c| c.is_whitespace() || matches!(c, '=' | ':' | '"' | '\''));
        out.push_str(&rest[..at]);
        out.push_str(if starts_path { to } else { from });
        rest = &rest[at + from.len()..];
    }
    out.push_str(rest);
    out
}

/// The stand-in's rewriting: mount paths where they start a path (never inside a local path already
/// rewritten), `0.0.0.0:<port>` and `--flag=:<port>` listen addresses.
#[test]
fn rewriting_moves_paths_and_ports_once() {
    let mounts = [
        ("/etc/kas".to_owned(), "/tmp/r/etc/kas".to_owned()),
        (
            "/etc/kas/secrets".to_owned(),
            "/tmp/r/etc/kas/secrets".to_owned(),
        ),
    ];
    let ports = [(8080, 41000_u16), (8150, 41001)];
    let rewrite = |text: &str| rewrite(text, &mounts, ports.iter());
    assert_eq!(
        rewrite("--config=/etc/kas/kas.yaml"),
        "--config=/tmp/r/etc/kas/kas.yaml"
    );
    assert_eq!(
        rewrite("admin_token_file: /etc/kas/secrets/admin-token\n  agent: 0.0.0.0:8150"),
        "admin_token_file: /tmp/r/etc/kas/secrets/admin-token\n  agent: 127.0.0.1:41001"
    );
    assert_eq!(
        rewrite("--observability-listen=:8080"),
        "--observability-listen=127.0.0.1:41000"
    );
    assert_eq!(rewrite("--keepalive=10s"), "--keepalive=10s");
}

fn rewrite_files(dir: &Path, rewrite: &impl Fn(&str) -> String) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_file()
            && let Ok(text) = std::fs::read_to_string(&path)
        {
            std::fs::write(&path, rewrite(&text))?;
        }
    }
    Ok(())
}

/// Writes a volume's files into `dir`, read from the cluster: a ConfigMap, a Secret, a projection of
/// Secrets; a PersistentVolumeClaim or emptyDir starts empty (kwok binds no volumes).
async fn write_volume(volume: &Volume, dir: &Path, ns: &TestNamespace) -> anyhow::Result<()> {
    if let Some(source) = &volume.config_map {
        let map: ConfigMap = ns.api().get(&source.name).await?;
        for (key, value) in map.data.unwrap_or_default() {
            std::fs::write(dir.join(key), value)?;
        }
    } else if let Some(source) = &volume.secret {
        let name = source
            .secret_name
            .as_deref()
            .context("secret volume name")?;
        for (key, value) in secret_data(ns, name).await? {
            std::fs::write(dir.join(key), value.0)?;
        }
    } else if let Some(projected) = &volume.projected {
        for source in projected.sources.iter().flatten() {
            let secret = source
                .secret
                .as_ref()
                .context("only Secrets are projected")?;
            let data = secret_data(ns, &secret.name).await?;
            for item in secret.items.iter().flatten() {
                let value = data
                    .get(&item.key)
                    .with_context(|| format!("key {} not in Secret {}", item.key, secret.name))?;
                std::fs::write(dir.join(&item.path), &value.0)?;
            }
        }
    } else if volume.persistent_volume_claim.is_none() && volume.empty_dir.is_none() {
        bail!(
            "volume {} has a source this stand-in does not know",
            volume.name
        );
    }
    Ok(())
}

async fn secret_data(
    ns: &TestNamespace,
    name: &str,
) -> anyhow::Result<BTreeMap<String, ByteString>> {
    let secret: Secret = ns
        .api()
        .get(name)
        .await
        .with_context(|| format!("Secret {name}"))?;
    Ok(secret.data.unwrap_or_default())
}

/// The container's environment as the kubelet would set it: values, the downward API, Secret keys.
async fn environment(
    container: &Container,
    spec: &PodSpec,
    pod_name: &str,
    ns: &TestNamespace,
) -> anyhow::Result<Vec<(String, String)>> {
    let mut env = Vec::new();
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(value), _) => value.clone(),
            (None, Some(from)) => {
                if let Some(field) = &from.field_ref {
                    match field.field_path.as_str() {
                        "metadata.namespace" => ns.name.clone(),
                        "metadata.name" => pod_name.to_owned(),
                        "spec.serviceAccountName" => {
                            spec.service_account_name.clone().unwrap_or_default()
                        }
                        other => bail!("env {}: field {other} not known here", var.name),
                    }
                } else if let Some(key) = &from.secret_key_ref {
                    let data = secret_data(ns, &key.name).await?;
                    String::from_utf8(data.get(&key.key).context("secret key")?.0.clone())?
                } else {
                    bail!("env {}: source not known here", var.name);
                }
            }
            (None, None) => String::new(),
        };
        env.push((var.name.clone(), value));
    }
    Ok(env)
}

/// A kubeconfig for the cluster that authenticates with a token of `service_account` (TokenRequest, like
/// the token the kubelet projects into the pod): the admin kubeconfig gives only the server and its CA.
async fn service_account_kubeconfig(
    ns: &TestNamespace,
    service_account: &str,
    path: &Path,
) -> anyhow::Result<()> {
    let token = ns
        .service_account_token(service_account)
        .await
        .with_context(|| format!("a token of ServiceAccount {service_account}"))?;
    let admin = std::fs::read_to_string(&test_env().kubernetes.kubeconfig)?;
    let mut kubeconfig: Value = serde_saphyr::from_str(&admin)?;
    for user in kubeconfig["users"].as_array_mut().context("users")? {
        user["user"] = serde_json::json!({ "token": token });
    }
    std::fs::write(path, serde_json::to_string(&kubeconfig)?)?;
    Ok(())
}

/// GETs `url` until it answers 200, returning the body.
async fn wait_ok(url: &str, within: Duration) -> anyhow::Result<String> {
    let client = reqwest::Client::new();
    let mut last = String::from("no answer");
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        match client.get(url).send().await {
            Ok(r) if r.status().is_success() => return Ok(r.text().await?),
            Ok(r) => last = format!("{}: {}", r.status(), r.text().await.unwrap_or_default()),
            Err(err) => last = err.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bail!("{url} did not answer 200 within {within:?}; last: {last}")
}

/// Waits until a just-started process answers 200 at `url`; fails at once, with its exit status, when it
/// exits first (its log, on stderr, says why: e.g. a configuration key it does not know).
async fn wait_started(process: &mut Killed, what: &str, url: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = process.0.try_wait()? {
            bail!("{what} exited with {status} before answering {url} (its log is above)");
        }
        if let Ok(r) = reqwest::get(url).await
            && r.status().is_success()
        {
            return Ok(());
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "{what} did not answer {url} within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The Kubernetes API proxy's port speaks TLS with the agent certificate when one is given (`ca`), and
/// plain HTTP otherwise.
async fn check_k8s_proxy_transport(
    kas: &ContainerAsProcess,
    ca: Option<&Path>,
) -> anyhow::Result<()> {
    let port = kas.port("k8s-proxy")?;
    let kas_yaml = std::fs::read_to_string(kas.file("/etc/kas/config/kas.yaml"))?;
    match ca {
        Some(ca) => {
            assert!(kas_yaml.contains("k8s_proxy_tls:"), "{kas_yaml}");
            let root = reqwest::Certificate::from_pem(&std::fs::read(ca)?)?;
            let client = reqwest::Client::builder()
                .add_root_certificate(root)
                .build()?;
            // Any HTTP answer means the TLS handshake with the chart's certificate succeeded.
            client
                .get(format!("https://localhost:{port}/version"))
                .send()
                .await
                .context("the proxy over https:// with the agent certificate")?;
            ensure!(
                reqwest::get(format!("http://127.0.0.1:{port}/version"))
                    .await
                    .is_err_and(|e| !e.is_status()),
                "the proxy answered plain http although it has a certificate"
            );
        }
        None => {
            assert!(!kas_yaml.contains("k8s_proxy_tls"), "{kas_yaml}");
            reqwest::get(format!("http://127.0.0.1:{port}/version"))
                .await
                .context("the plain proxy")?;
        }
    }
    Ok(())
}

/// The chart's Deployment as the cluster holds it after `helm install`.
async fn deployment(ns: &TestNamespace, name: &str) -> anyhow::Result<Deployment> {
    ns.api()
        .get(name)
        .await
        .with_context(|| format!("Deployment {name}"))
}

/// Plain text: agentk dials `grpc://`; the Kubernetes API proxy is plain http (kubectl would send it no
/// token; NOTES.txt says so).
#[tokio::test]
async fn installed_charts_run_as_processes_and_sync_the_seed() -> anyhow::Result<()> {
    install_and_sync(Transport::Plain).await
}

/// `agentTls.secretName` given: kas serves the agent port with that certificate, agentk dials `wss://` on the
/// Ingress's path and trusts it through `config.kasCaCert`, and the Kubernetes API proxy is served over TLS
/// by default.
#[tokio::test]
async fn installed_charts_with_agent_tls_sync_over_wss_and_serve_the_proxy_over_tls()
-> anyhow::Result<()> {
    install_and_sync(Transport::Tls).await
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Transport {
    Plain,
    Tls,
}

/// A kubernetes.io/tls Secret `kas-tls` for `localhost` in `ns`; returns the certificate file (PEM), which
/// is its own CA.
fn create_tls_secret(ns: &str, dir: &Path) -> anyhow::Result<PathBuf> {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
    let (crt, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&crt, cert.cert.pem())?;
    std::fs::write(&key, cert.signing_key.serialize_pem())?;
    let (crt_arg, key_arg) = (
        format!("--cert={}", crt.display()),
        format!("--key={}", key.display()),
    );
    kubectl(
        &[
            "create", "secret", "tls", "kas-tls", "-n", ns, &crt_arg, &key_arg,
        ],
        None,
    )?;
    Ok(crt)
}

async fn install_and_sync(transport: Transport) -> anyhow::Result<()> {
    let ns = TestNamespace::create("charts-run").await?;
    let certs = tempfile::tempdir()?;
    let n = ns.name.clone();
    let gitea = Gitea::from_env();
    // A private project: kas must read it with the Git password from the chart's Secret.
    let repo = gitea.create_private_repository("charts").await?;
    let config = format!(
        "gitops:\n  manifest_projects:\n  - id: {:?}\n    default_namespace: {n:?}\n    paths:\n    - glob: 'deployment/*.yaml'\n",
        repo.full_name
    );
    let manifest = format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: nginx-deployment\n  namespace: {n}\nspec:\n  selector:\n    matchLabels: {{ app: nginx }}\n  replicas: 1\n  template:\n    metadata:\n      labels: {{ app: nginx }}\n    spec:\n      containers:\n      - {{ name: nginx, image: 'nginx:1.14.2' }}\n"
    );
    push_files(
        &repo,
        "main",
        &[
            (".gitlab/agents/gitops/config.yaml", config.as_str()),
            ("deployment/deployment.yaml", manifest.as_str()),
        ],
        "the seed's layout",
    )?;

    // kas: installed by its chart, then run from what the cluster holds.
    let kas_release = unique_name("kas");
    let admin_token = unique_name("admin");
    let state = &test_env().gitea;
    let mut kas_values = format!(
        "adminToken={admin_token},gitPassword={},git.username={},git.baseUrl={},git.pollPeriod=2s,logging.format=text",
        state.admin_password, state.admin_user, state.url
    );
    let ca = match transport {
        Transport::Plain => None,
        Transport::Tls => {
            kas_values.push_str(",agentTls.secretName=kas-tls");
            Some(create_tls_secret(&n, certs.path())?)
        }
    };
    let notes = helm(&[
        "install",
        &kas_release,
        "kas",
        "--namespace",
        &n,
        "--set",
        &kas_values,
    ])?;
    // NOTES.txt warns about clear text exactly when there is no certificate.
    let warns = notes.contains("kubectl sends no bearer token")
        && notes.contains("agent tokens cross it in clear");
    assert_eq!(warns, transport == Transport::Plain, "{notes}");
    let kas_deployment = deployment(&ns, &format!("{kas_release}-kas")).await?;
    let kas_pod = ContainerAsProcess::from_deployment(&kas_deployment, &ns, "kas-0").await?;
    let stored_token = std::fs::read_to_string(kas_pod.file("/etc/kas/secrets/admin-token"))?;
    assert_eq!(stored_token, admin_token, "the admin token from the Secret");
    let mut kas = Killed(kas_pod.command()?.spawn().context("starting kas")?);
    let api = format!("http://127.0.0.1:{}", kas_pod.port("api")?);
    wait_started(&mut kas, "kas", &format!("{api}/healthz")).await?;
    let admin = kas::cli::AdminClient::new(&api, stored_token);
    let (_, _, agent_token) = e2e::register_agent(&admin, &repo.full_name).await?;

    // agentk: two replicas under the chart's ServiceAccount and least-privilege RBAC.
    let agentk_release = unique_name("agentk");
    let agent_port = kas_pod.port("agent")?;
    let address = match transport {
        Transport::Plain => format!("grpc://127.0.0.1:{agent_port}"),
        // The path the chart's Ingress routes to the agent port (kas takes the upgrade on any path).
        Transport::Tls => format!("wss://localhost:{agent_port}/-/kubernetes-agent/"),
    };
    let values = format!(
        "config.token={agent_token},config.kasAddress={address},config.driftCheckInterval=0s"
    );
    let mut args = vec![
        "install",
        &agentk_release,
        "agentk",
        "--namespace",
        &n,
        "--set",
        &values,
    ];
    let ca_value = ca
        .as_ref()
        .map(|ca| format!("config.kasCaCert={}", ca.display()));
    if let Some(ca_value) = &ca_value {
        args.extend(["--set-file", ca_value]);
    }
    helm(&args)?;
    let agentk_deployment = deployment(&ns, &format!("{agentk_release}-agentk")).await?;
    let replicas = agentk_deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .context("replicas")?;
    assert_eq!(replicas, 2, "the chart's default");
    let service_account = agentk_deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|s| s.service_account_name.clone())
        .context("serviceAccountName")?;
    let mut agents = Vec::new();
    for replica in 0..replicas {
        let pod_name = format!("{agentk_release}-agentk-{replica}");
        let pod = ContainerAsProcess::from_deployment(&agentk_deployment, &ns, &pod_name).await?;
        let kubeconfig = pod.root.path().join("kubeconfig");
        service_account_kubeconfig(&ns, &service_account, &kubeconfig).await?;
        let mut command = pod.command()?;
        command.env("KUBECONFIG", &kubeconfig);
        agents.push((Killed(command.spawn().context("starting agentk")?), pod));
    }

    // The seed sync: the Deployment from Git appears, written by agentk's field manager.
    let deployments: Api<Deployment> = ns.api();
    eventually(Duration::from_secs(60), "nginx-deployment applied", || {
        let deployments = deployments.clone();
        async move {
            let Some(applied) = deployments.get_opt("nginx-deployment").await? else {
                return Ok(false);
            };
            let managers: Vec<String> = applied
                .metadata
                .managed_fields
                .unwrap_or_default()
                .into_iter()
                .filter_map(|m| m.manager)
                .collect();
            Ok(managers.iter().any(|m| m == "agentk"))
        }
    })
    .await?;

    check_k8s_proxy_transport(&kas_pod, ca.as_deref()).await?;
    if let Some(ca) = &ca {
        let (_, pod) = &agents[0];
        assert_eq!(
            std::fs::read_to_string(pod.file("/etc/agentk/ca/ca.crt"))?,
            std::fs::read_to_string(ca)?,
            "config.kasCaCert reaches agentk through the chart's ConfigMap"
        );
    }

    // One replica leads, through the Lease the chart's Role lets it write (the holder is a pod name).
    let pod_names: Vec<String> = (0..replicas)
        .map(|r| format!("{agentk_release}-agentk-{r}"))
        .collect();
    let leases: Api<Lease> = ns.api();
    let holders: Vec<String> = leases
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter_map(|l| l.spec.and_then(|s| s.holder_identity))
        .collect();
    assert!(
        holders
            .iter()
            .any(|h| pod_names.iter().any(|p| h.contains(p.as_str()))),
        "no Lease held by {pod_names:?}: {holders:?}"
    );
    for (agent, pod) in &mut agents {
        if let Some(status) = agent.0.try_wait()? {
            bail!("agentk with {:?} exited with {status}", pod.args);
        }
    }

    // The probes the charts declare answer on the ports they name (observability listeners).
    let kas_metrics = kas_pod.port("http-metrics")?;
    for path in ["/livez", "/readyz"] {
        wait_ok(
            &format!("http://127.0.0.1:{kas_metrics}{path}"),
            Duration::from_secs(10),
        )
        .await
        .context("kas's probe")?;
    }
    for (_, pod) in &agents {
        let port = pod.port("http-metrics")?;
        for path in ["/livez", "/readyz"] {
            wait_ok(
                &format!("http://127.0.0.1:{port}{path}"),
                Duration::from_secs(30),
            )
            .await
            .context("agentk's probe")?;
        }
    }

    drop(agents);
    helm(&["uninstall", &agentk_release, "--namespace", &n])?;
    helm(&["uninstall", &kas_release, "--namespace", &n])?;
    ns.delete().await?;
    gitea.delete_repository(&repo).await?;
    Ok(())
}
