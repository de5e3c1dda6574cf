//! `RepoCache` against a real Git smart-HTTP server (`git http-backend`).

use std::time::{Duration, Instant};

use gitops_git::{Error, GitRef, GitServerConfig, Limits, RepoCache};
use test_support::git_http::{GitHttpServer, RequestCounts};

const PROJECT: &str = "group/project";

struct Fixture {
    server: GitHttpServer,
    cache: RepoCache,
    cache_dir: tempfile::TempDir,
}

impl Fixture {
    /// A server with `PROJECT` (public, one commit with `README.md` and `manifests/app.yaml`) and an
    /// anonymous cache.
    async fn new() -> anyhow::Result<(Self, String)> {
        install_crypto_provider();
        let server = GitHttpServer::start().await?;
        server.create_repo(PROJECT, false)?;
        let commit = server.commit_files(
            PROJECT,
            &[
                ("README.md", Some("# hello\n")),
                ("manifests/app.yaml", Some("kind: ConfigMap\n")),
            ],
            "initial",
        )?;
        let fixture = Self::with_server(server, None)?;
        Ok((fixture, commit))
    }

    fn with_server(
        server: GitHttpServer,
        credentials: Option<(&str, &str)>,
    ) -> anyhow::Result<Self> {
        Self::with_limits(server, credentials, Limits::default())
    }

    fn with_limits(
        server: GitHttpServer,
        credentials: Option<(&str, &str)>,
        limits: Limits,
    ) -> anyhow::Result<Self> {
        let cache_dir = tempfile::tempdir()?;
        let cache = RepoCache::with_limits(
            GitServerConfig {
                base_url: server.base_url(),
                username: credentials.map(|(user, _)| user.to_owned()),
                password: credentials.map(|(_, password)| password.to_owned()),
                extra_ca_pem: None,
            },
            cache_dir.path().to_path_buf(),
            limits,
        );
        Ok(Self {
            server,
            cache,
            cache_dir,
        })
    }

    /// `PROJECT` with one commit (`app.yaml` = `v: 0`) tagged `pinned`, and a cache compacted past
    /// `max_packs`; returns the commit too.
    async fn pinned_with_max_packs(max_packs: usize) -> anyhow::Result<(Self, String)> {
        install_crypto_provider();
        let server = GitHttpServer::start().await?;
        server.create_repo(PROJECT, false)?;
        let first = server.commit_files(PROJECT, &[("app.yaml", Some("v: 0\n"))], "v0")?;
        server.create_tag(PROJECT, "pinned", &first, false)?;
        let limits = Limits {
            max_packs,
            ..Limits::default()
        };
        Ok((Self::with_limits(server, None, limits)?, first))
    }

    fn counts(&self) -> RequestCounts {
        self.server.request_count(PROJECT)
    }
}

fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

#[tokio::test]
async fn resolves_default_branch_branch_tag_and_commit() -> anyhow::Result<()> {
    let (f, first) = Fixture::new().await?;
    let second = f
        .server
        .commit_files(PROJECT, &[("README.md", Some("# v2\n"))], "second")?;
    f.server.create_branch(PROJECT, "release", &first)?;
    let annotated = f.server.create_tag(PROJECT, "v1.0", &first, true)?;
    assert_ne!(annotated, first, "annotated tags are tag objects");
    f.server.create_tag(PROJECT, "light", &second, false)?;

    assert_eq!(
        f.cache.resolve(PROJECT, &GitRef::DefaultBranch).await?,
        second
    );
    assert_eq!(
        f.cache
            .resolve(PROJECT, &GitRef::Branch("main".into()))
            .await?,
        second
    );
    assert_eq!(
        f.cache
            .resolve(PROJECT, &GitRef::Branch("release".into()))
            .await?,
        first
    );
    assert_eq!(
        f.cache
            .resolve(PROJECT, &GitRef::Tag("v1.0".into()))
            .await?,
        first
    );
    assert_eq!(
        f.cache
            .resolve(PROJECT, &GitRef::Tag("light".into()))
            .await?,
        second
    );
    let counts = f.counts();
    assert_eq!(counts.fetches, 0, "resolving must not fetch: {counts:?}");

    // A commit resolves to itself without asking the server.
    assert_eq!(
        f.cache
            .resolve(PROJECT, &GitRef::Commit(first.clone()))
            .await?,
        first
    );
    assert_eq!(f.counts(), counts);

    // The default branch follows the server's HEAD.
    f.server.set_default_branch(PROJECT, "release")?;
    assert_eq!(
        f.cache.resolve(PROJECT, &GitRef::DefaultBranch).await?,
        first
    );
    Ok(())
}

