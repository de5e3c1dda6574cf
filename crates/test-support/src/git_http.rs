//! A real Git smart-HTTP server for tests.
//!
//! Requests are served by git's own `git http-backend` (run as a CGI program per request), so clients talk
//! to exactly the protocol implementation real forges use (protocol v0/v1 and v2). Repositories are bare
//! repositories under a temporary directory (`<root>/<group>/<project>.git`) and are set up with the `git`
//! CLI through plumbing commands, without any working tree.
//!
//! Private repositories require HTTP basic auth with [`GitHttpServer::credentials`]; public repositories
//! allow anonymous reads. Per-repository [`RequestCounts`] let tests assert how a client used the server,
//! e.g. "the ref was checked but nothing was fetched".

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

const USERNAME: &str = "git-test-user";
const DEFAULT_BRANCH: &str = "main";

/// How a client used one repository of the server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestCounts {
    /// `GET .../info/refs?service=git-upload-pack`: the ref advertisement (v0/v1) or capability advertisement (v2).
    pub info_refs: u64,
    /// Protocol v2 `command=ls-refs` requests.
    pub ls_refs: u64,
    /// Requests that negotiate or transfer a pack: protocol v2 `command=fetch`, or any v0/v1 upload-pack POST.
    pub fetches: u64,
    /// Requests rejected with 401 because credentials were missing or wrong.
    pub unauthorized: u64,
}

#[derive(Default)]
struct State {
    private_repos: HashSet<String>,
    counts: HashMap<String, RequestCounts>,
}

struct Shared {
    root: PathBuf,
    password: String,
    state: Mutex<State>,
    protocol_v2: AtomicBool,
    /// When set, requests that would transfer a pack are answered with this status (see
    /// [`GitHttpServer::fail_fetches`]).
    fetch_failure: Mutex<Option<StatusCode>>,
}

/// A loopback Git smart-HTTP server; stops when dropped.
pub struct GitHttpServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    /// With TLS: the PEM certificate clients must trust (self-signed, for `localhost`).
    tls_certificate: Option<String>,
    accept_loop: JoinHandle<()>,
    // Keeps the repositories alive for the server's lifetime; declared last so it's dropped last.
    _root: tempfile::TempDir,
}

impl std::fmt::Debug for GitHttpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitHttpServer")
            .field("addr", &self.addr)
            .field("root", &self.shared.root)
            .finish_non_exhaustive()
    }
}

impl Drop for GitHttpServer {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

impl GitHttpServer {
    /// Starts the server on `127.0.0.1` with an ephemeral port. Must be called inside a tokio runtime.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(false).await
    }

    /// Like [`Self::start`], serving HTTPS with a self-signed certificate for `localhost` (see
    /// [`Self::tls_certificate`]): a Git server behind a private CA.
    pub async fn start_tls() -> anyhow::Result<Self> {
        Self::start_with(true).await
    }

    /// The PEM certificate of a TLS server, for clients to trust.
    pub fn tls_certificate(&self) -> Option<&str> {
        self.tls_certificate.as_deref()
    }

    async fn start_with(tls: bool) -> anyhow::Result<Self> {
        let root = tempfile::tempdir().context("creating the repository root")?;
        let password = format!(
            "pw-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .subsec_nanos()
        );
        let shared = Arc::new(Shared {
            root: root.path().to_path_buf(),
            password,
            state: Mutex::new(State::default()),
            protocol_v2: AtomicBool::new(true),
            fetch_failure: Mutex::new(None),
        });
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .context("binding the git HTTP server")?;
        let addr = listener.local_addr()?;
        let (acceptor, tls_certificate) = if tls {
            let (acceptor, pem) = tls_acceptor()?;
            (Some(acceptor), Some(pem))
        } else {
            (None, None)
        };
        let accept_loop = tokio::spawn(accept_loop(listener, acceptor, shared.clone()));
        Ok(Self {
            shared,
            addr,
            tls_certificate,
            accept_loop,
            _root: root,
        })
    }

    /// E.g. `http://127.0.0.1:PORT`; repositories are at `{base_url}/{group}/{project}.git`.
    pub fn base_url(&self) -> String {
        match self.tls_certificate {
            Some(_) => format!("https://localhost:{}", self.addr.port()),
            None => format!("http://{}", self.addr),
        }
    }

