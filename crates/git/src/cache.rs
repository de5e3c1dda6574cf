//! The shared cache of bare repositories, one per project, and the async API on top of it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::OnceCell;

use crate::Error;
use crate::read::{self, FileListing, FileLookup};
use crate::remote::{self, Endpoint, FetchTarget, RemoteRef};
use crate::server::{Credentials, GitRef, GitServerConfig, Limits, validate_project};

/// Git access for kas with a local cache of fetched commits.
///
/// Cheap to clone; all clones share the same cache. Each project has exactly one bare repository under
/// the cache directory (`<cache_dir>/<group>/<project>.git`), which survives restarts.
#[derive(Clone)]
pub struct RepoCache {
    inner: Arc<Inner>,
}

struct Inner {
    /// Credential-free.
    base_url: String,
    credentials: Option<Credentials>,
    extra_ca_pem: Option<Arc<Vec<u8>>>,
    cache_dir: PathBuf,
    limits: Limits,
    projects: Mutex<HashMap<String, Arc<ProjectCache>>>,
    /// An empty repository for talking to servers without touching (or creating) a project's cache:
    /// gitoxide needs a repository to create a remote, even just to list refs.
    probe: OnceCell<gix::ThreadSafeRepository>,
    /// Told about every network operation (metrics), once set.
    observer: std::sync::OnceLock<Arc<dyn GitObserver>>,
}

/// A network operation against the Git server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GitOperation {
    /// Asking which commit a ref points at (`ls-refs` for one ref); no objects move.
    LsRefs,
    /// Fetching a commit (depth 1) into the cache; compaction's refetch counts too.
    Fetch,
}

impl GitOperation {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LsRefs => "ls_refs",
            Self::Fetch => "fetch",
        }
    }
}

/// Hears about each network operation when it ends: what it was, whether it worked, how long it took.
pub trait GitObserver: Send + Sync + 'static {
    fn observe(&self, operation: GitOperation, succeeded: bool, elapsed: std::time::Duration);
}

struct ProjectCache {
    /// Held while fetching (and compacting), so concurrent callers wait for one fetch instead of doing
    /// their own. Never waited for while holding a read guard of `repo`: compaction, which holds this
    /// lock, waits for every read guard when it swaps the directory. A fetch that outlives its deadline
    /// keeps it until it has really stopped, so no second fetch writes into the repository at the same time.
    fetch_lock: Arc<tokio::sync::Mutex<()>>,
    /// The open repository, once opened. Every use holds a read guard until it is done, so compaction
    /// (under the write lock, taken only for the local swap, never across the network) never removes the
    /// directory under a reader.
    repo: Arc<tokio::sync::RwLock<Option<gix::ThreadSafeRepository>>>,
    /// After a failed compaction: the pack count at which to try again, so a failing compaction is not
    /// retried (with a network fetch) after every fetch.
    compact_again_at: Mutex<usize>,
}

/// A project's open repository, kept from being replaced while held.
type RepoGuard =
    tokio::sync::OwnedRwLockReadGuard<Option<gix::ThreadSafeRepository>, gix::ThreadSafeRepository>;

impl std::fmt::Debug for RepoCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepoCache")
            .field("base_url", &self.inner.base_url)
            .field("cache_dir", &self.inner.cache_dir)
            .finish_non_exhaustive()
    }
}

impl RepoCache {
    /// A cache for projects on `server`, with repositories under `cache_dir` and default [`Limits`].
    pub fn new(server: GitServerConfig, cache_dir: PathBuf) -> Self {
        Self::with_limits(server, cache_dir, Limits::default())
    }