#[tokio::test]
async fn missing_refs_and_invalid_input_are_reported() -> anyhow::Result<()> {
    let (f, _) = Fixture::new().await?;
    let err = f
        .cache
        .resolve(PROJECT, &GitRef::Branch("nope".into()))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::RefNotFound { project, reference } if project == PROJECT && reference.contains("nope")),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("nope") && err.to_string().contains(PROJECT),
        "{err}"
    );
    let err = f
        .cache
        .resolve(PROJECT, &GitRef::Tag("nope".into()))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::RefNotFound { .. }), "{err:?}");

    let err = f
        .cache
        .resolve(PROJECT, &GitRef::Commit("abc".into()))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidCommit { .. }), "{err:?}");
    let err = f
        .cache
        .resolve("../etc", &GitRef::DefaultBranch)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidProject { .. }), "{err:?}");

    // An empty repository has no default branch yet.
    f.server.create_repo("group/empty", false)?;
    let err = f
        .cache
        .resolve("group/empty", &GitRef::DefaultBranch)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::RefNotFound { .. }), "{err:?}");
    Ok(())
}

#[tokio::test]
async fn fetches_only_when_the_commit_is_missing() -> anyhow::Result<()> {
    let (f, first) = Fixture::new().await?;

    assert_eq!(
        f.cache.snapshot(PROJECT, &GitRef::DefaultBranch).await?,
        first
    );
    assert_eq!(f.counts().fetches, 1, "{:?}", f.counts());

    // Unchanged ref: the ref is checked, nothing is fetched.
    let before = f.counts();
    assert_eq!(
        f.cache.snapshot(PROJECT, &GitRef::DefaultBranch).await?,
        first
    );
    let after = f.counts();
    assert_eq!(after.fetches, before.fetches, "{after:?}");
    assert!(
        after.ls_refs + after.info_refs > before.ls_refs + before.info_refs,
        "{after:?}"
    );
    f.cache
        .ensure_commit(PROJECT, &GitRef::DefaultBranch, &first)
        .await?;
    assert_eq!(
        f.counts(),
        after,
        "ensure_commit of a cached commit must not touch the server"
    );

    // A new commit is picked up with one more fetch.
    let second = f.server.commit_files(
        PROJECT,
        &[
            ("README.md", Some("# changed\n")),
            ("manifests/app.yaml", None),
        ],
        "second",
    )?;
    assert_eq!(
        f.cache.snapshot(PROJECT, &GitRef::DefaultBranch).await?,
        second
    );
    assert_eq!(f.counts().fetches, after.fetches + 1, "{:?}", f.counts());
    let readme = f
        .cache
        .read_file(PROJECT, &second, "README.md", 1024)
        .await?;
    assert_eq!(readme.as_deref(), Some(&b"# changed\n"[..]));
    assert_eq!(
        f.cache
            .read_file(PROJECT, &second, "manifests/app.yaml", 1024)
            .await?,
        None
    );
    // The old commit is still readable.
    let old = f
        .cache
        .read_file(PROJECT, &first, "manifests/app.yaml", 1024)
        .await?;
    assert_eq!(old.as_deref(), Some(&b"kind: ConfigMap\n"[..]));
    Ok(())
}

