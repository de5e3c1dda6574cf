//! Reading objects' live state in bulk: one LIST per (resource, namespace) shared by many objects, a GET
//! each otherwise. A sync reads every object of its set before applying (to skip what needs no write)
//! and agentk reads them again while waiting for readiness; 1,000 ConfigMaps in one namespace then cost
//! two LIST pages instead of 1,000 GETs.

use std::collections::HashMap;

use futures::StreamExt;
use kube::Client;
use kube::api::{Api, DynamicObject, ListParams, TypeMeta};
use kube::discovery::ApiResource;

use crate::error::kube_error_message;
use crate::key::ObjectKey;
use crate::result::Health;

/// Objects sharing a resource and namespace from which on one LIST reads them all.
const LIST_THRESHOLD: usize = 8;
/// Page size of those LISTs.
const LIST_PAGE: u32 = 500;
/// GETs in flight at once.
const GET_CONCURRENCY: usize = 16;

/// The live state of each object, in input order: `Ok(None)` when it does not exist, `Err` with the
/// apiserver's message when it could not be read. Listed objects get their apiVersion and kind set
/// (list items come without), so readiness rules can be applied to them.
pub async fn read_live(
    client: &Client,
    objects: &[(&ApiResource, &ObjectKey)],
) -> Vec<Result<Option<DynamicObject>, String>> {
    let mut groups: HashMap<(String, Option<&str>), Vec<usize>> = HashMap::new();
    for (i, (resource, key)) in objects.iter().enumerate() {
        groups
            .entry((
                format!("{}/{}", resource.api_version, resource.plural),
                key.namespace.as_deref(),
            ))
            .or_default()
            .push(i);
    }
    let mut live: Vec<Option<Result<Option<DynamicObject>, String>>> = vec![None; objects.len()];
    let mut singles = Vec::new();
    for members in groups.into_values() {
        if members.len() < LIST_THRESHOLD {
            singles.extend(members);
            continue;
        }
        let (resource, key) = objects[members[0]];
        let wanted: HashMap<&str, usize> = members
            .iter()
            .map(|&i| (objects[i].1.name.as_str(), i))
            .collect();
        let (found, unread) = list_named(client, resource, key.namespace.as_deref(), wanted).await;
        for (i, result) in found {
            live[i] = Some(result);
        }
        singles.extend(unread);
    }
    let read: Vec<(usize, Result<Option<DynamicObject>, String>)> = futures::stream::iter(singles)
        .map(|i| async move {
            let (resource, key) = objects[i];
            let result = match api(client, resource, key.namespace.as_deref())
                .get_opt(&key.name)
                .await
            {
                // `get_opt` knows a 404 by its Status reason; a kind that is no longer served (its CRD
                // just went) answers a plain-text "404 page not found", which has none. Gone all the same.
                Err(kube::Error::Api(status)) if status.code == 404 => Ok(None),
                other => other.map_err(|e| kube_error_message(&e)),
            };
            (i, result)
        })
        .buffer_unordered(GET_CONCURRENCY)
        .collect()
        .await;
    for (i, result) in read {
        live[i] = Some(result);
    }
    live.into_iter().map(|r| r.unwrap_or(Ok(None))).collect()
}

/// Lists `resource` in `namespace` page by page, keeping only the `wanted` names. Returns what the LIST
/// settled (found, absent, or its error) and the objects left to read one by one: when the first page
/// shows the namespace holds far more objects of the kind than are wanted, GETs are cheaper than paging
/// through all of them.
async fn list_named(
    client: &Client,
    resource: &ApiResource,
    namespace: Option<&str>,
    mut wanted: HashMap<&str, usize>,
) -> (
    Vec<(usize, Result<Option<DynamicObject>, String>)>,
    Vec<usize>,
) {
    let api = api(client, resource, namespace);
    let mut found = Vec::new();
    let mut params = ListParams::default().limit(LIST_PAGE);
    let listed = loop {
        let page = match api.list(&params).await {
            Ok(page) => page,
            Err(e) => break Err(kube_error_message(&e)),
        };
        for mut object in page.items {
            let name = object.metadata.name.as_deref().unwrap_or_default();
            if let Some(i) = wanted.remove(name) {
                object.types = Some(TypeMeta {
                    api_version: resource.api_version.clone(),
                    kind: resource.kind.clone(),
                });
                found.push((i, Ok(Some(object))));
            }
        }
        let remaining = page.metadata.remaining_item_count.unwrap_or(0);
        if remaining > (wanted.len() * 4) as i64 {
            // Far more objects of the kind than wanted are left: the rest are read one by one.
            return (found, wanted.into_values().collect());
        }
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => break Ok(()),
        }
    };
    found.extend(
        wanted
            .into_values()
            .map(|i| (i, listed.clone().map(|()| None))),
    );
    (found, Vec::new())
}

/// What one read of an object saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// It exists; its readiness by kstatus' rules.
    Present(Health),
    NotFound,
    /// The read failed: the apiserver's message.
    Unreadable(String),
}

/// Reads `objects` in bulk ([`read_live`]) every `poll` until `settled(index, observation)` holds for each
/// of them or `deadline` passes, and returns the last observation of each, in input order. Settled objects
/// are not read again. The one polling loop behind waiting for readiness (agentk), for `depends-on`
/// targets and for pruned objects to be gone.
pub async fn poll_live(
    client: &Client,
    objects: &[(&ApiResource, &ObjectKey)],
    poll: std::time::Duration,
    deadline: tokio::time::Instant,
    settled: impl Fn(usize, &Observed) -> bool,
) -> Vec<Observed> {
    let mut seen: Vec<Option<Observed>> = vec![None; objects.len()];
    let mut pending: Vec<usize> = (0..objects.len()).collect();
    while !pending.is_empty() {
        let wanted: Vec<(&ApiResource, &ObjectKey)> = pending.iter().map(|&i| objects[i]).collect();
        let live = read_live(client, &wanted).await;
        let mut still = Vec::new();
        for (&i, read) in pending.iter().zip(live) {
            let observed = match read {
                Ok(Some(object)) => Health::of(&object).map_or_else(
                    || Observed::Unreadable("not a Kubernetes object".into()),
                    Observed::Present,
                ),
                Ok(None) => Observed::NotFound,
                Err(message) => Observed::Unreadable(message),
            };
            if !settled(i, &observed) {
                still.push(i);
            }
            seen[i] = Some(observed);
        }
        pending = still;
        let now = tokio::time::Instant::now();
        if pending.is_empty() || now >= deadline {
            break;
        }
        tokio::time::sleep(poll.min(deadline - now)).await;
    }
    seen.into_iter()
        .map(|o| o.expect("every object is read at least once"))
        .collect()
}

/// The API of `resource` in `namespace` (`None`: cluster-scoped).
pub(crate) fn api(
    client: &Client,
    resource: &ApiResource,
    namespace: Option<&str>,
) -> Api<DynamicObject> {
    match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, resource),
        None => Api::all_with(client.clone(), resource),
    }
}
