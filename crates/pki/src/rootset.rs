//! Root sets: the trust bundle (`root-cert.pem`) every cluster shares.
//!
//! During a root rotation a bundle holds several roots. Istio accepts a change of root set only
//! when one set contains the other (A → A+B → B), so meshca needs set operations and a stable
//! fingerprint that does not depend on the order the roots are listed in.

use crate::cert::{Cert, CertError};
use crate::der_util::{self, SignatureError};

/// Why a root set was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RootSetError {
    /// A certificate did not parse.
    #[error(transparent)]
    Cert(#[from] CertError),
    /// The set is empty.
    #[error("the root set is empty")]
    Empty,
    /// A certificate in the set is not a CA.
    #[error("root {subject} is not a CA (basicConstraints CA:TRUE is missing)")]
    NotACa {
        /// Certificate subject.
        subject: String,
    },
    /// A certificate in the set is not self-signed.
    #[error("{subject} is not a root: it is issued by {issuer}")]
    NotSelfSigned {
        /// Certificate subject.
        subject: String,
        /// Its issuer.
        issuer: String,
    },
    /// A self-issued certificate whose signature does not verify with its own key.
    #[error("root {subject} has an invalid self-signature: {source}")]
    BadSelfSignature {
        /// Certificate subject.
        subject: String,
        /// Why.
        source: SignatureError,
    },
}

/// A set of trusted roots, deduplicated, in the order first seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootSet {
    roots: Vec<Cert>,
}

impl RootSet {
    /// Parses a PEM bundle of roots.
    pub fn from_pem(pem: &[u8]) -> Result<Self, RootSetError> {
        RootSet::from_certs(Cert::parse_pem_bundle(pem)?)
    }

    /// Builds a set from certificates, checking each is a self-signed CA.
    pub fn from_certs(certs: Vec<Cert>) -> Result<Self, RootSetError> {
        if certs.is_empty() {
            return Err(RootSetError::Empty);
        }
        let mut roots: Vec<Cert> = Vec::with_capacity(certs.len());
        for c in certs {
            check_root(&c)?;
            if !roots.contains(&c) {
                roots.push(c);
            }
        }
        Ok(RootSet { roots })
    }

    /// The roots.
    pub fn iter(&self) -> impl Iterator<Item = &Cert> {
        self.roots.iter()
    }

    /// How many roots.
    pub fn len(&self) -> usize {
        self.roots.len()
    }

    /// Always false: a root set is never empty.
    pub fn is_empty(&self) -> bool {
        self.roots.is_empty()
    }

    /// Whether `cert` (byte for byte) is one of the roots.
    pub fn contains(&self, cert: &Cert) -> bool {
        self.roots.contains(cert)
    }

    /// `sha256:<hex>` over the sorted SHA-256 fingerprints of the roots; equal sets have equal
    /// fingerprints whatever their order.
    pub fn fingerprint(&self) -> String {
        let fps: Vec<String> = self.roots.iter().map(Cert::fingerprint).collect();
        RootSet::fingerprint_of(fps.iter().map(String::as_str))
    }

    /// The [`RootSet::fingerprint`] of the set of roots whose certificate fingerprints
    /// ([`Cert::fingerprint`]) are `fps`, without the certificates: what a root set holding them
    /// will report.
    pub fn fingerprint_of<'a>(fps: impl Iterator<Item = &'a str>) -> String {
        let mut fps: Vec<&str> = fps.collect();
        fps.sort_unstable();
        fps.dedup();
        format!("sha256:{}", der_util::sha256_hex(fps.join("\n").as_bytes()))
    }

    /// The union of two sets (self's roots first).
    pub fn merge(&self, other: &RootSet) -> RootSet {
        let mut roots = self.roots.clone();
        for r in &other.roots {
            if !roots.contains(r) {
                roots.push(r.clone());
            }
        }
        RootSet { roots }
    }

    /// Whether every root of `self` is in `other`.
    pub fn is_subset_of(&self, other: &RootSet) -> bool {
        self.roots.iter().all(|r| other.contains(r))
    }

    /// The PEM bundle, one certificate per block.
    pub fn to_pem(&self) -> String {
        self.roots.iter().map(Cert::to_pem).collect()
    }

    /// The earliest NotAfter among the roots.
    pub fn earliest_expiry(&self) -> std::time::SystemTime {
        self.roots.iter().map(Cert::not_after).min().unwrap_or(std::time::UNIX_EPOCH)
    }
}

fn check_root(c: &Cert) -> Result<(), RootSetError> {
    if !c.is_self_issued() {
        return Err(RootSetError::NotSelfSigned { subject: c.subject(), issuer: c.issuer() });
    }
    if !c.is_ca() {
        return Err(RootSetError::NotACa { subject: c.subject() });
    }
    c.verify_signed_by(c).map_err(|source| RootSetError::BadSelfSignature { subject: c.subject(), source })
}
