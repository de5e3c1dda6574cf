//! The GitOps apply engine: the files of one manifest project at one commit in, per-object results out.
//!
//! The flow of [`apply()`]:
//! 1. [`decode`]: multi-document YAML and JSON files become objects, each keeping its origin (file and
//!    document index); `kind: List` is flattened; an invalid document becomes a failed result of its own.
//! 2. Resolve: each kind is looked up by API discovery (only the groups the set uses) to find its
//!    resource and scope; namespaced objects without a namespace get `default_namespace`. A kind whose
//!    CustomResourceDefinition is in the same set resolves from that CRD and is discovered again once
//!    the CRD is applied and established.
//! 3. [`order`]: Namespaces and CRDs first, then cli-utils' kind order, honouring
//!    `config.kubernetes.io/depends-on` and the implicit edges object → its Namespace and custom resource
//!    → its CRD; cycles fail the objects in them. As in cli-utils, a `depends-on` target must be ready
//!    (kstatus Current), not merely applied, before its dependent is applied, and a target outside the
//!    set must exist in the cluster ([`ApplyOptions::dependency_timeout`] bounds the wait).
//! 4. Apply: server-side apply with the field manager (`agentk`), forcing conflicts, honouring the dry-run
//!    strategy. Each batch's live objects are read first ([`live`]: one LIST per resource and namespace
//!    with many members); an object whose live state already holds the manifest, as recorded by the
//!    `agentk/manifest-digest` annotation of the last apply, is not written at all, so a re-sync of an
//!    unchanged set (the periodic drift check) writes nothing and a drifted object is put back. With
//!    [`AppliedForms`] kept across syncs, "holds the manifest" also accepts the apiserver's normalised form
//!    of it as recorded right after this process applied it (`cpu: 1` stored as "1"). Consecutive objects of one kind that do not depend on each other form a batch applied
//!    concurrently (16 in flight); batches go one after another, so the order holds. An object whose
//!    dependency failed or was skipped is skipped with the reason. Created / configured / unchanged come
//!    from comparing the object before and after (see `change.rs`: the resourceVersion alone lies).
//! 5. [`inventory`] (optional): the inventory (sharded ConfigMaps, no 1 MiB ceiling) first gains every
//!    object of the set, so a cancelled sync orphans nothing; applied objects are annotated as owned by
//!    it and an existing object is applied only if `inventory_policy` allows taking it; objects that left
//!    the set are pruned (reverse order, `on-remove: keep` honoured, `prune_timeout` waited for) only
//!    when every object succeeded; then the inventory is rewritten with what it owns.
//!
//! Results name objects by [`ObjectKey::resource_key`] (`apps/Deployment/ns/name`, core group empty:
//! `/ConfigMap/ns/name`, cluster-scoped: `/Namespace//name`) and a kubectl-like
//! [`ObjectResult::sync_result`] (`deployment.apps/name configured`).
//!
//! Only failing to discover the cluster's API or to read or write the inventory fails the whole sync:
//! every other problem is one object's result, so valid objects are applied whatever else is in the set.

pub mod apply;
mod change;
pub mod decode;
pub mod error;
mod guard;
pub mod inventory;
pub mod key;
pub mod live;
pub mod order;
mod prune;
mod ready;
mod resolve;
pub mod result;

pub use apply::{ApplyOptions, DryRunStrategy, InventoryOptions, apply, apply_decoded};
pub use change::AppliedForms;
pub use decode::{DecodedObject, ManifestFile, ObjectOrigin, decode_files};
pub use error::EngineError;
pub use inventory::{InventoryPolicy, InventoryRef};
pub use key::ObjectKey;
pub use kube::api::PropagationPolicy;
pub use live::{Observed, poll_live, read_live};
pub use result::{Health, ObjectResult, Outcome, SyncReport};
