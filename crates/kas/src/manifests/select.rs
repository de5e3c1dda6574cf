//! Which files of a manifest project an agent gets: `paths[]` entries (`glob` with GitLab's semantics, or
//! `file`), within limits. Every limit breach is an error naming the limit, so nothing is silently cut off.

pub use gitops_config::server::ManifestLimits;
use globset::{GlobBuilder, GlobMatcher};

/// One `paths[]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathSelector {
    Glob(String),
    File(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectError {
    #[error("paths[{index}]: invalid glob {glob:?}: {message}")]
    InvalidGlob {
        index: usize,
        glob: String,
        message: String,
    },
    #[error("paths[{index}]: file {path:?} does not exist at this commit")]
    MissingFile { index: usize, path: String },
    #[error("{count} paths are over the limit of {limit} paths per manifest project (max_paths)")]
    TooManyPaths { count: usize, limit: usize },
    #[error("{count} matching files are over the limit of {limit} (max_files)")]
    TooManyFiles { count: usize, limit: usize },
    #[error("file {path:?} is {size} bytes, over the limit of {limit} bytes (max_file_size)")]
    FileTooLarge { path: String, size: u64, limit: u64 },
    #[error("matching files total {size} bytes, over the limit of {limit} bytes (max_total_size)")]
    TotalTooLarge { size: u64, limit: u64 },
}

enum Matcher {
    Glob(GlobMatcher),
    File(String),
}

/// GitLab's glob semantics: a leading `/` is ignored; `*` stays within a directory; `**` crosses them;
/// `{a,b}` alternatives.
fn compile(index: usize, glob: &str) -> Result<GlobMatcher, SelectError> {
    let pattern = glob.trim_start_matches('/');
    let invalid = |e: globset::Error| SelectError::InvalidGlob {
        index,
        glob: glob.to_owned(),
        message: e.kind().to_string(),
    };
    Ok(GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .map_err(invalid)?
        .compile_matcher())
}

/// Files under a directory whose name starts with `.` are never manifests (`.gitlab/`, `.github/`...).
fn in_hidden_directory(path: &str) -> bool {
    let mut components: Vec<&str> = path.split('/').collect();
    components.pop();
    components.iter().any(|c| c.starts_with('.'))
}

/// The paths, sorted, of `files` (path, size) that `selectors` match.
pub fn select(
    files: &[(String, u64)],
    selectors: &[PathSelector],
    limits: &ManifestLimits,
) -> Result<Vec<String>, SelectError> {
    if selectors.len() > limits.max_paths {
        return Err(SelectError::TooManyPaths {
            count: selectors.len(),
            limit: limits.max_paths,
        });
    }
    let matchers = selectors
        .iter()
        .enumerate()
        .map(|(i, s)| match s {
            PathSelector::Glob(g) => compile(i, g).map(Matcher::Glob),
            PathSelector::File(f) => Ok(Matcher::File(f.trim_start_matches('/').to_owned())),
        })
        .collect::<Result<Vec<_>, _>>()?;
    for (index, matcher) in matchers.iter().enumerate() {
        if let Matcher::File(path) = matcher
            && !files.iter().any(|(p, _)| p == path)
        {
            return Err(SelectError::MissingFile {
                index,
                path: path.clone(),
            });
        }
    }
    let mut selected = Vec::new();
    let mut total = 0u64;
    for (path, size) in files {
        let matched = matchers.iter().any(|m| match m {
            Matcher::File(f) => f == path,
            Matcher::Glob(g) => !in_hidden_directory(path) && g.is_match(path),
        });
        if !matched {
            continue;
        }
        if *size > limits.max_file_size {
            return Err(SelectError::FileTooLarge {
                path: path.clone(),
                size: *size,
                limit: limits.max_file_size,
            });
        }
        total += size;
        selected.push(path.clone());
    }
    if selected.len() > limits.max_files {
        return Err(SelectError::TooManyFiles {
            count: selected.len(),
            limit: limits.max_files,
        });
    }
    if total > limits.max_total_size {
        return Err(SelectError::TotalTooLarge {
            size: total,
            limit: limits.max_total_size,
        });
    }
    selected.sort();
    Ok(selected)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(paths: &[&str]) -> Vec<(String, u64)> {
        paths.iter().map(|p| ((*p).to_owned(), 10)).collect()
    }

    fn glob(g: &str) -> PathSelector {
        PathSelector::Glob(g.to_owned())
    }

    const TREE: &[&str] = &[
        "README.md",
        "deployment/deployment.yaml",
        "deployment/nested/svc.yml",
        "top.yaml",
        "data.json",
        ".gitlab/agents/gitops/config.yaml",
        "apps/.hidden/secret.yaml",
        "apps/.dotfile.yaml",
    ];

    #[test]
    fn seed_glob_matches_all_yaml_except_under_dot_directories() {
        let got = select(
            &files(TREE),
            &[glob("/**/*.yaml")],
            &ManifestLimits::default(),
        )
        .unwrap();
        assert_eq!(
            got,
            vec![
                "apps/.dotfile.yaml",
                "deployment/deployment.yaml",
                "top.yaml"
            ]
        );
    }

    #[test]
    fn star_stays_in_one_directory_and_braces_alternate() {
        let got = select(
            &files(TREE),
            &[glob("deployment/*.{yaml,yml}")],
            &ManifestLimits::default(),
        )
        .unwrap();
        assert_eq!(got, vec!["deployment/deployment.yaml"]);
        let got = select(
            &files(TREE),
            &[glob("**/*.{yml,json}")],
            &ManifestLimits::default(),
        )
        .unwrap();
        assert_eq!(got, vec!["data.json", "deployment/nested/svc.yml"]);
    }

    #[test]
    fn file_entries_select_one_file_and_must_exist() {
        let got = select(
            &files(TREE),
            &[PathSelector::File("/top.yaml".into())],
            &ManifestLimits::default(),
        )
        .unwrap();
        assert_eq!(got, vec!["top.yaml"]);
        let err = select(
            &files(TREE),
            &[glob("*.yaml"), PathSelector::File("gone.yaml".into())],
            &ManifestLimits::default(),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "paths[1]: file \"gone.yaml\" does not exist at this commit"
        );
    }

    #[test]
    fn every_limit_is_named_when_breached() {
        let limits = ManifestLimits {
            max_file_size: 5,
            ..Default::default()
        };
        assert!(
            select(&files(TREE), &[glob("**/*.yaml")], &limits)
                .unwrap_err()
                .to_string()
                .contains("max_file_size")
        );
        let limits = ManifestLimits {
            max_total_size: 25,
            ..Default::default()
        };
        assert!(
            select(&files(TREE), &[glob("**/*.yaml")], &limits)
                .unwrap_err()
                .to_string()
                .contains("max_total_size")
        );
        let limits = ManifestLimits {
            max_files: 2,
            ..Default::default()
        };
        assert!(
            select(&files(TREE), &[glob("**/*.yaml")], &limits)
                .unwrap_err()
                .to_string()
                .contains("max_files")
        );
        let limits = ManifestLimits {
            max_paths: 1,
            ..Default::default()
        };
        assert!(
            select(&files(TREE), &[glob("a"), glob("b")], &limits)
                .unwrap_err()
                .to_string()
                .contains("max_paths")
        );
    }

    #[test]
    fn invalid_globs_are_named() {
        let err = select(&files(TREE), &[glob("a/[b")], &ManifestLimits::default()).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("paths[0]: invalid glob \"a/[b\""),
            "{err}"
        );
    }
}
