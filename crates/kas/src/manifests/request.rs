//! What agentk asks `GetObjectsToSynchronize` for, checked before anything else looks at it: the project
//! path, the ref name and every path selector must be well formed, or the call is `INVALID_ARGUMENT`
//! before authorisation, before any Git request and before any store write.

use gitops_config::agent::{GitRefConfig, ManifestProject, PathConfig};
use gitops_git::GitRef;
use gitops_protocol::{
    ObjectsToSynchronizeRequest, objects_to_synchronize_request::Ref, path_selector::Selector,
};
use sha2::{Digest, Sha256};

use super::PathSelector;

/// Longest project path accepted (GitLab's limit on full paths is of this order; Gitea's is shorter).
pub const MAX_PROJECT_LEN: usize = 255;
/// Longest branch or tag name accepted (Git has none, but every forge does: GitLab 255, Gitea 255).
pub const MAX_REF_LEN: usize = 255;
/// Longest `glob` or `file` entry accepted.
pub const MAX_SELECTOR_LEN: usize = 4096;

/// One `manifest_projects[]` entry as far as delivery is concerned: which project, at which ref, which files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub project: String,
    pub reference: GitRef,
    pub paths: Vec<PathSelector>,
}

/// A checked request: the selection and the commit agentk already has (`have`, empty on first start).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestRequest {
    pub selection: Selection,
    pub have: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error(
        "project_id {project:?} is not a project path such as \"group/project\" (at most {MAX_PROJECT_LEN} characters of letters, digits, '-', '_' and '.'; no empty, '.'-prefixed or '*.git' segments)"
    )]
    InvalidProject { project: String },
    #[error("{kind} {name:?} is not a valid {kind} name: {reason}")]
    InvalidRef {
        kind: &'static str,
        name: String,
        reason: &'static str,
    },
    #[error("commit_id {commit:?} is neither empty nor a full hex commit id")]
    InvalidHave { commit: String },
    #[error("paths is empty: a manifest project must select at least one path")]
    NoPaths,
    #[error(
        "paths[{index}] has no selector this kas knows (neither glob nor file; is agentk newer than kas?)"
    )]
    UnsetSelector { index: usize },
    #[error("paths[{index}] is empty")]
    EmptySelector { index: usize },
    #[error("paths[{index}] is {len} bytes, over the limit of {MAX_SELECTOR_LEN}")]
    SelectorTooLong { index: usize, len: usize },
    #[error("{count} paths are over the limit of {limit} paths per manifest project (max_paths)")]
    TooManyPaths { count: usize, limit: usize },
}

/// Checks `request`; `max_paths` is the server's `manifests.max_paths`.
pub fn parse(
    request: ObjectsToSynchronizeRequest,
    max_paths: usize,
) -> Result<ManifestRequest, RequestError> {
    validate_project(&request.project_id)?;
    if !request.commit_id.is_empty() && !is_commit_id(&request.commit_id) {
        return Err(RequestError::InvalidHave {
            commit: truncated(&request.commit_id),
        });
    }
    // An unset `ref` is the default branch, as in GitLab's schema. prost cannot tell it from a oneof variant
    // added by a newer agentk (unknown fields are dropped), but that cannot widen access: the selection must
    // equal an entry of the agent's config.yaml as this kas parsed it, and this kas's parser rejects ref kinds
    // it does not know, so the default branch is served only when config.yaml names no ref.
    let reference = match request.r#ref {
        None => GitRef::DefaultBranch,
        Some(Ref::Branch(b)) => GitRef::Branch(validate_ref_name("branch", b)?),
        Some(Ref::Tag(t)) => GitRef::Tag(validate_ref_name("tag", t)?),
        Some(Ref::Commit(c)) if is_commit_id(&c) => GitRef::Commit(c),
        Some(Ref::Commit(c)) => {
            return Err(RequestError::InvalidRef {
                kind: "commit",
                name: truncated(&c),
                reason: "it must be a full hex commit id",
            });
        }
    };
    if request.paths.is_empty() {
        return Err(RequestError::NoPaths);
    }
    if request.paths.len() > max_paths {
        return Err(RequestError::TooManyPaths {
            count: request.paths.len(),
            limit: max_paths,
        });
    }
    let paths = request
        .paths
        .into_iter()
        .enumerate()
        .map(|(index, p)| {
            let selector = match p.selector {
                Some(Selector::Glob(g)) => PathSelector::Glob(g),
                Some(Selector::File(f)) => PathSelector::File(f),
                None => return Err(RequestError::UnsetSelector { index }),
            };
            let (PathSelector::Glob(text) | PathSelector::File(text)) = &selector;
            if text.trim().is_empty() {
                return Err(RequestError::EmptySelector { index });
            }
            if text.len() > MAX_SELECTOR_LEN {
                return Err(RequestError::SelectorTooLong {
                    index,
                    len: text.len(),
                });
            }
            Ok(selector)
        })
        .collect::<Result<_, _>>()?;
    Ok(ManifestRequest {
        selection: Selection {
            project: request.project_id,
            reference,
            paths,
        },
        have: request.commit_id,
    })
}

