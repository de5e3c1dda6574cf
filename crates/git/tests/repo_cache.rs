//! `RepoCache` against a real Git smart-HTTP server (`git http-backend`).

use std::time::{Duration, Instant};

use gitops_git::{Error, GitRef, GitServerConfig, Limits, RepoCache};
use test_support::fault_proxy::{Fault, FaultProxy};
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
        let base_url = server.base_url();
        Self::with_base_url(server, &base_url, credentials, limits)
    }

    /// A cache that reaches `server` through a [`FaultProxy`], returned too.
    async fn through_proxy(
        server: GitHttpServer,
        limits: Limits,
    ) -> anyhow::Result<(Self, FaultProxy)> {
        let proxy = FaultProxy::for_url(&server.base_url()).await?;
        let base_url = proxy.proxied_url(&server.base_url());
        Ok((Self::with_base_url(server, &base_url, None, limits)?, proxy))
    }

    fn with_base_url(
        server: GitHttpServer,
        base_url: &str,
        credentials: Option<(&str, &str)>,
        limits: Limits,
    ) -> anyhow::Result<Self> {
        let cache_dir = tempfile::tempdir()?;
        let cache = RepoCache::with_limits(
            GitServerConfig {
                base_url: base_url.to_owned(),
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

    /// The cached repository of `PROJECT`.
    fn repo_dir(&self) -> std::path::PathBuf {
        self.cache_dir.path().join("group/project.git")
    }

    fn packs(&self) -> usize {
        std::fs::read_dir(self.repo_dir().join("objects/pack"))
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "pack"))
                    .count()
            })
            .unwrap_or(0)
    }

    /// A new cache over the same directory and server: kas restarted.
    fn restarted(&self, limits: Limits) -> RepoCache {
        RepoCache::with_limits(
            GitServerConfig {
                base_url: self.server.base_url(),
                username: None,
                password: None,
                extra_ca_pem: None,
            },
            self.cache_dir.path().to_path_buf(),
            limits,
        )
    }

    /// Commits `count` changes of `app.yaml` to `main`, fetching each through the default branch.
    async fn push_and_fetch(&self, count: usize) -> anyhow::Result<String> {
        let mut last = String::new();
        for i in 0..count {
            last = self.server.commit_files(
                PROJECT,
                &[("app.yaml", Some(&format!("pushed: {i}\n")))],
                "next",
            )?;
            assert_eq!(
                self.cache.snapshot(PROJECT, &GitRef::DefaultBranch).await?,
                last
            );
        }
        Ok(last)
    }
}

/// Names of the `.tmp-*` directories anywhere under `dir`.
fn leftovers(dir: &std::path::Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(".tmp-") {
            found.push(name);
        } else if entry.path().is_dir() && !name.ends_with(".git") {
            found.extend(leftovers(&entry.path()));
        }
    }
    found
}

/// Incompressible content, so a pack is about as large as the file.
fn random_text(len: usize) -> String {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            char::from(b'a' + (state % 26) as u8)
        })
        .collect()
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

/// S7: several agents pin different commits of one project. Each pinned commit has its own local ref, so
/// every one of them survives compaction and stays readable without a fetch (kas's watcher of a pinned
/// commit never fetches again).
#[tokio::test]
async fn every_pinned_commit_survives_compaction() -> anyhow::Result<()> {
    let (f, first) = Fixture::pinned_with_max_packs(3).await?;
    let second =
        f.server
            .commit_files(PROJECT, &[("app.yaml", Some("v: pinned 2\n"))], "second")?;
    for commit in [&first, &second] {
        f.cache
            .ensure_commit(PROJECT, &GitRef::Commit(commit.clone()), commit)
            .await?;
    }
    f.push_and_fetch(8).await?;
    assert!(f.packs() <= 3, "{} packs: never compacted", f.packs());
    let fetches = f.counts().fetches;
    for (commit, content) in [(&first, "v: 0\n"), (&second, "v: pinned 2\n")] {
        assert_eq!(
            f.cache.read_file(PROJECT, commit, "app.yaml", 1024).await?,
            Some(content.as_bytes().to_vec()),
            "pinned commit {commit} lost by compaction"
        );
        f.cache
            .ensure_commit(PROJECT, &GitRef::Commit(commit.clone()), commit)
            .await?;
    }
    assert_eq!(
        f.counts().fetches,
        fetches,
        "a pinned commit was fetched again"
    );
    Ok(())
}