#[tokio::test]
async fn fetches_commits_that_are_no_longer_a_ref_tip() -> anyhow::Result<()> {
    let (f, first) = Fixture::new().await?;
    let second = f
        .server
        .commit_files(PROJECT, &[("README.md", Some("# v2\n"))], "second")?;
    // `first` is now only reachable from history: fetched by id.
    f.cache
        .ensure_commit(PROJECT, &GitRef::DefaultBranch, &first)
        .await?;
    assert_eq!(
        f.cache
            .read_file(PROJECT, &first, "README.md", 1024)
            .await?
            .as_deref(),
        Some(&b"# hello\n"[..])
    );
    f.cache
        .ensure_commit(PROJECT, &GitRef::Commit(second.clone()), &second)
        .await?;
    assert_eq!(
        f.cache
            .read_file(PROJECT, &second, "README.md", 1024)
            .await?
            .as_deref(),
        Some(&b"# v2\n"[..])
    );

    // Unknown commits: the server refuses them, also after falling back to fetching the ref.
    let unknown = "0123456789abcdef0123456789abcdef01234567";
    for reference in [GitRef::DefaultBranch, GitRef::Commit(unknown.to_owned())] {
        let err = f
            .cache
            .ensure_commit(PROJECT, &reference, unknown)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::CommitNotFound { project, commit } if project == PROJECT && commit == unknown),
            "{err:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn works_with_protocol_v0_servers() -> anyhow::Result<()> {
    let (f, first) = Fixture::new().await?;
    f.server.set_protocol_v2(false);
    let second = f
        .server
        .commit_files(PROJECT, &[("README.md", Some("# v2\n"))], "second")?;
    f.server.create_tag(PROJECT, "v1", &first, true)?;

    assert_eq!(
        f.cache.resolve(PROJECT, &GitRef::DefaultBranch).await?,
        second
    );
    assert_eq!(
        f.cache.resolve(PROJECT, &GitRef::Tag("v1".into())).await?,
        first
    );
    let counts = f.counts();
    assert_eq!((counts.ls_refs, counts.fetches), (0, 0), "{counts:?}");

    // Over HTTP, v0 servers allow fetching commits reachable from a ref by id.
    f.cache
        .ensure_commit(PROJECT, &GitRef::DefaultBranch, &first)
        .await?;
    assert_eq!(f.counts().fetches, 1);
    let readme = f.cache.read_file(PROJECT, &first, "README.md", 100).await?;
    assert_eq!(readme.as_deref(), Some(&b"# hello\n"[..]));

    // Unreachable commits are refused; fetching the ref instead doesn't bring them either.
    let dangling = f
        .server
        .commit_files_to_branch(PROJECT, "tmp", &[("x", Some("x"))], "tmp")?;
    f.server.delete_branch(PROJECT, "tmp")?;
    let before = f.counts();
    let err = f
        .cache
        .ensure_commit(PROJECT, &GitRef::DefaultBranch, &dangling)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::CommitNotFound { .. }), "{err:?}");
    // Two connections: the refused fetch by id, then the ref, whose tip is already cached (no fetch).
    let after = f.counts();
    assert_eq!(after.info_refs, before.info_refs + 2, "{after:?}");
    assert_eq!(after.fetches, before.fetches + 1, "{after:?}");
    Ok(())
}

#[tokio::test]
async fn unresponsive_server_times_out() -> anyhow::Result<()> {
    install_crypto_provider();
    // Accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let silent = tokio::spawn(async move {
        let mut connections = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            connections.push(stream);
        }
    });
    let cache_dir = tempfile::tempdir()?;
    let cache = RepoCache::with_limits(
        GitServerConfig {
            base_url: format!("http://{addr}"),
            username: None,
            password: None,
            extra_ca_pem: None,
        },
        cache_dir.path().to_path_buf(),
        Limits {
            http_timeout: Duration::from_millis(500),
            ..Limits::default()
        },
    );
    let started = Instant::now();
    let err = cache
        .resolve(PROJECT, &GitRef::DefaultBranch)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Transport { .. }), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    silent.abort();
    Ok(())
}

