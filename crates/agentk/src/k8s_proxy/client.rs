//! The HTTP client the proxy sends requests to the apiserver with.
//!
//! `kube::Client::send` would keep upgrades (its connection is HTTP/1.1, and kube's own `connect()` calls
//! `hyper::upgrade::on` on the response it returns), but its request body type `kube::client::Body` can only
//! be built from bytes held whole in memory, so a streamed request body cannot go through it. This client is
//! built from the same `kube::Config` with the same parts kube uses (`ConfigExt`): the rustls connector with
//! the cluster's CA and client certificate (HTTP/1.1 only, so upgrades work), the base URI, the
//! authorization layer (whose in-cluster ServiceAccount token is re-read from its file as kubelet rotates it)
//! and the kubeconfig's extra headers (a kubeconfig that itself impersonates, `as:`, is refused). It leaves out kube's retry layer (a proxied request is the client's to
//! retry) and its read timeout (watches and exec sessions are long by design).

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use kube::client::ConfigExt;
use tower::{BoxError, ServiceBuilder, ServiceExt, util::BoxCloneSyncService};

use crate::AgentError;

/// A request body streamed from kas.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// agentk's own connection to its apiserver, with its own credentials, for the Kubernetes API proxy.
#[derive(Clone)]
pub struct ApiserverClient {
    service: BoxCloneSyncService<Request<ProxyBody>, Response<Incoming>, BoxError>,
    /// For logs and errors.
    cluster_url: Arc<str>,
}

impl std::fmt::Debug for ApiserverClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiserverClient")
            .field("cluster_url", &self.cluster_url)
            .finish()
    }
}

impl ApiserverClient {
    /// A client for the cluster `config` describes (in-cluster or a kubeconfig), with its credentials.
    pub fn new(config: &kube::Config) -> Result<Self, AgentError> {
        if let Some(proxy) = &config.proxy_url {
            return Err(AgentError::KubernetesConfig(format!(
                "the kubeconfig names the HTTP proxy {proxy}, which the Kubernetes API proxy does not support"
            )));
        }
        // The proxy writes Impersonate-* itself; on top of a kubeconfig's own (`as:`) they would clash, and
        // dropping the kubeconfig's would lend the proxy more than agentk's identity.
        let auth = &config.auth_info;
        if auth.impersonate.is_some()
            || auth.impersonate_uid.is_some()
            || auth.impersonate_groups.is_some()
            || auth.impersonate_user_extra.is_some()
        {
            return Err(AgentError::KubernetesConfig(
                "the kubeconfig impersonates a user (`as`), which the Kubernetes API proxy does not support: it sets impersonation itself".into(),
            ));
        }
        // kube needs a process-wide rustls provider; install agentk's one unless one is there already.
        if rustls::crypto::CryptoProvider::get_default().is_none() {
            let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        }
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(config.connect_timeout);
        // Exec and attach sessions write keystroke-sized packets; Nagle would hold each one back until the
        // apiserver's delayed ACK.
        http.set_nodelay(true);
        let https = config
            .rustls_https_connector_with_connector(http)
            .map_err(|e| kube_error(config, e))?;
        let client: Client<_, ProxyBody> = Client::builder(TokioExecutor::new()).build(https);
        let service = ServiceBuilder::new()
            .layer(config.base_uri_layer())
            .option_layer(config.auth_layer().map_err(|e| kube_error(config, e))?)
            .layer(
                config
                    .extra_headers_layer()
                    .map_err(|e| kube_error(config, e))?,
            )
            .service(client.map_err(BoxError::from))
            .map_err(Into::into);
        Ok(Self {
            service: BoxCloneSyncService::new(service),
            cluster_url: config.cluster_url.to_string().into(),
        })
    }

    /// The apiserver's URL, for messages.
    pub fn cluster_url(&self) -> &str {
        &self.cluster_url
    }

    /// Sends `request` (its URI holds only the path and query) and returns the response as soon as its
    /// head arrived; the body, or the upgraded connection, follows.
    pub fn send(
        &self,
        request: Request<ProxyBody>,
    ) -> impl Future<Output = Result<Response<Incoming>, BoxError>> + Send + 'static {
        self.service.clone().oneshot(request)
    }
}

fn kube_error(config: &kube::Config, e: kube::Error) -> AgentError {
    AgentError::KubernetesConfig(format!(
        "cannot build a client for the apiserver at {}: {e}",
        config.cluster_url
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> kube::Config {
        kube::Config::new("https://127.0.0.1:6443".parse().unwrap())
    }

    #[test]
    fn a_plain_config_gives_a_client() {
        let client = ApiserverClient::new(&config()).unwrap();
        assert_eq!(client.cluster_url(), "https://127.0.0.1:6443/");
    }

    #[test]
    fn a_kubeconfig_that_impersonates_is_refused() {
        let mut config = config();
        config.auth_info.impersonate = Some("someone".into());
        let error = ApiserverClient::new(&config).unwrap_err().to_string();
        assert!(error.contains("impersonates"), "{error}");
    }

    #[test]
    fn an_http_proxy_is_refused_by_name() {
        let mut config = config();
        config.proxy_url = Some("http://proxy.example:3128".parse().unwrap());
        let error = ApiserverClient::new(&config).unwrap_err().to_string();
        assert!(error.contains("http://proxy.example:3128"), "{error}");
    }
}
