//! The management plane's errors.

use meshca_store::StoreError;

/// What can go wrong in the management plane. Messages name the object or field at fault and
/// never carry key material or token secrets.
#[derive(Debug, thiserror::Error)]
pub enum MgmtError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The policy is invalid.
    #[error("policy: {0}")]
    Policy(#[from] meshca_policy::PolicyError),
    /// A secret referenced by the policy is missing or unusable.
    #[error("{field}: secret {secret}: {reason}")]
    Secret {
        /// The policy field that references it.
        field: &'static str,
        /// `namespace/name`.
        secret: String,
        /// What is wrong.
        reason: String,
    },
    /// A PKI operation failed.
    #[error("{0}")]
    Pki(String),
    /// TLS setup failed.
    #[error(transparent)]
    Tls(#[from] meshca_tls::TlsError),
    /// This replica led and lost its lease: it must stop signing, so the server stops (the
    /// process exits and, restarted, rejoins as a follower).
    #[error("lost the leadership lease ({0}); stopping so that only the new leader signs")]
    LostLeadership(String),
    /// An I/O failure at the edge (credentials files, sockets).
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
}

impl MgmtError {
    /// Wraps a PKI error with context.
    pub fn pki(context: &str, e: impl std::fmt::Display) -> Self {
        MgmtError::Pki(format!("{context}: {e}"))
    }
}
