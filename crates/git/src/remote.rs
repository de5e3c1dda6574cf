//! Blocking network operations with gitoxide; callers run them on tokio's blocking pool.

use std::num::NonZeroU32;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use gix::bstr::ByteSlice as _;
use gix::protocol::handshake::Ref;
use gix::remote::Direction;
use gix::remote::fetch::{Shallow, Tags};

use crate::server::Credentials;

/// Where and how to connect for one project.
#[derive(Clone, Debug)]
pub(crate) struct Endpoint {
    /// Credential-free repository URL.
    pub(crate) url: String,
    pub(crate) credentials: Option<Credentials>,
    /// CA certificates (PEM) trusted besides the system's.
    pub(crate) extra_ca_pem: Option<std::sync::Arc<Vec<u8>>>,
    pub(crate) connect_timeout: Duration,
    /// How long to wait for a response or for more data of a response.
    pub(crate) http_timeout: Duration,
}

/// What the server advertised for one ref.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RemoteRef {
    /// The ref points at `commit` (annotated tags are peeled).
    Commit(gix::ObjectId),
    /// The ref exists but has no commit yet, e.g. `HEAD` of an empty repository.
    Unborn,
    /// The server doesn't have the ref.
    Missing,
}

/// Asks the server where `ref_name` (e.g. `HEAD`, `refs/heads/main`) points, using only the ref
/// advertisement (protocol v2 `ls-refs` limited to that ref; v0/v1 initial advertisement). Nothing is fetched.
pub(crate) fn ls_ref(
    repo: &gix::Repository,
    endpoint: &Endpoint,
    ref_name: &str,
) -> gix::Result<RemoteRef> {
    let remote = remote(repo, endpoint, &[ref_name])?;
    let (ref_map, _handshake) =
        connect(repo, &remote, endpoint)?.ref_map(gix::progress::Discard, Default::default())?;
    Ok(find_ref(&ref_map.remote_refs, ref_name))
}

fn find_ref(refs: &[Ref], ref_name: &str) -> RemoteRef {
    for advertised in refs {
        match advertised {
            Ref::Peeled {
                full_ref_name,
                object,
                ..
            }
            | Ref::Direct {
                full_ref_name,
                object,
            }
            | Ref::Symbolic {
                full_ref_name,
                object,
                ..
            } if full_ref_name.as_bstr() == ref_name => return RemoteRef::Commit(*object),
            Ref::Unborn { full_ref_name, .. } if full_ref_name.as_bstr() == ref_name => {
                return RemoteRef::Unborn;
            }
            _ => {}
        }
    }
    RemoteRef::Missing
}

/// What to fetch.
#[derive(Debug, Clone, Copy)]
pub(crate) enum FetchTarget<'a> {
    /// Exactly `commit` with depth 1, recorded in `local_ref`. `ref_name` (the remote ref the commit came
    /// from) is asked for too, which keeps the ref listing that precedes every fetch small.
    Commit {
        commit: gix::ObjectId,
        ref_name: Option<&'a str>,
        local_ref: &'a str,
    },
    /// Each `(commit, local_ref)` with depth 1, in one fetch: rebuilding a compacted cache.
    Tips(&'a [(gix::ObjectId, String)]),
    /// The remote ref `ref_name` with all history we don't have yet, recorded in `local_ref`. For servers
    /// that don't allow fetching commits by id (protocol v0/v1 without `uploadpack.allow*SHA1InWant`).
    Ref {
        ref_name: &'a str,
        local_ref: &'a str,
    },
}

/// Fetches `target` into `repo`. The local ref lets later fetches tell the server what we already have.
pub(crate) fn fetch(
    repo: &gix::Repository,
    endpoint: &Endpoint,
    target: FetchTarget<'_>,
    should_interrupt: &AtomicBool,
) -> gix::Result<()> {
    let (specs, shallow) = match target {
        FetchTarget::Commit {
            commit,
            ref_name,
            local_ref,
        } => {
            let mut specs = vec![format!("+{commit}:{local_ref}")];
            specs.extend(ref_name.map(str::to_owned));
            (specs, Shallow::DepthAtRemote(NonZeroU32::MIN))
        }
        FetchTarget::Tips(tips) => (
            tips.iter()
                .map(|(commit, local_ref)| format!("+{commit}:{local_ref}"))
                .collect(),
            Shallow::DepthAtRemote(NonZeroU32::MIN),
        ),
        FetchTarget::Ref {
            ref_name,
            local_ref,
        } => (vec![format!("+{ref_name}:{local_ref}")], Shallow::NoChange),
    };
    let specs: Vec<&str> = specs.iter().map(String::as_str).collect();
    let remote = remote(repo, endpoint, &specs)?;
    let outcome = connect(repo, &remote, endpoint)?
        .prepare_fetch(gix::progress::Discard, Default::default())?
        .with_shallow(shallow)
        .receive(gix::progress::Discard, should_interrupt)?;
    tracing::debug!(
        url = %endpoint.url,
        ?target,
        status = status_name(&outcome.status),
        "fetched"
    );
    Ok(())
}

