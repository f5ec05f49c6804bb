//! The Istio `cacerts` bundle: the four files istiod reads as its plug-in CA.
//!
//! [`CaBundle::validate`] applies istiod's own load-time checks (all four files present, the key
//! matches, `ca-cert.pem` is an unexpired CA chaining to `root-cert.pem` through `cert-chain.pem`)
//! and meshca's stricter ones (the chain file is exactly the ordered path from `ca-cert.pem` to a
//! root of the set). Every writer validates before it writes, and every reader before it serves.

use std::time::SystemTime;

use zeroize::Zeroizing;

use crate::cert::{Cert, CertError};
use crate::chain::{self, ChainError, Usage};
use crate::issue::{CaSigner, IssueError};
use crate::key::{KeyError, PrivateKey};
use crate::rootset::{RootSet, RootSetError};

/// `ca-cert.pem`: the signing (intermediate) certificate.
pub const CA_CERT: &str = "ca-cert.pem";
/// `ca-key.pem`: its private key.
pub const CA_KEY: &str = "ca-key.pem";
/// `cert-chain.pem`: `ca-cert.pem` and every certificate above it, root included.
pub const CERT_CHAIN: &str = "cert-chain.pem";
/// `root-cert.pem`: the trusted root set.
pub const ROOT_CERT: &str = "root-cert.pem";
/// `ca-crl.pem`: optional; the CRLs istiod hands to Envoy and replicates into the
/// `istio-ca-crl` ConfigMap. When present it must hold a CRL from every certificate of
/// `cert-chain.pem` ([`crate::crl::check_chain_coverage`]).
pub const CA_CRL: &str = "ca-crl.pem";
/// The four files, in the order meshca writes them.
pub const FILES: [&str; 4] = [CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT];

/// Why a bundle was refused.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// One of the four files is missing or empty.
    #[error("cacerts bundle is incomplete: {0} is missing or empty (istiod refuses a partial bundle)")]
    Missing(&'static str),
    /// A certificate file does not parse.
    #[error("{file}: {source}")]
    Cert {
        /// Which file.
        file: &'static str,
        /// Why.
        source: CertError,
    },
    /// The key file does not parse.
    #[error("{CA_KEY}: {0}")]
    Key(#[from] KeyError),
    /// `root-cert.pem` is not a valid root set.
    #[error("{ROOT_CERT}: {0}")]
    Roots(#[from] RootSetError),
    /// The signer cannot be built from the cert and key (mismatch, not a CA, no keyCertSign).
    #[error("{CA_CERT} / {CA_KEY}: {0}")]
    Signer(#[from] IssueError),
    /// `ca-cert.pem` has expired (or is not valid yet).
    #[error("{CA_CERT}: {0}")]
    Validity(ChainError),
    /// `cert-chain.pem` does not start with `ca-cert.pem`.
    #[error("{CERT_CHAIN} must start with the certificate in {CA_CERT}")]
    ChainStart,
    /// `cert-chain.pem` does not end with a root from `root-cert.pem`.
    #[error("{CERT_CHAIN} must end with a root from {ROOT_CERT}; it ends with {last}")]
    ChainEnd {
        /// Subject of the last certificate in the chain file.
        last: String,
    },
    /// `ca-cert.pem` does not chain to the root set through `cert-chain.pem`.
    #[error("{CA_CERT} does not chain to {ROOT_CERT} through {CERT_CHAIN}: {0}")]
    Chain(ChainError),
    /// `cert-chain.pem` holds certificates out of order or not on the path.
    #[error("{CERT_CHAIN} is not the ordered path from {CA_CERT} to the root: {0}")]
    ChainOrder(String),
    /// The root set changed in a way Istio refuses (neither a subset nor a superset).
    #[error(
        "root set change refused: the new set ({new}) is neither a subset nor a superset of the current one ({old}); rotate roots through a bundle holding both"
    )]
    RootSetChange {
        /// Fingerprint of the current set.
        old: String,
        /// Fingerprint of the refused set.
        new: String,
    },
}

/// The four files' contents. The key is in a buffer wiped on drop.
#[derive(Clone, Default)]
pub struct BundleFiles {
    /// `ca-cert.pem`.
    pub ca_cert: Vec<u8>,
    /// `ca-key.pem`.
    pub ca_key: Zeroizing<Vec<u8>>,
    /// `cert-chain.pem`.
    pub cert_chain: Vec<u8>,
    /// `root-cert.pem`.
    pub root_cert: Vec<u8>,
}

impl std::fmt::Debug for BundleFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BundleFiles")
            .field("ca_cert_len", &self.ca_cert.len())
            .field("ca_key", &"[secret elided]")
            .field("cert_chain_len", &self.cert_chain.len())
            .field("root_cert_len", &self.root_cert.len())
            .finish()
    }
}