    /// Like [`Self::new`] with `limits`. Removes what an interrupted compaction or creation left behind in
    /// `cache_dir` (`.tmp-*` directories), so a crash never leaks disk space.
    pub fn with_limits(server: GitServerConfig, cache_dir: PathBuf, limits: Limits) -> Self {
        remove_leftovers(&cache_dir);
        Self {
            inner: Arc::new(Inner {
                base_url: server.sanitized_base_url(),
                credentials: server.credentials(),
                extra_ca_pem: server.extra_ca_pem.clone().map(Arc::new),
                cache_dir,
                limits,
                projects: Mutex::new(HashMap::new()),
                probe: OnceCell::new(),
                observer: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Reports every network operation to `observer` from now on (all clones share it). Only the first
    /// observer set is kept.
    pub fn set_observer(&self, observer: Arc<dyn GitObserver>) {
        let _ = self.inner.observer.set(observer);
    }

    fn observe(&self, operation: GitOperation, succeeded: bool, started: std::time::Instant) {
        if let Some(observer) = self.inner.observer.get() {
            observer.observe(operation, succeeded, started.elapsed());
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// Asks the server which commit `reference` points at, without fetching any objects (only the ref
    /// advertisement / `ls-refs` for that one ref). [`GitRef::DefaultBranch`] follows the server's `HEAD`.
    /// [`GitRef::Commit`] is returned as is, without network access.
    pub async fn resolve(&self, project: &str, reference: &GitRef) -> Result<String, Error> {
        validate_project(project)?;
        reference.validate()?;
        let Some(ref_name) = reference.remote_ref_name() else {
            let GitRef::Commit(commit) = reference else {
                unreachable!("only commits have no remote ref name")
            };
            return Ok(parse_commit(commit)?.to_string());
        };
        let probe = self.probe().await?;
        let endpoint = self.endpoint(project);
        let name = ref_name.clone();
        let started = std::time::Instant::now();
        let advertised = self
            .network(project, None, move |_| {
                remote::ls_ref(&probe.to_thread_local(), &endpoint, &name)
            })
            .await
            .and_then(|r| r.map_err(|err| Error::from_network(project, &err)));
        self.observe(GitOperation::LsRefs, advertised.is_ok(), started);
        let advertised = advertised?;
        match advertised {
            RemoteRef::Commit(commit) => {
                tracing::debug!(project, %reference, %commit, "resolved");
                Ok(commit.to_string())
            }
            RemoteRef::Unborn | RemoteRef::Missing => Err(Error::RefNotFound {
                project: project.to_owned(),
                reference: reference.to_string(),
            }),
        }
    }

    /// Makes sure `commit` (which `reference` pointed at) is in the local cache, fetching it (depth 1) only
    /// if it's missing.
    pub async fn ensure_commit(
        &self,
        project: &str,
        reference: &GitRef,
        commit: &str,
    ) -> Result<(), Error> {
        validate_project(project)?;
        reference.validate()?;
        let commit = parse_commit(commit)?;
        let cache = self.project(project);
        {
            let repo = self.project_repo(project, &cache).await?;
            if has_commit(project, &repo, commit).await? {
                return Ok(());
            }
        }
        let fetching = self.fetch_lock(project, &cache).await?;
        let repo = self.project_repo(project, &cache).await?;
        // Another caller may have fetched it while we waited.
        if has_commit(project, &repo, commit).await? {
            return Ok(());
        }
        let endpoint = self.endpoint(project);
        let ref_name = reference.remote_ref_name();
        let local_ref = local_ref_name(reference, commit);
        tracing::debug!(project, %reference, %commit, "fetching");
        let fetch_repo: gix::ThreadSafeRepository = (*repo).clone();
        // A cancelled caller's fetch still completes for the next caller; only the deadline interrupts it.
        let started = std::time::Instant::now();
        let fetched = self.network(project, Some(fetching), move |interrupt| {
            let repo = fetch_repo.to_thread_local();
            let by_id = FetchTarget::Commit {
                commit,
                ref_name: ref_name.as_deref(),
                local_ref: &local_ref,
            };
            let err = match remote::fetch(&repo, &endpoint, by_id, interrupt) {
                Ok(()) => return Ok(()),
                Err(err) => err,
            };
            // Servers that only allow fetching advertised refs refuse commits by id; the ref's history
            // contains the commit unless the ref was rewritten since it was resolved.
            let Some(ref_name) = ref_name.as_deref() else {
                return Err(err);
            };
            if matches!(
                Error::from_network("", &err),
                Error::NotFound { .. } | Error::Unauthorized { .. }
            ) {
                return Err(err);
            }
            tracing::debug!(%commit, ref_name, error = %err, "fetching by commit id failed, fetching the ref");
            let by_ref = FetchTarget::Ref {
                ref_name,
                local_ref: &local_ref,
            };
            remote::fetch(&repo, &endpoint, by_ref, interrupt)
        })
        .await;
        self.observe(GitOperation::Fetch, matches!(fetched, Ok(Ok(()))), started);
        if let Err(err) = fetched? {
            return Err(match Error::from_network(project, &err) {
                // The server refused to send it, e.g. "upload-pack: not our ref <commit>".
                Error::Transport { message, .. } if message.contains("not our ref") => {
                    Error::CommitNotFound {
                        project: project.to_owned(),
                        commit: commit.to_string(),
                    }
                }
                other => other,
            });
        }
        if !has_commit(project, &repo, commit).await? {
            return Err(Error::CommitNotFound {
                project: project.to_owned(),
                commit: commit.to_string(),
            });
        }
        drop(repo);
        let dir = self.project_dir(project);
        let due = |packs: usize| {
            let again_at = cache
                .compact_again_at
                .lock()
                .expect("compaction lock poisoned");
            packs > self.inner.limits.max_packs && packs >= *again_at
        };
        if due(count_packs(&dir)) {
            // The commit is cached; if the lock is held that long, compaction waits for a later fetch.
            let Ok(fetching) = self.fetch_lock(project, &cache).await else {
                return Ok(());
            };
            // Another caller may have compacted while we waited.
            let packs = count_packs(&dir);
            if !due(packs) {
                return Ok(());
            }
            let Some(old) = cache.repo.read().await.clone() else {
                return Ok(());
            };
            let compacted = self.compact(project, &cache, old, fetching).await;
            let mut again_at = cache
                .compact_again_at
                .lock()
                .expect("compaction lock poisoned");
            *again_at = match compacted {
                Ok(()) => 0,
                Err(err) => {
                    let again_at = packs + self.inner.limits.max_packs;
                    tracing::warn!(project, error = %err, again_at, "compacting the Git cache failed; keeping it as it is until it has that many packs");
                    again_at
                }
            };
        }
        Ok(())
    }

    /// Replaces the project's repository by a fresh one holding only the commits its local refs point at,
    /// fetched again with depth 1 in one fetch (one pack). Tips the server no longer serves (a deleted tag's
    /// commit, a rewritten pinned commit) are left out; they are fetched again if asked for. On failure the
    /// old repository stays. The fetch runs without the repository lock (readers keep reading `old`, which
    /// nothing writes to while `fetching` is held); only the swap takes it.
    async fn compact(
        &self,
        project: &str,
        cache: &ProjectCache,
        old: gix::ThreadSafeRepository,
        fetching: tokio::sync::OwnedMutexGuard<()>,
    ) -> Result<(), Error> {
        let dir = self.project_dir(project);
        let endpoint = self.endpoint(project);
        let built = {
            let dir = dir.clone();
            self.network(project, Some(fetching), move |interrupt| {
                build_compacted(&old, &dir, &endpoint, interrupt)
            })
            .await?
            .map_err(|err| Error::from_network(project, &err))?
        };
        for skipped in &built.skipped {
            tracing::warn!(project, reference = %skipped, "compaction left out a ref whose commit the server no longer serves");
        }
        let mut slot = cache.repo.write().await;
        let scratch = built.dir;
        let repo = blocking(project, move || swap_in(&scratch, &dir))
            .await?
            .map_err(|err| Error::from_local(project, err))?;
        *slot = Some(repo);
        tracing::debug!(
            project,
            skipped = built.skipped.len(),
            "compacted the Git cache"
        );
        Ok(())
    }

    /// The project's fetch lock, waited for at most [`Limits::fetch_timeout`]: a fetch that outlived its
    /// deadline holds it until it really ends, and callers must not wait for that without a bound either.
    async fn fetch_lock(
        &self,
        project: &str,
        cache: &ProjectCache,
    ) -> Result<tokio::sync::OwnedMutexGuard<()>, Error> {
        let deadline = self.inner.limits.fetch_timeout;
        tokio::time::timeout(deadline, cache.fetch_lock.clone().lock_owned())
            .await
            .map_err(|_| Error::Transport {
                project: project.to_owned(),
                message: format!(
                    "another fetch of the project is still running after {} (limit fetch_timeout)",
                    humanize(deadline)
                ),
            })
    }

    /// Runs blocking network work on tokio's blocking pool within [`Limits::fetch_timeout`]. Past the
    /// deadline the caller gets a [`Error::Transport`] at once, and the work is told to stop (`work` gets
    /// the flag to pass to gitoxide); `held` (the project's fetch lock) is released only when the work has
    /// really ended.
    async fn network<T: Send + 'static>(
        &self,
        project: &str,
        held: Option<tokio::sync::OwnedMutexGuard<()>>,
        work: impl FnOnce(&AtomicBool) -> T + Send + 'static,
    ) -> Result<T, Error> {
        let deadline = self.inner.limits.fetch_timeout;
        let interrupt = Arc::new(AtomicBool::new(false));
        let flag = interrupt.clone();
        let task = tokio::task::spawn_blocking(move || {
            let _held = held;
            work(&flag)
        });
        match tokio::time::timeout(deadline, task).await {
            Ok(joined) => joined.map_err(|err| Error::Aborted {
                project: project.to_owned(),
                message: err.to_string(),
            }),
            Err(_) => {
                interrupt.store(true, Ordering::SeqCst);
                Err(Error::Transport {
                    project: project.to_owned(),
                    message: format!(
                        "the Git server did not finish within {} (limit fetch_timeout)",
                        humanize(deadline)
                    ),
                })
            }
        }
    }

    /// [`Self::resolve`] and [`Self::ensure_commit`] in one call; returns the commit.
    pub async fn snapshot(&self, project: &str, reference: &GitRef) -> Result<String, Error> {
        let commit = self.resolve(project, reference).await?;
        self.ensure_commit(project, reference, &commit).await?;
        Ok(commit)
    }

    /// Reads the file at `path` in `commit`. `Ok(None)` if there's no regular file at `path`;
    /// [`Error::TooLarge`] if it's larger than `max_size` bytes (checked before loading it).
    pub async fn read_file(
        &self,
        project: &str,
        commit: &str,
        path: &str,
        max_size: u64,
    ) -> Result<Option<Vec<u8>>, Error> {
        validate_project(project)?;
        let commit_id = parse_commit(commit)?;
        let segments: Vec<String> = read::path_segments(path)?
            .into_iter()
            .map(str::to_owned)
            .collect();
        let repo = self.cached_repo(project, commit).await?;
        // The guard moves into the blocking read: the repository is not replaced under it.
        let lookup = blocking(project, move || {
            let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
            read::read_file(&repo.to_thread_local(), commit_id, &segments, max_size)
        })
        .await?
        .map_err(|err| Error::from_local(project, err))?;
        match lookup {
            None => Err(self.not_cached(project, commit)),
            Some(FileLookup::Found(data)) => Ok(Some(data)),
            Some(FileLookup::Missing) => Ok(None),
            Some(FileLookup::TooLarge { size }) => Err(Error::TooLarge {
                path: path.to_owned(),
                size,
                limit: max_size,
            }),
        }
    }

    /// All regular files (no symlinks or submodules) in the tree of `commit` as `(path, size)`, sorted by path.
    pub async fn list_files(
        &self,
        project: &str,
        commit: &str,
    ) -> Result<Vec<(String, u64)>, Error> {
        validate_project(project)?;
        let commit_id = parse_commit(commit)?;
        let repo = self.cached_repo(project, commit).await?;
        let max_files = self.inner.limits.max_files;
        let listing = blocking(project, move || {
            read::list_files(&repo.to_thread_local(), commit_id, max_files)
        })
        .await?
        .map_err(|err| Error::from_local(project, err))?;
        match listing {
            None => Err(self.not_cached(project, commit)),
            Some(FileListing::Files(files)) => Ok(files),
            Some(FileListing::TooMany) => Err(Error::TooManyFiles {
                project: project.to_owned(),
                limit: max_files,
            }),
        }
    }

    /// Whether `project` exists on the server: `false` if the server says it doesn't (HTTP 404), an error if
    /// access is denied or the server can't be reached.
    pub async fn exists(&self, project: &str) -> Result<bool, Error> {
        validate_project(project)?;
        let probe = self.probe().await?;
        let endpoint = self.endpoint(project);
        let result = self
            .network(project, None, move |_| {
                remote::ls_ref(&probe.to_thread_local(), &endpoint, "HEAD")
            })
            .await?;
        match result.map_err(|err| Error::from_network(project, &err)) {
            Ok(_) => Ok(true),
            Err(Error::NotFound { .. }) => Ok(false),
            Err(err) => Err(err),
        }
    }

    fn endpoint(&self, project: &str) -> Endpoint {
        Endpoint {
            url: format!("{}/{project}.git", self.inner.base_url),
            credentials: self.inner.credentials.clone(),
            extra_ca_pem: self.inner.extra_ca_pem.clone(),
            connect_timeout: self.inner.limits.connect_timeout,
            http_timeout: self.inner.limits.http_timeout,
        }
    }

    fn project(&self, project: &str) -> Arc<ProjectCache> {
        let mut projects = self
            .inner
            .projects
            .lock()
            .expect("project map lock poisoned");
        projects
            .entry(project.to_owned())
            .or_insert_with(|| {
                Arc::new(ProjectCache {
                    fetch_lock: Arc::default(),
                    repo: Arc::default(),
                    compact_again_at: Mutex::new(0),
                })
            })
            .clone()
    }

    fn project_dir(&self, project: &str) -> PathBuf {
        self.inner.cache_dir.join(format!("{project}.git"))
    }

    /// The project's cached repository, created if it doesn't exist yet.
    async fn project_repo(&self, project: &str, cache: &ProjectCache) -> Result<RepoGuard, Error> {
        loop {
            let guard = cache.repo.clone().read_owned().await;
            if guard.is_some() {
                return Ok(tokio::sync::OwnedRwLockReadGuard::map(guard, |repo| {
                    repo.as_ref().expect("checked above")
                }));
            }
            drop(guard);
            let mut slot = cache.repo.write().await;
            if slot.is_none() {
                let dir = self.project_dir(project);
                let repo = blocking(project, move || open_or_init(&dir))
                    .await?
                    .map_err(|err| Error::from_local(project, err))?;
                *slot = Some(repo);
            }
        }
    }

    /// The project's cached repository for reading `commit`; a project that was never fetched has none.
    async fn cached_repo(&self, project: &str, commit: &str) -> Result<RepoGuard, Error> {
        let cache = self.project(project);
        if cache.repo.read().await.is_none() && !self.project_dir(project).exists() {
            return Err(self.not_cached(project, commit));
        }
        self.project_repo(project, &cache).await
    }

    fn not_cached(&self, project: &str, commit: &str) -> Error {
        Error::CommitNotCached {
            project: project.to_owned(),
            commit: commit.to_owned(),
        }
    }

    async fn probe(&self) -> Result<gix::ThreadSafeRepository, Error> {
        let dir = self.inner.cache_dir.join(".probe.git");
        let repo = self
            .inner
            .probe
            .get_or_try_init(|| async {
                blocking("", move || open_or_init(&dir))
                    .await?
                    .map_err(|err| Error::from_local("", err))
            })
            .await?;
        Ok(repo.clone())
    }
}

/// Where a fetched commit is recorded locally, per followed ref, so the next fetch of the same ref can
/// tell the server which objects we have, and so compaction keeps it. Each pinned commit has a ref of its
/// own: several agents may pin different commits of one project, and each must survive compaction.
fn local_ref_name(reference: &GitRef, commit: gix::ObjectId) -> String {
    match reference {
        GitRef::DefaultBranch => "refs/kas/default-branch".to_owned(),
        GitRef::Branch(branch) => format!("refs/kas/heads/{branch}"),
        GitRef::Tag(tag) => format!("refs/kas/tags/{tag}"),
        GitRef::Commit(_) => format!("refs/kas/commits/{commit}"),
    }
}

/// `90s`, `2m 30s`, `500ms`: for messages that name a limit.
fn humanize(duration: Duration) -> String {
    let secs = duration.as_secs();
    match (secs, duration.subsec_millis()) {
        (0, millis) => format!("{millis}ms"),
        (secs, 0) if secs % 60 == 0 => format!("{}m", secs / 60),
        (secs, 0) if secs > 60 => format!("{}m {}s", secs / 60, secs % 60),
        (secs, 0) => format!("{secs}s"),
        _ => format!("{:.1}s", duration.as_secs_f64()),
    }
}

fn parse_commit(commit: &str) -> Result<gix::ObjectId, Error> {
    let invalid = || Error::InvalidCommit {
        commit: commit.to_owned(),
    };
    // Abbreviated ids are ambiguous and can't be fetched; only full SHA-1 ids are accepted.
    if commit.len() != 40 {
        return Err(invalid());
    }
    gix::ObjectId::from_hex(commit.as_bytes()).map_err(|_| invalid())
}

/// Whether `commit` is in the repository as a commit (fetched commits always come with their trees).
async fn has_commit(
    project: &str,
    repo: &gix::ThreadSafeRepository,
    commit: gix::ObjectId,
) -> Result<bool, Error> {
    let repo = repo.clone();
    let header = blocking(project, move || {
        repo.to_thread_local().try_find_header(commit)
    })
    .await?
    .map_err(|err| Error::from_local(project, err))?;
    Ok(header.is_some_and(|header| header.kind() == gix::object::Kind::Commit))
}

/// How many packs the repository at `dir` has.
fn count_packs(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("objects/pack"))
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "pack"))
                .count()
        })
        .unwrap_or(0)
}