/// S8: a tag is deleted on the server after its (otherwise unreachable) commit was cached, and the server
/// collects the commit. Compaction leaves that tip out and succeeds, instead of failing after every fetch
/// while packs pile up.
#[tokio::test]
async fn compaction_skips_a_tip_the_server_no_longer_serves() -> anyhow::Result<()> {
    let (f, _) = Fixture::pinned_with_max_packs(3).await?;
    let gone = f.server.commit_files_to_branch(
        PROJECT,
        "side",
        &[("app.yaml", Some("side\n"))],
        "side",
    )?;
    f.server.create_tag(PROJECT, "gone", &gone, false)?;
    let tag = GitRef::Tag("gone".into());
    assert_eq!(f.cache.snapshot(PROJECT, &tag).await?, gone);
    f.server.delete_tag(PROJECT, "gone")?;
    f.server.delete_branch(PROJECT, "side")?;
    f.server.collect_garbage(PROJECT)?;

    let last = f.push_and_fetch(10).await?;
    assert!(
        f.packs() <= 3,
        "{} packs: compaction failed on the unfetchable tip",
        f.packs()
    );
    assert_eq!(
        f.cache.read_file(PROJECT, &last, "app.yaml", 1024).await?,
        Some(b"pushed: 9\n".to_vec())
    );
    // The tag's commit is gone from the cache, as from the server.
    let err = f
        .cache
        .read_file(PROJECT, &gone, "app.yaml", 1024)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::CommitNotCached { .. }), "{err:?}");
    Ok(())
}

/// S9, first half: kas killed during a compaction before the renames (the scratch repository is half
/// fetched). Simulated by creating the scratch directory a kill would leave next to the intact cache, then
/// starting a new cache over the directory: it removes the leftover and serves the old cache unchanged.
#[tokio::test]
async fn a_compaction_killed_before_the_swap_leaks_nothing() -> anyhow::Result<()> {
    let (f, commit) = Fixture::new().await?;
    f.cache.snapshot(PROJECT, &GitRef::DefaultBranch).await?;
    let scratch = f.cache_dir.path().join("group/.tmp-4242-1.git");
    std::fs::create_dir_all(scratch.join("objects/pack"))?;
    std::fs::write(scratch.join("objects/pack/tmp_pack_half"), b"half a pack")?;
    let fetches = f.counts().fetches;

    let restarted = f.restarted(Limits::default());
    assert_eq!(leftovers(f.cache_dir.path()), Vec::<String>::new());
    assert_eq!(
        restarted
            .read_file(PROJECT, &commit, "README.md", 100)
            .await?,
        Some(b"# hello\n".to_vec())
    );
    restarted
        .ensure_commit(PROJECT, &GitRef::DefaultBranch, &commit)
        .await?;
    assert_eq!(f.counts().fetches, fetches);
    Ok(())
}

/// S9, second half: kas killed between the two renames of a compaction, so the project directory is
/// missing and the old (`.retired`) and new (`.tmp-*.git`) repositories lie next to it. Simulated by making
/// exactly that state with renames. The next fetch heals the cache; no directory leaks.
#[tokio::test]
async fn a_compaction_killed_between_the_renames_heals_on_the_next_fetch() -> anyhow::Result<()> {
    let (f, commit) = Fixture::new().await?;
    f.cache.snapshot(PROJECT, &GitRef::DefaultBranch).await?;
    let group = f.cache_dir.path().join("group");
    std::fs::rename(f.repo_dir(), group.join(".tmp-4242-2.retired"))?;
    std::fs::create_dir_all(group.join(".tmp-4242-2.git/objects/pack"))?;

    let restarted = f.restarted(Limits::default());
    assert_eq!(leftovers(f.cache_dir.path()), Vec::<String>::new());
    let err = restarted
        .read_file(PROJECT, &commit, "README.md", 100)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::CommitNotCached { .. }), "{err:?}");
    assert_eq!(
        restarted.snapshot(PROJECT, &GitRef::DefaultBranch).await?,
        commit
    );
    assert_eq!(
        restarted
            .read_file(PROJECT, &commit, "README.md", 100)
            .await?,
        Some(b"# hello\n".to_vec())
    );
    assert_eq!(leftovers(f.cache_dir.path()), Vec::<String>::new());
    Ok(())
}