    /// The URL of the repository at `path` ("group/project").
    pub fn repo_url(&self, path: &str) -> String {
        format!("{}/{}.git", self.base_url(), path)
    }

    /// The basic-auth user and password the server accepts.
    pub fn credentials(&self) -> (&str, &str) {
        (USERNAME, &self.shared.password)
    }

    /// The bare repository directory of `path` ("group/project"), for tests that want to inspect it.
    pub fn repo_dir(&self, path: &str) -> PathBuf {
        self.shared.root.join(format!("{path}.git"))
    }

    /// Creates an empty bare repository at `path` ("group/project") with default branch `main`.
    /// A `private` repository requires basic auth; a public one allows anonymous reads.
    pub fn create_repo(&self, path: &str, private: bool) -> anyhow::Result<()> {
        validate_repo_path(path)?;
        let dir = self.repo_dir(path);
        if dir.exists() {
            bail!("repository {path} already exists");
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        git(
            &dir,
            &[
                "init",
                "--quiet",
                "--bare",
                &format!("--initial-branch={DEFAULT_BRANCH}"),
            ],
            None,
        )?;
        let mut state = self.shared.state.lock().expect("state lock poisoned");
        if private {
            state.private_repos.insert(path.to_owned());
        }
        Ok(())
    }

    /// Commits to the default branch `main`: `Some(content)` writes a file, `None` deletes it.
    /// Returns the new commit id (hex).
    pub fn commit_files(
        &self,
        path: &str,
        files: &[(&str, Option<&str>)],
        message: &str,
    ) -> anyhow::Result<String> {
        self.commit_files_to_branch(path, DEFAULT_BRANCH, files, message)
    }

    /// Like [`Self::commit_files`], for any branch; the branch is created if it doesn't exist yet.
    pub fn commit_files_to_branch(
        &self,
        path: &str,
        branch: &str,
        files: &[(&str, Option<&str>)],
        message: &str,
    ) -> anyhow::Result<String> {
        let contents: Vec<(&str, Option<&[u8]>)> = files
            .iter()
            .map(|(p, c)| (*p, c.map(str::as_bytes)))
            .collect();
        self.commit_bytes_to_branch(path, branch, &contents, message)
    }

    /// Like [`Self::commit_files_to_branch`] with binary contents (e.g. large files).
    pub fn commit_bytes_to_branch(
        &self,
        path: &str,
        branch: &str,
        files: &[(&str, Option<&[u8]>)],
        message: &str,
    ) -> anyhow::Result<String> {
        let dir = self.existing_repo_dir(path)?;
        let branch_ref = format!("refs/heads/{branch}");
        let parent = rev_parse(&dir, &branch_ref)?;

        // A scratch index keeps the bare repository free of a worktree and leaves no state behind.
        let scratch = tempfile::tempdir()?;
        let index = scratch.path().join("index");
        let index_env = [("GIT_INDEX_FILE", index.as_os_str())];
        if let Some(parent) = &parent {
            git_env(&dir, &["read-tree", parent], None, &index_env)?;
        }
        // `--index-info` works without a worktree; mode 0 removes a path.
        let mut index_info = String::new();
        for (file, content) in files {
            match content {
                Some(content) => {
                    let blob = git(&dir, &["hash-object", "-w", "--stdin"], Some(content))?;
                    index_info.push_str(&format!("100644 {blob}\t{file}\n"));
                }
                None => index_info.push_str(&format!("0 {}\t{file}\n", "0".repeat(40))),
            }
        }
        git_env(
            &dir,
            &["update-index", "--index-info"],
            Some(index_info.as_bytes()),
            &index_env,
        )?;
        let tree = git_env(&dir, &["write-tree"], None, &index_env)?;
        let mut args = vec!["commit-tree", tree.as_str(), "-m", message];
        if let Some(parent) = &parent {
            args.extend(["-p", parent.as_str()]);
        }
        let commit = git(&dir, &args, None)?;
        // Compare-and-swap against the parent so concurrent commits in a test can't silently lose one.
        let old = parent.unwrap_or_else(|| "0".repeat(40));
        git(&dir, &["update-ref", &branch_ref, &commit, &old], None)?;
        Ok(commit)
    }

    /// Points the repository's HEAD (the default branch clients see) at `branch`.
    pub fn set_default_branch(&self, path: &str, branch: &str) -> anyhow::Result<()> {
        let dir = self.existing_repo_dir(path)?;
        git(
            &dir,
            &["symbolic-ref", "HEAD", &format!("refs/heads/{branch}")],
            None,
        )?;
        Ok(())
    }

    /// Creates (or moves) `branch` to point at `commit`.
    pub fn create_branch(&self, path: &str, branch: &str, commit: &str) -> anyhow::Result<()> {
        let dir = self.existing_repo_dir(path)?;
        git(
            &dir,
            &["update-ref", &format!("refs/heads/{branch}"), commit],
            None,
        )?;
        Ok(())
    }

    /// Deletes `branch`; its commits stay in the repository, unreachable.
    pub fn delete_branch(&self, path: &str, branch: &str) -> anyhow::Result<()> {
        let dir = self.existing_repo_dir(path)?;
        git(
            &dir,
            &["update-ref", "-d", &format!("refs/heads/{branch}")],
            None,
        )?;
        Ok(())
    }

    /// Deletes tag `tag`; its commit stays in the repository (unreachable, unless a branch has it).
    pub fn delete_tag(&self, path: &str, tag: &str) -> anyhow::Result<()> {
        let dir = self.existing_repo_dir(path)?;
        git(
            &dir,
            &["update-ref", "-d", &format!("refs/tags/{tag}")],
            None,
        )?;
        Ok(())
    }

    /// Deletes every unreachable object of the repository (expires reflogs, `git gc --prune=now`), as a
    /// forge does some time after a force-push or a deleted tag: clients can no longer fetch them by id.
    pub fn collect_garbage(&self, path: &str) -> anyhow::Result<()> {
        let dir = self.existing_repo_dir(path)?;
        git(&dir, &["reflog", "expire", "--expire=now", "--all"], None)?;
        git(&dir, &["gc", "--quiet", "--prune=now"], None)?;
        Ok(())
    }

    /// With `Some(status)`, every request that would transfer a pack (what [`RequestCounts::fetches`]
    /// counts) is answered with `status` (e.g. 500) after the ref listing went well: a server failing in
    /// the middle of a fetch. `None` serves fetches again.
    pub fn fail_fetches(&self, status: Option<StatusCode>) {
        *self
            .shared
            .fetch_failure
            .lock()
            .expect("fetch failure lock poisoned") = status;
    }

    /// Creates tag `tag` at `commit`: an annotated tag object when `annotated`, else a lightweight tag.
    /// Returns the id the tag ref points at (the tag object for annotated tags, else `commit`).
    pub fn create_tag(
        &self,
        path: &str,
        tag: &str,
        commit: &str,
        annotated: bool,
    ) -> anyhow::Result<String> {
        let dir = self.existing_repo_dir(path)?;
        if annotated {
            git(
                &dir,
                &["tag", "-a", "-m", &format!("tag {tag}"), tag, commit],
                None,
            )?;
        } else {
            git(
                &dir,
                &["update-ref", &format!("refs/tags/{tag}"), commit],
                None,
            )?;
        }
        git(
            &dir,
            &["rev-parse", "--verify", &format!("refs/tags/{tag}")],
            None,
        )
    }

    /// The commit a ref (e.g. `refs/heads/main`, `HEAD`) points at in the server's repository.
    pub fn rev_parse(&self, path: &str, rev: &str) -> anyhow::Result<Option<String>> {
        rev_parse(&self.existing_repo_dir(path)?, rev)
    }

    /// With `false`, the server ignores clients' request for protocol v2 and speaks v0, like old servers:
    /// only advertised ref tips can be fetched then.
    pub fn set_protocol_v2(&self, enabled: bool) {
        self.shared.protocol_v2.store(enabled, Ordering::Relaxed);
    }

    /// How clients used repository `path` so far.
    pub fn request_count(&self, path: &str) -> RequestCounts {
        let state = self.shared.state.lock().expect("state lock poisoned");
        state.counts.get(path).copied().unwrap_or_default()
    }

    /// Forgets the request counts of repository `path`.
    pub fn reset_request_count(&self, path: &str) {
        let mut state = self.shared.state.lock().expect("state lock poisoned");
        state.counts.remove(path);
    }

    fn existing_repo_dir(&self, path: &str) -> anyhow::Result<PathBuf> {
        validate_repo_path(path)?;
        let dir = self.repo_dir(path);
        if !dir.is_dir() {
            bail!("repository {path} does not exist; call create_repo first");
        }
        Ok(dir)
    }
}

fn validate_repo_path(path: &str) -> anyhow::Result<()> {
    let valid = !path.is_empty()
        && path.split('/').all(|segment| {
            !segment.is_empty() && segment != "." && segment != ".." && !segment.ends_with(".git")
        });
    if !valid {
        bail!("invalid repository path {path:?}, expected e.g. \"group/project\"");
    }
    Ok(())
}

/// Runs `git` in the bare repository `dir` and returns its trimmed stdout.
fn git(dir: &Path, args: &[&str], stdin: Option<&[u8]>) -> anyhow::Result<String> {
    git_env(dir, args, stdin, &[])
}

fn git_env(
    dir: &Path,
    args: &[&str],
    stdin: Option<&[u8]>,
    env: &[(&str, &std::ffi::OsStr)],
) -> anyhow::Result<String> {
    use std::io::Write as _;

    let mut command = std::process::Command::new("git");
    command
        .arg("--git-dir")
        .arg(dir)
        .args(args)
        .envs(isolated_git_env())
        .env("GIT_AUTHOR_NAME", "Test Author")
        .env("GIT_AUTHOR_EMAIL", "author@example.com")
        .env("GIT_COMMITTER_NAME", "Test Committer")
        .env("GIT_COMMITTER_EMAIL", "committer@example.com")
        .envs(env.iter().copied())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().context("running git (is it installed?)")?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        pipe.write_all(input)?;
    }
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "git {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8(output.stdout)?.trim().to_owned())
}

