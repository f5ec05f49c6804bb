//! meshca's Kubernetes mode: everything that talks to a Kubernetes API server.
//!
//! - [`store::KubeStore`]: the [`meshca_store::Store`] trait on Secrets. Resource versions are the
//!   compare-and-swap token, a write is one API call (so one atomic update of every key), and a
//!   watch is the API server's watch with a re-list when its resource version expires. The agent
//!   writes `istio-system/cacerts` through it; the management plane keeps all of its state in it.
//! - [`policy`]: the RootTrustPolicy custom resource — read and watched as the management plane's
//!   [`meshca_mgmt::loader::PolicySource`], with a status subresource the leader writes.
//! - [`lease`]: leader election with a `coordination.k8s.io/v1` Lease, so several `meshca server`
//!   replicas run against one API server and only one signs.
//! - [`tokenreview`]: the workload CA's caller authentication by TokenReview, as istiod does.
//! - [`istiod`]: istiod's Deployment, patched by the agent (restarts; the Vault agent sidecar).
//!
//! Only APIs that are GA in every supported Kubernetes version are used (core/v1 Secrets,
//! coordination/v1 Leases, authentication/v1 TokenReview, apiextensions/v1 CRDs, apps/v1
//! Deployments with server-side apply), and the tests
//! run against a real API server (`scripts/peers/kube-apiserver.sh`, docs/kubernetes.md).
#![forbid(unsafe_code)]

pub mod istiod;
pub mod lease;
pub mod policy;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tokenreview;

use std::path::PathBuf;

pub use kube::Client;

/// Label meshca puts on every object it manages (the agent's `cacerts`, its identity, the
/// management plane's records).
pub use meshca_store::labels::MANAGED_BY;

/// The field manager name meshca writes with (server-side apply and `managedFields`).
pub const FIELD_MANAGER: &str = "meshca";

/// How to reach an API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Connection {
    /// A kubeconfig file (its current context, or the named one).
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// A context other than the file's current one.
        context: Option<String>,
    },
    /// An explicit server: what a pod has (`KUBERNETES_SERVICE_HOST`, the mounted CA and token)
    /// or what a test passes.
    Direct {
        /// `https://host:port`.
        url: String,
        /// PEM file of the CA that signed the API server's serving certificate.
        ca_file: Option<PathBuf>,
        /// File holding a bearer token; re-read when it changes (projected service-account tokens
        /// are rotated by the kubelet).
        token_file: Option<PathBuf>,
    },
    /// The pod's own service account (`/var/run/secrets/kubernetes.io/serviceaccount`).
    InCluster,
}

/// Why a client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The kubeconfig could not be read or used.
    #[error("kubeconfig {path}: {reason}")]
    Kubeconfig {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The URL is not an `https://host:port` URL.
    #[error("API server URL {url:?}: {reason}")]
    Url {
        /// The URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The CA file could not be read or holds no certificate.
    #[error("API server CA file {path}: {reason}")]
    CaFile {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The token file is unreadable or malformed.
    #[error("API server token file {path}: {reason}")]
    TokenFile {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// Not running in a pod (no service-account mount or `KUBERNETES_SERVICE_*`).
    #[error("not running inside a Kubernetes pod: {0}; pass --kubeconfig or --kube-url")]
    NotInCluster(String),
    /// kube-rs refused the configuration.
    #[error("building the Kubernetes client: {0}")]
    Client(String),
}

/// Builds a client for `conn`. Nothing is contacted yet: the first request connects.
pub async fn connect(conn: &Connection) -> Result<Client, ConnectError> {
    let config = match conn {
        Connection::Kubeconfig { path, context } => {
            let who = path.display().to_string();
            let file = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| ConnectError::Kubeconfig { path: who.clone(), reason: e.to_string() })?;
            let options = kube::config::KubeConfigOptions { context: context.clone(), ..Default::default() };
            kube::Config::from_custom_kubeconfig(file, &options)
                .await
                .map_err(|e| ConnectError::Kubeconfig { path: who, reason: e.to_string() })?
        }
        Connection::Direct { url, ca_file, token_file } => {
            let uri: http::Uri = url
                .parse()
                .map_err(|e: http::uri::InvalidUri| ConnectError::Url { url: url.clone(), reason: e.to_string() })?;
            if uri.scheme_str() != Some("https") {
                return Err(ConnectError::Url { url: url.clone(), reason: "only https:// is supported".into() });
            }
            let mut config = kube::Config::new(uri);
            if let Some(ca) = ca_file {
                config.root_cert = Some(read_ca_file(ca)?);
            }
            if let Some(path) = token_file {
                check_token_file(path)?;
            }
            config.auth_info.token_file = token_file.as_ref().map(|p| p.display().to_string());
            config
        }
        Connection::InCluster => kube::Config::incluster().map_err(|e| ConnectError::NotInCluster(e.to_string()))?,
    };
    Client::try_from(config).map_err(|e| ConnectError::Client(e.to_string()))
}

/// kube-rs sends a token file's content verbatim (re-reading it as it rotates), so a trailing
/// newline — what `echo` or an editor leaves — would make every request fail with an opaque
/// header error. Say so at start instead.
fn check_token_file(path: &std::path::Path) -> Result<(), ConnectError> {
    let bad = |reason: String| ConnectError::TokenFile { path: path.display().to_string(), reason };
    let token = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    if token.trim().is_empty() {
        return Err(bad("is empty".into()));
    }
    if token.trim() != token {
        return Err(bad(
            "has leading or trailing whitespace (a newline?); write the token alone, e.g. with printf %s".into()
        ));
    }
    Ok(())
}

/// Reads a PEM CA bundle into the DER certificates kube-rs wants.
fn read_ca_file(path: &std::path::Path) -> Result<Vec<Vec<u8>>, ConnectError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let bad = |reason: String| ConnectError::CaFile { path: path.display().to_string(), reason };
    let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let certs: Vec<Vec<u8>> = CertificateDer::pem_slice_iter(&pem)
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<_, _>>()
        .map_err(|e| bad(format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(bad("holds no certificate".into()));
    }
    Ok(certs)
}

/// The HTTP status of a failed API call, when the API server answered one.
pub(crate) fn api_status(e: &kube::Error) -> Option<(u16, String)> {
    match e {
        kube::Error::Api(s) => Some((s.code, s.message.clone())),
        _ => None,
    }
}
