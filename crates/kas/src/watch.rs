//! One watcher per Git project, shared by every agent that needs it: it asks the server for the ref's commit
//! each poll period (no objects move unless the commit changed), fetches new commits into the shared cache,
//! and publishes the current commit. A webhook can [`ProjectWatchers::poke`] it to check at once.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use gitops_git::{GitRef, RepoCache};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// What a watcher knows about its project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProjectState {
    /// Not checked yet.
    Pending,
    /// The ref's commit, present in the cache.
    Commit(String),
    /// The last check failed; the message names the project and the cause.
    Failed(String),
}

/// A subscription to one project's state. The poll task stops when the last subscription is dropped.
#[derive(Debug)]
pub struct ProjectWatcher {
    pub project: String,
    state: watch::Receiver<ProjectState>,
    checks: Checks,
    poke: Arc<Notify>,
    stop: CancellationToken,
}

/// Refresh requests and how far the poll task has served them: a check serves every request made before it
/// started, so [`ProjectWatcher::refresh`] knows when the state it reads is newer than its call.
#[derive(Debug, Clone)]
struct Checks {
    requested: Arc<watch::Sender<u64>>,
    served: watch::Receiver<u64>,
}

impl ProjectWatcher {
    pub fn subscribe(&self) -> watch::Receiver<ProjectState> {
        self.state.clone()
    }

    /// Check the project now instead of at the next poll.
    pub fn poke(&self) {
        self.poke.notify_one();
    }

    /// Checks the project now and returns its state as a check that started after this call found it.
    pub async fn refresh(&self) -> ProjectState {
        let mut request = 0;
        self.checks.requested.send_modify(|n| {
            *n += 1;
            request = *n;
        });
        self.poke();
        let mut served = self.checks.served.clone();
        // An error means the poll task ended (the watcher is being dropped): its last state is all there is.
        let _ = served.wait_for(|n| *n >= request).await;
        self.state.borrow().clone()
    }
}

impl Drop for ProjectWatcher {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[derive(Debug)]
pub struct ProjectWatchers {
    repos: RepoCache,
    poll_period: Duration,
    watchers: Mutex<HashMap<(String, GitRef), Weak<ProjectWatcher>>>,
}

impl ProjectWatchers {
    pub fn new(repos: RepoCache, poll_period: Duration) -> Self {
        Self {
            repos,
            poll_period,
            watchers: Mutex::default(),
        }
    }

    pub fn repos(&self) -> &RepoCache {
        &self.repos
    }

    /// The watcher of the project's default branch (where agent configuration lives).
    pub fn watch(&self, project: &str) -> Arc<ProjectWatcher> {
        self.watch_ref(project, GitRef::DefaultBranch)
    }

    /// The watcher of `reference` in `project`, started if nobody watches it yet. One per (project, ref),
    /// shared by every agent: one ref check and at most one fetch per poll, however many agents watch.
    pub fn watch_ref(&self, project: &str, reference: GitRef) -> Arc<ProjectWatcher> {
        let mut watchers = self.watchers.lock().expect("watchers lock");
        let key = (project.to_owned(), reference);
        if let Some(existing) = watchers.get(&key).and_then(Weak::upgrade) {
            return existing;
        }
        let (tx, rx) = watch::channel(ProjectState::Pending);
        let (served_tx, served) = watch::channel(0);
        let requested = Arc::new(watch::Sender::new(0));
        let watcher = Arc::new(ProjectWatcher {
            project: project.to_owned(),
            state: rx,
            checks: Checks {
                requested: requested.clone(),
                served,
            },
            poke: Arc::new(Notify::new()),
            stop: CancellationToken::new(),
        });
        let wake = Wake {
            poke: watcher.poke.clone(),
            requested,
            served: served_tx,
            stop: watcher.stop.clone(),
        };
        tokio::spawn(poll(
            self.repos.clone(),
            key.clone(),
            self.poll_period,
            tx,
            wake,
        ));
        watchers.retain(|_, w| w.strong_count() > 0);
        watchers.insert(key, Arc::downgrade(&watcher));
        watcher
    }

    /// How many (project, ref) watchers run now.
    pub fn count(&self) -> usize {
        let watchers = self.watchers.lock().expect("watchers lock");
        watchers.values().filter(|w| w.strong_count() > 0).count()
    }

