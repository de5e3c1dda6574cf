//! The `kas` command line against a real kas, real Gitea and the real apiserver, with agentk as a process:
//! `kas reconcile` puts back an object changed by hand long before the drift check would, and brings a new
//! commit although kas polls only once an hour; `kas get …` and `kas token list` print kubectl-like tables
//! (read by their column positions, as a person reads them) and the same records as JSON and YAML.

use std::{
    collections::BTreeMap,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context;
use e2e::{
    eventually,
    process::{GitSource, KasProcess, sibling_binary},
};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use test_support::{
    cluster::{TestNamespace, install_crypto_provider},
    env::test_env,
    gitea::{Gitea, Repository, push_files},
};

async fn push(repo: &Repository, path: &str, content: &str) -> anyhow::Result<String> {
    let (repo, path, content) = (repo.clone(), path.to_owned(), content.to_owned());
    Ok(tokio::task::spawn_blocking(move || {
        push_files(
            &repo,
            "main",
            &[(path.as_str(), content.as_str())],
            "update",
        )
    })
    .await??)
}

fn configmap(value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: reconciled\ndata:\n  value: {value}\n"
    )
}

/// `kas <args>` against `kas`'s API with the admin token from the environment; (success, stdout, stderr).
fn kas_cli(kas: &KasProcess, args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let output = Command::new(sibling_binary("kas")?)
        .args(args)
        .env("KAS_API_URL", format!("http://127.0.0.1:{}", kas.api_port))
        .env("KAS_ADMIN_TOKEN", &kas.admin_token)
        .stdin(Stdio::null())
        .output()
        .context("running kas")?;
    Ok((
        output.status.success(),
        String::from_utf8(output.stdout)?,
        String::from_utf8(output.stderr)?,
    ))
}

/// `kas <args>`, which must succeed; its stdout.
fn kas_ok(kas: &KasProcess, args: &[&str]) -> anyhow::Result<String> {
    let (ok, out, err) = kas_cli(kas, args)?;
    anyhow::ensure!(ok, "kas {args:?} failed: {out}{err}");
    Ok(out)
}

/// A table as kubectl prints it, read by the headers' positions: each cell starts where its header
/// starts, so a misaligned table fails here.
fn parse_table(text: &str) -> anyhow::Result<Vec<BTreeMap<String, String>>> {
    let mut lines = text.lines();
    let header = lines.next().context("no header line")?;
    let mut starts = Vec::new();
    let mut previous = ' ';
    for (i, c) in header.char_indices() {
        if c != ' ' && previous == ' ' {
            starts.push(i);
        }
        previous = c;
    }
    let names: Vec<&str> = header.split_whitespace().collect();
    anyhow::ensure!(
        names.len() == starts.len(),
        "a header has a space: {header}"
    );
    anyhow::ensure!(
        names.iter().all(|n| n.chars().all(|c| !c.is_lowercase())),
        "headers are upper case: {header}"
    );
    let mut rows = Vec::new();
    for line in lines {
        let mut row = BTreeMap::new();
        for (i, name) in names.iter().enumerate() {
            let start = starts[i];
            let end = starts
                .get(i + 1)
                .copied()
                .unwrap_or(line.len())
                .min(line.len());
            let cell = line.get(start.min(line.len())..end).unwrap_or_default();
            anyhow::ensure!(
                i == 0 || start >= line.len() || line[..start].ends_with(' '),
                "column {name} does not start at its header in {line:?}"
            );
            row.insert((*name).to_owned(), cell.trim().to_owned());
        }
        rows.push(row);
    }
    Ok(rows)
}

async fn value_of(configmaps: &Api<ConfigMap>) -> anyhow::Result<String> {
    Ok(configmaps
        .get_opt("reconciled")
        .await?
        .and_then(|c| c.data)
        .and_then(|d| d.get("value").cloned())
        .unwrap_or_default())
}

fn agentk_process(
    kas: &KasProcess,
    token: &str,
    ns: &str,
    log: &Path,
) -> anyhow::Result<e2e::process::Killed> {
    let mut command = kas.agentk_command("grpc", token)?;
    command
        // GitLab's kube flags, not the environment.
        .env_remove("KUBECONFIG")
        .arg(format!(
            "--kubeconfig={}",
            test_env().kubernetes.kubeconfig.display()
        ))
        // Far beyond the test: only a reconcile can put drift back.
        .arg("--drift-check-interval=1h")
        .env("POD_NAMESPACE", ns)
        .stderr(std::fs::File::create(log)?);
    Ok(e2e::process::Killed(command.spawn().context("agentk")?))
}

