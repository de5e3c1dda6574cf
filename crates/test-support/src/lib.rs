//! Real infrastructure for tests: a Git smart-HTTP server, and (see the cluster harness) a Kubernetes
//! control plane and Gitea.

pub mod git_http;