/// A compacted copy of a repository, not yet swapped in.
struct Compacted {
    dir: PathBuf,
    /// Local refs left out because the server refused their commit.
    skipped: Vec<String>,
}

/// [`RepoCache::compact`]'s network part: a new repository next to `dir` with the commits of `old`'s local
/// refs, in one fetch. A tip the server refuses ("not our ref <id>") is dropped and the fetch retried
/// without it; any other failure removes the new repository and is returned.
fn build_compacted(
    old: &gix::ThreadSafeRepository,
    dir: &Path,
    endpoint: &Endpoint,
    interrupt: &AtomicBool,
) -> gix::Result<Compacted> {
    let old = old.to_thread_local();
    let mut tips = Vec::new();
    for reference in old.references()?.prefixed("refs/kas/")? {
        let mut reference = reference.map_err(gix::Error::from_error)?;
        let name = reference.name().as_bstr().to_string();
        tips.push((reference.peel_to_id()?.detach(), name));
    }
    let parent = dir
        .parent()
        .expect("project directories are inside the cache directory");
    let scratch = tempfile_dir(parent, "git");
    let fresh = gix::ThreadSafeRepository::init_opts(
        &scratch,
        gix::create::Kind::Bare,
        gix::create::Options::default(),
        gix::open::Options::isolated(),
    )?;
    let mut skipped = Vec::new();
    let fetched = loop {
        if tips.is_empty() {
            break Ok(());
        }
        let err = match remote::fetch(
            &fresh.to_thread_local(),
            endpoint,
            FetchTarget::Tips(&tips),
            interrupt,
        ) {
            Ok(()) => break Ok(()),
            Err(err) => err,
        };
        let refused = refused_tip(&err, &tips);
        match refused {
            Some(index) => skipped.push(tips.remove(index).1),
            None => break Err(err),
        }
    };
    drop(fresh);
    match fetched {
        Ok(()) => Ok(Compacted {
            dir: scratch,
            skipped,
        }),
        Err(err) => {
            let _ = std::fs::remove_dir_all(&scratch);
            Err(err)
        }
    }
}

