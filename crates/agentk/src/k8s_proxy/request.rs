//! From the `HttpRequestHeader` kas sent to the head of the request agentk sends its apiserver: which paths
//! are served, which headers pass, and the impersonation headers. kas checks the same things; agentk checks
//! them again because it is the one holding the cluster credentials.

use gitops_protocol::{HttpHeader, HttpRequestHeader, Impersonation};
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header, request::Parts,
    uri::PathAndQuery,
};

/// A request agentk answers itself instead of sending it on, as a Kubernetes `Status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: StatusCode,
    /// The `Status.reason`, e.g. `BadRequest`.
    pub reason: &'static str,
    pub message: String,
}

impl Refusal {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            code: StatusCode::BAD_REQUEST,
            reason: "BadRequest",
            message: message.into(),
        }
    }

    fn not_found(message: impl Into<String>) -> Self {
        Self {
            code: StatusCode::NOT_FOUND,
            reason: "NotFound",
            message: message.into(),
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            code: StatusCode::SERVICE_UNAVAILABLE,
            reason: "ServiceUnavailable",
            message: message.into(),
        }
    }

    /// The `Status` object, as the apiserver would write it.
    pub fn body(&self) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code.as_u16(),
        }))
        .expect("a Status serializes")
    }
}

/// The path prefixes of the Kubernetes API; anything else on the apiserver (`/metrics`, `/logs`,
/// `/debug/…`) is not served through the proxy.
const API_PATHS: [&str; 7] = [
    "/api", "/apis", "/version", "/openapi", "/healthz", "/livez", "/readyz",
];

/// Headers that describe one connection, not the request (RFC 9110 §7.6.1), plus `Host` (the client sets
/// the apiserver's). `Connection` and `Upgrade` are put back for an upgrade request.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

const IMPERSONATE_PREFIX: &str = "impersonate-";

/// The head of the request to the apiserver, and whether it asks for a connection upgrade.
#[derive(Debug)]
pub struct ApiRequest {
    pub parts: Parts,
    pub upgrade: bool,
}

/// Checks `header` and builds the request head from it.
pub fn api_request(header: &HttpRequestHeader) -> Result<ApiRequest, Refusal> {
    let method = Method::from_bytes(header.method.as_bytes())
        .map_err(|_| Refusal::bad_request(format!("invalid method {:?}", header.method)))?;
    let path_and_query = api_path(&header.path_and_query)?;
    let (mut headers, upgrade) = end_to_end_headers(&header.headers)?;
    if let Some(impersonation) = &header.impersonation {
        if let Some(name) = headers
            .keys()
            .find(|name| name.as_str().starts_with(IMPERSONATE_PREFIX))
        {
            return Err(Refusal::bad_request(format!(
                "the {name} header is not allowed: this request's identity is set by its access_as configuration"
            )));
        }
        impersonate(&mut headers, impersonation)?;
    }
    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.method = method;
    parts.uri = path_and_query.into();
    parts.headers = headers;
    // The connection to the apiserver is HTTP/1.1, which upgrades need.
    parts.version = http::Version::HTTP_11;
    Ok(ApiRequest { parts, upgrade })
}

/// `path_and_query` if it is a Kubernetes API path with no `.`/`..` segments (plain or percent-encoded).
fn api_path(path_and_query: &str) -> Result<PathAndQuery, Refusal> {
    let parsed: PathAndQuery = path_and_query
        .parse()
        .map_err(|_| Refusal::bad_request(format!("invalid path {path_and_query:?}")))?;
    let path = parsed.path();
    let is_api = API_PATHS.iter().any(|prefix| {
        path.strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    });
    if !is_api {
        return Err(Refusal::not_found(format!(
            "{path} is not a Kubernetes API path; the proxy serves only {}",
            API_PATHS.join(", ")
        )));
    }
    let dot_segment = path.split('/').any(|segment| {
        let decoded = segment.replace("%2e", ".").replace("%2E", ".");
        decoded == "." || decoded == ".."
    });
    if dot_segment || path.contains("//") {
        return Err(Refusal::bad_request(format!(
            "the path {path:?} is not in canonical form"
        )));
    }
    Ok(parsed)
}