impl BundleFiles {
    /// Builds the files from a lookup by file name (a directory, a Secret's data map, …).
    pub fn from_lookup<F: FnMut(&'static str) -> Option<Vec<u8>>>(mut get: F) -> Self {
        BundleFiles {
            ca_cert: get(CA_CERT).unwrap_or_default(),
            ca_key: Zeroizing::new(get(CA_KEY).unwrap_or_default()),
            cert_chain: get(CERT_CHAIN).unwrap_or_default(),
            root_cert: get(ROOT_CERT).unwrap_or_default(),
        }
    }

    /// `(file name, contents)` for all four files.
    pub fn entries(&self) -> [(&'static str, &[u8]); 4] {
        [(CA_CERT, &self.ca_cert), (CA_KEY, &self.ca_key), (CERT_CHAIN, &self.cert_chain), (ROOT_CERT, &self.root_cert)]
    }
}

/// A validated bundle, ready to sign with.
#[derive(Debug)]
pub struct CaBundle {
    signer: CaSigner,
    roots: RootSet,
}

impl CaBundle {
    /// Validates the four files at `now` as istiod would, plus meshca's ordering rules.
    pub fn validate(files: &BundleFiles, now: SystemTime) -> Result<CaBundle, BundleError> {
        for (name, data) in files.entries() {
            if data.iter().all(u8::is_ascii_whitespace) {
                return Err(BundleError::Missing(name));
            }
        }
        let ca_cert = Cert::from_pem(&files.ca_cert).map_err(|source| BundleError::Cert { file: CA_CERT, source })?;
        let chain = Cert::parse_pem_bundle(&files.cert_chain)
            .map_err(|source| BundleError::Cert { file: CERT_CHAIN, source })?;
        let roots = RootSet::from_pem(&files.root_cert)?;
        let key = PrivateKey::from_pem(&files.ca_key)?;

        if chain.first() != Some(&ca_cert) {
            return Err(BundleError::ChainStart);
        }
        let last = chain.last().unwrap_or(&ca_cert);
        if !roots.contains(last) {
            return Err(BundleError::ChainEnd { last: last.subject() });
        }
        chain::check_validity(&ca_cert, now).map_err(BundleError::Validity)?;
        let middle = if chain.len() > 2 { &chain[1..chain.len() - 1] } else { &[] };
        let path = chain::verify_chain(&ca_cert, middle, &roots, now, Usage::Ca).map_err(BundleError::Chain)?;
        if path.len() != chain.len() || path.iter().zip(&chain).any(|(a, b)| *a != b) {
            let got: Vec<String> = chain.iter().map(Cert::subject).collect();
            return Err(BundleError::ChainOrder(got.join(" -> ")));
        }
        let signer = CaSigner::new(key, chain)?;
        Ok(CaBundle { signer, roots })
    }

    /// Assembles the files for a freshly issued CA certificate: `chain_above` is the chain of its
    /// issuer (issuer first, root last).
    pub fn assemble(key: &PrivateKey, ca_cert: &Cert, chain_above: &[Cert], roots: &RootSet) -> BundleFiles {
        let ca_pem = ca_cert.to_pem();
        let mut chain = ca_pem.clone();
        for c in chain_above {
            chain.push_str(&c.to_pem());
        }
        BundleFiles {
            ca_cert: ca_pem.into_bytes(),
            ca_key: Zeroizing::new(key.to_pkcs8_pem().as_bytes().to_vec()),
            cert_chain: chain.into_bytes(),
            root_cert: roots.to_pem().into_bytes(),
        }
    }

    /// The signer (cluster intermediate and key).
    pub fn signer(&self) -> &CaSigner {
        &self.signer
    }

    /// Consumes the bundle, returning the signer.
    pub fn into_signer(self) -> CaSigner {
        self.signer
    }

    /// The trusted root set.
    pub fn roots(&self) -> &RootSet {
        &self.roots
    }

    /// The signing certificate.
    pub fn ca_cert(&self) -> &Cert {
        self.signer.cert()
    }
}

/// Istio's multi-root rule: a root set may only change to a subset or a superset of itself.
pub fn check_root_transition(old: &RootSet, new: &RootSet) -> Result<(), BundleError> {
    if old.is_subset_of(new) || new.is_subset_of(old) {
        Ok(())
    } else {
        Err(BundleError::RootSetChange { old: old.fingerprint(), new: new.fingerprint() })
    }
}
