//! TLS to the relay as Cilium sets it up with `hubble.tls.enabled`: the relay's certificate for a name
//! that is not its address (`*.hubble-relay.cilium.io`), and client certificates required.

use std::{sync::Arc, time::Duration};

use gitops_hubble::{
    RelayConfig, RelayTls, channel, dropped_flows_request, flow::Verdict,
    observer::observer_client::ObserverClient, testing::ReplayServer,
};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

struct Pki {
    ca_pem: String,
    server: rustls::ServerConfig,
    client_cert_pem: String,
    client_key_pem: String,
}

fn pki() -> Pki {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "hubble-ca.cilium.io");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        (cert, key)
    };
    let (server_cert, server_key) = leaf("ui.hubble-relay.cilium.io");
    let (client_cert, client_key) = leaf("agentk.hubble-relay.cilium.io");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca.der().to_vec())).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
        .build()
        .unwrap();
    let server = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![server_cert.der().clone()],
            PrivateKeyDer::try_from(server_key.serialize_der()).unwrap(),
        )
        .unwrap();
    Pki {
        ca_pem: ca.pem(),
        server,
        client_cert_pem: client_cert.pem(),
        client_key_pem: client_key.serialize_pem(),
    }
}

async fn follow(server: &ReplayServer, tls: RelayTls) -> Result<(), tonic::Status> {
    let config = RelayConfig {
        address: server.address(),
        tls: Some(tls),
        connect_timeout: Duration::from_secs(2),
    };
    let mut client = ObserverClient::new(channel(&config).expect("config is usable"));
    client
        .get_flows(dropped_flows_request(&[Verdict::Dropped]))
        .await
        .map(|_| ())
}

#[tokio::test]
async fn mutual_tls_with_the_relays_server_name() {
    let relay_pki = pki();
    let server = ReplayServer::start_tls(relay_pki.server.clone())
        .await
        .unwrap();
    let good = RelayTls {
        ca_pem: Some(relay_pki.ca_pem.clone().into_bytes()),
        client_pem: Some((
            relay_pki.client_cert_pem.clone().into_bytes(),
            relay_pki.client_key_pem.clone().into_bytes(),
        )),
        server_name: Some("ui.hubble-relay.cilium.io".into()),
    };
    follow(&server, good.clone())
        .await
        .expect("mutual TLS works");
    assert!(server.wait_for_followers(1, Duration::from_secs(5)).await);

    // Each missing piece fails: no client certificate, the address's own name, an unknown CA.
    let no_client = RelayTls {
        client_pem: None,
        ..good.clone()
    };
    assert!(follow(&server, no_client).await.is_err());
    let wrong_name = RelayTls {
        server_name: None,
        ..good.clone()
    };
    assert!(follow(&server, wrong_name).await.is_err());
    let other_ca = RelayTls {
        ca_pem: Some(self::pki().ca_pem.into_bytes()),
        ..good
    };
    assert!(follow(&server, other_ca).await.is_err());
}

#[test]
fn unreadable_tls_material_is_refused_before_dialling() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let bad = |tls: RelayTls| {
        channel(&RelayConfig {
            address: "127.0.0.1:4245".into(),
            tls: Some(tls),
            connect_timeout: Duration::from_secs(1),
        })
        .unwrap_err()
        .to_string()
    };
    let err = bad(RelayTls {
        ca_pem: Some(b"not pem".to_vec()),
        ..Default::default()
    });
    assert!(err.contains("ca_file"), "{err}");
    let err = bad(RelayTls {
        client_pem: Some((b"".to_vec(), b"".to_vec())),
        ..Default::default()
    });
    assert!(err.contains("cert_file"), "{err}");
    let missing = RelayTls::from_files(
        Some(std::path::Path::new("/nonexistent/ca.crt")),
        None,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(missing.contains("/nonexistent/ca.crt"), "{missing}");
    let address = channel(&RelayConfig {
        address: "relay-without-port".into(),
        tls: None,
        connect_timeout: Duration::from_secs(1),
    })
    .unwrap_err()
    .to_string();
    assert!(address.contains("relay-without-port"), "{address}");
}
