//! `agentk generate`: the install manifests of the article's step 3, printed for `kubectl apply -f -`:
//! namespace, service account `gitlab-agent`, the cluster roles and bindings, the token Secret and the
//! Deployment. Strings are written as JSON scalars, which are valid YAML and need no escaping rules.
//!
//! RBAC, in both modes:
//! - `gitlab-agent-state`, a Role in the agent's namespace for what agentk itself keeps there: the leader
//!   election Lease and the inventory ConfigMaps. The built-in `admin` role of the restricted mode has no
//!   Leases, so without this Role a restricted agent never became leader and never applied anything.
//!   agentk writes no Events, so none are granted.
//! - `gitops-read-all` (cluster-wide reads: the objects it applies, depends-on targets, drift checks).
//! - writes: `gitops-write-all` cluster-wide, or (`cluster_write: false`) the built-in `admin` role in the
//!   agent's namespace only; a manifest for another namespace then fails, that object only, with the
//!   apiserver's "forbidden" message.
//!
//! - impersonation (`impersonate: true`, off by default): `gitlab-agent-impersonate`, granting `impersonate` on
//!   the users, groups, service accounts, uids and user extras the Kubernetes API proxy acts as when
//!   an agent's `ci_access`/`user_access` uses `access_as` other than `agent`. Without it such requests are
//!   refused by the apiserver (403), so an agent that only does GitOps never holds the permission.
//!
//! The Deployment runs the image as its numeric non-root user (65532) under seccomp `RuntimeDefault`, so it
//! is admitted where Pod Security "restricted" is enforced, and its probes use the observability listener
//! (`--observability-listen=:8080`: `/livez`, `/readyz`).
//!
//! The cluster roles are the same for every install and keep the article's names; the cluster role
//! bindings carry the namespace (`gitops-read-all:<namespace>`), so a second agent installed in another
//! namespace adds its own binding instead of replacing the first agent's subject.

use std::fmt::Write;

/// What the install depends on.
#[derive(Debug, Clone)]
pub struct InstallOptions {
    pub namespace: String,
    pub kas_address: String,
    pub agent_token: String,
    /// Image tag, e.g. `0.1.0` ([`DEFAULT_IMAGE_TAG`]).
    pub agent_version: String,
    pub image_repository: String,
    /// Grant the agent write access to the whole cluster (the article's `gitops-write-all`). Without it,
    /// the agent can read everything but write only in its own namespace.
    pub cluster_write: bool,
    /// Grant the agent `impersonate` (users, groups, uids, service accounts, user extras) for the
    /// Kubernetes API proxy's `access_as: impersonate | ci_job | user`.
    pub impersonate: bool,
}

/// The image `agentk generate` installs unless told otherwise: the project's, tagged with this build's
/// version (what `cargo xtask image` builds and the chart's appVersion names).
pub const DEFAULT_IMAGE_REPOSITORY: &str = "ghcr.io/gitops-rs/agentk";
pub const DEFAULT_IMAGE_TAG: &str = env!("CARGO_PKG_VERSION");
/// `/metrics`, `/livez`, `/readyz` (`--observability-listen`); the probes use it.
pub const OBSERVABILITY_PORT: u16 = 8080;

fn q(s: &str) -> String {
    serde_json::to_string(s).expect("strings serialize")
}