    /// Checks every watched ref of `project` at once (a push webhook arrived). Returns how many were poked.
    pub fn poke(&self, project: &str) -> usize {
        let watchers: Vec<_> = self
            .watchers
            .lock()
            .expect("watchers lock")
            .iter()
            .filter(|((p, _), _)| p == project)
            .filter_map(|(_, w)| w.upgrade())
            .collect();
        watchers.iter().for_each(|w| w.poke());
        watchers.len()
    }

    /// The watchers of `project` that run now, one per watched ref.
    pub fn of_project(&self, project: &str) -> Vec<Arc<ProjectWatcher>> {
        self.watchers
            .lock()
            .expect("watchers lock")
            .iter()
            .filter(|((p, _), _)| p == project)
            .filter_map(|(_, w)| w.upgrade())
            .collect()
    }
}

/// What wakes a poll task besides its period, and where it says which refresh requests it served.
struct Wake {
    poke: Arc<Notify>,
    requested: Arc<watch::Sender<u64>>,
    served: watch::Sender<u64>,
    stop: CancellationToken,
}

async fn poll(
    repos: RepoCache,
    (project, reference): (String, GitRef),
    period: Duration,
    state: watch::Sender<ProjectState>,
    wake: Wake,
) {
    loop {
        let serving = *wake.requested.borrow();
        let next = match repos.snapshot(&project, &reference).await {
            Ok(commit) => ProjectState::Commit(commit),
            Err(e) => ProjectState::Failed(e.to_string()),
        };
        state.send_if_modified(|current| {
            if *current == next {
                return false;
            }
            match &next {
                ProjectState::Commit(commit) => debug!(project, commit, "project has a new commit"),
                ProjectState::Failed(error) => warn!(project, error, "checking project failed"),
                ProjectState::Pending => {}
            }
            *current = next;
            true
        });
        wake.served.send_replace(serving);
        // A pinned commit never changes: once it is in the cache there is nothing left to poll, and a
        // refresh is answered with what is there.
        if matches!(reference, GitRef::Commit(_))
            && matches!(*state.borrow(), ProjectState::Commit(_))
        {
            loop {
                tokio::select! {
                    _ = wake.stop.cancelled() => return,
                    _ = wake.poke.notified() => {
                        wake.served.send_replace(*wake.requested.borrow());
                    }
                }
            }
        }
        tokio::select! {
            _ = wake.stop.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
            _ = wake.poke.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use gitops_git::GitServerConfig;
    use test_support::git_http::GitHttpServer;

    use super::*;

    const PROJECT: &str = "group/apps";

    /// A refresh sees a commit pushed just before it, although the poll period is an hour; a pinned
    /// commit (whose task no longer polls) answers at once.
    #[tokio::test]
    async fn a_refresh_reads_git_now_and_a_pinned_commit_answers_at_once() -> anyhow::Result<()> {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let server = GitHttpServer::start().await?;
        server.create_repo(PROJECT, false)?;
        let first = server.commit_files(PROJECT, &[("a.yaml", Some("a: 1\n"))], "first")?;
        let cache = tempfile::tempdir()?;
        let repos = RepoCache::new(
            GitServerConfig {
                base_url: server.base_url(),
                username: None,
                password: None,
                extra_ca_pem: None,
            },
            cache.path().to_path_buf(),
        );
        let watchers = ProjectWatchers::new(repos, Duration::from_secs(3600));
        let watcher = watchers.watch(PROJECT);
        assert_eq!(watcher.refresh().await, ProjectState::Commit(first.clone()));
        let second = server.commit_files(PROJECT, &[("a.yaml", Some("a: 2\n"))], "second")?;
        let refreshed = tokio::time::timeout(Duration::from_secs(20), watcher.refresh()).await?;
        assert_eq!(refreshed, ProjectState::Commit(second.clone()));
        assert_eq!(*watcher.subscribe().borrow(), ProjectState::Commit(second));
        assert_eq!(watchers.of_project(PROJECT).len(), 1);

        let pinned = watchers.watch_ref(PROJECT, GitRef::Commit(first.clone()));
        assert_eq!(pinned.refresh().await, ProjectState::Commit(first.clone()));
        let again = tokio::time::timeout(Duration::from_secs(5), pinned.refresh()).await?;
        assert_eq!(again, ProjectState::Commit(first));
        assert_eq!(watchers.of_project(PROJECT).len(), 2);
        Ok(())
    }
}
