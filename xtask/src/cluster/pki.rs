//! Certificates for the local control plane: one CA, the API server's serving certificate, and client
//! certificates for the admin, the controller-manager and the scheduler (their usernames are what RBAC's
//! bootstrap roles bind), plus the service-account signing key.

use std::path::{Path, PathBuf};

use anyhow::Result;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// Paths of the files [`generate`] wrote.
#[derive(Debug, Clone)]
pub struct Pki {
    pub ca_cert: PathBuf,
    pub serving_cert: PathBuf,
    pub serving_key: PathBuf,
    /// Signs service-account tokens (PKCS#8 private key).
    pub service_account_key: PathBuf,
    /// Verifies them (the API server takes public keys only).
    pub service_account_public_key: PathBuf,
    pub admin: ClientCert,
    pub controller_manager: ClientCert,
    pub scheduler: ClientCert,
}

#[derive(Debug, Clone)]
pub struct ClientCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The first address of the service CIDR, which the `kubernetes` Service gets.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
const KUBERNETES_SERVICE_IP: &str = "10.96.0.1";

pub fn generate(dir: &Path) -> Result<Pki> {
    std::fs::create_dir_all(dir)?;
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "gitops-test-ca");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let ca_cert_path = dir.join("ca.crt");
    std::fs::write(&ca_cert_path, ca_cert.pem())?;
    let issuer = Issuer::new(ca_params, ca_key);

    let serving_names = [
        "127.0.0.1",
        "localhost",
        KUBERNETES_SERVICE_IP,
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
    ];
    let mut serving = CertificateParams::new(serving_names.map(String::from).to_vec())?;
    serving
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let serving = write_leaf(dir, "apiserver", serving, &issuer)?;

    let client =
        |name: &str, common_name: &str, organization: Option<&str>| -> Result<ClientCert> {
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params
                .distinguished_name
                .push(DnType::CommonName, common_name);
            if let Some(organization) = organization {
                params
                    .distinguished_name
                    .push(DnType::OrganizationName, organization);
            }
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            write_leaf(dir, name, params, &issuer)
        };
    let admin = client("admin", "kubernetes-admin", Some("system:masters"))?;
    let controller_manager = client("controller-manager", "system:kube-controller-manager", None)?;
    let scheduler = client("scheduler", "system:kube-scheduler", None)?;

    let service_account = KeyPair::generate()?;
    let service_account_key = dir.join("service-account.key");
    std::fs::write(&service_account_key, service_account.serialize_pem())?;
    let service_account_public_key = dir.join("service-account.pub");
    std::fs::write(
        &service_account_public_key,
        service_account.public_key_pem(),
    )?;

    Ok(Pki {
        ca_cert: ca_cert_path,
        serving_cert: serving.cert,
        serving_key: serving.key,
        service_account_key,
        service_account_public_key,
        admin,
        controller_manager,
        scheduler,
    })
}

fn write_leaf(
    dir: &Path,
    name: &str,
    params: CertificateParams,
    issuer: &Issuer<'_, KeyPair>,
) -> Result<ClientCert> {
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    let paths = ClientCert {
        cert: dir.join(format!("{name}.crt")),
        key: dir.join(format!("{name}.key")),
    };
    std::fs::write(&paths.cert, cert.pem())?;
    std::fs::write(&paths.key, key.serialize_pem())?;
    Ok(paths)
}

/// A kubeconfig for `server` authenticating with `client`.
pub fn kubeconfig(server: &str, ca_cert: &Path, client: &ClientCert, user: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: gitops-test
  cluster:
    server: {server}
    certificate-authority: {ca}
users:
- name: {user}
  user:
    client-certificate: {cert}
    client-key: {key}
contexts:
- name: gitops-test
  context:
    cluster: gitops-test
    user: {user}
current-context: gitops-test
",
        ca = ca_cert.display(),
        cert = client.cert.display(),
        key = client.key.display(),
    )
}