/// Compactions that succeed leave nothing behind either.
#[tokio::test]
async fn compactions_leave_no_directories_behind() -> anyhow::Result<()> {
    let (f, _) = Fixture::pinned_with_max_packs(2).await?;
    f.push_and_fetch(6).await?;
    assert!(f.packs() <= 2, "{} packs", f.packs());
    assert_eq!(leftovers(f.cache_dir.path()), Vec::<String>::new());
    Ok(())
}

/// Every pack a cache holds is complete (has its index) and no temporary pack file is left over.
fn assert_packs_complete(dir: &std::path::Path) {
    let names: Vec<String> = std::fs::read_dir(dir.join("objects/pack"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for name in &names {
        let complete = match name.rsplit_once('.') {
            Some((stem, "pack")) => names.contains(&format!("{stem}.idx")),
            Some((stem, "idx")) => names.contains(&format!("{stem}.pack")),
            _ => false,
        };
        assert!(complete, "stray file {name} in {names:?}");
    }
}

/// S5: the connection is reset in the middle of the pack (through the fault proxy). The fetch fails with
/// a transport error naming the project, the cache stays usable: older commits are readable, no partial
/// pack is kept, and the next fetch succeeds.
#[tokio::test]
async fn a_fetch_cut_mid_pack_fails_and_the_cache_stays_usable() -> anyhow::Result<()> {
    install_crypto_provider();
    let server = GitHttpServer::start().await?;
    server.create_repo(PROJECT, false)?;
    let first = server.commit_files(PROJECT, &[("small.yaml", Some("a: 1\n"))], "first")?;
    let (f, proxy) = Fixture::through_proxy(server, Limits::default()).await?;
    assert_eq!(
        f.cache.snapshot(PROJECT, &GitRef::DefaultBranch).await?,
        first
    );

    let big = random_text(400_000);
    let second = f
        .server
        .commit_files(PROJECT, &[("big.txt", Some(&big))], "big")?;
    proxy.set(Fault::ResetAfter { bytes: 100_000 });
    let err = f
        .cache
        .snapshot(PROJECT, &GitRef::DefaultBranch)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Transport { project, .. } if project == PROJECT),
        "{err:?}"
    );
    assert!(proxy.stats().resets >= 1, "{:?}", proxy.stats());
    assert_packs_complete(&f.repo_dir());
    assert_eq!(
        f.cache
            .read_file(PROJECT, &first, "small.yaml", 100)
            .await?,
        Some(b"a: 1\n".to_vec())
    );

    proxy.set(Fault::PassThrough);
    assert_eq!(
        f.cache.snapshot(PROJECT, &GitRef::DefaultBranch).await?,
        second
    );
    assert_eq!(
        f.cache
            .read_file(PROJECT, &second, "big.txt", 1_000_000)
            .await?
            .map(|data| data.len()),
        Some(big.len())
    );
    assert_packs_complete(&f.repo_dir());
    Ok(())
}

/// S5: the server answers 500 to the pack request after the ref listing went well. The fetch fails naming
/// the project; the cache stays usable and the next fetch succeeds.
#[tokio::test]
async fn a_500_from_upload_pack_fails_and_the_cache_stays_usable() -> anyhow::Result<()> {
    let (f, first) = Fixture::new().await?;
    f.cache.snapshot(PROJECT, &GitRef::DefaultBranch).await?;
    let second = f
        .server
        .commit_files(PROJECT, &[("README.md", Some("# v2\n"))], "second")?;
    f.server
        .fail_fetches(Some(http::StatusCode::INTERNAL_SERVER_ERROR));
    let err = f
        .cache
        .ensure_commit(PROJECT, &GitRef::DefaultBranch, &second)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Transport { project, message } if project == PROJECT && message.contains("500")),
        "{err:?}"
    );
    assert_packs_complete(&f.repo_dir());
    assert_eq!(
        f.cache.read_file(PROJECT, &first, "README.md", 100).await?,
        Some(b"# hello\n".to_vec())
    );

    f.server.fail_fetches(None);
    f.cache
        .ensure_commit(PROJECT, &GitRef::DefaultBranch, &second)
        .await?;
    assert_eq!(
        f.cache
            .read_file(PROJECT, &second, "README.md", 100)
            .await?,
        Some(b"# v2\n".to_vec())
    );
    Ok(())
}

