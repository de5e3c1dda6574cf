//! `agentk generate`: the install manifests of the article's step 3, printed for `kubectl apply -f -`:
//! namespace, service account `gitlab-agent`, the cluster roles and bindings, the token Secret and the
//! Deployment. Strings are written as JSON scalars, which are valid YAML and need no escaping rules.

use std::fmt::Write;

/// What the install depends on.
#[derive(Debug, Clone)]
pub struct InstallOptions {
    pub namespace: String,
    pub kas_address: String,
    pub agent_token: String,
    /// Image tag, e.g. `stable` or `0.1.0`.
    pub agent_version: String,
    pub image_repository: String,
    /// Grant the agent write access to the whole cluster (the article's `gitops-write-all`). Without it,
    /// the agent can read everything but write only in its own namespace.
    pub cluster_write: bool,
}

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
  name: gitops-read-all
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
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: gitlab-agent-alert-reader
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
  name: gitops-write-all
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: gitops-write-all
subjects:
- kind: ServiceAccount
  name: gitlab-agent
  namespace: {ns}
---
"#
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
      containers:
      - name: agent
        image: {image}
        args:
        - --kas-address={address}
        - --token-file=/etc/agentk/token/token
        env:
        - name: POD_NAMESPACE
          valueFrom:
            fieldRef:
              fieldPath: metadata.namespace
        - name: POD_NAME
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
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
        InstallOptions {
            namespace: "gitlab-kubernetes-agent".into(),
            kas_address: "wss://kas.example".into(),
            agent_token: "kasagent_abc\"quoted".into(),
            agent_version: "stable".into(),
            image_repository: "agentk".into(),
            cluster_write,
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
        assert_eq!(yaml.matches("\n---\n").count() + 1, 10, "ten objects");
    }

    #[test]
    fn without_cluster_write_the_agent_writes_only_its_namespace() {
        let yaml = manifests(&options(false));
        assert!(!yaml.contains("gitops-write-all"));
        assert!(yaml.contains("kind: RoleBinding"));
    }
}