/// The tip a failed fetch names as refused by the server (`upload-pack: not our ref <id>`), if any.
fn refused_tip(err: &gix::Error, tips: &[(gix::ObjectId, String)]) -> Option<usize> {
    let text = match Error::from_network("", err) {
        Error::Transport { message, .. } => message,
        _ => return None,
    };
    if !text.contains("not our ref") {
        return None;
    }
    tips.iter()
        .position(|(commit, _)| text.contains(&commit.to_string()))
}

/// [`RepoCache::compact`]'s local part: `scratch` replaces `dir`, and the old repository is removed. A crash
/// in between leaves `dir` missing (refetched on the next use) and `.tmp-*` directories, which
/// [`remove_leftovers`] removes at the next start.
fn swap_in(scratch: &Path, dir: &Path) -> gix::Result<gix::ThreadSafeRepository> {
    let retired = scratch.with_extension("retired");
    if let Err(err) = std::fs::rename(dir, &retired) {
        let _ = std::fs::remove_dir_all(scratch);
        return Err(gix::Error::from_error(err));
    }
    if let Err(err) = std::fs::rename(scratch, dir) {
        // Put the old one back: a cache must never be left missing.
        let _ = std::fs::rename(&retired, dir);
        let _ = std::fs::remove_dir_all(scratch);
        return Err(gix::Error::from_error(err));
    }
    let _ = std::fs::remove_dir_all(&retired);
    gix::ThreadSafeRepository::open_opts(dir, gix::open::Options::isolated())
}