/// S4: a server that trickles a pack at 2 KB/s (each read gets data well within `http_timeout`, so only a
/// total deadline can end it). `fetch_timeout` ends the fetch with a transport error naming the project and
/// the limit, the interrupted fetch stops soon after (its connection closes), and reads of another project
/// (and of the same project's cached commits) go on at full speed meanwhile. Fetching works again when the
/// server is healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_server_hits_the_fetch_deadline_and_other_reads_go_on() -> anyhow::Result<()> {
    install_crypto_provider();
    let server = GitHttpServer::start().await?;
    let other = "group/other";
    server.create_repo(PROJECT, false)?;
    server.create_repo(other, false)?;
    let first = server.commit_files(PROJECT, &[("a.yaml", Some("a: 1\n"))], "first")?;
    let other_commit = server.commit_files(other, &[("b.yaml", Some("b: 1\n"))], "first")?;
    let limits = Limits {
        fetch_timeout: Duration::from_secs(5),
        http_timeout: Duration::from_secs(10),
        ..Limits::default()
    };
    let (f, proxy) = Fixture::through_proxy(server, limits).await?;
    f.cache.snapshot(PROJECT, &GitRef::DefaultBranch).await?;
    f.cache.snapshot(other, &GitRef::DefaultBranch).await?;
    let big = random_text(400_000);
    let second = f
        .server
        .commit_files(PROJECT, &[("big.txt", Some(&big))], "second")?;

    proxy.set(Fault::Trickle {
        bytes: 500,
        every: Duration::from_millis(250),
    });
    let started = Instant::now();
    let fetch = tokio::spawn({
        let cache = f.cache.clone();
        let second = second.clone();
        async move {
            cache
                .ensure_commit(PROJECT, &GitRef::DefaultBranch, &second)
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..5 {
        let read = Instant::now();
        assert_eq!(
            f.cache
                .read_file(other, &other_commit, "b.yaml", 100)
                .await?,
            Some(b"b: 1\n".to_vec())
        );
        assert_eq!(
            f.cache.read_file(PROJECT, &first, "a.yaml", 100).await?,
            Some(b"a: 1\n".to_vec())
        );
        assert!(
            read.elapsed() < Duration::from_millis(500),
            "reads waited {:?} for the slow fetch",
            read.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let err = fetch.await?.unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(&err, Error::Transport { project, .. } if project == PROJECT),
        "{err:?}"
    );
    assert!(err.to_string().contains("fetch_timeout"), "{err}");
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(8),
        "the deadline ended the fetch after {took:?}"
    );
    assert!(
        proxy.stats().bytes_to_client > 0,
        "the server sent nothing: {:?}",
        proxy.stats()
    );
    // The interrupted fetch stops too, with the server still trickling.
    let stopping = Instant::now();
    while proxy.stats().open > 0 {
        // Bounded by `http_timeout` (10 s) while gix waits inside one read; slack for a loaded CI machine.
        assert!(
            stopping.elapsed() < Duration::from_secs(30),
            "the interrupted fetch is still running: {:?}",
            proxy.stats()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "the interrupted fetch stopped {:?} after the deadline",
        stopping.elapsed()
    );

    proxy.set(Fault::PassThrough);
    f.cache
        .ensure_commit(PROJECT, &GitRef::DefaultBranch, &second)
        .await?;
    assert_eq!(
        f.cache
            .read_file(PROJECT, &second, "big.txt", 1_000_000)
            .await?
            .map(|data| data.len()),
        Some(big.len())
    );
    Ok(())
}

/// F24: branch and tag names from agents are checked before they become refspecs: the error names the
/// ref, and nothing reaches the server.
#[tokio::test]
async fn invalid_ref_names_are_refused_before_any_request() -> anyhow::Result<()> {
    let (f, commit) = Fixture::new().await?;
    let before = f.counts();
    for reference in [
        GitRef::Branch("main:refs/heads/evil".into()),
        GitRef::Branch("-main".into()),
        GitRef::Tag("v1..v2".into()),
        GitRef::Tag("v*".into()),
    ] {
        let err = f.cache.resolve(PROJECT, &reference).await.unwrap_err();
        assert!(matches!(err, Error::InvalidRef { .. }), "{err:?}");
        assert!(err.to_string().contains(&reference.to_string()), "{err}");
        let err = f
            .cache
            .ensure_commit(PROJECT, &reference, &commit)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidRef { .. }), "{err:?}");
    }
    assert_eq!(f.counts(), before);
    Ok(())
}
