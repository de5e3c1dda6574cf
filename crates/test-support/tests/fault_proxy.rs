//! The fault proxy's own tests, on loopback only: each fault against real TCP (and TLS, HTTP) servers.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use test_support::fault_proxy::{Fault, FaultProxy};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// Echoes every byte back.
async fn echo_server() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Ok(addr)
}

/// Sends `size` bytes (`0, 1, 2, …` mod 251) to every client, then closes.
async fn talker(size: usize) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let data = data.clone();
            tokio::spawn(async move {
                let _ = stream.write_all(&data).await;
                let _ = stream.shutdown().await;
                // Hold the socket until the client is done, so the close is not what the test sees.
                let mut sink = [0u8; 64];
                let _ = stream.read(&mut sink).await;
            });
        }
    });
    Ok(addr)
}

/// A minimal HTTP/1.1 server answering every request with `200 OK` and body `ok`, keeping connections alive.
async fn http_ok_server() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_request| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from_static(b"ok")),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

async fn roundtrip(stream: &mut TcpStream, data: &[u8]) -> anyhow::Result<Vec<u8>> {
    stream.write_all(data).await?;
    let mut got = vec![0u8; data.len()];
    stream.read_exact(&mut got).await?;
    Ok(got)
}

fn is_reset(err: &std::io::Error) -> bool {
    matches!(
        err.kind(),
        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
    )
}

/// Reads until EOF or an error; returns what arrived and the error.
async fn read_all(stream: &mut TcpStream) -> (Vec<u8>, Option<std::io::Error>) {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => return (got, None),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(err) => return (got, Some(err)),
        }
    }
}

#[tokio::test]
async fn pass_through_forwards_and_counts() -> anyhow::Result<()> {
    let proxy = FaultProxy::start(echo_server().await?).await?;
    assert_eq!(proxy.fault(), Fault::PassThrough);
    let mut stream = TcpStream::connect(proxy.addr()).await?;
    assert_eq!(roundtrip(&mut stream, b"hello").await?, b"hello");
    assert_eq!(roundtrip(&mut stream, b"again").await?, b"again");
    let stats = proxy.stats();
    assert_eq!(
        (
            stats.accepted,
            stats.open,
            stats.bytes_to_target,
            stats.bytes_to_client
        ),
        (1, 1, 10, 10),
        "{stats:?}"
    );
    drop(stream);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(proxy.stats().open, 0, "{:?}", proxy.stats());
    assert_eq!(
        proxy.proxied_url("http://127.0.0.1:1/x/y"),
        format!("http://{}/x/y", proxy.addr())
    );
    Ok(())
}

/// A reset reaches an idle open connection at once, and every new connection after its accept; pass-through
/// brings new connections back.
#[tokio::test]
async fn reset_closes_open_and_new_connections() -> anyhow::Result<()> {
    let proxy = FaultProxy::start(echo_server().await?).await?;
    let mut open = TcpStream::connect(proxy.addr()).await?;
    assert_eq!(roundtrip(&mut open, b"before").await?, b"before");

    proxy.set(Fault::Reset);
    let mut buf = [0u8; 16];
    let err = tokio::time::timeout(Duration::from_secs(5), open.read(&mut buf))
        .await?
        .expect_err("an open connection is reset");
    assert!(is_reset(&err), "{err:?}");

    let mut new = TcpStream::connect(proxy.addr()).await?;
    let err = tokio::time::timeout(Duration::from_secs(5), new.read(&mut buf))
        .await?
        .expect_err("a new connection is reset");
    assert!(is_reset(&err), "{err:?}");
    assert_eq!(proxy.stats().resets, 2, "{:?}", proxy.stats());

    proxy.set(Fault::PassThrough);
    let mut after = TcpStream::connect(proxy.addr()).await?;
    assert_eq!(roundtrip(&mut after, b"after").await?, b"after");
    Ok(())
}

/// A stall accepts and holds: nothing is answered on open or new connections until pass-through resumes
/// both.
#[tokio::test]
async fn stall_holds_connections_until_released() -> anyhow::Result<()> {
    let proxy = FaultProxy::start(echo_server().await?).await?;
    let mut open = TcpStream::connect(proxy.addr()).await?;
    assert_eq!(roundtrip(&mut open, b"1").await?, b"1");

    proxy.set(Fault::Stall);
    let mut new = TcpStream::connect(proxy.addr()).await?;
    open.write_all(b"open").await?;
    new.write_all(b"new!").await?;
    let mut buf = [0u8; 4];
    assert!(
        tokio::time::timeout(Duration::from_millis(500), open.read_exact(&mut buf))
            .await
            .is_err(),
        "a stalled open connection answered"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(500), new.read_exact(&mut buf))
            .await
            .is_err(),
        "a stalled new connection answered"
    );
    assert_eq!(proxy.stats().bytes_to_target, 1, "{:?}", proxy.stats());
    assert_eq!(proxy.stats().open, 2);

    proxy.set(Fault::PassThrough);
    tokio::time::timeout(Duration::from_secs(5), open.read_exact(&mut buf)).await??;
    assert_eq!(&buf, b"open");
    tokio::time::timeout(Duration::from_secs(5), new.read_exact(&mut buf)).await??;
    assert_eq!(&buf, b"new!");
    Ok(())
}

