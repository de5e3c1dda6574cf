//! The dashboard's server side, in-process: the viewer token reads but can never mutate (whatever the
//! document looks like), the admin token can; the page and its assets name no other origin and carry a CSP
//! that forbids loading from one; the event stream needs a token and says what changed. No Git server is
//! needed: agents and tokens are written to kas's store directly.

use std::time::Duration;

use kas::RunningKas;
use serde_json::{Value, json};

const ADMIN: &str = "admin-token-for-dashboard-tests";
const VIEWER: &str = "viewer-token-for-dashboard-tests";

async fn start_kas() -> anyhow::Result<(RunningKas, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let d = dir.path().display();
    std::fs::write(dir.path().join("admin"), ADMIN)?;
    std::fs::write(dir.path().join("viewer"), VIEWER)?;
    // Nothing here reads Git: the address only has to parse.
    let yaml = format!(
        "listen:\n  agent: 127.0.0.1:0\n  api: 127.0.0.1:0\ndata_dir: {d}/data\n\
         admin_token_file: {d}/admin\nviewer_token_file: {d}/viewer\ngit:\n  base_url: http://127.0.0.1:9\n"
    );
    let config = gitops_config::ServerConfig::parse("kas.yaml", &yaml)?;
    Ok((kas::start(config).await?, dir))
}

async fn graphql(kas: &RunningKas, token: &str, query: &str) -> anyhow::Result<(u16, Value)> {
    let response = reqwest::Client::new()
        .post(format!("http://{}/api/graphql", kas.api_addr))
        .bearer_auth(token)
        .json(&json!({ "query": query }))
        .send()
        .await?;
    Ok((response.status().as_u16(), response.json().await?))
}

#[tokio::test]
async fn the_viewer_token_reads_and_is_refused_every_mutation() -> anyhow::Result<()> {
    let (kas, _dir) = start_kas().await?;
    let store = &kas.state.store;
    let agent = store.create_agent("group/project", "gitops")?;
    let token = store.create_token(agent.id, "main", "", &kas::tokens::hash("kasagent_x"), 2)?;
    let token_gid = format!("gid://kas/Clusters::AgentToken/{}", token.id);
    let revoke = format!(
        r#"mutation {{ clusterAgentTokenRevoke(input: {{ id: "{token_gid}" }}) {{ errors }} }}"#
    );

    let (status, answer) = graphql(
        &kas,
        VIEWER,
        "{ clusterAgents { name tokens { name revoked } } }",
    )
    .await?;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["data"]["clusterAgents"][0]["tokens"][0]["revoked"], false,
        "{answer}"
    );

    // Plain, named, hidden behind a query in the same document, and a subscription: all refused.
    let hidden = format!(
        "query look {{ clusterAgents {{ name }} }}\n{}",
        revoke.replacen("mutation", "mutation sneaky", 1)
    );
    for document in [revoke.clone(), hidden, "subscription { x }".to_owned()] {
        let (status, answer) = graphql(&kas, VIEWER, &document).await?;
        assert_eq!(status, 403, "{document}: {answer}");
        let message = answer["errors"][0]["message"].as_str().unwrap_or_default();
        assert!(message.contains("viewer token may only read"), "{message}");
    }
    // Even the operation selected by name cannot be a mutation the schema runs: the viewer schema has none.
    let (status, answer) = graphql(&kas, VIEWER, "{ __schema { mutationType { name } } }").await?;
    assert_eq!(
        (status, &answer["data"]["__schema"]["mutationType"]),
        (200, &Value::Null),
        "{answer}"
    );
    assert!(
        store
            .active_token(&kas::tokens::hash("kasagent_x"))?
            .is_some(),
        "the viewer revoked a token"
    );

    let (status, answer) = graphql(&kas, "not-a-token", "{ clusterAgents { name } }").await?;
    assert_eq!(status, 401, "{answer}");

    let (status, answer) = graphql(&kas, ADMIN, &revoke).await?;
    assert_eq!(
        (status, &answer["data"]["clusterAgentTokenRevoke"]["errors"]),
        (200, &json!([])),
        "{answer}"
    );
    assert!(
        store
            .active_token(&kas::tokens::hash("kasagent_x"))?
            .is_none(),
        "the admin could not revoke"
    );
    kas.shutdown().await;
    Ok(())
}

/// Every `attr="…"` value in `html`.
fn attribute_values<'a>(html: &'a str, attr: &str) -> Vec<&'a str> {
    let needle = format!("{attr}=\"");
    html.match_indices(&needle)
        .filter_map(|(at, _)| {
            let rest = &html[at + needle.len()..];
            rest.find('"').map(|end| &rest[..end])
        })
        .collect()
}

