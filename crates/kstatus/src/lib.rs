//! Readiness rules over Kubernetes objects, ported from kstatus.
//!
//! [kstatus](https://github.com/kubernetes-sigs/cli-utils/tree/master/pkg/kstatus/status)
//! is the library `kubectl`-adjacent tools (kpt, Flux, cli-utils' applier) use to
//! answer "has this object reached the state its spec asks for?". It reduces every
//! object to one [`Status`]: `InProgress`, `Current`, `Failed` or `Terminating`,
//! with a human-readable message and the standard `Reconciling`/`Stalled`
//! conditions that would describe it.
//!
//! This crate is a pure port of those rules: [`compute`] takes the full object
//! (spec *and* status) as a [`serde_json::Value`] and ([`compute_at`]) the time to
//! judge it at, and does no I/O, reads no clock and talks to no cluster. It covers:
//!
//! - the generic rules every object gets first (`generic.rs`): a
//!   `metadata.deletionTimestamp` means `Terminating`; an unobserved
//!   `metadata.generation` means `InProgress`; a `Reconciling=True` condition means
//!   `InProgress` and a `Stalled=True` condition means `Failed`;
//! - the built-in kinds kstatus knows (`kinds/`): Deployment, StatefulSet,
//!   DaemonSet, ReplicaSet, Pod, PersistentVolumeClaim, Service, Job,
//!   CustomResourceDefinition, PodDisruptionBudget, and the always-ready
//!   ConfigMap, Secret and CronJob;
//! - everything else is `Current` once the generic rules have nothing to say,
//!   unless its `Ready` condition is `False` or `Unknown`: then it is `InProgress`.
//!
//! Deliberate differences from kstatus are documented on the rule they touch:
//! `Ready` on kinds without a rule of their own (kstatus ignores it and calls such
//! a custom resource Current, so a `depends-on` dependent of a database that is
//! not ready yet would be applied at once; Flux and Argo CD read `Ready` the same
//! way this port does), and PodDisruptionBudget. Like kstatus, an unschedulable
//! Pod gets a grace period before it is Failed (hence the clock argument), and a
//! LoadBalancer Service is Current without an ingress address (see the Service
//! rule for why).
//!
//! Input that does not look like a Kubernetes object never panics: it yields
//! [`Status::Unknown`] with a message saying what was wrong.

mod fields;
mod generic;
mod kinds;

use std::fmt;
use std::time::SystemTime;

use serde_json::Value;

/// The readiness of one object, as kstatus defines it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// The object's controller has not yet made the actual state match the spec.
    InProgress,
    /// The controller gave up or the object is in an error state it will not leave by itself.
    Failed,
    /// The actual state matches the spec.
    Current,
    /// The object has a deletion timestamp and is waiting for finalizers.
    Terminating,
    /// The object does not exist. Never returned by [`compute`] (it needs an object);
    /// kept so callers that look objects up can use one vocabulary.
    NotFound,
    /// The status could not be computed, e.g. the input is not a Kubernetes object.
    Unknown,
}

impl Status {
    /// The kstatus spelling, e.g. `"InProgress"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::InProgress => "InProgress",
            Status::Failed => "Failed",
            Status::Current => "Current",
            Status::Terminating => "Terminating",
            Status::NotFound => "NotFound",
            Status::Unknown => "Unknown",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The standard condition type kstatus uses for "still working on it".
pub const CONDITION_RECONCILING: &str = "Reconciling";
/// The standard condition type kstatus uses for "gave up / error".
pub const CONDITION_STALLED: &str = "Stalled";

/// A Kubernetes-style status condition (`type`, `status`, `reason`, `message`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// The condition type, e.g. `Reconciling` or `Available`.
    pub condition_type: String,
    /// `"True"`, `"False"` or `"Unknown"`.
    pub status: String,
    /// One CamelCase word saying why.
    pub reason: String,
    /// A human-readable explanation.
    pub message: String,
}

impl Condition {
    fn is_true(&self) -> bool {
        self.status == "True"
    }

    fn is_false(&self) -> bool {
        self.status == "False"
    }
}

/// What [`compute`] found out about an object (kstatus' `Result`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Result {
    /// The computed status.
    pub status: Status,
    /// Why the object has this status, e.g. `"Ready: 1/2"`.
    pub message: String,
    /// The standard conditions (`Reconciling` or `Stalled`) that describe the
    /// status; empty when the object is `Current` or `Terminating`.
    pub conditions: Vec<Condition>,
}

impl Result {
    /// `Current`, with no conditions.
    pub(crate) fn current(message: impl Into<String>) -> Self {
        Result {
            status: Status::Current,
            message: message.into(),
            conditions: Vec::new(),
        }
    }

    /// `InProgress`, described by a `Reconciling=True` condition with this reason.
    pub(crate) fn in_progress(reason: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        Result {
            status: Status::InProgress,
            conditions: vec![standard_condition(CONDITION_RECONCILING, reason, &message)],
            message,
        }
    }

    /// `Failed`, described by a `Stalled=True` condition with this reason.
    pub(crate) fn failed(reason: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        Result {
            status: Status::Failed,
            conditions: vec![standard_condition(CONDITION_STALLED, reason, &message)],
            message,
        }
    }

    /// `Unknown`: the input could not be interpreted.
    pub(crate) fn unknown(message: impl Into<String>) -> Self {
        Result {
            status: Status::Unknown,
            message: message.into(),
            conditions: Vec::new(),
        }
    }
}

fn standard_condition(condition_type: &str, reason: &str, message: &str) -> Condition {
    Condition {
        condition_type: condition_type.to_owned(),
        status: "True".to_owned(),
        reason: reason.to_owned(),
        message: message.to_owned(),
    }
}

/// Computes the status of a Kubernetes object given with its full state
/// (`apiVersion`, `kind`, `metadata`, `spec`, `status`), as of `now` (the caller's
/// clock: only grace periods use it).
///
/// The generic rules come first; if they decide, the kind-specific rules are not
/// consulted (so a Deployment with `Stalled=True` is `Failed` whatever its
/// replica counts say). Kinds without specific rules are `Current` unless the
/// generic rules or their `Ready` condition say otherwise. Never panics; malformed
/// input yields [`Status::Unknown`].
pub fn compute_at(object: &Value, now: SystemTime) -> Result {
    compute_with(object, Some(now))
}

/// [`compute_at`] without a clock: every grace period counts as over (an unschedulable Pod is `Failed`
/// at once). Callers that poll live objects should use [`compute_at`] with the current time.
pub fn compute(object: &Value) -> Result {
    compute_with(object, None)
}

fn compute_with(object: &Value, now: Option<SystemTime>) -> Result {
    if !object.is_object() {
        return Result::unknown("Object is not a JSON object");
    }
    match generic::check(object) {
        Ok(Some(result)) => return result,
        Ok(None) => {}
        Err(malformed) => return Result::unknown(malformed.to_string()),
    }
    match kinds::evaluate(object, now) {
        Some(verdict) => verdict.unwrap_or_else(|malformed| Result::unknown(malformed.to_string())),
        None => match generic::not_ready(object) {
            Ok(Some(result)) => result,
            Ok(None) => Result::current("Resource is current"),
            Err(malformed) => Result::unknown(malformed.to_string()),
        },
    }
}

#[cfg(test)]
mod tests;