/// A trickle delivers every byte, in order, `bytes` per `every`.
#[tokio::test]
async fn trickle_slows_answers_down() -> anyhow::Result<()> {
    let proxy = FaultProxy::start(talker(10).await?).await?;
    proxy.set(Fault::Trickle {
        bytes: 2,
        every: Duration::from_millis(200),
    });
    let started = Instant::now();
    let mut stream = TcpStream::connect(proxy.addr()).await?;
    let mut first = [0u8; 2];
    stream.read_exact(&mut first).await?;
    let (rest, err) = read_all(&mut stream).await;
    let elapsed = started.elapsed();
    assert!(err.is_none(), "{err:?}");
    let all: Vec<u8> = first.iter().chain(&rest).copied().collect();
    assert_eq!(all, (0..10u8).collect::<Vec<_>>());
    // Five pieces, four waits between them.
    assert!(elapsed >= Duration::from_millis(800), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    Ok(())
}

/// "After N bytes, reset" cuts an answer after exactly N bytes, on every connection.
#[tokio::test]
async fn reset_after_cuts_answers_mid_way() -> anyhow::Result<()> {
    let proxy = FaultProxy::start(talker(200_000).await?).await?;
    proxy.set(Fault::ResetAfter { bytes: 1000 });
    for _ in 0..2 {
        let mut stream = TcpStream::connect(proxy.addr()).await?;
        let (got, err) = read_all(&mut stream).await;
        assert_eq!(got.len(), 1000);
        assert_eq!(got, (0..1000).map(|i| (i % 251) as u8).collect::<Vec<_>>());
        let err = err.expect("the connection is reset, not closed");
        assert!(is_reset(&err), "{err:?}");
    }
    assert_eq!(proxy.stats().resets, 2, "{:?}", proxy.stats());
    proxy.set(Fault::PassThrough);
    let mut stream = TcpStream::connect(proxy.addr()).await?;
    let (got, err) = read_all(&mut stream).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(got.len(), 200_000);
    Ok(())
}

/// 503s for new requests, on new connections and on a kept-alive one, without reaching the target.
#[tokio::test]
async fn service_unavailable_answers_http_requests() -> anyhow::Result<()> {
    let proxy = FaultProxy::start(http_ok_server().await?).await?;
    let url = proxy.proxied_url("http://127.0.0.1/some/path");
    let client = reqwest::Client::new();
    let response = client.get(&url).send().await?;
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await?, "ok");
    assert_eq!(proxy.stats().accepted, 1);

    proxy.set(Fault::ServiceUnavailable);
    let target_bytes = proxy.stats().bytes_to_target;
    // The pooled connection: its next request is answered by the proxy.
    let response = client.get(&url).send().await?;
    assert_eq!(response.status(), 503);
    assert_eq!(
        proxy.stats().accepted,
        1,
        "the kept-alive connection was used"
    );
    assert_eq!(response.headers()["retry-after"], "1");
    let status: serde_json::Value = response.json().await?;
    assert_eq!(status["code"], 503);
    assert_eq!(status["reason"], "ServiceUnavailable");
    // New connections, with and without a body.
    let response = client.post(&url).body(vec![b'x'; 100_000]).send().await?;
    assert_eq!(response.status(), 503);
    let response = reqwest::Client::new().get(&url).send().await?;
    assert_eq!(response.status(), 503);
    assert_eq!(proxy.stats().unavailable, 3, "{:?}", proxy.stats());
    assert_eq!(proxy.stats().bytes_to_target, target_bytes);

    proxy.set(Fault::PassThrough);
    assert_eq!(client.get(&url).send().await?.status(), 200);
    Ok(())
}

/// With TLS termination the proxy shows its own CA's certificate, reaches an HTTPS target (here the Git
/// server behind a private CA) over TLS, and can answer 503 inside TLS.
#[tokio::test]
async fn terminating_tls_proxies_https_and_answers_503() -> anyhow::Result<()> {
    test_support::cluster::install_crypto_provider();
    let server = test_support::git_http::GitHttpServer::start_tls().await?;
    server.create_repo("group/project", false)?;
    server.commit_files("group/project", &[("a", Some("a"))], "first")?;
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject as _;
    roots.add(rustls::pki_types::CertificateDer::from_pem_slice(
        server.tls_certificate().expect("TLS").as_bytes(),
    )?)?;
    let upstream = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let target: SocketAddr = format!(
        "127.0.0.1:{}",
        server.base_url().rsplit(':').next().unwrap()
    )
    .parse()?;
    let proxy = FaultProxy::start_terminating_tls(target, upstream, "localhost").await?;
    let url = format!(
        "{}/group/project.git/info/refs?service=git-upload-pack",
        proxy.proxied_url(&server.base_url())
    );
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let ca = reqwest::Certificate::from_pem(proxy.ca_pem().expect("TLS proxy").as_bytes())?;
    let client = reqwest::Client::builder().tls_certs_only([ca]).build()?;
    let response = client.get(&url).send().await?;
    assert_eq!(response.status(), 200);
    assert!(response.text().await?.contains("refs/heads/main"));
    assert_eq!(server.request_count("group/project").info_refs, 1);

    proxy.set(Fault::ServiceUnavailable);
    let response = client.get(&url).send().await?;
    assert_eq!(response.status(), 503);
    assert_eq!(server.request_count("group/project").info_refs, 1);

    // A client that trusts only the Git server's CA refuses the proxy's certificate.
    proxy.set(Fault::PassThrough);
    let server_ca = reqwest::Certificate::from_pem(server.tls_certificate().unwrap().as_bytes())?;
    let other = reqwest::Client::builder()
        .tls_certs_only([server_ca])
        .build()?;
    assert!(other.get(&url).send().await.is_err());
    Ok(())
}

/// Dropping the proxy closes its connections, so no test leaks a held connection.
#[tokio::test]
async fn dropping_the_proxy_closes_its_connections() -> anyhow::Result<()> {
    let proxy = FaultProxy::start(echo_server().await?).await?;
    let mut stream = TcpStream::connect(proxy.addr()).await?;
    assert_eq!(roundtrip(&mut stream, b"x").await?, b"x");
    proxy.set(Fault::Stall);
    drop(proxy);
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await?;
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    Ok(())
}