#[tokio::test]
async fn reads_and_lists_files() -> anyhow::Result<()> {
    let (f, _) = Fixture::new().await?;
    let big = "x".repeat(10_000);
    let commit = f.server.commit_files(
        PROJECT,
        &[("big.bin", Some(&big)), ("deep/a/b/c.yaml", Some("c\n"))],
        "more",
    )?;
    f.cache
        .ensure_commit(PROJECT, &GitRef::DefaultBranch, &commit)
        .await?;

    let readme = f
        .cache
        .read_file(PROJECT, &commit, "README.md", 1024)
        .await?;
    assert_eq!(readme.as_deref(), Some(&b"# hello\n"[..]));
    let nested = f
        .cache
        .read_file(PROJECT, &commit, "/deep/a/./b/c.yaml", 1024)
        .await?;
    assert_eq!(nested.as_deref(), Some(&b"c\n"[..]));
    assert_eq!(
        f.cache
            .read_file(PROJECT, &commit, "missing.yaml", 1024)
            .await?,
        None
    );
    assert_eq!(
        f.cache.read_file(PROJECT, &commit, "deep/a", 1024).await?,
        None,
        "directories aren't files"
    );
    assert_eq!(
        f.cache
            .read_file(PROJECT, &commit, "big.bin", 10_000)
            .await?
            .map(|d| d.len()),
        Some(10_000)
    );

    let err = f
        .cache
        .read_file(PROJECT, &commit, "big.bin", 9_999)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::TooLarge { path, size: 10_000, limit: 9_999 } if path == "big.bin"),
        "{err:?}"
    );
    assert!(err.to_string().contains("big.bin"), "{err}");
    let err = f
        .cache
        .read_file(PROJECT, &commit, "../x", 10)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidPath { .. }), "{err:?}");

    let files = f.cache.list_files(PROJECT, &commit).await?;
    assert_eq!(
        files,
        vec![
            ("README.md".to_owned(), 8),
            ("big.bin".to_owned(), 10_000),
            ("deep/a/b/c.yaml".to_owned(), 2),
            ("manifests/app.yaml".to_owned(), 16),
        ]
    );

    // Commits that were never fetched can't be read.
    let unknown = "0123456789abcdef0123456789abcdef01234567";
    let err = f
        .cache
        .read_file(PROJECT, unknown, "README.md", 1024)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::CommitNotCached { .. }), "{err:?}");
    let err = f
        .cache
        .list_files("group/other", unknown)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::CommitNotCached { .. }), "{err:?}");
    Ok(())
}

#[tokio::test]
async fn private_projects_need_the_right_credentials() -> anyhow::Result<()> {
    install_crypto_provider();
    let server = GitHttpServer::start().await?;
    server.create_repo("group/private", true)?;
    let commit = server.commit_files(
        "group/private",
        &[("secret.yaml", Some("s: 1\n"))],
        "initial",
    )?;
    let (user, password) = server.credentials();
    let (user, password) = (user.to_owned(), password.to_owned());

    let authorized = Fixture::with_server(server, Some((&user, &password)))?;
    assert_eq!(
        authorized
            .cache
            .snapshot("group/private", &GitRef::DefaultBranch)
            .await?,
        commit
    );
    assert!(authorized.cache.exists("group/private").await?);
    let secret = authorized
        .cache
        .read_file("group/private", &commit, "secret.yaml", 100)
        .await?;
    assert_eq!(secret.as_deref(), Some(&b"s: 1\n"[..]));

    let wrong_password = "definitely-wrong-password";
    let cache_dir = tempfile::tempdir()?;
    let wrong = RepoCache::new(
        GitServerConfig {
            base_url: authorized.server.base_url(),
            username: Some(user.clone()),
            password: Some(wrong_password.to_owned()),
            extra_ca_pem: None,
        },
        cache_dir.path().to_path_buf(),
    );
    let err = wrong
        .resolve("group/private", &GitRef::DefaultBranch)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Unauthorized { project, .. } if project == "group/private"),
        "{err:?}"
    );
    assert!(
        !err.to_string().contains(wrong_password),
        "credentials leaked: {err}"
    );
    assert!(
        !format!("{err:?}").contains(wrong_password),
        "credentials leaked: {err:?}"
    );
    let err = wrong
        .snapshot("group/private", &GitRef::DefaultBranch)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unauthorized { .. }), "{err:?}");
    let err = wrong.exists("group/private").await.unwrap_err();
    assert!(matches!(err, Error::Unauthorized { .. }), "{err:?}");

    // Without credentials.
    let anonymous = Fixture::with_server(GitHttpServer::start().await?, None)?;
    anonymous.server.create_repo("group/private", true)?;
    let err = anonymous
        .cache
        .resolve("group/private", &GitRef::DefaultBranch)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unauthorized { .. }), "{err:?}");
    Ok(())
}

