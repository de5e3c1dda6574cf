//! The client's request against the replay server: the server-side filter keeps only what agentk asked for,
//! and a stopped server ends the stream so the client sees it.

use std::time::Duration;

use gitops_hubble::{
    RelayConfig, channel, dropped_flows_request, event_type,
    flow::{CiliumEventType, Flow, Verdict},
    observer::{get_flows_response::ResponseTypes, observer_client::ObserverClient},
    testing::ReplayServer,
};

fn flow(verdict: Verdict, event: i32, uuid: &str) -> Flow {
    Flow {
        verdict: verdict as i32,
        event_type: Some(CiliumEventType {
            r#type: event,
            sub_type: 0,
        }),
        uuid: uuid.into(),
        ..Default::default()
    }
}

fn client(server: &ReplayServer) -> ObserverClient<tonic::transport::Channel> {
    ObserverClient::new(
        channel(&RelayConfig {
            address: server.address(),
            tls: None,
            connect_timeout: Duration::from_secs(2),
        })
        .unwrap(),
    )
}

#[tokio::test]
async fn only_requested_verdicts_arrive_and_a_stop_ends_the_stream() {
    let mut server = ReplayServer::start().await.unwrap();
    let mut flows = client(&server)
        .get_flows(dropped_flows_request(&[Verdict::Dropped]))
        .await
        .unwrap()
        .into_inner();
    assert!(server.wait_for_followers(1, Duration::from_secs(5)).await);
    server.send([
        flow(Verdict::Forwarded, event_type::DROP, "forwarded"),
        // A policy verdict for a dropped packet comes with a drop event too: only the drop is asked for.
        flow(Verdict::Dropped, event_type::POLICY_VERDICT, "verdict"),
        flow(Verdict::Audit, event_type::POLICY_VERDICT, "audit"),
        flow(Verdict::Dropped, event_type::DROP, "drop"),
    ]);
    let first = flows.message().await.unwrap().unwrap();
    match first.response_types {
        Some(ResponseTypes::Flow(f)) => assert_eq!(f.uuid, "drop"),
        other => panic!("expected the drop, got {other:?}"),
    }
    server.stop().await;
    let end = tokio::time::timeout(Duration::from_secs(5), flows.message())
        .await
        .expect("the stream ends when the server stops");
    assert!(end.is_err(), "{end:?}");
    // Down: a new call fails; back up on the same port, the same client follows again.
    let mut c = client(&server);
    assert!(
        c.get_flows(dropped_flows_request(&[Verdict::Dropped]))
            .await
            .is_err()
    );
    server.start_again().await.unwrap();
    let mut again = c
        .get_flows(dropped_flows_request(&[Verdict::Dropped, Verdict::Audit]))
        .await
        .unwrap()
        .into_inner();
    assert!(server.wait_for_followers(1, Duration::from_secs(5)).await);
    server.send([flow(Verdict::Audit, event_type::POLICY_VERDICT, "audit")]);
    match again.message().await.unwrap().unwrap().response_types {
        Some(ResponseTypes::Flow(f)) => assert_eq!(f.uuid, "audit"),
        other => panic!("expected the audit verdict, got {other:?}"),
    }
    assert_eq!(server.requests().len(), 2);
}

#[tokio::test]
async fn unsupported_filters_are_refused_not_ignored() {
    let server = ReplayServer::start().await.unwrap();
    let mut request = dropped_flows_request(&[Verdict::Dropped]);
    request.whitelist[0].source_pod = vec!["shop/".into()];
    let err = client(&server).get_flows(request).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented, "{err}");
}

#[tokio::test]
async fn a_client_that_goes_away_is_no_longer_a_follower() {
    let server = ReplayServer::start().await.unwrap();
    let flows = client(&server)
        .get_flows(dropped_flows_request(&[Verdict::Dropped]))
        .await
        .unwrap();
    assert!(server.wait_for_followers(1, Duration::from_secs(5)).await);
    drop(flows);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while server.followers() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "still a follower");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