/// Prefix of the scratch (`.tmp-….git`) and retired (`.tmp-….retired`) directories of repository creation
/// and compaction, next to the project directories.
const LEFTOVER_PREFIX: &str = ".tmp-";

/// Removes every `.tmp-*` directory under `cache_dir` (scratch and retired repositories of a creation or
/// compaction that was killed half-way). Runs before the cache is used, so none of them is in use. Does not
/// descend into repositories.
fn remove_leftovers(cache_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(cache_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        if name.starts_with(LEFTOVER_PREFIX) {
            match std::fs::remove_dir_all(&path) {
                Ok(()) => {
                    tracing::info!(dir = %path.display(), "removed a leftover of an interrupted Git cache operation")
                }
                Err(err) => {
                    tracing::warn!(dir = %path.display(), error = %err, "cannot remove a leftover of an interrupted Git cache operation")
                }
            }
        } else if !name.ends_with(".git") {
            // A group directory.
            remove_leftovers(&path);
        }
    }
}

/// Opens the bare repository at `dir`, creating it if needed. Git configuration of the host (system,
/// global, environment) is ignored so nothing but this crate controls how kas talks to servers.
fn open_or_init(dir: &Path) -> gix::Result<gix::ThreadSafeRepository> {
    if dir.exists() {
        match gix::ThreadSafeRepository::open_opts(dir, gix::open::Options::isolated()) {
            Ok(repo) => return Ok(repo),
            // Out of file descriptors or memory, an I/O error: the cache is probably fine and must not be
            // thrown away (and refetched) for it. The error goes to the caller, the next call tries again.
            Err(err) if open_failure_is_transient(dir, &err) => return Err(err),
            Err(err) => {
                // A cache can always be rebuilt from the server; a broken one (e.g. after a crash during
                // creation) must not block the project forever.
                tracing::warn!(dir = %dir.display(), error = %err, "recreating unusable Git cache");
                std::fs::remove_dir_all(dir).map_err(gix::Error::from_error)?;
            }
        }
    }
    // Create next to the final location and rename, so a crash never leaves a half-initialized repository.
    let parent = dir
        .parent()
        .expect("project directories are inside the cache directory");
    std::fs::create_dir_all(parent).map_err(gix::Error::from_error)?;
    let scratch = tempfile_dir(parent, "git");
    gix::ThreadSafeRepository::init_opts(
        &scratch,
        gix::create::Kind::Bare,
        gix::create::Options::default(),
        gix::open::Options::isolated(),
    )?;
    match std::fs::rename(&scratch, dir) {
        Ok(()) => {}
        // Lost a race against another process; theirs is as good as ours.
        Err(_) if dir.exists() => {
            let _ = std::fs::remove_dir_all(&scratch);
        }
        Err(err) => return Err(gix::Error::from_error(err)),
    }
    gix::ThreadSafeRepository::open_opts(dir, gix::open::Options::isolated())
}