#[tokio::test]
async fn credentials_in_the_base_url_are_used_but_never_shown() -> anyhow::Result<()> {
    install_crypto_provider();
    let server = GitHttpServer::start().await?;
    server.create_repo("group/private", true)?;
    let commit = server.commit_files("group/private", &[("a", Some("a"))], "initial")?;
    let (user, password) = server.credentials();
    let cache_dir = tempfile::tempdir()?;
    let base_url = server
        .base_url()
        .replace("http://", &format!("http://{user}:{password}@"));
    let cache = RepoCache::new(
        GitServerConfig {
            base_url,
            username: None,
            password: None,
            extra_ca_pem: None,
        },
        cache_dir.path().to_path_buf(),
    );
    assert!(!format!("{cache:?}").contains(password));
    assert_eq!(
        cache
            .snapshot("group/private", &GitRef::DefaultBranch)
            .await?,
        commit
    );
    let err = cache
        .resolve("group/private", &GitRef::Branch("nope".into()))
        .await
        .unwrap_err();
    assert!(!err.to_string().contains(password), "{err}");
    Ok(())
}

#[tokio::test]
async fn missing_projects_are_not_found() -> anyhow::Result<()> {
    let (f, _) = Fixture::new().await?;
    assert!(f.cache.exists(PROJECT).await?);
    assert!(!f.cache.exists("group/missing").await?);
    let err = f
        .cache
        .resolve("group/missing", &GitRef::DefaultBranch)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::NotFound { project } if project == "group/missing"),
        "{err:?}"
    );
    assert!(err.to_string().contains("group/missing"), "{err}");
    let err = f
        .cache
        .snapshot("group/missing", &GitRef::Branch("main".into()))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
    Ok(())
}

#[tokio::test]
async fn unreachable_server_is_a_transport_error() -> anyhow::Result<()> {
    install_crypto_provider();
    // Bind and drop a listener to get a port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let cache_dir = tempfile::tempdir()?;
    let cache = RepoCache::new(
        GitServerConfig {
            base_url: format!("http://127.0.0.1:{port}"),
            username: None,
            password: None,
            extra_ca_pem: None,
        },
        cache_dir.path().to_path_buf(),
    );
    let err = cache
        .resolve(PROJECT, &GitRef::DefaultBranch)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Transport { project, .. } if project == PROJECT),
        "{err:?}"
    );
    let err = cache.exists(PROJECT).await.unwrap_err();
    assert!(matches!(err, Error::Transport { .. }), "{err:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_snapshots_fetch_once() -> anyhow::Result<()> {
    let (f, commit) = Fixture::new().await?;
    let snapshots: Vec<_> = (0..8)
        .map(|_| {
            let cache = f.cache.clone();
            tokio::spawn(async move { cache.snapshot(PROJECT, &GitRef::DefaultBranch).await })
        })
        .collect();
    for snapshot in snapshots {
        assert_eq!(snapshot.await??, commit);
    }
    assert_eq!(f.counts().fetches, 1, "{:?}", f.counts());
    Ok(())
}

#[tokio::test]
async fn cache_survives_a_restart() -> anyhow::Result<()> {
    let (f, commit) = Fixture::new().await?;
    let cache_dir = tempfile::tempdir()?;
    let config = GitServerConfig {
        base_url: f.server.base_url(),
        username: None,
        password: None,
        extra_ca_pem: None,
    };
    let first = RepoCache::new(config.clone(), cache_dir.path().to_path_buf());
    first.snapshot(PROJECT, &GitRef::DefaultBranch).await?;
    drop(first);
    let fetches = f.counts().fetches;

    let restarted = RepoCache::new(config, cache_dir.path().to_path_buf());
    assert_eq!(
        restarted
            .read_file(PROJECT, &commit, "README.md", 100)
            .await?
            .as_deref(),
        Some(&b"# hello\n"[..])
    );
    restarted.snapshot(PROJECT, &GitRef::DefaultBranch).await?;
    assert_eq!(f.counts().fetches, fetches);
    Ok(())
}

