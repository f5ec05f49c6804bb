//! Certificate signing requests: building them, and verifying the ones that arrive from outside.
//!
//! A verified CSR yields only its public key. Its subject, attributes and requested extensions are
//! deliberately never read: the issuer alone decides what a certificate says, so no SAN, CA flag
//! or name in a CSR can reach a certificate.

use der::{Decode, Encode};
use spki::SubjectPublicKeyInfoRef;
use x509_cert::request::{CertReqInfo, Version};
use x509_cert::spki::SubjectPublicKeyInfoOwned;

use crate::der_util::{self, PublicKeyError, SignatureError};
use crate::key::{Curve, KeyError, PrivateKey, PublicKeyKind};
use crate::name::{self, NameAttr, NameError};

/// Why a CSR was refused. Each variant names what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    /// The request is larger than the policy allows.
    #[error("CSR is {len} bytes, more than the {max}-byte limit")]
    TooLarge {
        /// Input length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Nothing that looks like a CSR (neither PEM nor DER).
    #[error("input is neither a PEM CERTIFICATE REQUEST nor a DER CSR")]
    NotACsr,
    /// The PEM framing is broken, or holds something else than one CSR.
    #[error("malformed PEM CSR: {0}")]
    Pem(String),
    /// The DER does not decode as PKCS#10.
    #[error("malformed CSR: {0}")]
    Der(String),
    /// PKCS#10 version other than v1 (0).
    #[error("unsupported CSR version {0}; only v1 (0) exists")]
    Version(u8),
    /// The public key is of a kind meshca never signs.
    #[error("CSR public key refused: {0}")]
    PublicKey(#[from] PublicKeyError),
    /// An RSA key below the minimum size.
    #[error("RSA key of {bits} bits is too small; at least {min} bits are required")]
    RsaTooSmall {
        /// Key size.
        bits: usize,
        /// Minimum.
        min: usize,
    },
    /// An RSA key above the maximum size.
    #[error("RSA key of {bits} bits is too large; at most {max} bits are accepted")]
    RsaTooLarge {
        /// Key size.
        bits: usize,
        /// Maximum.
        max: usize,
    },
    /// An RSA key whose public exponent is not 65537.
    #[error(
        "RSA public exponent {exponent} refused: only 65537 is accepted (small exponents invite signature forgery and broken padding checks; every mainstream key generator uses 65537)"
    )]
    RsaExponent {
        /// The exponent, decimal when it fits in 64 bits, else hex.
        exponent: String,
    },
    /// The key kind is valid in general but not allowed by this issuer's policy.
    #[error("{got} keys are not allowed here; allowed: {allowed}")]
    KeyNotAllowed {
        /// The key in the CSR.
        got: PublicKeyKind,
        /// What the policy allows, for the message.
        allowed: String,
    },
    /// The self-signature (proof of possession) does not verify.
    #[error("CSR signature check (proof of possession) failed: {0}")]
    Signature(#[from] SignatureError),
    /// Building a CSR failed.
    #[error("cannot build CSR: {0}")]
    Build(String),
}

impl From<KeyError> for CsrError {
    fn from(e: KeyError) -> Self {
        CsrError::Build(e.to_string())
    }
}

impl From<NameError> for CsrError {
    fn from(e: NameError) -> Self {
        CsrError::Build(e.to_string())
    }
}

/// Which keys a CSR may carry, and how large the request may be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsrPolicy {
    /// Largest accepted input, PEM or DER.
    pub max_bytes: usize,
    /// Smallest RSA modulus accepted.
    pub min_rsa_bits: usize,
    /// Largest RSA modulus accepted.
    pub max_rsa_bits: usize,
    /// Whether RSA keys are accepted at all.
    pub allow_rsa: bool,
    /// Accepted curves.
    pub curves: Vec<Curve>,
}

impl Default for CsrPolicy {
    /// The leaf profile: RSA 2048–8192, P-256 and P-384, requests up to 64 KiB.
    fn default() -> Self {
        CsrPolicy {
            max_bytes: 64 * 1024,
            min_rsa_bits: 2048,
            max_rsa_bits: 8192,
            allow_rsa: true,
            curves: vec![Curve::P256, Curve::P384],
        }
    }
}

impl CsrPolicy {
    /// A policy accepting exactly one key kind (used for cluster intermediates, whose key
    /// algorithm the RootTrustPolicy fixes).
    pub fn exactly(kind: PublicKeyKind) -> Self {
        match kind {
            PublicKeyKind::Ec(c) => CsrPolicy { allow_rsa: false, curves: vec![c], ..Default::default() },
            PublicKeyKind::Rsa { bits } => CsrPolicy {
                allow_rsa: true,
                curves: vec![],
                min_rsa_bits: bits,
                max_rsa_bits: bits,
                ..Default::default()
            },
        }
    }