/// The manifests, as one multi-document YAML stream.
pub fn manifests(o: &InstallOptions) -> String {
    let ns = q(&o.namespace);
    let mut out = String::new();
    let _ = write!(
        out,
        r#"apiVersion: v1
kind: Namespace
metadata:
  name: {ns}
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: gitlab-agent
  namespace: {ns}
---
apiVersion: v1
kind: Secret
metadata:
  name: gitlab-agent-token
  namespace: {ns}
type: Opaque
stringData:
  token: {token}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: gitlab-agent-state
  namespace: {ns}
rules:
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["get", "create", "update"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "create", "update", "patch", "delete"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: gitlab-agent-state
  namespace: {ns}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: Role
  name: gitlab-agent-state
subjects:
- kind: ServiceAccount
  name: gitlab-agent
  namespace: {ns}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: gitops-read-all
rules:
- apiGroups: ["*"]
  resources: ["*"]
  verbs: ["get", "list", "watch"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: {read_binding}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: gitops-read-all
subjects:
- kind: ServiceAccount
  name: gitlab-agent
  namespace: {ns}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: gitlab-agent-alert-reader
rules:
- apiGroups: ["cilium.io"]
  resources: ["ciliumnetworkpolicies", "ciliumclusterwidenetworkpolicies"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: {alert_binding}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: gitlab-agent-alert-reader
subjects:
- kind: ServiceAccount
  name: gitlab-agent
  namespace: {ns}
---
"#,
        token = q(&o.agent_token),
        read_binding = q(&format!("gitops-read-all:{}", o.namespace)),
        alert_binding = q(&format!("gitlab-agent-alert-reader:{}", o.namespace)),
    );
    if o.cluster_write {
        let _ = write!(
            out,
            r#"apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: gitops-write-all
rules:
- apiGroups: ["*"]
  resources: ["*"]
  verbs: ["create", "update", "delete", "patch"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: {write_binding}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: gitops-write-all
subjects:
- kind: ServiceAccount
  name: gitlab-agent
  namespace: {ns}
---
"#,
            write_binding = q(&format!("gitops-write-all:{}", o.namespace)),
        );
    } else {
        let _ = write!(
            out,
            r#"apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: gitops-write-own-namespace
  namespace: {ns}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: admin
subjects:
- kind: ServiceAccount
  name: gitlab-agent
  namespace: {ns}
---
"#
        );
    }
    // Events go to the namespace of the object they are about (`default` for cluster-scoped ones), so the
    // grant is cluster-wide, and only for Events: kube's recorder creates them and patches their series.
    let _ = write!(
        out,
        r#"apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: gitlab-agent-events
rules:
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: {events_binding}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: gitlab-agent-events
subjects:
- kind: ServiceAccount
  name: gitlab-agent
  namespace: {ns}
---
"#,
        events_binding = q(&format!("gitlab-agent-events:{}", o.namespace)),
    );
    if o.impersonate {
        let _ = write!(
            out,
            r#"apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: gitlab-agent-impersonate
rules:
- apiGroups: [""]
  resources: ["users", "groups", "serviceaccounts"]
  verbs: ["impersonate"]
# `*` here means `uids` and every `userextras/<key>`: RBAC matches no `userextras/*` pattern, and the
# extras' keys include whatever `access_as: impersonate` configures.
- apiGroups: ["authentication.k8s.io"]
  resources: ["*"]
  verbs: ["impersonate"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: {impersonate_binding}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: gitlab-agent-impersonate
subjects:
- kind: ServiceAccount
  name: gitlab-agent
  namespace: {ns}
---
"#,
            impersonate_binding = q(&format!("gitlab-agent-impersonate:{}", o.namespace)),
        );
    }
    let _ = write!(
        out,
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: gitlab-agent
  namespace: {ns}
spec:
  replicas: 1
  selector:
    matchLabels:
      app: gitlab-agent
  template:
    metadata:
      labels:
        app: gitlab-agent
    spec:
      serviceAccountName: gitlab-agent
      # Pod Security "restricted": non-root as the image's numeric user, seccomp RuntimeDefault.
      securityContext:
        runAsNonRoot: true
        runAsUser: 65532
        runAsGroup: 65532
        seccompProfile:
          type: RuntimeDefault
      containers:
      - name: agent
        image: {image}
        args:
        - --kas-address={address}
        - --token-file=/etc/agentk/token/token
        - --observability-listen=:{OBSERVABILITY_PORT}
        env:
        - name: POD_NAMESPACE
          valueFrom:
            fieldRef:
              fieldPath: metadata.namespace
        - name: POD_NAME
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        ports:
        - name: http-metrics
          containerPort: {OBSERVABILITY_PORT}
        livenessProbe:
          httpGet:
            path: /livez
            port: http-metrics
          initialDelaySeconds: 5
          periodSeconds: 20
        readinessProbe:
          httpGet:
            path: /readyz
            port: http-metrics
          periodSeconds: 10
        resources:
          requests:
            cpu: 10m
            memory: 32Mi
          limits:
            memory: 256Mi
        securityContext:
          allowPrivilegeEscalation: false
          readOnlyRootFilesystem: true
          runAsNonRoot: true
          capabilities:
            drop: ["ALL"]
        volumeMounts:
        - name: token
          mountPath: /etc/agentk/token
          readOnly: true
      volumes:
      - name: token
        secret:
          secretName: gitlab-agent-token
"#,
        image = q(&format!("{}:{}", o.image_repository, o.agent_version)),
        address = q(&o.kas_address).trim_matches('"'),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(cluster_write: bool) -> InstallOptions {
        options_with(cluster_write, false)
    }

    fn options_with(cluster_write: bool, impersonate: bool) -> InstallOptions {
        InstallOptions {
            namespace: "gitlab-kubernetes-agent".into(),
            kas_address: "wss://kas.example".into(),
            agent_token: "kasagent_abc\"quoted".into(),
            agent_version: "stable".into(),
            image_repository: "agentk".into(),
            cluster_write,
            impersonate,
        }
    }

    #[test]
    fn seed_objects_are_all_there() {
        let yaml = manifests(&options(true));
        for needle in [
            "kind: Namespace",
            "name: gitlab-agent\n",
            "name: gitops-read-all",
            "name: gitops-write-all",
            "name: gitlab-agent-alert-reader",
            "kind: Secret",
            "kind: Deployment",
            "--kas-address=wss://kas.example",
            "\"gitlab-kubernetes-agent\"",
        ] {
            assert!(yaml.contains(needle), "missing {needle:?}");
        }
        assert!(
            yaml.contains(r#"token: "kasagent_abc\"quoted""#),
            "the token is quoted safely"
        );
        assert_eq!(yaml.matches("\n---\n").count() + 1, 14, "fourteen objects");
    }

    /// The documents of kind `kind`.
    fn documents<'a>(yaml: &'a str, kind: &str) -> Vec<&'a str> {
        yaml.split("\n---\n")
            .filter(|d| d.contains(&format!("\nkind: {kind}\n")))
            .collect()
    }

    /// The Deployment is what Pod Security "restricted" admits and what the image and probes need.
    #[test]
    fn the_deployment_is_restricted_compliant_with_probes_on_the_observability_port() {
        let yaml = manifests(&InstallOptions {
            agent_version: DEFAULT_IMAGE_TAG.into(),
            image_repository: DEFAULT_IMAGE_REPOSITORY.into(),
            ..options(true)
        });
        let deployment = documents(&yaml, "Deployment")[0];
        for needle in [
            &format!(
                "image: \"ghcr.io/gitops-rs/agentk:{}\"\n",
                env!("CARGO_PKG_VERSION")
            ),
            "        - --observability-listen=:8080\n",
            "      securityContext:\n        runAsNonRoot: true\n        runAsUser: 65532\n        runAsGroup: 65532\n        seccompProfile:\n          type: RuntimeDefault\n",
            "        - name: http-metrics\n          containerPort: 8080\n",
            "        livenessProbe:\n          httpGet:\n            path: /livez\n            port: http-metrics\n",
            "        readinessProbe:\n          httpGet:\n            path: /readyz\n            port: http-metrics\n",
            "          allowPrivilegeEscalation: false\n          readOnlyRootFilesystem: true\n",
            "            drop: [\"ALL\"]\n",
        ] {
            assert!(
                deployment.contains(needle),
                "{needle:?} missing from\n{deployment}"
            );
        }
    }

    /// agentk's own state (the leader Lease, the inventory ConfigMaps) is granted by a Role in its
    /// namespace in both modes; the built-in `admin` role of the restricted mode has no Leases.
    #[test]
    fn both_modes_grant_the_lease_and_the_inventories_in_the_agents_namespace() {
        for cluster_write in [true, false] {
            let yaml = manifests(&options(cluster_write));
            let roles = documents(&yaml, "Role");
            assert_eq!(roles.len(), 1, "{yaml}");
            let role = roles[0];
            for needle in [
                "name: gitlab-agent-state\n  namespace: \"gitlab-kubernetes-agent\"\n",
                "- apiGroups: [\"coordination.k8s.io\"]\n  resources: [\"leases\"]\n  verbs: [\"get\", \"create\", \"update\"]\n",
                "- apiGroups: [\"\"]\n  resources: [\"configmaps\"]\n",
            ] {
                assert!(role.contains(needle), "{needle:?} missing from\n{role}");
            }
            assert!(
                documents(&yaml, "RoleBinding")
                    .iter()
                    .any(|b| b.contains("  kind: Role\n  name: gitlab-agent-state\n")
                        && b.contains("  name: gitlab-agent\n")),
                "{yaml}"
            );
        }
    }

    /// Cluster role bindings name their namespace, so installing a second agent elsewhere does not take
    /// the first one's grants away (`kubectl apply` would replace the binding's subjects).
    #[test]
    fn cluster_role_bindings_are_per_namespace() {
        let yaml = manifests(&options(true));
        let names: Vec<&str> = documents(&yaml, "ClusterRoleBinding")
            .iter()
            .map(|d| {
                d.split("\n  name: ")
                    .nth(1)
                    .unwrap()
                    .lines()
                    .next()
                    .unwrap()
            })
            .collect();
        assert_eq!(
            names,
            [
                "\"gitops-read-all:gitlab-kubernetes-agent\"",
                "\"gitlab-agent-alert-reader:gitlab-kubernetes-agent\"",
                "\"gitops-write-all:gitlab-kubernetes-agent\"",
                "\"gitlab-agent-events:gitlab-kubernetes-agent\"",
            ]
        );
    }

    #[test]
    fn without_cluster_write_the_agent_writes_only_its_namespace() {
        let yaml = manifests(&options(false));
        assert!(!yaml.contains("gitops-write-all"));
        assert!(yaml.contains("kind: RoleBinding"));
    }

    /// The impersonation grant appears only when asked for, in both write modes, and covers every kind of
    /// identity the proxy sets (user, uid, groups, extras; service accounts for `access_as: impersonate`).
    #[test]
    fn impersonation_is_granted_only_when_asked() {
        for cluster_write in [true, false] {
            let plain = manifests(&options_with(cluster_write, false));
            assert!(!plain.contains("impersonate"), "{plain}");
            let yaml = manifests(&options_with(cluster_write, true));
            assert_eq!(
                yaml.matches("\n---\n").count(),
                plain.matches("\n---\n").count() + 2,
                "a ClusterRole and its binding"
            );
            let roles = documents(&yaml, "ClusterRole");
            let role = roles
                .iter()
                .find(|d| d.contains("name: gitlab-agent-impersonate\n"))
                .expect("the impersonation ClusterRole");
            for needle in [
                "- apiGroups: [\"\"]\n  resources: [\"users\", \"groups\", \"serviceaccounts\"]\n  verbs: [\"impersonate\"]\n",
                "- apiGroups: [\"authentication.k8s.io\"]\n  resources: [\"*\"]\n  verbs: [\"impersonate\"]",
            ] {
                assert!(role.contains(needle), "{needle:?} missing from\n{role}");
            }
            let bindings = documents(&yaml, "ClusterRoleBinding");
            let binding = bindings
                .iter()
                .find(|d| d.contains("name: gitlab-agent-impersonate\n"))
                .expect("the impersonation binding");
            assert!(
                binding.contains("name: \"gitlab-agent-impersonate:gitlab-kubernetes-agent\"")
                    && binding.contains("- kind: ServiceAccount\n  name: gitlab-agent\n"),
                "{binding}"
            );
        }
    }

    #[test]
    fn both_modes_may_record_events_and_nothing_else_through_that_role() {
        for cluster_write in [true, false] {
            let yaml = manifests(&options(cluster_write));
            let role = documents(&yaml, "ClusterRole")
                .into_iter()
                .find(|d| d.contains("name: gitlab-agent-events\n"))
                .expect("the events ClusterRole");
            assert!(
                role.contains("- apiGroups: [\"events.k8s.io\"]\n  resources: [\"events\"]\n  verbs: [\"create\", \"patch\"]"),
                "{role}"
            );
            assert_eq!(role.matches("apiGroups").count(), 1, "{role}");
            assert!(
                documents(&yaml, "ClusterRoleBinding")
                    .iter()
                    .any(|b| b.contains("  name: gitlab-agent-events\n")),
                "bound: {yaml}"
            );
        }
    }
}