#[tokio::test]
async fn reconcile_puts_drift_back_and_reads_git_at_once_and_kas_get_shows_the_result()
-> anyhow::Result<()> {
    install_crypto_provider();
    let env = test_env();
    let gitea = Gitea::from_env();
    let ns = TestNamespace::create("cli").await?;
    let config_repo = gitea.create_repository("cli-config").await?;
    let manifests = gitea.create_repository("cli-manifests").await?;
    let project = manifests.full_name.as_str();
    let config = format!(
        "gitops:\n  manifest_projects:\n  - id: {project}\n    default_namespace: {}\n    paths:\n    - glob: '*.yaml'\n",
        ns.name
    );
    push(&config_repo, ".gitlab/agents/gitops/config.yaml", &config).await?;
    let first = push(&manifests, "cm.yaml", &configmap("one")).await?;

    let dir = tempfile::tempdir()?;
    let agentk_log = dir.path().join("agentk.log");
    // Polls once an hour, no webhook: only a reconcile makes kas look at Git again.
    let source = GitSource {
        base_url: env.gitea.url.clone(),
        username: env.gitea.admin_user.clone(),
        password: env.gitea.admin_password.clone(),
        poll_period: "1h".into(),
        webhook_secret: None,
    };
    let kas_log = dir.path().join("kas.log");
    let kas = KasProcess::start_with(
        &source,
        dir.path(),
        "info",
        Stdio::from(std::fs::File::create(&kas_log)?),
    )
    .await?;
    // On a failure, both logs say what happened.
    let logs = || {
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        format!("kas:\n{}\nagentk:\n{}", read(&kas_log), read(&agentk_log))
    };
    let (agent_gid, _, secret) = e2e::register_agent(&kas.admin, &config_repo.full_name).await?;
    let agent = agent_gid
        .rsplit('/')
        .next()
        .context("agent number")?
        .to_owned();
    let agentk = agentk_process(&kas, &secret, &ns.name, &agentk_log)?;
    let configmaps: Api<ConfigMap> = ns.api();
    eventually(Duration::from_secs(60), "the first sync", || async {
        Ok(value_of(&configmaps).await? == "one")
    })
    .await
    .with_context(logs)?;

    // Drift by hand; nothing puts it back by itself (drift check: 1 h).
    let mut edited = configmaps.get("reconciled").await?;
    edited
        .data
        .get_or_insert_default()
        .insert("value".into(), "drifted".into());
    configmaps
        .replace("reconciled", &Default::default(), &edited)
        .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        value_of(&configmaps).await?,
        "drifted",
        "control: nothing else restores it"
    );
    let asked = Instant::now();
    kas_ok(&kas, &["reconcile", "--agent", &agent])?;
    eventually(Duration::from_secs(30), "the drift put back", || async {
        Ok(value_of(&configmaps).await? == "one")
    })
    .await
    .with_context(logs)?;
    eprintln!(
        "kas reconcile -> drift put back in {:?} (drift-check interval: 1 h)",
        asked.elapsed()
    );

    // Again, waiting for the agent's report: when `--wait` returns the drift is already put back.
    let mut again = configmaps.get("reconciled").await?;
    again
        .data
        .get_or_insert_default()
        .insert("value".into(), "drifted".into());
    configmaps
        .replace("reconciled", &Default::default(), &again)
        .await?;
    let asked = Instant::now();
    let waited = kas_ok(&kas, &["reconcile", "--agent", &agent, "--wait"])?;
    let took = asked.elapsed();
    assert_eq!(
        value_of(&configmaps).await?,
        "one",
        "--wait returned before the sync"
    );
    let waited = parse_table(&waited)?;
    assert_eq!(waited.len(), 1);
    assert_eq!(waited[0]["OUTCOME"], "synced");
    eprintln!("kas reconcile --wait -> returned with the sync's report in {took:?}");

    // A new commit, which kas would not see for an hour: a reconcile of that project reads Git now.
    let second = push(&manifests, "cm.yaml", &configmap("two")).await?;
    let asked = Instant::now();
    kas_ok(
        &kas,
        &["reconcile", "--agent", &agent, "--project", project],
    )?;
    eventually(
        Duration::from_secs(30),
        "the new commit applied",
        || async { Ok(value_of(&configmaps).await? == "two") },
    )
    .await?;
    eprintln!(
        "kas reconcile --project -> new commit applied in {:?} (poll period: 1 h)",
        asked.elapsed()
    );
    assert_ne!(first, second);

    // A project the agent does not sync, and an agent that does not exist: errors that name them.
    let (ok, _, err) = kas_cli(
        &kas,
        &["reconcile", "--agent", &agent, "--project", "no/such"],
    )?;
    assert!(
        !ok && err.contains("no/such") && err.contains("manifest stream"),
        "{err}"
    );
    let (ok, _, err) = kas_cli(&kas, &["reconcile", "--agent", "999"])?;
    assert!(!ok && err.contains("agent 999 does not exist"), "{err}");

    // The report of the second sync reaches kas before the tables are read.
    eventually(Duration::from_secs(30), "the sync reported", || async {
        let syncs = kas_ok(&kas, &["get", "syncs", "-o", "json"])?;
        let syncs: serde_json::Value = serde_json::from_str(&syncs)?;
        Ok(syncs[0]["lastSync"]["commitApplied"] == second.as_str()
            && syncs[0]["lastSync"]["health"]["Current"] == 1)
    })
    .await?;

    let agents = parse_table(&kas_ok(&kas, &["get", "agents"])?)?;
    let row = agents
        .iter()
        .find(|r| r["ID"] == agent)
        .context("agent row")?;
    assert_eq!(row["NAME"], "gitops");
    assert_eq!(row["PROJECT"], config_repo.full_name);
    assert_eq!(row["CONNECTED"], "true");
    assert_eq!(row["VERSION"], env!("CARGO_PKG_VERSION"));
    assert_eq!(row["SYNCED"], "1/1");

    let syncs = parse_table(&kas_ok(&kas, &["get", "syncs", "--agent", &agent])?)?;
    assert_eq!(syncs.len(), 1);
    assert_eq!(syncs[0]["PROJECT"], project);
    assert_eq!(syncs[0]["OUTCOME"], "synced");
    assert_eq!(syncs[0]["APPLIED"], second[..8]);
    assert_eq!(syncs[0]["SEEN"], second[..8]);
    assert_eq!(syncs[0]["OBJECTS"], "1");
    assert_eq!(syncs[0]["READY"], "1/1");

    let table = kas_ok(&kas, &["get", "objects", "--agent", &agent])?;
    eprintln!("$ kas get objects --agent {agent}\n{table}");
    let objects = parse_table(&table)?;
    assert_eq!(objects.len(), 1);
    let object = &objects[0];
    assert_eq!(
        (
            object["NAMESPACE"].as_str(),
            object["KIND"].as_str(),
            object["NAME"].as_str()
        ),
        (ns.name.as_str(), "configmap", "reconciled")
    );
    assert_eq!(object["RESULT"], "configured");
    assert_eq!(object["HEALTH"], "Current");
    assert_eq!(object["SOURCE"], "cm.yaml, document 0");

    // `get agent <id>`: the agent's row, then its syncs.
    let one = kas_ok(&kas, &["get", "agent", &agent])?;
    eprintln!("$ kas get agent {agent}\n{one}");
    let (agent_part, syncs_part) = one.split_once("\n\n").context("two tables")?;
    assert_eq!(parse_table(agent_part)?[0]["ID"], agent);
    assert_eq!(parse_table(syncs_part)?[0]["OUTCOME"], "synced");

    // The same records as JSON and YAML.
    let json: serde_json::Value =
        serde_json::from_str(&kas_ok(&kas, &["get", "agent", &agent, "-o", "json"])?)?;
    assert_eq!(json["id"], agent_gid.as_str());
    assert_eq!(
        json["manifestProjects"][0]["lastSync"]["objects"][0]["health"],
        "Current"
    );
    let yaml = kas_ok(&kas, &["get", "objects", "-o", "yaml"])?;
    let yaml: serde_json::Value = serde_saphyr::from_str(&yaml)?;
    assert_eq!(yaml[0]["result"], "configured");
    assert_eq!(yaml[0]["agentId"], agent_gid.as_str());

    let tokens = parse_table(&kas_ok(&kas, &["token", "list", "--agent", &agent])?)?;
    assert_eq!(tokens.len(), 1);
    assert_eq!(tokens[0]["AGENT"], agent);
    assert_eq!(tokens[0]["STATUS"], "active");
    assert_eq!(tokens[0]["NAME"], "test");
    let (ok, out, err) = kas_cli(&kas, &["get", "agent", "999"])?;
    assert!(
        !ok && err.contains("agent 999 does not exist"),
        "{out}{err}"
    );

    let bash = kas_ok(&kas, &["completion", "bash"])?;
    assert!(
        bash.contains("complete") && bash.contains("reconcile"),
        "not a bash completion script for kas"
    );

    // The agent gone: a reconcile says it is not connected.
    drop(agentk);
    eventually(
        Duration::from_secs(20),
        "the agent disconnected",
        || async { Ok(kas.admin.list_agents(None).await?[0]["connected"] == false) },
    )
    .await?;
    let (ok, _, err) = kas_cli(&kas, &["reconcile", "--agent", &agent])?;
    assert!(!ok && err.contains("not connected"), "{err}");

    ns.delete().await?;
    gitea.delete_repository(&config_repo).await?;
    gitea.delete_repository(&manifests).await?;
    Ok(())
}