    fn describe(&self) -> String {
        let mut parts: Vec<String> = self.curves.iter().map(|c| format!("ECDSA {c}")).collect();
        if self.allow_rsa {
            if self.min_rsa_bits == self.max_rsa_bits {
                parts.push(format!("RSA {}", self.min_rsa_bits));
            } else {
                parts.push(format!("RSA {}-{}", self.min_rsa_bits, self.max_rsa_bits));
            }
        }
        parts.join(", ")
    }

    fn check(&self, kind: PublicKeyKind) -> Result<(), CsrError> {
        match kind {
            PublicKeyKind::Ec(c) if self.curves.contains(&c) => Ok(()),
            PublicKeyKind::Rsa { bits } if self.allow_rsa => {
                if bits < self.min_rsa_bits {
                    Err(CsrError::RsaTooSmall { bits, min: self.min_rsa_bits })
                } else if bits > self.max_rsa_bits {
                    Err(CsrError::RsaTooLarge { bits, max: self.max_rsa_bits })
                } else {
                    Ok(())
                }
            }
            got => Err(CsrError::KeyNotAllowed { got, allowed: self.describe() }),
        }
    }
}

/// A CSR whose signature verified and whose key the policy accepts. Only the key is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedCsr {
    spki_der: Vec<u8>,
    kind: PublicKeyKind,
    /// Kept as parsed: formatting it (OID names looked up) on every request cost more than the
    /// rest of the parse, for a string only logs and tests read.
    subject: x509_cert::name::Name,
    subject_locality: Option<String>,
}

impl VerifiedCsr {
    /// The requester's public key (DER `SubjectPublicKeyInfo`).
    pub fn public_key_spki(&self) -> &[u8] {
        &self.spki_der
    }

    /// The kind of key.
    pub fn key_kind(&self) -> PublicKeyKind {
        self.kind
    }

    /// The subject the requester wrote (RFC 4514). Never copied into a certificate; only for
    /// consistency checks and logs.
    pub fn subject(&self) -> String {
        self.subject.to_string()
    }

    /// The `L=` of the subject, where meshca's agents name their cluster. Only for the check that
    /// a caller does not ask in another cluster's name.
    pub fn subject_locality(&self) -> Option<&str> {
        self.subject_locality.as_deref()
    }
}

/// Extracts the DER of a CSR from PEM or DER input.
fn csr_der(input: &[u8]) -> Result<std::borrow::Cow<'_, [u8]>, CsrError> {
    let trimmed = input.trim_ascii_start();
    if trimmed.starts_with(b"-----BEGIN") {
        let blocks = der_util::pem_blocks(trimmed).map_err(|e| CsrError::Pem(e.to_string()))?;
        match blocks.as_slice() {
            [(label, _)] if label == "CERTIFICATE REQUEST" || label == "NEW CERTIFICATE REQUEST" => {
                Ok(std::borrow::Cow::Owned(blocks.into_iter().next().map(|b| b.1).unwrap_or_default()))
            }
            [(label, _)] => Err(CsrError::Pem(format!("expected CERTIFICATE REQUEST, found {label}"))),
            other => Err(CsrError::Pem(format!("expected one PEM block, found {}", other.len()))),
        }
    } else if input.first() == Some(&0x30) {
        Ok(std::borrow::Cow::Borrowed(input))
    } else {
        Err(CsrError::NotACsr)
    }
}

/// Parses a PEM or DER CSR, checks its proof of possession and its key against `policy`.
pub fn verify_csr(input: &[u8], policy: &CsrPolicy) -> Result<VerifiedCsr, CsrError> {
    if input.len() > policy.max_bytes {
        return Err(CsrError::TooLarge { len: input.len(), max: policy.max_bytes });
    }
    let der = csr_der(input)?;
    let signed = der_util::split_signed(&der).map_err(|e| CsrError::Der(e.to_string()))?;
    let info = CertReqInfo::from_der(signed.tbs).map_err(|e| CsrError::Der(e.to_string()))?;
    if info.version != Version::V1 {
        return Err(CsrError::Version(info.version as u8));
    }
    let spki_der = info.public_key.to_der().map_err(|e| CsrError::Der(e.to_string()))?;
    let spki = SubjectPublicKeyInfoRef::from_der(&spki_der).map_err(|e| CsrError::Der(e.to_string()))?;
    let kind = der_util::public_key_kind(&spki)?;
    policy.check(kind)?;
    if let PublicKeyKind::Rsa { .. } = kind {
        check_rsa_exponent(&der_util::rsa_public_exponent(&spki)?)?;
    }
    der_util::verify_signature(&spki, kind, &signed.algorithm, signed.tbs, signed.signature)?;
    let subject_locality = info.subject.locality().ok().flatten().map(|l| l.value().into_owned());
    Ok(VerifiedCsr { spki_der, kind, subject: info.subject, subject_locality })
}

/// RSA keys in CSRs must use the public exponent 65537 (F4): what every mainstream generator
/// makes, what the CA/Browser Forum's baseline asks of certified keys, and what keeps the
/// small-exponent attacks (e = 3 with sloppy padding checks elsewhere) out of the mesh.
const RSA_EXPONENT: [u8; 3] = [0x01, 0x00, 0x01];

