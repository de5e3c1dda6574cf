//! The test Gitea takes repositories created through its API and pushes over HTTP, and delivers signed push
//! webhooks to loopback addresses. Needs `cargo xtask test`.

use std::time::Duration;

use test_support::gitea::{Gitea, push_files};
use test_support::webhook::{WebhookReceiver, verify_hmac_sha256};

#[tokio::test]
async fn push_over_http_fires_a_signed_push_webhook() {
    let gitea = Gitea::from_env();
    let repo = gitea
        .create_repository("smoke-webhook")
        .await
        .expect("create repository");
    let mut receiver = WebhookReceiver::start()
        .await
        .expect("start webhook receiver");
    let secret = "webhook-secret-for-the-smoke-test";
    gitea
        .add_push_webhook(&repo, &receiver.url, secret)
        .await
        .expect("add webhook");

    let pushed = {
        let repo = repo.clone();
        tokio::task::spawn_blocking(move || {
            push_files(
                &repo,
                "main",
                &[("manifests/app.yaml", "kind: ConfigMap\n")],
                "first commit",
            )
        })
        .await
        .expect("join")
        .expect("push over HTTP")
    };

    let delivery = receiver
        .next_delivery(Duration::from_secs(60))
        .await
        .expect("no webhook delivery within 60s");
    assert_eq!(delivery.method, http::Method::POST);
    assert_eq!(delivery.header("X-Gitea-Event"), Some("push"));
    let signature = delivery
        .header("X-Gitea-Signature")
        .expect("X-Gitea-Signature header");
    assert!(
        verify_hmac_sha256(secret.as_bytes(), &delivery.body, signature),
        "signature does not verify"
    );
    assert!(
        !verify_hmac_sha256(b"another secret", &delivery.body, signature),
        "signature verifies under any key"
    );

    let payload: serde_json::Value = serde_json::from_slice(&delivery.body).expect("JSON payload");
    assert_eq!(payload["ref"], "refs/heads/main");
    assert_eq!(payload["after"], pushed.as_str());
    assert_eq!(payload["repository"]["full_name"], repo.full_name.as_str());

    gitea
        .delete_repository(&repo)
        .await
        .expect("delete repository");
}