/// The client's end-to-end headers, and whether the request is an upgrade (then its `Connection: Upgrade`
/// and `Upgrade` are kept). `Authorization` never passes: the request acts with agentk's credentials.
fn end_to_end_headers(fields: &[HttpHeader]) -> Result<(HeaderMap, bool), Refusal> {
    let mut headers = HeaderMap::with_capacity(fields.len());
    for field in fields {
        let name = HeaderName::from_bytes(field.name.as_bytes())
            .map_err(|_| Refusal::bad_request(format!("invalid header name {:?}", field.name)))?;
        let value = HeaderValue::from_bytes(&field.value)
            .map_err(|_| Refusal::bad_request(format!("invalid value of the {name} header")))?;
        headers.append(name, value);
    }
    // Headers a `Connection` header names are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    let upgrade_to = headers.get(header::UPGRADE).cloned();
    let upgrade = upgrade_to.is_some() && named.contains(&header::UPGRADE);
    for name in named.iter().map(HeaderName::as_str).chain(HOP_BY_HOP) {
        headers.remove(name);
    }
    headers.remove(header::AUTHORIZATION);
    headers.remove(header::HOST);
    if let (true, Some(protocol)) = (upgrade, upgrade_to) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(header::UPGRADE, protocol);
    }
    Ok((headers, upgrade))
}

/// The impersonation headers, exactly as client-go's `ImpersonatingRoundTripper` writes them.
fn impersonate(headers: &mut HeaderMap, who: &Impersonation) -> Result<(), Refusal> {
    let value = |v: &str| {
        HeaderValue::from_str(v).map_err(|_| {
            Refusal::bad_request(format!(
                "impersonation value {v:?} is not a valid header value"
            ))
        })
    };
    headers.insert("impersonate-user", value(&who.username)?);
    if !who.uid.is_empty() {
        headers.insert("impersonate-uid", value(&who.uid)?);
    }
    for group in &who.groups {
        headers.append("impersonate-group", value(group)?);
    }
    for extra in &who.extra {
        let name = extra_header_name(&extra.key)?;
        for v in &extra.values {
            headers.append(name.clone(), value(v)?);
        }
    }
    Ok(())
}

/// `Impersonate-Extra-<key>`, the key percent-encoded where it is not a header token character, and `%`
/// itself, as client-go's `headerKeyEscape` does (the apiserver unescapes it).
fn extra_header_name(key: &str) -> Result<HeaderName, Refusal> {
    let mut name = String::from("impersonate-extra-");
    for byte in key.bytes() {
        let token = byte.is_ascii_alphanumeric() || b"!#$&'*+-.^_`|~".contains(&byte);
        if token {
            name.push(char::from(byte));
        } else {
            name.push_str(&format!("%{byte:02X}"));
        }
    }
    HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| Refusal::bad_request(format!("impersonation extra key {key:?} is not usable")))
}

