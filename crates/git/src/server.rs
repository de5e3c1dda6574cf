//! What to talk to, what to fetch, and how much of it.

use std::fmt;
use std::time::Duration;

use crate::Error;

/// Where the Git server is and how to authenticate with it.
///
/// Project `group/project` lives at `{base_url}/group/project.git`.
#[derive(Clone, PartialEq, Eq)]
pub struct GitServerConfig {
    /// E.g. `https://gitlab.example.com`. Credentials embedded in it (`https://user:pw@host`) are removed
    /// from the URL and used as `username`/`password` unless those are set.
    pub base_url: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// CA certificates (PEM) to trust for the Git server besides the system's: a self-hosted server behind
    /// a private CA. Check them with [`crate::check_ca_certificates`].
    pub extra_ca_pem: Option<Vec<u8>>,
}

// Hand-written so the password can never be printed.
impl fmt::Debug for GitServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GitServerConfig")
            .field("base_url", &strip_userinfo(&self.base_url).0)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("extra_ca_pem", &self.extra_ca_pem.as_ref().map(Vec::len))
            .finish()
    }
}

/// Checks a PEM bundle of CA certificates for [`GitServerConfig::extra_ca_pem`]; returns how many it holds.
pub fn check_ca_certificates(pem: &[u8]) -> Result<usize, crate::Error> {
    let certificates = reqwest::Certificate::from_pem_bundle(pem)
        .map_err(|e| crate::Error::CaCertificates(e.to_string()))?;
    if certificates.is_empty() {
        return Err(crate::Error::CaCertificates(
            "no PEM certificate in the bundle".into(),
        ));
    }
    Ok(certificates.len())
}

/// Basic-auth credentials for the Git server.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Credentials {
    pub(crate) username: String,
    pub(crate) password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl GitServerConfig {
    /// The base URL without credentials and without a trailing slash.
    pub fn sanitized_base_url(&self) -> String {
        strip_userinfo(&self.base_url)
            .0
            .trim_end_matches('/')
            .to_owned()
    }

    /// Explicit credentials win over ones embedded in the URL. A username without password (or the
    /// reverse) is completed with an empty string, which is what token-only servers expect.
    pub(crate) fn credentials(&self) -> Option<Credentials> {
        let (_, url_user, url_password) = strip_userinfo(&self.base_url);
        let username = self.username.clone().or(url_user);
        let password = self.password.clone().or(url_password);
        if username.is_none() && password.is_none() {
            return None;
        }
        Some(Credentials {
            username: username.unwrap_or_default(),
            password: password.unwrap_or_default(),
        })
    }
}