fn rev_parse(dir: &Path, rev: &str) -> anyhow::Result<Option<String>> {
    let output = std::process::Command::new("git")
        .arg("--git-dir")
        .arg(dir)
        .args([
            "rev-parse",
            "--verify",
            "--quiet",
            &format!("{rev}^{{commit}}"),
        ])
        .envs(isolated_git_env())
        .stdin(Stdio::null())
        .output()
        .context("running git rev-parse")?;
    Ok(output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned()))
}

/// Keeps the developer's or CI's git configuration out of the test server and setup commands.
fn isolated_git_env() -> [(&'static str, &'static str); 3] {
    [
        ("GIT_CONFIG_NOSYSTEM", "1"),
        ("GIT_CONFIG_GLOBAL", "/dev/null"),
        ("GIT_TERMINAL_PROMPT", "0"),
    ]
}

/// A TLS acceptor with a fresh self-signed certificate for `localhost`, and that certificate (PEM).
fn tls_acceptor() -> anyhow::Result<(tokio_rustls::TlsAcceptor, String)> {
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
    let key = rustls::pki_types::PrivateKeyDer::try_from(generated.signing_key.serialize_der())
        .map_err(|e| anyhow::anyhow!("test key: {e}"))?;
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![generated.cert.der().clone()], key)?;
    Ok((
        tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        generated.cert.pem(),
    ))
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shared: Arc<Shared>,
) {
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(_) => {
                // E.g. too many open files: back off instead of spinning.
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let shared = shared.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, remote, request).await) }
            });
            let server = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let _ = match tls {
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(stream) => server.serve_connection(TokioIo::new(stream), service).await,
                    // A client that does not trust us hangs up during the handshake.
                    Err(_) => return,
                },
                None => server.serve_connection(TokioIo::new(stream), service).await,
            };
        });
    }
}