/// Whether a response header passes back to kas: end-to-end ones always; `Connection` and `Upgrade` only on
/// `101 Switching Protocols`, where they are the answer to the upgrade.
pub fn response_header_passes(name: &HeaderName, switching_protocols: bool) -> bool {
    if switching_protocols && (name == header::CONNECTION || name == header::UPGRADE) {
        return true;
    }
    !HOP_BY_HOP.contains(&name.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use gitops_protocol::ImpersonationExtra;

    fn header(path: &str, fields: &[(&str, &str)]) -> HttpRequestHeader {
        HttpRequestHeader {
            method: "GET".into(),
            path_and_query: path.into(),
            headers: fields
                .iter()
                .map(|(n, v)| HttpHeader {
                    name: (*n).into(),
                    value: v.as_bytes().to_vec(),
                })
                .collect(),
            impersonation: None,
        }
    }

    fn values<'a>(parts: &'a Parts, name: &str) -> Vec<&'a str> {
        parts
            .headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    }

    #[test]
    fn only_kubernetes_api_paths_pass() {
        for ok in [
            "/api",
            "/api/v1/namespaces?watch=true",
            "/apis/apps/v1",
            "/version",
            "/openapi/v3",
            "/healthz",
            "/livez/etcd",
            "/readyz?verbose",
        ] {
            assert!(api_request(&header(ok, &[])).is_ok(), "{ok}");
        }
        for (refused, code) in [
            ("/metrics", 404),
            ("/apisx", 404),
            ("/", 404),
            ("/debug/pprof", 404),
            ("/logs/kube-apiserver.log", 404),
            ("/api/../metrics", 400),
            ("/api/%2e%2E/metrics", 400),
            ("/api/./v1", 400),
            ("/api//v1", 400),
            ("not a path", 400),
        ] {
            let refusal = api_request(&header(refused, &[])).unwrap_err();
            assert_eq!(refusal.code.as_u16(), code, "{refused}: {refusal:?}");
        }
    }

    #[test]
    fn authorization_and_hop_by_hop_headers_are_dropped() {
        let request = api_request(&header(
            "/api",
            &[
                ("Authorization", "Bearer ci:1:secret"),
                ("Connection", "keep-alive, X-Private"),
                ("X-Private", "1"),
                ("Keep-Alive", "timeout=5"),
                ("TE", "trailers"),
                ("Transfer-Encoding", "chunked"),
                ("Upgrade", "websocket"),
                ("Host", "kas.example"),
                ("Accept", "application/json"),
                ("Impersonate-User", "someone"),
            ],
        ))
        .unwrap();
        assert!(!request.upgrade, "Upgrade without Connection: Upgrade");
        let mut names: Vec<&str> = request.parts.headers.keys().map(|n| n.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["accept", "impersonate-user"]);
    }

    #[test]
    fn an_upgrade_keeps_connection_and_upgrade() {
        let request = api_request(&header(
            "/api/v1/namespaces/n/pods/p/exec?command=sh",
            &[
                ("Connection", "Upgrade"),
                ("Upgrade", "websocket"),
                ("Sec-WebSocket-Protocol", "v5.channel.k8s.io"),
            ],
        ))
        .unwrap();
        assert!(request.upgrade);
        assert_eq!(values(&request.parts, "connection"), ["Upgrade"]);
        assert_eq!(values(&request.parts, "upgrade"), ["websocket"]);
        assert_eq!(
            values(&request.parts, "sec-websocket-protocol"),
            ["v5.channel.k8s.io"]
        );
    }

    #[test]
    fn impersonation_is_written_like_client_go() {
        let mut h = header("/api", &[("Accept", "application/json")]);
        h.impersonation = Some(Impersonation {
            username: "gitlab:ci_job:1".into(),
            uid: String::new(),
            groups: vec!["gitlab:ci_job".into(), "gitlab:project:g/p".into()],
            extra: vec![ImpersonationExtra {
                key: "agent.gitlab.com/id".into(),
                values: vec!["7".into(), "8".into()],
            }],
        });
        let request = api_request(&h).unwrap();
        assert_eq!(
            values(&request.parts, "impersonate-user"),
            ["gitlab:ci_job:1"]
        );
        assert!(request.parts.headers.get("impersonate-uid").is_none());
        assert_eq!(
            values(&request.parts, "impersonate-group"),
            ["gitlab:ci_job", "gitlab:project:g/p"]
        );
        assert_eq!(
            values(&request.parts, "impersonate-extra-agent.gitlab.com%2Fid"),
            ["7", "8"]
        );
    }

    #[test]
    fn extra_keys_are_escaped_like_client_go() {
        for (key, name) in [
            ("scopes", "impersonate-extra-scopes"),
            ("a/b", "impersonate-extra-a%2Fb"),
            ("100%", "impersonate-extra-100%25"),
            ("x y", "impersonate-extra-x%20y"),
            ("ok-_.~", "impersonate-extra-ok-_.~"),
        ] {
            assert_eq!(
                extra_header_name(key).unwrap().as_str(),
                name.to_lowercase()
            );
        }
    }

    #[test]
    fn client_impersonation_is_refused_when_impersonation_is_set() {
        for client_header in [
            "Impersonate-User",
            "Impersonate-Group",
            "impersonate-extra-x",
        ] {
            let mut h = header("/api", &[(client_header, "admin")]);
            h.impersonation = Some(Impersonation {
                username: "gitlab:user:alice".into(),
                ..Default::default()
            });
            let refusal = api_request(&h).unwrap_err();
            assert_eq!(refusal.code, StatusCode::BAD_REQUEST);
            assert!(
                refusal
                    .message
                    .contains(&client_header.to_ascii_lowercase()),
                "{refusal:?}"
            );
        }
    }

    #[test]
    fn a_refusal_is_a_kubernetes_status() {
        let body: serde_json::Value =
            serde_json::from_slice(&Refusal::bad_request("no").body()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "no", "reason": "BadRequest", "code": 400})
        );
    }
}