impl Selection {
    /// The selection a `config.yaml` entry describes, in the form agentk sends it.
    pub fn of_entry(entry: &ManifestProject) -> Self {
        Self {
            project: entry.id.clone(),
            reference: match &entry.reference {
                None => GitRef::DefaultBranch,
                Some(GitRefConfig::Branch(b)) => GitRef::Branch(b.clone()),
                Some(GitRefConfig::Tag(t)) => GitRef::Tag(t.clone()),
                Some(GitRefConfig::Commit(c)) => GitRef::Commit(c.clone()),
            },
            paths: entry
                .paths
                .iter()
                .map(|p| match p {
                    PathConfig::Glob(g) => PathSelector::Glob(g.clone()),
                    PathConfig::File(f) => PathSelector::File(f.clone()),
                })
                .collect(),
        }
    }

    /// A stable digest of ref and paths, stored with the commit sent so that a later stream asking with
    /// that commit as `have` but another selection gets a fresh snapshot instead of nothing.
    pub fn digest(&self) -> String {
        let mut hasher = Sha256::new();
        let mut field = |tag: &str, value: &str| {
            hasher.update(tag.as_bytes());
            hasher.update((value.len() as u64).to_le_bytes());
            hasher.update(value.as_bytes());
        };
        match &self.reference {
            GitRef::DefaultBranch => field("default", ""),
            GitRef::Branch(b) => field("branch", b),
            GitRef::Tag(t) => field("tag", t),
            GitRef::Commit(c) => field("commit", c),
        }
        for path in &self.paths {
            match path {
                PathSelector::Glob(g) => field("glob", g),
                PathSelector::File(f) => field("file", f),
            }
        }
        hex::encode(hasher.finalize())
    }
}

/// The same rule as the Git layer's (`gitops_git` refuses the rest too, but later and per call): a plain
/// `group/project` path that can escape neither a URL nor the cache directory.
pub fn validate_project(project: &str) -> Result<(), RequestError> {
    let valid_segment = |segment: &str| {
        !segment.is_empty()
            && !segment.starts_with('.')
            && !segment.ends_with(".git")
            && segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    };
    if project.len() <= MAX_PROJECT_LEN && project.split('/').all(valid_segment) {
        Ok(())
    } else {
        Err(RequestError::InvalidProject {
            project: truncated(project),
        })
    }
}

/// `git check-ref-format` for a branch or tag name (without `refs/heads/` or `refs/tags/`), plus a length
/// limit and no leading `-` (it would read as an option to Git tools).
pub fn validate_ref_name(kind: &'static str, name: String) -> Result<String, RequestError> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_REF_LEN {
        Some("it is longer than 255 bytes")
    } else if name.starts_with('-') {
        Some("it starts with '-'")
    } else if name
        .bytes()
        .any(|b| b.is_ascii_control() || b" ~^:?*[\\".contains(&b))
    {
        Some("it contains a space, a control character or one of ~ ^ : ? * [ \\")
    } else if name.contains("..") || name.contains("@{") || name == "@" {
        Some("it contains '..' or '@{', or is '@'")
    } else if name.ends_with('.') || name.ends_with('/') || name.starts_with('/') {
        Some("it starts with '/' or ends with '.' or '/'")
    } else if name
        .split('/')
        .any(|c| c.is_empty() || c.starts_with('.') || c.ends_with(".lock"))
    {
        Some("a component is empty, starts with '.' or ends with '.lock'")
    } else {
        None
    };
    match reason {
        None => Ok(name),
        Some(reason) => Err(RequestError::InvalidRef {
            kind,
            name: truncated(&name),
            reason,
        }),
    }
}

