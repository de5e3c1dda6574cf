//! kwok serves the kubelet's streaming API for its fake pods, straight from kubectl through the real
//! apiserver (no kas): `logs` and `logs -f` of a file the test writes, `exec -i` echoing stdin,
//! `kubectl cp` both ways, and `port-forward` to a local echo server. The Kubernetes API proxy tests rely on
//! all of these. Needs the test environment (`cargo xtask cluster up`).

use std::time::{Duration, Instant};

use test_support::cluster::TestNamespace;
use test_support::kubectl::{Tool, port_forward};
use test_support::kwok::{
    PodLogFile, create_running_pod, echo_server, set_pod_logs, set_pod_port_forward,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// kwok reads `Logs` and `PortForward` objects through an informer: the first request may come before it
/// has seen them, so it is retried for a short while.
async fn retry<T, E: std::fmt::Display, F, Fut>(what: &str, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let started = Instant::now();
    loop {
        match attempt().await {
            Ok(value) => return value,
            Err(err) if started.elapsed() < Duration::from_secs(20) => {
                eprintln!("{what}: {err}; retrying");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(err) => panic!("{what}: {err}"),
        }
    }
}

#[tokio::test]
async fn kubectl_logs_exec_cp_and_port_forward_reach_kwok_pods() -> anyhow::Result<()> {
    let ns = TestNamespace::create("kwok-streaming").await?;
    let namespace = ns.name.clone();
    create_running_pod(&ns.client, &namespace, "fake").await?;
    let kubectl = Tool::admin_kubectl().with_args(&["--namespace", &namespace]);
    let dir = tempfile::tempdir()?;

    // logs: what the file holds, then lines appended while `logs -f` runs.
    let log = PodLogFile::create(&dir.path().join("fake.log"))?;
    log.append("first line")?;
    set_pod_logs(&ns.client, &namespace, "fake", &log.path).await?;
    let output = retry("kubectl logs", || kubectl.run(&["logs", "fake"], None)).await;
    assert_eq!(output.stdout, "first line\n");
    let mut follow = kubectl.stream(&["logs", "-f", "fake"])?;
    follow
        .wait_for_line("the existing line", Duration::from_secs(20), |l| {
            l == "first line"
        })
        .await?;
    log.append("appended later")?;
    follow
        .wait_for_line("the appended line", Duration::from_secs(20), |l| {
            l == "appended later"
        })
        .await?;
    follow.child.kill().await?;

    // exec: stdin reaches the command and its output comes back; a failing command fails kubectl.
    // (`head -n 1`, not `cat`: kwok never closes the command's stdin, see xtask/src/cluster/local.rs.)
    let output = kubectl
        .run(
            &["exec", "-i", "fake", "--", "head", "-n", "1"],
            Some(b"hello through exec\nnot this\n"),
        )
        .await?;
    assert_eq!(output.stdout, "hello through exec\n");
    let failed = kubectl
        .run(&["exec", "fake", "--", "sh", "-c", "exit 3"], None)
        .await
        .expect_err("exit 3 must fail");
    assert!(
        failed.stderr().contains('3'),
        "the exit status is reported: {failed}"
    );

    // cp: kwok runs the pod's side (tar) on this machine, so the "pod path" is a local path.
    let source = dir.path().join("source.txt");
    std::fs::write(&source, "copied content\n")?;
    let into_pod = dir.path().join("in-pod");
    std::fs::create_dir(&into_pod)?;
    let pod_path = into_pod.join("copied.txt");
    kubectl
        .run(
            &[
                "cp",
                &source.display().to_string(),
                &format!("fake:{}", pod_path.display()),
            ],
            None,
        )
        .await?;
    assert_eq!(std::fs::read_to_string(&pod_path)?, "copied content\n");
    let back = dir.path().join("back.txt");
    kubectl
        .run(
            &[
                "cp",
                &format!("fake:{}", pod_path.display()),
                &back.display().to_string(),
            ],
            None,
        )
        .await?;
    assert_eq!(std::fs::read_to_string(&back)?, "copied content\n");

    // port-forward: bytes go to the local echo server and come back.
    let echo = echo_server().await?;
    set_pod_port_forward(&ns.client, &namespace, "fake", 8080, echo.addr).await?;
    let (mut forward, port) =
        port_forward(&Tool::admin_kubectl(), &namespace, "pod/fake", 8080).await?;
    let reply = retry("a round trip through port-forward", || async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream.write_all(b"ping through port-forward").await?;
        let mut buf = vec![0u8; 25];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut buf)).await??;
        anyhow::Ok(buf)
    })
    .await;
    assert_eq!(reply, b"ping through port-forward");
    forward.child.kill().await?;

    ns.delete().await?;
    Ok(())
}
