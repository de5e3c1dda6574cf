//! Real infrastructure for tests: a Git smart-HTTP server, and (see the cluster harness) a Kubernetes
//! control plane and Gitea.

pub mod alertmanager;
pub mod cluster;
pub mod env;
pub mod fault_proxy;
pub mod git_http;
pub mod gitea;
pub mod kubectl;
pub mod kwok;
pub mod state;
pub mod webhook;