/// A full SHA-1 or SHA-256 commit id.
fn is_commit_id(id: &str) -> bool {
    matches!(id.len(), 40 | 64) && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Error messages quote at most 100 characters of a hostile value.
fn truncated(value: &str) -> String {
    match value.char_indices().nth(100) {
        Some((end, _)) => format!("{}...", &value[..end]),
        None => value.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use gitops_protocol::PathSelector as WireSelector;

    use super::*;

    fn request(
        project: &str,
        reference: Option<Ref>,
        paths: Vec<Option<Selector>>,
    ) -> ObjectsToSynchronizeRequest {
        ObjectsToSynchronizeRequest {
            project_id: project.into(),
            commit_id: String::new(),
            r#ref: reference,
            paths: paths
                .into_iter()
                .map(|selector| WireSelector { selector })
                .collect(),
        }
    }

    fn glob() -> Vec<Option<Selector>> {
        vec![Some(Selector::Glob("*.yaml".into()))]
    }

    #[test]
    fn well_formed_requests_parse() {
        let parsed = parse(request("group/sub/project.x", None, glob()), 20).unwrap();
        assert_eq!(parsed.selection.reference, GitRef::DefaultBranch);
        assert_eq!(
            parsed.selection.paths,
            vec![PathSelector::Glob("*.yaml".into())]
        );
        for name in ["main", "release/1.x", "feature-a_b", "v1.0.0"] {
            assert!(
                parse(request("g/p", Some(Ref::Branch(name.into())), glob()), 20).is_ok(),
                "{name}"
            );
        }
        let commit = "a".repeat(40);
        let parsed = parse(
            request("g/p", Some(Ref::Commit(commit.clone())), glob()),
            20,
        )
        .unwrap();
        assert_eq!(parsed.selection.reference, GitRef::Commit(commit));
    }

    #[test]
    fn hostile_project_ids_are_invalid() {
        let huge = "a".repeat(1 << 20);
        for bad in [
            "acme/../other/x",
            "/acme/x",
            "acme/x.git",
            "acme/.hidden",
            "",
            "acme//x",
            "acme/x y",
            huge.as_str(),
        ] {
            let err = parse(request(bad, None, glob()), 20).unwrap_err();
            assert!(
                matches!(err, RequestError::InvalidProject { .. }),
                "{bad}: {err}"
            );
            assert!(
                err.to_string().len() < 400,
                "the message quotes a bounded part"
            );
        }
    }

    #[test]
    fn hostile_ref_names_are_invalid_and_named() {
        let long = "x".repeat(10 * 1024);
        for bad in [
            "main:refs/heads/x",
            "*",
            "a..b",
            "-x",
            long.as_str(),
            "",
            "a b",
            "a/",
            "/a",
            "a//b",
            "a.lock",
            ".a",
            "a/.b",
            "a.",
            "a@{1}",
            "@",
            "a\\b",
            "a\u{7f}",
        ] {
            for reference in [Ref::Branch(bad.into()), Ref::Tag(bad.into())] {
                let err = parse(request("g/p", Some(reference), glob()), 20).unwrap_err();
                assert!(
                    matches!(err, RequestError::InvalidRef { .. }),
                    "{bad:?}: {err}"
                );
            }
        }
        let err = parse(request("g/p", Some(Ref::Commit("main".into())), glob()), 20).unwrap_err();
        assert!(err.to_string().contains("commit \"main\""), "{err}");
    }

    #[test]
    fn unset_empty_or_too_many_selectors_are_invalid() {
        assert_eq!(
            parse(request("g/p", None, vec![]), 20).unwrap_err(),
            RequestError::NoPaths
        );
        assert_eq!(
            parse(
                request("g/p", None, vec![Some(Selector::Glob("*".into())), None]),
                20
            )
            .unwrap_err(),
            RequestError::UnsetSelector { index: 1 }
        );
        assert_eq!(
            parse(
                request("g/p", None, vec![Some(Selector::File(" ".into()))]),
                20
            )
            .unwrap_err(),
            RequestError::EmptySelector { index: 0 }
        );
        assert_eq!(
            parse(
                request("g/p", None, vec![Some(Selector::Glob("*".into())); 21]),
                20
            )
            .unwrap_err(),
            RequestError::TooManyPaths {
                count: 21,
                limit: 20
            }
        );
        let mut bad_have = request("g/p", None, glob());
        bad_have.commit_id = "HEAD".into();
        assert!(matches!(
            parse(bad_have, 20).unwrap_err(),
            RequestError::InvalidHave { .. }
        ));
    }

    #[test]
    fn digests_differ_by_ref_and_paths() {
        let base = Selection {
            project: "g/p".into(),
            reference: GitRef::DefaultBranch,
            paths: vec![PathSelector::Glob("*.yaml".into())],
        };
        let mut other_ref = base.clone();
        other_ref.reference = GitRef::Branch("main".into());
        let mut other_paths = base.clone();
        other_paths.paths = vec![PathSelector::File("*.yaml".into())];
        assert_eq!(base.digest(), base.clone().digest());
        assert_ne!(base.digest(), other_ref.digest());
        assert_ne!(base.digest(), other_paths.digest());
    }
}
