//! What kas reads from a client's request before carrying it: whether its path is a Kubernetes API path,
//! which headers go on (end-to-end ones only), and what it does in Kubernetes terms (verb, resource,
//! namespace, name) for the audit log.

use gitops_protocol::HttpHeader;
use http::{HeaderMap, HeaderName, Method, header};

use crate::{k8s_proxy::ProxyError, store::audit::Verb};

/// GitLab's prefix for the proxy (`https://kas.example.com/k8s-proxy/`); stripped before forwarding.
pub const GITLAB_PREFIX: &str = "/k8s-proxy";

/// The apiserver's path roots the proxy serves; anything else on the apiserver (`/metrics`, `/debug/…`,
/// `/logs`) stays out of reach.
const API_ROOTS: &[&str] = &[
    "/api", "/apis", "/version", "/openapi", "/healthz", "/livez", "/readyz",
];

/// The Kubernetes API path and query to forward, with GitLab's prefix removed; refuses anything else.
pub fn api_path_and_query(uri: &http::Uri) -> Result<String, ProxyError> {
    let path = uri.path();
    let not_api = || ProxyError::NotApiPath {
        path: path.to_owned(),
    };
    let stripped = match path.strip_prefix(GITLAB_PREFIX) {
        Some(rest) if rest.starts_with('/') => rest,
        Some(_) => return Err(not_api()),
        None => path,
    };
    let on_root = API_ROOTS.iter().any(|root| {
        stripped
            .strip_prefix(root)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    });
    // `/api/../metrics` would leave the roots once the apiserver cleaned it.
    let dot_segment = stripped.split('/').any(|segment| {
        let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
        decoded == "." || decoded == ".."
    });
    if !on_root || dot_segment {
        return Err(not_api());
    }
    Ok(match uri.query() {
        Some(query) => format!("{stripped}?{query}"),
        None => stripped.to_owned(),
    })
}

/// Whether the client asks to upgrade the connection (WebSocket or SPDY for exec, attach, port-forward).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    connection_tokens(headers).any(|token| token.eq_ignore_ascii_case("upgrade"))
        && headers.contains_key(header::UPGRADE)
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Hop-by-hop headers (RFC 9110 §7.6.1, plus the de-facto `Proxy-Connection` and `Keep-Alive`): they describe
/// one connection, not the request, so a proxy never passes them on.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn is_hop_by_hop(name: &HeaderName, named_in_connection: &[String]) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
        || named_in_connection
            .iter()
            .any(|n| n.eq_ignore_ascii_case(name.as_str()))
}

/// The end-to-end headers of `headers`: hop-by-hop ones removed (and those `Connection` names), except that
/// an upgrade keeps `Connection: Upgrade` and `Upgrade`, which are the point of it.
pub fn end_to_end(headers: &HeaderMap, upgrade: bool) -> Vec<(HeaderName, http::HeaderValue)> {
    let named: Vec<String> = connection_tokens(headers)
        .filter(|t| !t.eq_ignore_ascii_case("upgrade") || !upgrade)
        .map(str::to_owned)
        .collect();
    let mut out: Vec<_> = headers
        .iter()
        .filter(|(name, _)| !is_hop_by_hop(name, &named))
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    if upgrade {
        out.push((
            header::CONNECTION,
            http::HeaderValue::from_static("Upgrade"),
        ));
        out.extend(
            headers
                .get_all(header::UPGRADE)
                .iter()
                .map(|v| (header::UPGRADE, v.clone())),
        );
    }
    out
}

/// The headers to send to agentk: end-to-end ones without the caller's `Authorization` (agentk adds its own
/// credential; the caller's is kas's business) and without `Host` (agentk's client names the apiserver),
/// with the client's address appended to `X-Forwarded-For`, as reverse proxies do: the apiserver lists it
/// in its audit events' `sourceIPs`, after whatever the client claimed and before agentk's own address.
pub fn request_headers(
    headers: &HeaderMap,
    upgrade: bool,
    peer: Option<std::net::IpAddr>,
) -> Vec<HttpHeader> {
    let mut out: Vec<HttpHeader> = end_to_end(headers, upgrade)
        .into_iter()
        .filter(|(name, _)| {
            name != header::AUTHORIZATION && name != header::HOST && name != "x-forwarded-for"
        })
        .map(|(name, value)| HttpHeader {
            name: name.as_str().to_owned(),
            value: value.as_bytes().to_vec(),
        })
        .collect();
    if let Some(peer) = peer {
        let claimed: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        let mut value = claimed.join(", ");
        if !value.is_empty() {
            value.push_str(", ");
        }
        value.push_str(&peer.to_string());
        out.push(HttpHeader {
            name: "x-forwarded-for".into(),
            value: value.into_bytes(),
        });
    }
    out
}

