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
    poke: Arc<Notify>,
    stop: CancellationToken,
}

impl ProjectWatcher {
    pub fn subscribe(&self) -> watch::Receiver<ProjectState> {
        self.state.clone()
    }

    /// Check the project now instead of at the next poll.
    pub fn poke(&self) {
        self.poke.notify_one();
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
    watchers: Mutex<HashMap<String, Weak<ProjectWatcher>>>,
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

    /// The project's watcher, started if nobody watches it yet. Only the default branch for now: that is
    /// where agent configuration lives.
    pub fn watch(&self, project: &str) -> Arc<ProjectWatcher> {
        let mut watchers = self.watchers.lock().expect("watchers lock");
        if let Some(existing) = watchers.get(project).and_then(Weak::upgrade) {
            return existing;
        }
        let (tx, rx) = watch::channel(ProjectState::Pending);
        let watcher = Arc::new(ProjectWatcher {
            project: project.to_owned(),
            state: rx,
            poke: Arc::new(Notify::new()),
            stop: CancellationToken::new(),
        });
        tokio::spawn(poll(
            self.repos.clone(),
            project.to_owned(),
            self.poll_period,
            tx,
            watcher.poke.clone(),
            watcher.stop.clone(),
        ));
        watchers.retain(|_, w| w.strong_count() > 0);
        watchers.insert(project.to_owned(), Arc::downgrade(&watcher));
        watcher
    }

    /// Checks `project` at once if anyone watches it (a push webhook arrived).
    pub fn poke(&self, project: &str) -> bool {
        let watcher = self
            .watchers
            .lock()
            .expect("watchers lock")
            .get(project)
            .and_then(Weak::upgrade);
        watcher.map(|w| w.poke()).is_some()
    }
}

async fn poll(
    repos: RepoCache,
    project: String,
    period: Duration,
    state: watch::Sender<ProjectState>,
    poke: Arc<Notify>,
    stop: CancellationToken,
) {
    loop {
        let next = match repos.snapshot(&project, &GitRef::DefaultBranch).await {
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
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
            _ = poke.notified() => {}
        }
    }
}