fn check_rsa_exponent(e: &[u8]) -> Result<(), CsrError> {
    if e == RSA_EXPONENT {
        return Ok(());
    }
    let exponent = if e.len() <= 8 {
        e.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)).to_string()
    } else {
        format!("0x{}", hex::encode(e))
    };
    Err(CsrError::RsaExponent { exponent })
}

/// Builds a PEM CSR signed by `key`. `subject` may be empty: meshca's issuer ignores it anyway,
/// but operators reading a CSR appreciate a hint of what it is for.
pub fn build_csr(key: &PrivateKey, subject: &[(NameAttr, &str)]) -> Result<String, CsrError> {
    let der_err = |e: der::Error| CsrError::Build(e.to_string());
    let subject_der = if subject.is_empty() { name::EMPTY_NAME_DER.to_vec() } else { name::build_name(subject)? };
    let info = CertReqInfo {
        version: Version::V1,
        subject: x509_cert::name::Name::from_der(&subject_der).map_err(der_err)?,
        public_key: SubjectPublicKeyInfoOwned::from_der(key.public_key_spki()).map_err(der_err)?,
        attributes: Default::default(),
    };
    let tbs = info.to_der().map_err(der_err)?;
    let sig = key.sign(&tbs)?;
    let der = der_util::assemble_signed(&tbs, key.signature_algorithm_der(), &sig).map_err(der_err)?;
    Ok(der_util::pem_encode("CERTIFICATE REQUEST", &der))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::KeyAlgorithm;
    use proptest::prelude::*;

    #[test]
    fn csrs_built_here_verify_for_every_key_algorithm() {
        for alg in [KeyAlgorithm::EcdsaP256, KeyAlgorithm::EcdsaP384, KeyAlgorithm::Rsa2048] {
            let key = PrivateKey::generate(alg).expect("key");
            let pem = build_csr(&key, &[(NameAttr::CommonName, "x")]).expect("csr");
            let v = verify_csr(pem.as_bytes(), &CsrPolicy::default()).expect("verifies");
            assert_eq!(v.public_key_spki(), key.public_key_spki());
            assert_eq!(v.key_kind(), alg.kind());
            assert_eq!(v.subject(), "CN=x");
        }
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).expect("key");
        let pem = build_csr(&key, &[(NameAttr::CommonName, "i"), (NameAttr::Locality, "cluster-7")]).expect("csr");
        let v = verify_csr(pem.as_bytes(), &CsrPolicy::default()).expect("verifies");
        assert_eq!(v.subject_locality(), Some("cluster-7"));
    }

    #[test]
    fn a_flipped_signature_byte_is_a_proof_of_possession_failure() {
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).expect("key");
        let pem = build_csr(&key, &[]).expect("csr");
        let mut der = csr_der(pem.as_bytes()).expect("der").into_owned();
        let last = der.len() - 1;
        der[last] ^= 0x01;
        let err = verify_csr(&der, &CsrPolicy::default()).expect_err("bad sig");
        assert!(matches!(err, CsrError::Signature(_)), "{err}");
    }

    #[test]
    fn policy_restricts_key_kinds_with_a_message_naming_both() {
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP384).expect("key");
        let pem = build_csr(&key, &[]).expect("csr");
        let err = verify_csr(pem.as_bytes(), &CsrPolicy::exactly(KeyAlgorithm::EcdsaP256.kind())).expect_err("refused");
        assert_eq!(err.to_string(), "ECDSA P-384 keys are not allowed here; allowed: ECDSA P-256");
    }

    #[test]
    fn rsa_exponents_other_than_65537_are_refused() {
        assert_eq!(check_rsa_exponent(&[1, 0, 1]), Ok(()));
        for (e, shown) in
            [(&[3u8][..], "3"), (&[1, 0, 0, 0, 1][..], "4294967297"), (&[1; 9][..], "0x010101010101010101")]
        {
            assert_eq!(check_rsa_exponent(e), Err(CsrError::RsaExponent { exponent: shown.into() }));
        }
    }

    #[test]
    fn size_cap_is_checked_before_parsing() {
        let junk = vec![0x30u8; 70 * 1024];
        assert!(matches!(verify_csr(&junk, &CsrPolicy::default()), Err(CsrError::TooLarge { .. })));
        assert!(matches!(verify_csr(b"hello", &CsrPolicy::default()), Err(CsrError::NotACsr)));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = verify_csr(&bytes, &CsrPolicy::default());
        }

        #[test]
        fn truncating_a_valid_csr_is_always_an_error(cut in 1usize..200) {
            let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).expect("key");
            let pem = build_csr(&key, &[]).expect("csr");
            let der = csr_der(pem.as_bytes()).expect("der").into_owned();
            let cut = cut.min(der.len() - 1);
            prop_assert!(verify_csr(&der[..der.len() - cut], &CsrPolicy::default()).is_err());
        }
    }
}
