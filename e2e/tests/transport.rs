//! The connection under hostile networks: a load balancer that drops idle connections, and an HTTP proxy.

use std::{sync::atomic::Ordering, time::Duration};

use e2e::{Harness, connect_proxy, idle_dropping_proxy, wait_for_state};

/// Keepalives below the balancer's idle timeout keep the first connection alive; without them the
/// balancer cuts it (the control that shows the proxy really drops idle connections).
#[tokio::test]
async fn keepalives_survive_a_load_balancer_that_drops_idle_connections() -> anyhow::Result<()> {
    let h = Harness::start(false).await?;
    let (_, _, secret) = h.register_agent().await?;
    for (keepalive, expect_reconnects) in [
        (Duration::from_millis(300), false),
        (Duration::from_secs(30), true),
    ] {
        let (proxy, accepted) =
            idle_dropping_proxy(h.kas().agent_addr, Duration::from_millis(1500)).await?;
        let mut client = h.client_config("grpc", &secret);
        client.address = gitops_tunnel::KasAddress::parse(&format!("grpc://{proxy}"))?;
        client.keepalive = keepalive;
        let agent = h.agent(client)?;
        wait_for_state(&agent, Duration::from_secs(20), "connected", |s| {
            s.connected && s.config.is_some()
        })
        .await?;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let connections = accepted.load(Ordering::SeqCst);
        if expect_reconnects {
            assert!(
                connections > 1,
                "control: without keepalives the balancer should have cut the connection"
            );
        } else {
            assert_eq!(
                connections, 1,
                "the connection was dropped and redialled despite keepalives"
            );
            assert!(agent.state.borrow().connected);
        }
        agent.shutdown().await;
    }
    Ok(())
}

#[tokio::test]
async fn websocket_connects_through_an_https_proxy() -> anyhow::Result<()> {
    let h = Harness::start(true).await?;
    let (_, _, secret) = h.register_agent().await?;
    let (proxy, tunnels) = connect_proxy().await?;
    let mut client = h.client_config("wss", &secret);
    client.proxy_via(&format!("http://{proxy}"));
    let agent = h.agent(client)?;
    wait_for_state(
        &agent,
        Duration::from_secs(20),
        "connected through the proxy",
        |s| s.connected,
    )
    .await?;
    assert!(
        tunnels.load(Ordering::SeqCst) >= 1,
        "the connection bypassed the proxy"
    );
    agent.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn extra_headers_and_tls_server_name_are_honoured() -> anyhow::Result<()> {
    let h = Harness::start(true).await?;
    let (_, _, secret) = h.register_agent().await?;
    // Dial by IP but verify the certificate for "localhost".
    let mut client = h.client_config("grpcs", &secret);
    client.address = gitops_tunnel::KasAddress::parse(&format!(
        "grpcs://127.0.0.1:{}",
        h.kas().agent_addr.port()
    ))?;
    client.tls_server_name = Some("localhost".into());
    client
        .extra_headers
        .push(("x-forwarded-client".into(), "e2e".into()));
    let agent = h.agent(client.clone())?;
    wait_for_state(&agent, Duration::from_secs(20), "connected", |s| {
        s.connected
    })
    .await?;
    agent.shutdown().await;

    // Without the override the certificate does not match the IP: no connection.
    client.tls_server_name = None;
    let agent = h.agent(client)?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !agent.state.borrow().connected,
        "a certificate for localhost was accepted for 127.0.0.1"
    );
    agent.shutdown().await;
    Ok(())
}