#[tokio::test]
async fn the_page_and_its_assets_name_no_other_origin() -> anyhow::Result<()> {
    let (kas, _dir) = start_kas().await?;
    let base = format!("http://{}", kas.api_addr);
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;

    let root = http.get(format!("{base}/")).send().await?;
    assert!(root.status().is_redirection(), "{}", root.status());
    assert_eq!(root.headers()["location"], "/dashboard");
    let explorer = http.get(format!("{base}/api/graphql")).send().await?;
    assert_eq!(explorer.headers()["location"], "/dashboard#/query");

    let page = http.get(format!("{base}/dashboard")).send().await?;
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"]
        .to_str()?
        .to_owned();
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "CSP lacks {directive}: {csp}");
    }
    let html = page.text().await?;
    let mut linked = Vec::new();
    for value in attribute_values(&html, "src")
        .into_iter()
        .chain(attribute_values(&html, "href"))
    {
        let local = value.starts_with('#')
            || value == "data:,"
            || (value.starts_with('/') && !value.starts_with("//"));
        assert!(
            local,
            "the page links {value:?}, which is not on kas itself"
        );
        if let Some(name) = value.strip_prefix("/dashboard/assets/") {
            linked.push(name.to_owned());
        }
    }
    let served: Vec<&str> = kas::dashboard::ASSETS.iter().map(|a| a.name).collect();
    assert_eq!(
        linked.len(),
        served.len(),
        "linked {linked:?}, served {served:?}"
    );
    for name in &linked {
        let response = http
            .get(format!("{base}/dashboard/assets/{name}"))
            .send()
            .await?;
        assert_eq!(response.status(), 200, "{name}");
        assert!(
            response.headers().contains_key("content-security-policy"),
            "{name}"
        );
        let body = response.text().await?;
        assert!(!body.is_empty(), "{name} is empty");
        for external in [
            "http://", "https://", "@import", "url(//", "import(", "<script",
        ] {
            assert!(!body.contains(external), "{name} contains {external:?}");
        }
        if name.ends_with(".css") {
            for (at, _) in body.match_indices("url(") {
                assert!(
                    body[at + 4..].starts_with("data:"),
                    "{name} loads {}",
                    &body[at..at + 40]
                );
            }
        }
    }
    let missing = http
        .get(format!("{base}/dashboard/assets/../kas.redb"))
        .send()
        .await?;
    assert_eq!(missing.status(), 404);
    kas.shutdown().await;
    Ok(())
}

/// The next `event:` block of the stream whose name is `event`, within `within`.
async fn next_event(
    stream: &mut reqwest::Response,
    buffer: &mut String,
    event: &str,
    within: Duration,
) -> anyhow::Result<String> {
    tokio::time::timeout(within, async {
        loop {
            while let Some(end) = buffer.find("\n\n") {
                let block: String = buffer.drain(..end + 2).collect();
                if block
                    .lines()
                    .any(|l| l == format!("event: {event}") || l == format!("event:{event}"))
                {
                    return Ok(block);
                }
            }
            let chunk = stream
                .chunk()
                .await?
                .ok_or_else(|| anyhow::anyhow!("stream ended"))?;
            buffer.push_str(std::str::from_utf8(&chunk)?);
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("no {event:?} event within {within:?}; got {buffer:?}"))?
}

#[tokio::test]
async fn the_event_stream_needs_a_token_and_says_what_changed() -> anyhow::Result<()> {
    let (kas, _dir) = start_kas().await?;
    let url = format!("http://{}/dashboard/api/events", kas.api_addr);
    let http = reqwest::Client::new();
    assert_eq!(http.get(&url).send().await?.status(), 401);
    assert_eq!(
        http.get(&url).bearer_auth("wrong").send().await?.status(),
        401
    );

    let response = http.get(&url).bearer_auth(VIEWER).send().await?;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut stream = response;
    let mut buffer = String::new();
    next_event(&mut stream, &mut buffer, "ready", Duration::from_secs(5)).await?;
    // Let the watcher take its first look before anything changes.
    tokio::time::sleep(kas::dashboard::events::POLL_PERIOD * 3).await;
    let agent = kas.state.store.create_agent("group/project", "gitops")?;
    let block = next_event(&mut stream, &mut buffer, "changed", Duration::from_secs(5)).await?;
    assert!(block.contains(r#""agents""#), "{block}");
    assert!(
        block.contains(&format!("agent/{}/tokens", agent.id)),
        "{block}"
    );

    kas.state
        .store
        .create_token(agent.id, "t", "", &kas::tokens::hash("kasagent_y"), 2)?;
    let block = next_event(&mut stream, &mut buffer, "changed", Duration::from_secs(5)).await?;
    assert!(
        block.contains(&format!(r#"{{"topics":["agent/{}/tokens"]}}"#, agent.id)),
        "{block}"
    );
    drop(stream);
    kas.shutdown().await;
    Ok(())
}
