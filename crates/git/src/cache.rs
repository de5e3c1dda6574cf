//! The shared cache of bare repositories, one per project, and the async API on top of it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

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
}

struct ProjectCache {
    /// Held while fetching (and compacting), so concurrent callers wait for one fetch instead of doing
    /// their own. Never waited for while holding a read guard of `repo`: compaction, which holds this
    /// lock, waits for every read guard.
    fetch_lock: tokio::sync::Mutex<()>,
    /// The open repository, once opened. Every use holds a read guard until it is done, so compaction
    /// (under the write lock) never removes the directory under a reader.
    repo: Arc<tokio::sync::RwLock<Option<gix::ThreadSafeRepository>>>,
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

    pub fn with_limits(server: GitServerConfig, cache_dir: PathBuf, limits: Limits) -> Self {
        Self {
            inner: Arc::new(Inner {
                base_url: server.sanitized_base_url(),
                credentials: server.credentials(),
                extra_ca_pem: server.extra_ca_pem.clone().map(Arc::new),
                cache_dir,
                limits,
                projects: Mutex::new(HashMap::new()),
                probe: OnceCell::new(),
            }),
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
        let Some(ref_name) = reference.remote_ref_name() else {
            let GitRef::Commit(commit) = reference else {
                unreachable!("only commits have no remote ref name")
            };
            return Ok(parse_commit(commit)?.to_string());
        };
        let probe = self.probe().await?;
        let endpoint = self.endpoint(project);
        let name = ref_name.clone();
        let advertised = blocking(project, move || {
            remote::ls_ref(&probe.to_thread_local(), &endpoint, &name)
        })
        .await?
        .map_err(|err| Error::from_network(project, &err))?;
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
        let commit = parse_commit(commit)?;
        let cache = self.project(project);
        {
            let repo = self.project_repo(project, &cache).await?;
            if has_commit(project, &repo, commit).await? {
                return Ok(());
            }
        }
        let _fetching = cache.fetch_lock.lock().await;
        let repo = self.project_repo(project, &cache).await?;
        // Another caller may have fetched it while we waited.
        if has_commit(project, &repo, commit).await? {
            return Ok(());
        }
        let endpoint = self.endpoint(project);
        let ref_name = reference.remote_ref_name();
        let local_ref = local_ref_name(reference);
        tracing::debug!(project, %reference, %commit, "fetching");
        let fetch_repo: gix::ThreadSafeRepository = (*repo).clone();
        let fetched = blocking(project, move || {
            let repo = fetch_repo.to_thread_local();
            // Nothing interrupts fetches: a cancelled caller's fetch still completes for the next caller.
            let never_interrupt = AtomicBool::new(false);
            let by_id = FetchTarget::Commit {
                commit,
                ref_name: ref_name.as_deref(),
                local_ref: &local_ref,
            };
            let err = match remote::fetch(&repo, &endpoint, by_id, &never_interrupt) {
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
            remote::fetch(&repo, &endpoint, by_ref, &never_interrupt)
        })
        .await?;
        if let Err(err) = fetched {
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
        if count_packs(&self.project_dir(project)) > self.inner.limits.max_packs {
            self.compact(project, &cache).await;
        }
        Ok(())
    }

    /// Replaces the project's repository by a fresh one holding only the commits its local refs point at,
    /// fetched again with depth 1 in one fetch (one pack). On failure the old repository stays.
    async fn compact(&self, project: &str, cache: &ProjectCache) {
        let mut slot = cache.repo.write().await;
        let Some(old) = slot.clone() else { return };
        let dir = self.project_dir(project);
        let endpoint = self.endpoint(project);
        let rebuilt = blocking(project, move || rebuild(&old, &dir, &endpoint)).await;
        match rebuilt {
            Ok(Ok(repo)) => {
                tracing::debug!(project, "compacted the Git cache");
                *slot = Some(repo);
            }
            Ok(Err(err)) => {
                tracing::warn!(project, error = %err, "compacting the Git cache failed; keeping it as it is")
            }
            Err(err) => tracing::warn!(project, error = %err, "compacting the Git cache failed"),
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
        let result = blocking(project, move || {
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
                    fetch_lock: tokio::sync::Mutex::new(()),
                    repo: Arc::default(),
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
/// tell the server which objects we have.
fn local_ref_name(reference: &GitRef) -> String {
    match reference {
        GitRef::DefaultBranch => "refs/kas/default-branch".to_owned(),
        GitRef::Branch(branch) => format!("refs/kas/heads/{branch}"),
        GitRef::Tag(tag) => format!("refs/kas/tags/{tag}"),
        GitRef::Commit(_) => "refs/kas/commit".to_owned(),
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

/// [`RepoCache::compact`]'s work: a new repository next to `dir` with the commits of `old`'s local refs,
/// swapped in for `dir`.
fn rebuild(
    old: &gix::ThreadSafeRepository,
    dir: &Path,
    endpoint: &Endpoint,
) -> gix::Result<gix::ThreadSafeRepository> {
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
    let scratch = tempfile_dir(parent)?;
    let fresh = gix::ThreadSafeRepository::init_opts(
        &scratch,
        gix::create::Kind::Bare,
        gix::create::Options::default(),
        gix::open::Options::isolated(),
    )?;
    let never_interrupt = AtomicBool::new(false);
    let fetched = if tips.is_empty() {
        Ok(())
    } else {
        remote::fetch(
            &fresh.to_thread_local(),
            endpoint,
            FetchTarget::Tips(&tips),
            &never_interrupt,
        )
    };
    if let Err(err) = fetched {
        let _ = std::fs::remove_dir_all(&scratch);
        return Err(err);
    }
    drop(fresh);
    let retired = scratch.with_extension("retired");
    std::fs::rename(dir, &retired).map_err(gix::Error::from_error)?;
    if let Err(err) = std::fs::rename(&scratch, dir) {
        // Put the old one back: a cache must never be left missing.
        let _ = std::fs::rename(&retired, dir);
        return Err(gix::Error::from_error(err));
    }
    let _ = std::fs::remove_dir_all(&retired);
    gix::ThreadSafeRepository::open_opts(dir, gix::open::Options::isolated())
}

/// Opens the bare repository at `dir`, creating it if needed. Git configuration of the host (system,
/// global, environment) is ignored so nothing but this crate controls how kas talks to servers.
fn open_or_init(dir: &Path) -> gix::Result<gix::ThreadSafeRepository> {
    if dir.exists() {
        match gix::ThreadSafeRepository::open_opts(dir, gix::open::Options::isolated()) {
            Ok(repo) => return Ok(repo),
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
    let scratch = tempfile_dir(parent)?;
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

fn tempfile_dir(parent: &Path) -> gix::Result<PathBuf> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let dir = parent.join(format!(".tmp-{}-{nanos}.git", std::process::id()));
    Ok(dir)
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