/// Splits `scheme://user:password@host/...` into the URL without userinfo and the (percent-decoded)
/// user and password.
fn strip_userinfo(url: &str) -> (String, Option<String>, Option<String>) {
    let Some(scheme_end) = url.find("://") else {
        return (url.to_owned(), None, None);
    };
    let authority_start = scheme_end + 3;
    let authority_end = url[authority_start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| authority_start + i);
    let authority = &url[authority_start..authority_end];
    let Some(at) = authority.rfind('@') else {
        return (url.to_owned(), None, None);
    };
    let userinfo = &authority[..at];
    let (user, password) = match userinfo.split_once(':') {
        Some((user, password)) => (user, Some(password)),
        None => (userinfo, None),
    };
    let stripped = format!(
        "{}{}",
        &url[..authority_start],
        &url[authority_start + at + 1..]
    );
    let non_empty = |s: &str| (!s.is_empty()).then(|| percent_decode(s));
    (stripped, non_empty(user), password.and_then(non_empty))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Checks that `project` is a plain `group/sub/project` path: it becomes part of both a URL and a
/// directory in the cache, so nothing that could escape either is allowed.
pub(crate) fn validate_project(project: &str) -> Result<(), Error> {
    let valid_segment = |segment: &str| {
        !segment.is_empty()
            && segment != "."
            && segment != ".."
            && !segment.starts_with('.')
            && !segment.ends_with(".git")
            && segment
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    if project.split('/').all(valid_segment) {
        Ok(())
    } else {
        Err(Error::InvalidProject {
            project: project.to_owned(),
        })
    }
}

/// A Git reference to follow.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum GitRef {
    /// Whatever branch the server's `HEAD` points at.
    DefaultBranch,
    /// A branch name without `refs/heads/`, e.g. `main`.
    Branch(String),
    /// A tag name without `refs/tags/`, e.g. `v1.0`. Annotated tags resolve to the commit they point at.
    Tag(String),
    /// A full hex commit id; resolves to itself without asking the server.
    Commit(String),
}

/// Longest branch or tag name accepted, in bytes (Git itself has no limit, but refs become file names).
pub const MAX_REF_NAME_LEN: usize = 255;

impl GitRef {
    /// Checks a branch or tag name (they come from agents) against `git check-ref-format`'s rules before it
    /// is formatted into refspecs and local ref names, where `:`, `*`, `..` or a leading `-` would change
    /// their meaning. Commits are checked when they are parsed.
    pub fn validate(&self) -> Result<(), Error> {
        let name = match self {
            GitRef::Branch(name) | GitRef::Tag(name) => name,
            GitRef::DefaultBranch | GitRef::Commit(_) => return Ok(()),
        };
        match ref_name_problem(name) {
            None => Ok(()),
            Some(reason) => Err(Error::InvalidRef {
                reference: self.to_string(),
                reason,
            }),
        }
    }

    /// The full name of the remote ref to look up, or `None` for [`GitRef::Commit`].
    pub(crate) fn remote_ref_name(&self) -> Option<String> {
        match self {
            GitRef::DefaultBranch => Some("HEAD".to_owned()),
            GitRef::Branch(branch) => Some(format!("refs/heads/{branch}")),
            GitRef::Tag(tag) => Some(format!("refs/tags/{tag}")),
            GitRef::Commit(_) => None,
        }
    }
}

impl fmt::Display for GitRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GitRef::DefaultBranch => f.write_str("default branch"),
            GitRef::Branch(branch) => write!(f, "branch {branch:?}"),
            GitRef::Tag(tag) => write!(f, "tag {tag:?}"),
            GitRef::Commit(commit) => write!(f, "commit {commit}"),
        }
    }
}

/// Why `name` is not a valid branch or tag name (the rules of `git check-ref-format`, plus no leading `-`
/// and a length cap), or `None` if it is.
fn ref_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return Some("the name is empty");
    }
    if name.len() > MAX_REF_NAME_LEN {
        return Some("the name is longer than 255 bytes");
    }
    if name.starts_with('-') {
        return Some("the name starts with '-'");
    }
    if name == "@" {
        return Some("the name is '@'");
    }
    if let Some(c) = name.chars().find(|c| {
        c.is_ascii_control() || matches!(c, ' ' | '~' | '^' | ':' | '?' | '*' | '[' | '\\')
    }) {
        return Some(match c {
            ':' => "the name contains ':'",
            '*' => "the name contains '*'",
            ' ' => "the name contains a space",
            c if c.is_ascii_control() => "the name contains a control character",
            _ => "the name contains one of '~', '^', '?', '[' or '\\'",
        });
    }
    if name.contains("..") {
        return Some("the name contains '..'");
    }
    if name.contains("@{") {
        return Some("the name contains '@{'");
    }
    if name.starts_with('/') || name.ends_with('/') || name.contains("//") {
        return Some("the name has an empty '/'-separated component");
    }
    if name.ends_with('.') {
        return Some("the name ends with '.'");
    }
    for component in name.split('/') {
        if component.starts_with('.') {
            return Some("a '/'-separated component starts with '.'");
        }
        if component.ends_with(".lock") {
            return Some("a '/'-separated component ends with '.lock'");
        }
    }
    None
}