fn status_name(status: &gix::remote::fetch::Status) -> &'static str {
    match status {
        gix::remote::fetch::Status::NoPackReceived { .. } => "no pack received",
        gix::remote::fetch::Status::Change { .. } => "pack received",
    }
}

fn remote<'repo>(
    repo: &'repo gix::Repository,
    endpoint: &Endpoint,
    refspecs: &[&str],
) -> gix::Result<gix::Remote<'repo>> {
    // No implicit tag refspec: it would widen the ref listing to all tags and fetch them.
    repo.remote_at(endpoint.url.as_str())?
        .with_fetch_tags(Tags::None)
        .with_refspecs(refspecs.iter().copied(), Direction::Fetch)
}

type Connection<'remote, 'repo> = gix::remote::Connection<
    'remote,
    'static,
    'repo,
    Box<dyn gix_transport::client::blocking_io::Transport + Send>,
>;

/// Connects with our credentials and HTTP timeouts.
fn connect<'remote, 'repo>(
    repo: &gix::Repository,
    remote: &'remote gix::Remote<'repo>,
    endpoint: &Endpoint,
) -> gix::Result<Connection<'remote, 'repo>> {
    let mut connection = remote
        .connect(Direction::Fetch)?
        .with_credentials(credentials_callback(endpoint.credentials.clone()));
    if let Some(options) = transport_options(repo, endpoint)? {
        connection = connection.with_transport_options(options);
    }
    Ok(connection)
}

/// The transport options gitoxide would use, plus timeouts (the reqwest backend ignores gitoxide's
/// timeout settings, and reqwest's blocking client would otherwise give up on any response, or read,
/// after 30 seconds) and the extra CA certificates. Proxies come from `HTTPS_PROXY` / `NO_PROXY`, which
/// reqwest reads itself.
fn transport_options(
    repo: &gix::Repository,
    endpoint: &Endpoint,
) -> gix::Result<Option<Box<dyn std::any::Any>>> {
    use gix_transport::client::blocking_io::http;

    let Some(mut options) = repo.transport_options(endpoint.url.as_str(), None)? else {
        return Ok(None);
    };
    if let Some(http_options) = options.downcast_mut::<http::Options>() {
        let (connect_timeout, http_timeout) = (endpoint.connect_timeout, endpoint.http_timeout);
        let extra_ca_pem = endpoint.extra_ca_pem.clone();
        let configure_client: Box<http::reqwest::ConfigureClientFn> = Box::new(move |builder| {
            let builder = builder
                .connect_timeout(connect_timeout)
                .timeout(http_timeout);
            // Checked when kas starts (check_ca_certificates), so a bundle that fails here is empty.
            let extra = extra_ca_pem
                .as_deref()
                .and_then(|pem| reqwest::Certificate::from_pem_bundle(pem).ok())
                .unwrap_or_default();
            Ok(if extra.is_empty() {
                builder
            } else {
                builder.tls_certs_merge(extra)
            })
        });
        http_options.backend = Some(std::sync::Arc::new(std::sync::Mutex::new(
            http::reqwest::Options {
                configure_client: Some(configure_client),
                configure_request: None,
            },
        )));
    }
    Ok(Some(options))
}
type CredentialsOutcome = gix::Result<Option<gix::credentials::protocol::Outcome>>;

/// Answers gitoxide's credential requests with the configured credentials, instead of running git's
/// credential helpers or prompting. Without credentials, the request is declined, which gitoxide turns
/// into an "unauthenticated" error.
fn credentials_callback(
    credentials: Option<Credentials>,
) -> impl FnMut(gix::credentials::helper::Action) -> CredentialsOutcome {
    move |action| match action {
        gix::credentials::helper::Action::Get(context) => {
            Ok(credentials
                .as_ref()
                .map(|credentials| gix::credentials::protocol::Outcome {
                    identity: gix::sec::identity::Account {
                        username: credentials.username.clone(),
                        password: credentials.password.clone(),
                        oauth_refresh_token: None,
                    },
                    next: context.into(),
                }))
        }
        // Nothing is stored, so there's nothing to approve or reject.
        gix::credentials::helper::Action::Store(_) | gix::credentials::helper::Action::Erase(_) => {
            Ok(None)
        }
    }
}