/// Refuses the client's own `Impersonate-*` headers; called when kas impersonates for the request, since
/// they would otherwise let the caller choose whom agentk acts as.
pub fn refuse_client_impersonation(headers: &HeaderMap) -> Result<(), ProxyError> {
    match headers
        .keys()
        .find(|name| name.as_str().starts_with("impersonate-"))
    {
        Some(name) => Err(ProxyError::BadRequest(format!(
            "the {name} header is not allowed: the agent's configuration grants this credential an \
             identity (access_as is not `agent`), so the request cannot choose whom to impersonate"
        ))),
        None => Ok(()),
    }
}

/// What a request does, in the apiserver's own terms (its `RequestInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestInfo {
    pub verb: Verb,
    pub resource: Option<String>,
    pub subresource: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// A watch or a followed log: a stream that is expected to end whenever the server ends it.
    pub streaming: bool,
}

/// Namespaces' own subresources: `/api/v1/namespaces/<ns>/status` names the namespace, not a resource in it.
const NAMESPACE_SUBRESOURCES: &[&str] = &["status", "finalize"];

/// Derives the verb, resource, namespace and name the way the apiserver's `RequestInfoFactory` does.
pub fn request_info(method: &Method, path_and_query: &str, upgrade: bool) -> RequestInfo {
    let (path, query) = path_and_query
        .split_once('?')
        .unwrap_or((path_and_query, ""));
    let flag = |key: &str| {
        query.split('&').any(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            k == key && matches!(v, "true" | "1")
        })
    };
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let mut parts: &[&str] = match segments.as_slice() {
        ["api", _version, rest @ ..] => rest,
        ["apis", _group, _version, rest @ ..] => rest,
        _ => &[],
    };
    let mut watch = flag("watch");
    if parts.first() == Some(&"watch") {
        watch = true;
        parts = &parts[1..];
    }
    let mut namespace = None;
    if parts.first() == Some(&"namespaces") && parts.len() >= 2 {
        namespace = Some(parts[1].to_owned());
        if parts.len() > 2 && !NAMESPACE_SUBRESOURCES.contains(&parts[2]) {
            parts = &parts[2..];
        }
    }
    let resource = parts.first().map(|s| (*s).to_owned());
    let name = parts.get(1).map(|s| (*s).to_owned());
    let subresource = parts.get(2).map(|s| (*s).to_owned());
    // `namespaces/<ns>` names the namespace object itself, not something in it.
    let namespace = if resource.as_deref() == Some("namespaces") {
        None
    } else {
        namespace
    };
    let verb = if upgrade {
        Verb::Connect
    } else {
        match *method {
            Method::POST => Verb::Create,
            Method::PUT => Verb::Update,
            Method::PATCH => Verb::Patch,
            Method::DELETE if name.is_none() && resource.is_some() => Verb::DeleteCollection,
            Method::DELETE => Verb::Delete,
            _ if resource.is_none() => Verb::Get,
            _ if watch => Verb::Watch,
            _ if name.is_none() => Verb::List,
            _ => Verb::Get,
        }
    };
    RequestInfo {
        verb,
        streaming: verb == Verb::Watch || flag("follow"),
        resource,
        subresource,
        namespace,
        name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri(s: &str) -> http::Uri {
        s.parse().unwrap()
    }

    #[test]
    fn only_kubernetes_api_paths_pass_with_gitlabs_prefix_stripped() {
        for (given, forwarded) in [
            ("/api", "/api"),
            ("/api/v1/pods?watch=1", "/api/v1/pods?watch=1"),
            ("/apis/apps/v1/deployments", "/apis/apps/v1/deployments"),
            ("/version", "/version"),
            ("/openapi/v3/api/v1", "/openapi/v3/api/v1"),
            ("/healthz", "/healthz"),
            ("/livez/ping", "/livez/ping"),
            ("/readyz", "/readyz"),
            ("/k8s-proxy/api/v1/namespaces", "/api/v1/namespaces"),
            ("/k8s-proxy/version?timeout=32s", "/version?timeout=32s"),
        ] {
            assert_eq!(
                api_path_and_query(&uri(given)).unwrap(),
                forwarded,
                "{given}"
            );
        }
        for refused in [
            "/",
            "/metrics",
            "/debug/pprof",
            "/logs/",
            "/apiserver",
            "/k8s-proxy",
            "/k8s-proxy/metrics",
            "/k8s-proxyapi",
            "/api/../metrics",
            "/api/%2E%2e/metrics",
            "/apis/./x",
        ] {
            let err = api_path_and_query(&uri(refused)).unwrap_err();
            assert_eq!(err.status_code(), 404, "{refused}");
            assert!(err.to_string().contains(refused), "{err}");
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (n, v) in pairs {
            map.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        map
    }

    fn names(list: &[HttpHeader]) -> Vec<&str> {
        list.iter().map(|h| h.name.as_str()).collect()
    }

    #[test]
    fn hop_by_hop_headers_and_the_credential_are_not_forwarded() {
        let given = headers(&[
            ("authorization", "Bearer ci:1:secret"),
            ("host", "kas.example.com"),
            ("connection", "keep-alive, x-hop"),
            ("keep-alive", "timeout=5"),
            ("x-hop", "1"),
            ("proxy-authorization", "Basic x"),
            ("te", "trailers"),
            ("trailer", "x-t"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("accept", "application/json"),
            ("user-agent", "kubectl"),
        ]);
        let out = request_headers(&given, false, None);
        assert_eq!(names(&out), ["accept", "user-agent"]);
    }

    #[test]
    fn an_upgrade_keeps_connection_upgrade_and_its_protocol() {
        let given = headers(&[
            ("connection", "Upgrade, x-hop"),
            ("upgrade", "SPDY/3.1"),
            ("x-hop", "1"),
            ("x-stream-protocol-version", "v4.channel.k8s.io"),
        ]);
        assert!(is_upgrade(&given));
        let out = request_headers(&given, true, None);
        let pairs: Vec<(&str, &[u8])> = out
            .iter()
            .map(|h| (h.name.as_str(), h.value.as_slice()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("x-stream-protocol-version", b"v4.channel.k8s.io".as_slice()),
                ("connection", b"Upgrade"),
                ("upgrade", b"SPDY/3.1"),
            ]
        );
        assert!(!is_upgrade(&headers(&[("connection", "upgrade")])));
        assert!(!is_upgrade(&headers(&[("upgrade", "websocket")])));
    }

    #[test]
    fn the_clients_address_is_appended_to_x_forwarded_for() {
        let peer = Some("10.0.0.9".parse().unwrap());
        let out = request_headers(&headers(&[]), false, peer);
        assert_eq!(out[0].value, b"10.0.0.9");
        let out = request_headers(&headers(&[("x-forwarded-for", "1.2.3.4")]), false, peer);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].value, b"1.2.3.4, 10.0.0.9");
    }

    #[test]
    fn client_impersonation_headers_are_refused() {
        assert!(refuse_client_impersonation(&headers(&[("accept", "x")])).is_ok());
        let err =
            refuse_client_impersonation(&headers(&[("Impersonate-User", "admin")])).unwrap_err();
        assert_eq!(err.status_code(), 400);
        assert!(err.to_string().contains("impersonate-user"), "{err}");
        assert!(refuse_client_impersonation(&headers(&[("impersonate-group", "x")])).is_err());
    }

    fn info(method: Method, path: &str) -> RequestInfo {
        request_info(&method, path, false)
    }

    #[test]
    fn verbs_and_resources_are_derived_like_the_apiservers() {
        let i = info(Method::GET, "/api/v1/namespaces/default/pods/web");
        assert_eq!(
            i,
            RequestInfo {
                verb: Verb::Get,
                resource: Some("pods".into()),
                subresource: None,
                namespace: Some("default".into()),
                name: Some("web".into()),
                streaming: false,
            }
        );
        assert_eq!(info(Method::GET, "/api/v1/pods").verb, Verb::List);
        let w = info(
            Method::GET,
            "/api/v1/namespaces/a/configmaps?watch=true&rv=1",
        );
        assert_eq!((w.verb, w.streaming), (Verb::Watch, true));
        assert_eq!(info(Method::GET, "/api/v1/watch/pods").verb, Verb::Watch);
        let c = info(Method::POST, "/apis/apps/v1/namespaces/a/deployments");
        assert_eq!(
            (c.verb, c.resource.as_deref()),
            (Verb::Create, Some("deployments"))
        );
        assert_eq!(
            info(Method::PUT, "/api/v1/namespaces/a/pods/p").verb,
            Verb::Update
        );
        assert_eq!(info(Method::PATCH, "/api/v1/nodes/n").verb, Verb::Patch);
        assert_eq!(
            info(Method::DELETE, "/api/v1/namespaces/a/pods/p").verb,
            Verb::Delete
        );
        assert_eq!(
            info(Method::DELETE, "/api/v1/namespaces/a/pods").verb,
            Verb::DeleteCollection
        );
        let logs = info(Method::GET, "/api/v1/namespaces/a/pods/p/log?follow=true");
        assert_eq!(
            (logs.verb, logs.subresource.as_deref(), logs.streaming),
            (Verb::Get, Some("log"), true)
        );
        let exec = request_info(
            &Method::GET,
            "/api/v1/namespaces/a/pods/p/exec?command=sh",
            true,
        );
        assert_eq!(
            (exec.verb, exec.subresource.as_deref()),
            (Verb::Connect, Some("exec"))
        );
        let ns = info(Method::GET, "/api/v1/namespaces/a");
        assert_eq!(
            (ns.resource.as_deref(), ns.name.as_deref(), ns.namespace),
            (Some("namespaces"), Some("a"), None)
        );
        let ns = info(Method::PUT, "/api/v1/namespaces/a/finalize");
        assert_eq!(
            (ns.resource.as_deref(), ns.subresource.as_deref()),
            (Some("namespaces"), Some("finalize"))
        );
        let v = info(Method::GET, "/version");
        assert_eq!((v.verb, v.resource), (Verb::Get, None));
        assert_eq!(info(Method::GET, "/apis/apps/v1").verb, Verb::Get);
    }
}
