//! Blocking network operations with gitoxide; callers run them on tokio's blocking pool.

use std::num::NonZeroU32;
use std::sync::atomic::AtomicBool;

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
    let connection = remote
        .connect(Direction::Fetch)?
        .with_credentials(credentials_callback(endpoint.credentials.clone()));
    let (ref_map, _handshake) = connection.ref_map(gix::progress::Discard, Default::default())?;
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

/// Fetches `commit` and what it needs (depth 1) into `repo`, recording it in `local_ref` so later fetches
/// can tell the server what we already have. `ref_name` is the remote ref the commit came from; asking for
/// it too keeps the ref listing that precedes every fetch small.
pub(crate) fn fetch_commit(
    repo: &gix::Repository,
    endpoint: &Endpoint,
    commit: gix::ObjectId,
    ref_name: Option<&str>,
    local_ref: &str,
    should_interrupt: &AtomicBool,
) -> gix::Result<()> {
    let commit_spec = format!("+{commit}:{local_ref}");
    let mut specs = vec![commit_spec.as_str()];
    specs.extend(ref_name);
    let remote = remote(repo, endpoint, &specs)?;
    let outcome = remote
        .connect(Direction::Fetch)?
        .with_credentials(credentials_callback(endpoint.credentials.clone()))
        .prepare_fetch(gix::progress::Discard, Default::default())?
        .with_shallow(Shallow::DepthAtRemote(NonZeroU32::MIN))
        .receive(gix::progress::Discard, should_interrupt)?;
    tracing::debug!(url = %endpoint.url, %commit, status = ?status_name(&outcome.status), "fetched");
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
