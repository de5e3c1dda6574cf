//! The proxy's listener (`listen.k8s_proxy`): accepts Kubernetes API requests, has them authorised, and
//! carries them down the agent's connection with `KubernetesApi.MakeRequest`, streaming both ways.

/// Requests in flight per agent, audit state, … (owned by this module).
#[derive(Debug, Default)]
pub struct SessionState {}