/// Limits that protect kas from huge or slow repositories.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Default maximum size of a single file read from a repository, in bytes.
    pub max_file_size: u64,
    /// Maximum number of files [`crate::RepoCache::list_files`] returns before failing.
    pub max_files: usize,
    /// How long connecting to the Git server may take.
    pub connect_timeout: Duration,
    /// How long to wait for the server to answer a request, or to send more data of an answer.
    pub http_timeout: Duration,
    /// Packs a project's cache may collect before it is compacted: every fetch adds one and gitoxide
    /// cannot repack, so the cache is rebuilt from the commits its refs point at (fetched again, depth 1).
    pub max_packs: usize,
    /// Total time one network operation (a ref lookup, a fetch, a compaction's fetch) may take, however
    /// steadily the server trickles bytes (`http_timeout` only bounds each wait for more data). Past it the
    /// caller gets [`crate::Error::Transport`] naming the project and this limit.
    pub fetch_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_file_size: 5 * 1024 * 1024,
            max_files: 50_000,
            connect_timeout: Duration::from_secs(10),
            http_timeout: Duration::from_secs(60),
            max_packs: 32,
            fetch_timeout: Duration::from_secs(5 * 60),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_credentials_from_base_url() {
        let config = GitServerConfig {
            base_url: "https://alice:p%40ss@git.example.com:8443/prefix/".to_owned(),
            username: None,
            password: None,
            extra_ca_pem: None,
        };
        assert_eq!(
            config.sanitized_base_url(),
            "https://git.example.com:8443/prefix"
        );
        assert_eq!(
            config.credentials(),
            Some(Credentials {
                username: "alice".to_owned(),
                password: "p@ss".to_owned()
            })
        );
        let debug = format!("{config:?}");
        assert!(
            !debug.contains("p%40ss") && !debug.contains("p@ss"),
            "{debug}"
        );
    }

    #[test]
    fn explicit_credentials_win() {
        let config = GitServerConfig {
            base_url: "http://u:p@h".to_owned(),
            username: Some("x".to_owned()),
            password: Some("y".to_owned()),
            extra_ca_pem: None,
        };
        let credentials = config.credentials().unwrap();
        assert_eq!(
            (credentials.username.as_str(), credentials.password.as_str()),
            ("x", "y")
        );
        assert!(!format!("{credentials:?}").contains('y'));
        let anonymous = GitServerConfig {
            base_url: "http://h".to_owned(),
            username: None,
            password: None,
            extra_ca_pem: None,
        };
        assert_eq!(anonymous.credentials(), None);
    }

    #[test]
    fn accepts_valid_branch_and_tag_names() {
        for ok in [
            "main",
            "release/1.x",
            "feature/a-b_c",
            "v1.0.0",
            "user@host",
            "a.b",
            "ünïcode",
            &"x".repeat(MAX_REF_NAME_LEN),
        ] {
            assert!(GitRef::Branch(ok.to_owned()).validate().is_ok(), "{ok}");
            assert!(GitRef::Tag(ok.to_owned()).validate().is_ok(), "{ok}");
        }
        assert!(GitRef::DefaultBranch.validate().is_ok());
    }

    #[test]
    fn refuses_invalid_branch_and_tag_names_naming_them() {
        let cases = [
            ("", "empty"),
            ("a..b", "'..'"),
            ("main:refs/heads/x", "':'"),
            ("-delete", "'-'"),
            ("feat*", "'*'"),
            ("a\u{7}b", "control character"),
            ("a\nb", "control character"),
            ("a\u{7f}", "control character"),
            ("a b", "space"),
            ("a~1", "'~'"),
            ("a^", "'~'"),
            ("a?", "'~'"),
            ("a[b", "'~'"),
            ("a\\b", "'~'"),
            ("a@{1}", "'@{'"),
            ("@", "'@'"),
            ("/a", "empty"),
            ("a/", "empty"),
            ("a//b", "empty"),
            ("a.", "ends with '.'"),
            (".hidden", "starts with '.'"),
            ("a/.b", "starts with '.'"),
            ("a.lock", "'.lock'"),
            ("a.lock/b", "'.lock'"),
        ];
        for (name, reason) in cases {
            for reference in [
                GitRef::Branch(name.to_owned()),
                GitRef::Tag(name.to_owned()),
            ] {
                let err = reference.validate().unwrap_err();
                let text = err.to_string();
                assert!(
                    matches!(&err, Error::InvalidRef { .. }),
                    "{name:?}: {err:?}"
                );
                assert!(text.contains(reason), "{name:?}: {text}");
                // The message names the ref, escaped.
                assert!(text.contains(&format!("{name:?}")), "{name:?}: {text}");
            }
        }
        let long = "x".repeat(MAX_REF_NAME_LEN + 1);
        let err = GitRef::Branch(long).validate().unwrap_err();
        assert!(err.to_string().contains("longer than 255"), "{err}");
    }

    #[test]
    fn validates_project_paths() {
        for ok in ["group/project", "a/b/c", "g-1/p_2.x"] {
            assert!(validate_project(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "/g/p", "g/p/", "g/../p", "g/.p", "g/p.git", "g/p?x", "g//p", "g/p q",
        ] {
            assert!(validate_project(bad).is_err(), "{bad}");
        }
    }
}
