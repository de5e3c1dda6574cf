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
        let watcher = Arc::new(ProjectWatcher {
            project: project.to_owned(),
            state: rx,
            poke: Arc::new(Notify::new()),
            stop: CancellationToken::new(),
        });
        tokio::spawn(poll(
            self.repos.clone(),
            key.clone(),
            self.poll_period,
            tx,
            watcher.poke.clone(),
            watcher.stop.clone(),
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
}

async fn poll(
    repos: RepoCache,
    (project, reference): (String, GitRef),
    period: Duration,
    state: watch::Sender<ProjectState>,
    poke: Arc<Notify>,
    stop: CancellationToken,
) {
    loop {
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
        // A pinned commit never changes: once it is in the cache there is nothing left to poll.
        if matches!(reference, GitRef::Commit(_))
            && matches!(*state.borrow(), ProjectState::Commit(_))
        {
            return stop.cancelled().await;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
            _ = poke.notified() => {}
        }
    }
}
