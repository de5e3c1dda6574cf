//! The identity of an object in the cluster and its two spellings: `resource_key` and kubectl's
//! `kind.group/name`.

use std::fmt;

/// Group, kind, namespace and name: what identifies an object across versions of its API.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    /// API group; empty for the core group.
    pub group: String,
    pub kind: String,
    /// `None` for cluster-scoped objects.
    pub namespace: Option<String>,
    pub name: String,
}

impl ObjectKey {
    /// `resource_key` as in GitLab's agent logs: `group/Kind/namespace/name`, always four segments
    /// separated by `/`, with empty segments for the core group and for cluster-scoped objects:
    /// `apps/Deployment/gitlab-agent/nginx`, `/ConfigMap/gitlab-agent/settings`, `/Namespace//gitlab-agent`.
    /// The empty core group is how `config.kubernetes.io/depends-on` spells it too.
    pub fn resource_key(&self) -> String {
        format!(
            "{}/{}/{}/{}",
            self.group,
            self.kind,
            self.namespace.as_deref().unwrap_or_default(),
            self.name
        )
    }

    /// Parses [`ObjectKey::resource_key`]'s spelling back.
    pub fn from_resource_key(resource_key: &str) -> Option<Self> {
        let mut parts = resource_key.split('/');
        let (group, kind, namespace, name) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || kind.is_empty() || name.is_empty() {
            return None;
        }
        Some(Self {
            group: group.to_string(),
            kind: kind.to_string(),
            namespace: (!namespace.is_empty()).then(|| namespace.to_string()),
            name: name.to_string(),
        })
    }

    /// kubectl's name for the object in its output: `deployment.apps/nginx`, `configmap/settings`.
    pub fn kubectl_name(&self) -> String {
        let kind = self.kind.to_ascii_lowercase();
        if self.group.is_empty() {
            format!("{kind}/{}", self.name)
        } else {
            format!("{kind}.{}/{}", self.group, self.name)
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.resource_key())
    }
}

/// Splits `apiVersion` into group and version (`v1` is the core group).
pub(crate) fn split_api_version(api_version: &str) -> (&str, &str) {
    match api_version.split_once('/') {
        Some((group, version)) => (group, version),
        None => ("", api_version),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings() {
        let deployment = ObjectKey {
            group: "apps".into(),
            kind: "Deployment".into(),
            namespace: Some("ns".into()),
            name: "nginx-deployment".into(),
        };
        assert_eq!(
            deployment.resource_key(),
            "apps/Deployment/ns/nginx-deployment"
        );
        assert_eq!(
            deployment.kubectl_name(),
            "deployment.apps/nginx-deployment"
        );
        let namespace = ObjectKey {
            group: "".into(),
            kind: "Namespace".into(),
            namespace: None,
            name: "ns".into(),
        };
        assert_eq!(namespace.resource_key(), "/Namespace//ns");
        assert_eq!(namespace.kubectl_name(), "namespace/ns");
        for key in [&deployment, &namespace] {
            assert_eq!(
                ObjectKey::from_resource_key(&key.resource_key()).as_ref(),
                Some(key)
            );
        }
        assert_eq!(ObjectKey::from_resource_key("a/b/c"), None);
        assert_eq!(split_api_version("apps/v1"), ("apps", "v1"));
        assert_eq!(split_api_version("v1"), ("", "v1"));
    }
}