fn text_response(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(text.to_owned())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

/// Splits `/group/project.git/info/refs` into (`group/project`, `/group/project.git/info/refs`).
fn repo_of(uri_path: &str) -> Option<String> {
    let end = uri_path.find(".git/")?;
    let repo = uri_path[..end].trim_start_matches('/');
    validate_repo_path(repo).ok()?;
    Some(repo.to_owned())
}

enum Access {
    Anonymous,
    User,
    Denied,
}

fn check_access(shared: &Shared, headers: &HeaderMap, private: bool) -> Access {
    let Some(authorization) = headers.get(header::AUTHORIZATION) else {
        return if private {
            Access::Denied
        } else {
            Access::Anonymous
        };
    };
    let expected =
        base64::engine::general_purpose::STANDARD.encode(format!("{USERNAME}:{}", shared.password));
    // Like real forges, wrong credentials are rejected even where anonymous access would be allowed.
    match authorization
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Basic "))
    {
        Some(given) if given.trim() == expected => Access::User,
        _ => Access::Denied,
    }
}

async fn handle(
    shared: &Shared,
    remote: SocketAddr,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    match handle_inner(shared, remote, request).await {
        Ok(response) => response,
        Err(err) => text_response(StatusCode::INTERNAL_SERVER_ERROR, &format!("{err:#}")),
    }
}

async fn handle_inner(
    shared: &Shared,
    remote: SocketAddr,
    request: Request<Incoming>,
) -> anyhow::Result<Response<Full<Bytes>>> {
    let (parts, body) = request.into_parts();
    let uri_path = parts.uri.path().to_owned();
    let Some(repo) = repo_of(&uri_path) else {
        return Ok(text_response(StatusCode::NOT_FOUND, "Not Found"));
    };
    if !shared.root.join(format!("{repo}.git")).is_dir() {
        return Ok(text_response(StatusCode::NOT_FOUND, "Repository not found"));
    }
    let private = shared
        .state
        .lock()
        .expect("state lock poisoned")
        .private_repos
        .contains(&repo);
    let remote_user = match check_access(shared, &parts.headers, private) {
        Access::Anonymous => None,
        Access::User => Some(USERNAME),
        Access::Denied => {
            count(shared, &repo, |c| c.unauthorized += 1);
            let mut response = text_response(StatusCode::UNAUTHORIZED, "Unauthorized");
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"git\""),
            );
            return Ok(response);
        }
    };

    let body = body
        .collect()
        .await
        .context("reading request body")?
        .to_bytes();
    let header_str = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    let content_encoding = header_str("content-encoding").to_owned();
    let query = parts.uri.query().unwrap_or("");
    if uri_path.ends_with("/info/refs") && query.contains("service=git-upload-pack") {
        count(shared, &repo, |c| c.info_refs += 1);
    } else if uri_path.ends_with("/git-upload-pack") {
        // Only uncompressed bodies can be inspected; clients gzip large (negotiation) bodies only.
        let is_ls_refs = content_encoding.is_empty() && contains(&body, b"command=ls-refs");
        if is_ls_refs {
            count(shared, &repo, |c| c.ls_refs += 1);
        } else {
            count(shared, &repo, |c| c.fetches += 1);
            let failure = *shared
                .fetch_failure
                .lock()
                .expect("fetch failure lock poisoned");
            if let Some(status) = failure {
                return Ok(text_response(status, "injected fetch failure"));
            }
        }
    }

    let mut command = tokio::process::Command::new("git");
    command
        .arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(isolated_git_env())
        .env("GIT_PROJECT_ROOT", &shared.root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("PATH_INFO", &uri_path)
        .env("REQUEST_METHOD", parts.method.as_str())
        .env("QUERY_STRING", query)
        .env("REMOTE_ADDR", remote.ip().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(user) = remote_user {
        command.env("REMOTE_USER", user);
    }
    let content_type = header_str("content-type");
    if !content_type.is_empty() {
        command.env("CONTENT_TYPE", content_type);
    }
    if !body.is_empty() || parts.method == http::Method::POST {
        command.env("CONTENT_LENGTH", body.len().to_string());
    }
    // http-backend inflates gzip request bodies itself when told about the encoding.
    if !content_encoding.is_empty() {
        command.env("HTTP_CONTENT_ENCODING", &content_encoding);
    }
    // Protocol v2 is negotiated through this header, which git expects in GIT_PROTOCOL.
    let git_protocol = header_str("git-protocol");
    if !git_protocol.is_empty() && shared.protocol_v2.load(Ordering::Relaxed) {
        command.env("GIT_PROTOCOL", git_protocol);
    }

    let mut child = command.spawn().context("spawning git http-backend")?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    // Write the body concurrently with reading the output so a large request and response can't deadlock.
    let writer = tokio::spawn(async move {
        let _ = stdin.write_all(&body).await;
        drop(stdin);
    });
    let output = child
        .wait_with_output()
        .await
        .context("running git http-backend")?;
    let _ = writer.await;
    if !output.status.success() && output.stdout.is_empty() {
        bail!(
            "git http-backend failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    cgi_response(&output.stdout)
}

fn count(shared: &Shared, repo: &str, update: impl FnOnce(&mut RequestCounts)) {
    let mut state = shared.state.lock().expect("state lock poisoned");
    update(state.counts.entry(repo.to_owned()).or_default());
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// Turns CGI output (headers, blank line, body) into an HTTP response, honoring `Status:`.
fn cgi_response(output: &[u8]) -> anyhow::Result<Response<Full<Bytes>>> {
    let (head, body) = split_cgi_output(output).context("CGI output has no header terminator")?;
    let head = std::str::from_utf8(head).context("CGI headers are not UTF-8")?;
    let mut response = Response::new(Full::new(Bytes::copy_from_slice(body)));
    for line in head.lines() {
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            continue;
        }
        let (name, value) = line
            .split_once(':')
            .with_context(|| format!("malformed CGI header line {line:?}"))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code = value.split_whitespace().next().unwrap_or_default();
            *response.status_mut() = StatusCode::from_bytes(code.as_bytes())
                .with_context(|| format!("malformed CGI status {value:?}"))?;
        } else {
            response.headers_mut().append(
                header::HeaderName::from_bytes(name.as_bytes())?,
                HeaderValue::from_str(value)?,
            );
        }
    }
    Ok(response)
}

fn split_cgi_output(output: &[u8]) -> Option<(&[u8], &[u8])> {
    let crlf = output
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4));
    let lf = output.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let (at, len) = match (crlf, lf) {
        (Some(a), Some(b)) => {
            if a.0 <= b.0 {
                a
            } else {
                b
            }
        }
        (a, b) => a.or(b)?,
    };
    Some((&output[..at], &output[at + len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cgi_output_with_status() {
        let response =
            cgi_response(b"Status: 404 Not Found\r\nContent-Type: text/plain\r\n\r\nnope").unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "text/plain");
    }

    #[test]
    fn parses_cgi_output_without_status() {
        let response =
            cgi_response(b"Content-Type: application/x-git-upload-pack-advertisement\n\n0000")
                .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }

    #[test]
    fn extracts_repo_from_url_path() {
        assert_eq!(
            repo_of("/group/project.git/info/refs").as_deref(),
            Some("group/project")
        );
        assert_eq!(
            repo_of("/a/b/c.git/git-upload-pack").as_deref(),
            Some("a/b/c")
        );
        assert_eq!(repo_of("/../x.git/info/refs"), None);
        assert_eq!(repo_of("/group/project/info/refs"), None);
    }

    #[tokio::test]
    async fn serves_clones_to_the_git_cli() {
        let server = GitHttpServer::start().await.unwrap();
        server.create_repo("group/public", false).unwrap();
        server.create_repo("group/private", true).unwrap();
        let commit = server
            .commit_files("group/public", &[("a.txt", Some("hello\n"))], "first")
            .unwrap();
        server
            .commit_files("group/private", &[("b.txt", Some("secret\n"))], "first")
            .unwrap();

        let scratch = tempfile::tempdir().unwrap();
        let url = server.repo_url("group/public");
        let clone = |url: String, dest: PathBuf| {
            std::process::Command::new("git")
                .args(["-c", "protocol.version=2", "clone", "--quiet"])
                .arg(url)
                .arg(dest)
                .envs(isolated_git_env())
                .output()
                .unwrap()
        };
        let public = tokio::task::spawn_blocking({
            let dest = scratch.path().join("public");
            move || clone(url, dest)
        })
        .await
        .unwrap();
        assert!(
            public.status.success(),
            "{}",
            String::from_utf8_lossy(&public.stderr)
        );
        let cloned = std::fs::read_to_string(scratch.path().join("public/a.txt")).unwrap();
        assert_eq!(cloned, "hello\n");
        assert_eq!(
            server.rev_parse("group/public", "HEAD").unwrap().as_deref(),
            Some(commit.as_str())
        );
        let counts = server.request_count("group/public");
        assert_eq!(counts.info_refs, 1);
        assert_eq!(counts.ls_refs, 1);
        assert_eq!(counts.fetches, 1);

        let url = server.repo_url("group/private");
        let denied = tokio::task::spawn_blocking({
            let dest = scratch.path().join("denied");
            move || clone(url, dest)
        })
        .await
        .unwrap();
        assert!(!denied.status.success());

        let (user, password) = server.credentials();
        let url = server
            .repo_url("group/private")
            .replace("http://", &format!("http://{user}:{password}@"));
        let private = tokio::task::spawn_blocking({
            let dest = scratch.path().join("private");
            move || clone(url, dest)
        })
        .await
        .unwrap();
        assert!(
            private.status.success(),
            "{}",
            String::from_utf8_lossy(&private.stderr)
        );
    }
}