/// Whether opening the repository at `dir` failed for a reason other than the repository itself: a
/// transient I/O error ([`is_transient_io`]) in the failure's causes, or when reading its `HEAD` ourselves.
/// A missing or garbage `HEAD`, a missing `objects` directory or a corrupt config are not transient: such a
/// repository is recreated.
fn open_failure_is_transient(dir: &Path, err: &gix::Error) -> bool {
    if err.iter_errors().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(is_transient_io)
    }) {
        return true;
    }
    match std::fs::read(dir.join("HEAD")) {
        Err(io) => is_transient_io(&io),
        Ok(_) => false,
    }
}

/// I/O errors that say nothing about the files: out of descriptors or memory, interrupted, busy, a failing
/// or full disk, or missing permissions (which deleting would not fix either).
fn is_transient_io(err: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    // EPERM, EINTR, EIO, EAGAIN, ENOMEM, EACCES, EBUSY, ENFILE, EMFILE, ENOSPC.
    const TRANSIENT_ERRNOS: [i32; 10] = [1, 4, 5, 11, 12, 13, 16, 23, 24, 28];
    err.raw_os_error()
        .is_some_and(|errno| TRANSIENT_ERRNOS.contains(&errno))
        || matches!(
            err.kind(),
            ErrorKind::Interrupted
                | ErrorKind::WouldBlock
                | ErrorKind::OutOfMemory
                | ErrorKind::TimedOut
                | ErrorKind::PermissionDenied
                | ErrorKind::ResourceBusy
                | ErrorKind::StorageFull
        )
}

