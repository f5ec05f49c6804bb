//! TLS plumbing shared by meshca's servers and clients.
//!
//! - [`provider`]: the one crypto provider (aws-lc-rs) for every rustls config in the process.
//! - [`client`]: every client configuration (server trust, client identity, versions).
//! - [`identity`]: a certificate chain and key as rustls wants them.
//! - [`reload`]: a certificate that can be swapped while connections are accepted, so rotation
//!   never needs a restart.
//! - [`revocation`]: the CRLs the peer verifiers check, and the grace for a revoked CA's leaves.
//! - [`spiffe`]: peer verification for URI-only (SPIFFE) certificates, in both directions, with a
//!   root set that can change during a root rotation.
//! - [`grpc`]: tonic clients over these rustls configs, the server ALPN, and the peer certificate
//!   as handlers see it (the servers' accept loop is `meshca-serve`).
#![forbid(unsafe_code)]

pub mod client;
pub mod grpc;
pub mod identity;
pub mod provider;
pub mod reload;
pub mod revocation;
pub mod spiffe;

pub use client::{ClientAuth, ServerTrust, Versions, client_config};
pub use identity::Identity;
pub use reload::SwappableCert;
pub use revocation::RevocationGrace;
pub use spiffe::{PeerPolicy, SpiffeVerifier};

/// TLS setup failures.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rustls refused the configuration (bad key, no usable certificate, …).
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// A certificate or key could not be converted.
    #[error("TLS identity: {0}")]
    Identity(String),
    /// The trust roots are unusable.
    #[error("TLS trust roots: {0}")]
    Roots(String),
    /// A CRL rustls-webpki cannot use.
    #[error("TLS CRL: {0}")]
    Crl(String),
    /// The endpoint address is not a valid URI.
    #[error("invalid endpoint {0:?}")]
    Endpoint(String),
}

/// Content type of meshca's metrics endpoints (prometheus-client writes OpenMetrics text).
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Whether an HTTP `authorization` header value is `Bearer <want>`, the token compared in
/// constant time. The scheme name is matched case-insensitively and may be followed by several
/// spaces (RFC 7235 §2.1: `bearer`, `BEARER` and `Bearer` are the same scheme). An empty `want`
/// matches nothing. Used by the token-protected metrics endpoints.
pub fn bearer_matches(authorization: Option<&str>, want: &str) -> bool {
    let Some((scheme, token)) = authorization.map(str::trim).and_then(|v| v.split_once(' ')) else {
        return false;
    };
    let token = token.trim();
    scheme.eq_ignore_ascii_case("bearer")
        && !want.is_empty()
        && !token.is_empty()
        && aws_lc_rs::constant_time::verify_slices_are_equal(token.as_bytes(), want.as_bytes()).is_ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn bearer_tokens_must_match_exactly() {
        assert!(super::bearer_matches(Some("Bearer abc"), "abc"));
        assert!(!super::bearer_matches(Some("Bearer abd"), "abc"));
        assert!(!super::bearer_matches(Some("Bearer abcd"), "abc"));
        assert!(!super::bearer_matches(Some("abc"), "abc"));
        assert!(!super::bearer_matches(Some("Basic abc"), "abc"));
        assert!(!super::bearer_matches(Some("Bearerabc"), "abc"));
        assert!(!super::bearer_matches(None, "abc"));
        assert!(!super::bearer_matches(Some("Bearer "), ""), "an empty token never matches");
    }

    #[test]
    fn the_scheme_name_is_case_insensitive_as_rfc_7235_says() {
        for header in ["bearer abc", "BEARER abc", "bEaReR abc", "Bearer   abc", " Bearer abc "] {
            assert!(super::bearer_matches(Some(header), "abc"), "{header:?}");
        }
    }
}