/// A Git server behind a private CA: refused (a TLS error naming the certificate problem) until kas is
/// given the CA, then used like any other; a bundle without certificates is refused up front.
#[tokio::test]
async fn https_servers_with_a_private_ca_need_that_ca() -> anyhow::Result<()> {
    install_crypto_provider();
    let server = GitHttpServer::start_tls().await?;
    server.create_repo(PROJECT, false)?;
    let commit = server.commit_files(
        PROJECT,
        &[("app.yaml", Some("kind: ConfigMap\n"))],
        "initial",
    )?;
    let ca = server
        .tls_certificate()
        .expect("TLS server")
        .as_bytes()
        .to_vec();
    let cache_dir = tempfile::tempdir()?;
    let cache = |extra_ca_pem: Option<Vec<u8>>| {
        RepoCache::new(
            GitServerConfig {
                base_url: server.base_url(),
                username: None,
                password: None,
                extra_ca_pem,
            },
            cache_dir.path().to_path_buf(),
        )
    };

    let err = cache(None)
        .resolve(PROJECT, &GitRef::DefaultBranch)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Transport { .. }), "{err:?}");
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "{err}"
    );

    assert_eq!(gitops_git::check_ca_certificates(&ca)?, 1);
    let trusted = cache(Some(ca));
    assert_eq!(
        trusted.resolve(PROJECT, &GitRef::DefaultBranch).await?,
        commit
    );
    trusted
        .ensure_commit(PROJECT, &GitRef::DefaultBranch, &commit)
        .await?;
    assert_eq!(
        trusted
            .read_file(PROJECT, &commit, "app.yaml", 1024)
            .await?,
        Some(b"kind: ConfigMap\n".to_vec())
    );

    let err = gitops_git::check_ca_certificates(b"not a certificate").unwrap_err();
    assert!(err.to_string().contains("CA certificates"), "{err}");
    Ok(())
}

/// Every fetch adds a pack and gitoxide cannot repack: past `max_packs` the cache is rebuilt from the
/// commits its refs point at, so the pack count stays bounded while every followed ref keeps its commit.
#[tokio::test]
async fn the_cache_is_compacted_when_packs_pile_up() -> anyhow::Result<()> {
    let (f, first) = Fixture::pinned_with_max_packs(3).await?;
    let (server, cache) = (&f.server, &f.cache);
    let packs = || -> anyhow::Result<usize> {
        Ok(
            std::fs::read_dir(f.cache_dir.path().join("group/project.git/objects/pack"))?
                .flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "pack"))
                .count(),
        )
    };
    let tag = GitRef::Tag("pinned".into());
    assert_eq!(cache.snapshot(PROJECT, &tag).await?, first);
    let mut most = 0;
    let mut last = first.clone();
    for i in 1..=8 {
        last = server.commit_files(PROJECT, &[("app.yaml", Some(&format!("v: {i}\n")))], "next")?;
        assert_eq!(cache.snapshot(PROJECT, &GitRef::DefaultBranch).await?, last);
        assert_eq!(
            cache.read_file(PROJECT, &last, "app.yaml", 1024).await?,
            Some(format!("v: {i}\n").into_bytes())
        );
        most = most.max(packs()?);
    }
    assert!(most <= 3, "{most} packs: never compacted");
    // The tag's commit survived every compaction, without fetching it again.
    let fetches = server.request_count(PROJECT).fetches;
    cache.ensure_commit(PROJECT, &tag, &first).await?;
    assert_eq!(server.request_count(PROJECT).fetches, fetches);
    assert_eq!(
        cache.read_file(PROJECT, &first, "app.yaml", 1024).await?,
        Some(b"v: 0\n".to_vec())
    );
    assert_ne!(first, last);
    Ok(())
}

/// Compaction swaps the repository directory: readers running at the same time never see it missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_during_compaction_never_fail() -> anyhow::Result<()> {
    let (f, first) = Fixture::pinned_with_max_packs(2).await?;
    let (server, cache) = (&f.server, &f.cache);
    let tag = GitRef::Tag("pinned".into());
    cache.snapshot(PROJECT, &tag).await?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let (cache, first, stop) = (cache.clone(), first.clone(), stop.clone());
            tokio::spawn(async move {
                let mut reads = 0u32;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let data = cache.read_file(PROJECT, &first, "app.yaml", 1024).await?;
                    anyhow::ensure!(data.as_deref() == Some(&b"v: 0\n"[..]), "{data:?}");
                    reads += 1;
                }
                Ok::<_, anyhow::Error>(reads)
            })
        })
        .collect();
    for i in 1..=10 {
        let commit =
            server.commit_files(PROJECT, &[("app.yaml", Some(&format!("v: {i}\n")))], "next")?;
        assert_eq!(
            cache.snapshot(PROJECT, &GitRef::DefaultBranch).await?,
            commit
        );
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for reader in readers {
        let reads = reader.await??;
        assert!(reads > 0);
    }
    Ok(())
}
