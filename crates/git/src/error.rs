//! Errors of this crate, and the translation of gitoxide's errors into them.

/// Why a Git operation failed. Messages name the project, ref or path involved and never contain
/// credentials.
#[derive(thiserror::Error, Debug)]
pub enum Error {
    #[error("project {project:?} is not a valid project path (expected e.g. \"group/project\")")]
    InvalidProject { project: String },

    #[error("project {project:?} was not found on the Git server")]
    NotFound { project: String },

    #[error("access to project {project:?} was denied by the Git server: {message}")]
    Unauthorized { project: String, message: String },

    #[error("{reference} was not found in project {project:?}")]
    RefNotFound { project: String, reference: String },

    #[error("{reference} is not a valid Git ref name: {reason}")]
    InvalidRef {
        reference: String,
        reason: &'static str,
    },

    #[error("{commit:?} is not a valid commit id (expected 40 hex characters)")]
    InvalidCommit { commit: String },

    #[error(
        "commit {commit} of project {project:?} is not in the local cache; call ensure_commit first"
    )]
    CommitNotCached { project: String, commit: String },

    #[error("commit {commit} was not found in project {project:?}")]
    CommitNotFound { project: String, commit: String },

    #[error("{path:?} is not a valid file path in a repository")]
    InvalidPath { path: String },

    #[error("file {path:?} is {size} bytes, over the limit of {limit} bytes")]
    TooLarge { path: String, size: u64, limit: u64 },

    #[error("project {project:?} has more than {limit} files")]
    TooManyFiles { project: String, limit: usize },

    #[error("talking to the Git server about project {project:?} failed: {message}")]
    Transport { project: String, message: String },

    #[error("local Git cache of project {project:?}: {message}")]
    Repository { project: String, message: String },

    #[error("CA certificates for the Git server: {0}")]
    CaCertificates(String),

    #[error("Git operation for project {project:?} was aborted: {message}")]
    Aborted { project: String, message: String },
}

impl Error {
    /// Translates an error of a network operation (handshake, ls-refs, fetch) on `project`.
    pub(crate) fn from_network(project: &str, err: &gix::Error) -> Self {
        let project = project.to_owned();
        if is_http_not_found(err) {
            return Error::NotFound { project };
        }
        if err.is_unauthenticated() || err.is_permission_denied() {
            return Error::Unauthorized {
                project,
                message: describe(err),
            };
        }
        Error::Transport {
            project,
            message: describe(err),
        }
    }

    /// Translates an error of a local operation on the cached repository of `project`.
    pub(crate) fn from_local(project: &str, err: impl std::fmt::Display) -> Self {
        Error::Repository {
            project: project.to_owned(),
            message: err.to_string(),
        }
    }
}

/// gitoxide reports HTTP 404 as an unclassified reqwest status error. Matching the text avoids depending
/// on the exact reqwest version gitoxide links.
fn is_http_not_found(err: &gix::Error) -> bool {
    err.is_not_found()
        || err.iter_errors().any(|e| {
            let text = e.to_string();
            text.contains("HTTP status 404") || text.contains("(404 Not Found)")
        })
}

/// One line with the whole cause chain, like anyhow's `{:#}`, without duplicated segments.
fn describe(err: &gix::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in err.iter_errors() {
        let text = format!("{cause:#}");
        if !text.is_empty() && !parts.iter().any(|seen| seen.contains(&text)) {
            parts.push(text);
        }
    }
    if parts.is_empty() {
        err.to_string()
    } else {
        parts.join(": ")
    }
}
