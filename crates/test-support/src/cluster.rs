//! The test Kubernetes cluster: a kube-rs client for it and a namespace of one's own per test.

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{DeleteParams, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::env::{test_env, unique_name};

/// Why the cluster could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot read the test cluster's kubeconfig: {0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    #[error("cannot build a client for the test cluster: {0}")]
    Client(#[from] kube::Error),
    #[error("the TokenRequest for ServiceAccount {0} came back without a token")]
    NoToken(String),
}

/// Installs the process-wide rustls provider (aws-lc-rs) once; kube's TLS needs one.
pub fn install_crypto_provider() {
    // Err means another part of the process installed one already, which is fine.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// A cluster-admin client for the test cluster.
pub async fn kube_client() -> Result<Client, ClusterError> {
    install_crypto_provider();
    let kubeconfig = Kubeconfig::read_from(&test_env().kubernetes.kubeconfig)?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

/// How many requests a [`counting_kube_client`] sent: reads (GET) and writes (everything else).
#[derive(Debug, Default)]
pub struct RequestCounts {
    reads: AtomicUsize,
    writes: AtomicUsize,
}

impl RequestCounts {
    pub fn reads(&self) -> usize {
        self.reads.load(Ordering::SeqCst)
    }

    pub fn writes(&self) -> usize {
        self.writes.load(Ordering::SeqCst)
    }
}

/// A cluster-admin client that counts its requests, for tests that assert what was (not) written.
pub async fn counting_kube_client() -> Result<(Client, Arc<RequestCounts>), ClusterError> {
    install_crypto_provider();
    let kubeconfig = Kubeconfig::read_from(&test_env().kubernetes.kubeconfig)?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    let counts = Arc::new(RequestCounts::default());
    let counter = counts.clone();
    let count = move |request: http::Request<kube::client::Body>| {
        let counter = if request.method() == http::Method::GET {
            &counter.reads
        } else {
            &counter.writes
        };
        counter.fetch_add(1, Ordering::SeqCst);
        request
    };
    let client = kube::client::ClientBuilder::try_from(config)?
        .with_layer(&tower::util::MapRequestLayer::new(count))
        .build();
    Ok((client, counts))
}

/// A namespace created for one test, so tests sharing the cluster do not see each other's objects.
/// Call [`TestNamespace::delete`] at the end of a passing test; a failed test's namespace is left for
/// inspection and goes away with the cluster.
pub struct TestNamespace {
    pub client: Client,
    pub name: String,
}

impl TestNamespace {
    /// Creates `<prefix>-<random>` in the test cluster.
    pub async fn create(prefix: &str) -> Result<Self, ClusterError> {
        let client = kube_client().await?;
        let name = unique_name(prefix);
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await?;
        Ok(Self { client, name })
    }

    /// An API for namespaced objects of kind `K` in this namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    /// A one-hour token of ServiceAccount `name` in this namespace from the TokenRequest API, like the
    /// token the kubelet projects into a pod (tests run agentk under it as a process).
    pub async fn service_account_token(&self, name: &str) -> Result<String, ClusterError> {
        use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
        use k8s_openapi::api::core::v1::ServiceAccount;
        let request = TokenRequest {
            spec: TokenRequestSpec {
                expiration_seconds: Some(3600),
                ..Default::default()
            },
            ..Default::default()
        };
        self.api::<ServiceAccount>()
            .create_token_request(name, &PostParams::default(), &request)
            .await?
            .status
            .map(|status| status.token)
            .ok_or_else(|| ClusterError::NoToken(name.to_owned()))
    }

    /// Deletes the namespace (and, through the namespace controller, everything in it).
    pub async fn delete(self) -> Result<(), ClusterError> {
        Api::<Namespace>::all(self.client.clone())
            .delete(&self.name, &DeleteParams::default())
            .await?;
        Ok(())
    }
}
