//! meshca's Vault mode (RootTrustPolicy `spec.config.vault`; docs/architecture.md, "Root-of-trust modes"): the root lives in
//! Vault, and beside each cluster's workload CA `meshca vault-agent` obtains the cluster
//! intermediate from Vault's PKI engine and hands it over **in memory only**.
//!
//! - [`client`]: Vault's HTTP API (TLS through rustls with meshca's aws-lc-rs provider), Vault's
//!   `{"errors": [...]}` surfaced with the HTTP status.
//! - [`auth`]: token, AppRole and Kubernetes login; one task that keeps the token, renews it at
//!   about half its lease and logs in afresh when renewal fails. Tokens, secret IDs and JWTs are
//!   [`auth::Secret`]s: never printed, never in an error.
//! - [`pki`]: the pre-flight checks (mount, TTL against the mount's max, key type against the
//!   root), `sign-intermediate`, and `intermediate/generate/exported` for the `csrPath` flow.
//! - [`source`]: [`VaultSource`], the agent's [`meshca_agent::source::IntermediateSource`] in
//!   Vault mode; `key_location() == "memory"`.
//! - [`memdir`]: the `statfs` check that the `cacerts` folder is tmpfs/ramfs.
#![forbid(unsafe_code)]

pub mod auth;
pub mod client;
mod http;
pub mod memdir;
pub mod pki;
pub mod source;

pub use auth::{AuthKind, AuthMethod, Secret, Session};
pub use client::VaultClient;
pub use source::{Overrides, Settings, VaultSource};

/// Why something in Vault mode failed. No variant carries a token, secret ID or JWT: login
/// failures name the auth method and its mount, and Vault's own messages are scrubbed of the
/// credentials that were sent.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// The Vault settings are unusable; `field` names the policy field (or flag).
    #[error("{field}: {message}")]
    Config {
        /// E.g. `spec.config.vault.caPath`.
        field: String,
        /// What is wrong and what would be right.
        message: String,
    },
    /// Vault did not answer (connection refused, TLS failure, timeout). Retried with backoff.
    #[error("Vault at {server} is unreachable: {reason}")]
    Unreachable {
        /// Vault's address.
        server: String,
        /// What failed.
        reason: String,
    },
    /// Vault answered a request with an error.
    #[error("Vault refused {method} {path} (HTTP {status}): {message}")]
    Api {
        /// HTTP method.
        method: String,
        /// API path (under `/v1/`); never carries a credential.
        path: String,
        /// HTTP status.
        status: u16,
        /// Vault's `errors`, joined.
        message: String,
    },
    /// A login was refused.
    #[error("Vault {method} login at auth/{mount} failed (HTTP {status}): {message}")]
    Login {
        /// The auth method.
        method: AuthKind,
        /// Its mount path.
        mount: String,
        /// HTTP status.
        status: u16,
        /// Vault's message, scrubbed of the credentials sent.
        message: String,
    },
    /// A credential file (token, secret ID, service-account JWT) could not be read.
    #[error("reading the {what} for the Vault {method} login from {path}: {reason}")]
    CredentialFile {
        /// The auth method.
        method: AuthKind,
        /// What the file holds.
        what: &'static str,
        /// The file.
        path: String,
        /// Why (never the contents).
        reason: String,
    },
    /// A pre-flight check failed before anything was asked of Vault's PKI engine.
    #[error("Vault pre-flight check: {0}")]
    Preflight(String),
    /// Vault's answer cannot be used.
    #[error("Vault's answer to {path} is unusable: {reason}")]
    BadResponse {
        /// API path.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The `cacerts` folder is not memory-backed, or cannot be used.
    #[error("{0}")]
    MemoryDir(String),
}

impl VaultError {
    /// Whether Vault refused the token itself (revoked or expired: HTTP 403 "invalid token"),
    /// which one fresh login fixes. A plain "permission denied" is a policy problem: logging in
    /// again would not help, and would spend an AppRole secret ID's uses for nothing.
    pub fn is_token_refused(&self) -> bool {
        matches!(self, VaultError::Api { status: 403, message, .. } if message.contains("invalid token"))
    }
}

#[cfg(test)]
mod tests {
    use super::VaultError;

    #[test]
    fn only_an_invalid_token_is_worth_a_fresh_login() {
        let api = |status, message: &str| VaultError::Api {
            method: "GET".into(),
            path: "sys/internal/ui/mounts/pki".into(),
            status,
            message: message.into(),
        };
        assert!(api(403, "permission denied; invalid token").is_token_refused());
        assert!(!api(403, "permission denied").is_token_refused());
        assert!(!api(400, "invalid token").is_token_refused());
    }
}
