//! meshca's PKI core: keys, CSRs, the certificate profiles (`docs/architecture.md`, "Certificate
//! profiles"), chain verification, root sets and the Istio `cacerts` bundle.
//!
//! This crate does no I/O and reads no clock: callers pass `now`. Everything here is therefore
//! deterministic apart from key and serial randomness, and is tested without files or sockets.
#![forbid(unsafe_code)]

pub mod bundle;
pub mod cert;
pub mod chain;
pub mod crl;
pub mod csr;
mod der_util;
pub mod issue;
pub mod key;
pub mod name;
pub mod profile;
pub mod rootset;
pub mod spiffe;

pub use bundle::{BundleError, BundleFiles, CaBundle};
pub use cert::{Cert, CertError};
pub use chain::{ChainError, Usage, verify_chain};
pub use crl::{Crl, CrlError, CrlParams, Reason, Revoked};
pub use csr::{CsrError, CsrPolicy, VerifiedCsr, build_csr, verify_csr};
pub use der_util::{PublicKeyComponents, PublicKeyError, SignatureError};
pub use issue::{CaSigner, IntermediateParams, IssueError, Issued, LeafParams, RootParams};
pub use key::{Curve, KeyAlgorithm, KeyError, PrivateKey, PublicKeyKind};
pub use rootset::{RootSet, RootSetError};
pub use spiffe::{SpiffeError, SpiffeId, TrustDomain};