/// A fresh name for a scratch directory next to the project directories, with `LEFTOVER_PREFIX`.
fn tempfile_dir(parent: &Path, extension: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    parent.join(format!(
        "{LEFTOVER_PREFIX}{}-{nanos}.{extension}",
        std::process::id()
    ))
}

/// Runs blocking gitoxide work on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    project: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|err| Error::Aborted {
            project: project.to_owned(),
            message: err.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_transient_io_errors_keep_an_unopenable_cache() {
        for errno in [24, 23, 12, 5, 28, 13] {
            let err = std::io::Error::from_raw_os_error(errno);
            assert!(is_transient_io(&err), "{err}");
        }
        for kind in [
            std::io::ErrorKind::NotFound,
            std::io::ErrorKind::InvalidData,
            std::io::ErrorKind::IsADirectory,
            std::io::ErrorKind::UnexpectedEof,
        ] {
            assert!(!is_transient_io(&std::io::Error::from(kind)), "{kind:?}");
        }
    }

    #[test]
    fn an_unusable_repository_is_recreated() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("group/project.git");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("HEAD"), b"garbage").unwrap();
        open_or_init(&dir).expect("a broken cache is recreated");
        assert!(dir.join("objects").is_dir());
    }

    #[test]
    fn humanizes_limits() {
        assert_eq!(humanize(Duration::from_secs(300)), "5m");
        assert_eq!(humanize(Duration::from_secs(90)), "1m 30s");
        assert_eq!(humanize(Duration::from_secs(3)), "3s");
        assert_eq!(humanize(Duration::from_millis(500)), "500ms");
    }
}
