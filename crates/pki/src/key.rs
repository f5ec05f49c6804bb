//! Private keys: generation, loading in the three PEM forms users bring, and signing.
//!
//! Keys are held as aws-lc-rs key pairs. The PKCS#8 encoding is kept in a zeroizing buffer so that
//! a key can be written out (to its owner only) without re-deriving it, and it is wiped on drop.
//! `Debug` never prints key material.

use std::fmt;
use std::str::FromStr;

use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der, PublicKeyX509Der};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair as _, RsaKeyPair};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;
use zeroize::Zeroizing;

use crate::der_util;

/// Largest private-key PEM accepted; an RSA-8192 PKCS#8 key is about 6.5 KB of PEM.
pub const MAX_KEY_PEM_BYTES: usize = 16 * 1024;

/// A key algorithm meshca can generate. The spelling (`ecdsa-p256`, `rsa-2048`, …) is the one used
/// in policies, flags and status output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum KeyAlgorithm {
    /// ECDSA on NIST P-256 with SHA-256 signatures: the default, and the fastest signer.
    #[default]
    EcdsaP256,
    /// ECDSA on NIST P-384 with SHA-384 signatures.
    EcdsaP384,
    /// RSA with a 2048-bit modulus, PKCS#1 v1.5 SHA-256 signatures.
    Rsa2048,
    /// RSA with a 3072-bit modulus.
    Rsa3072,
    /// RSA with a 4096-bit modulus.
    Rsa4096,
}

impl KeyAlgorithm {
    /// Every algorithm, in the order the CLI documents them.
    pub const ALL: [KeyAlgorithm; 5] = [
        KeyAlgorithm::EcdsaP256,
        KeyAlgorithm::EcdsaP384,
        KeyAlgorithm::Rsa2048,
        KeyAlgorithm::Rsa3072,
        KeyAlgorithm::Rsa4096,
    ];

    /// The canonical spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyAlgorithm::EcdsaP256 => "ecdsa-p256",
            KeyAlgorithm::EcdsaP384 => "ecdsa-p384",
            KeyAlgorithm::Rsa2048 => "rsa-2048",
            KeyAlgorithm::Rsa3072 => "rsa-3072",
            KeyAlgorithm::Rsa4096 => "rsa-4096",
        }
    }

    /// The public-key kind a key of this algorithm has.
    pub fn kind(self) -> PublicKeyKind {
        match self {
            KeyAlgorithm::EcdsaP256 => PublicKeyKind::Ec(Curve::P256),
            KeyAlgorithm::EcdsaP384 => PublicKeyKind::Ec(Curve::P384),
            KeyAlgorithm::Rsa2048 => PublicKeyKind::Rsa { bits: 2048 },
            KeyAlgorithm::Rsa3072 => PublicKeyKind::Rsa { bits: 3072 },
            KeyAlgorithm::Rsa4096 => PublicKeyKind::Rsa { bits: 4096 },
        }
    }
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyAlgorithm {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KeyAlgorithm::ALL
            .into_iter()
            .find(|a| a.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| KeyError::UnknownAlgorithm(s.to_string()))
    }
}

/// An elliptic curve meshca accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Curve {
    /// NIST P-256 (secp256r1).
    P256,
    /// NIST P-384 (secp384r1).
    P384,
}

impl fmt::Display for Curve {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Curve::P256 => "P-256",
            Curve::P384 => "P-384",
        })
    }
}

/// What kind of public key a key, CSR or certificate carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PublicKeyKind {
    /// ECDSA on the given curve.
    Ec(Curve),
    /// RSA with a modulus of `bits` bits.
    Rsa {
        /// Modulus length in bits.
        bits: usize,
    },
}

impl fmt::Display for PublicKeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PublicKeyKind::Ec(c) => write!(f, "ECDSA {c}"),
            PublicKeyKind::Rsa { bits } => write!(f, "RSA {bits}"),
        }
    }
}

/// Why a key could not be generated or loaded. No variant ever carries key bytes.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The algorithm name is not one meshca knows.
    #[error("unknown key algorithm {0:?}: use one of ecdsa-p256, ecdsa-p384, rsa-2048, rsa-3072, rsa-4096")]
    UnknownAlgorithm(String),
    /// The crypto library failed to generate a key.
    #[error("key generation failed for {0}")]
    Generation(KeyAlgorithm),
    /// The input is larger than any key meshca accepts.
    #[error("private key input is {len} bytes, more than the {max}-byte limit")]
    TooLarge {
        /// Input length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The input holds an encrypted key.
    #[error("the private key is encrypted; decrypt it first (openssl pkey -in key.pem -out plain.pem)")]
    Encrypted,
    /// No PEM private-key block was found.
    #[error(
        "no private key found: expected a PEM block labelled PRIVATE KEY (PKCS#8), RSA PRIVATE KEY (PKCS#1) or EC PRIVATE KEY (SEC1)"
    )]
    NoKey,
    /// The key's encoding is valid PEM but the key inside is not one meshca can use.
    #[error("unsupported or malformed {format} private key: {reason}")]
    Unsupported {
        /// PKCS#8, PKCS#1 or SEC1.
        format: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// Signing failed inside the crypto library.
    #[error("signing with the {0} key failed")]
    Sign(PublicKeyKind),
}

enum Inner {
    Ec(EcdsaKeyPair),
    Rsa(RsaKeyPair),
}

/// A private key with its public half, able to sign certificates and CSRs.
pub struct PrivateKey {
    inner: Inner,
    pkcs8: Zeroizing<Vec<u8>>,
    spki: Vec<u8>,
    kind: PublicKeyKind,
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrivateKey").field("kind", &self.kind).field("key", &"[secret elided]").finish()
    }
}

fn ec_signing_alg(curve: Curve) -> &'static signature::EcdsaSigningAlgorithm {
    match curve {
        Curve::P256 => &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        Curve::P384 => &signature::ECDSA_P384_SHA384_ASN1_SIGNING,
    }
}

impl PrivateKey {
    /// Generates a fresh key.
    pub fn generate(alg: KeyAlgorithm) -> Result<Self, KeyError> {
        let err = |_| KeyError::Generation(alg);
        match alg {
            KeyAlgorithm::EcdsaP256 | KeyAlgorithm::EcdsaP384 => {
                let curve = if alg == KeyAlgorithm::EcdsaP256 { Curve::P256 } else { Curve::P384 };
                let doc = EcdsaKeyPair::generate_pkcs8(ec_signing_alg(curve), &SystemRandom::new()).map_err(err)?;
                Self::from_ec_pkcs8(doc.as_ref(), curve).map_err(|_| KeyError::Generation(alg))
            }
            KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 | KeyAlgorithm::Rsa4096 => {
                let size = match alg {
                    KeyAlgorithm::Rsa2048 => KeySize::Rsa2048,
                    KeyAlgorithm::Rsa3072 => KeySize::Rsa3072,
                    _ => KeySize::Rsa4096,
                };
                let kp = RsaKeyPair::generate(size).map_err(err)?;
                Self::from_rsa(kp, "generated").map_err(|_| KeyError::Generation(alg))
            }
        }
    }

    fn from_ec_pkcs8(pkcs8: &[u8], curve: Curve) -> Result<Self, KeyError> {
        let kp = EcdsaKeyPair::from_pkcs8(ec_signing_alg(curve), pkcs8)
            .map_err(|e| KeyError::Unsupported { format: "PKCS#8", reason: e.to_string() })?;
        Self::from_ec(kp, curve)
    }

    fn from_ec(kp: EcdsaKeyPair, curve: Curve) -> Result<Self, KeyError> {
        let unsupported = |reason: &str| KeyError::Unsupported { format: "EC", reason: reason.to_string() };
        let pkcs8 = kp.to_pkcs8v1().map_err(|_| unsupported("cannot re-encode as PKCS#8"))?;
        let spki: PublicKeyX509Der<'static> =
            kp.public_key().as_der().map_err(|_| unsupported("cannot encode the public key"))?;
        Ok(PrivateKey {
            inner: Inner::Ec(kp),
            pkcs8: Zeroizing::new(pkcs8.as_ref().to_vec()),
            spki: spki.as_ref().to_vec(),
            kind: PublicKeyKind::Ec(curve),
        })
    }

    fn from_rsa(kp: RsaKeyPair, format: &'static str) -> Result<Self, KeyError> {
        let unsupported = |reason: &str| KeyError::Unsupported { format, reason: reason.to_string() };
        let bits = kp.public_modulus_len() * 8;
        if bits < 2048 {
            return Err(unsupported(&format!("RSA key of {bits} bits; at least 2048 are required")));
        }
        let pkcs8: Pkcs8V1Der<'static> = kp.as_der().map_err(|_| unsupported("cannot re-encode as PKCS#8"))?;
        let spki: PublicKeyX509Der<'static> =
            kp.public_key().as_der().map_err(|_| unsupported("cannot encode the public key"))?;
        Ok(PrivateKey {
            inner: Inner::Rsa(kp),
            pkcs8: Zeroizing::new(pkcs8.as_ref().to_vec()),
            spki: spki.as_ref().to_vec(),
            kind: PublicKeyKind::Rsa { bits },
        })
    }

    /// Loads a key from PEM: PKCS#8 (`PRIVATE KEY`), PKCS#1 (`RSA PRIVATE KEY`) or SEC1
    /// (`EC PRIVATE KEY`). Other PEM blocks in the input (certificates, EC parameters) are skipped,
    /// as OpenSSL does.
    pub fn from_pem(pem: &[u8]) -> Result<Self, KeyError> {
        if pem.len() > MAX_KEY_PEM_BYTES {
            return Err(KeyError::TooLarge { len: pem.len(), max: MAX_KEY_PEM_BYTES });
        }
        if pem.windows(b"ENCRYPTED".len()).any(|w| w == b"ENCRYPTED") {
            return Err(KeyError::Encrypted);
        }
        let der = PrivateKeyDer::from_pem_slice(pem).map_err(|_| KeyError::NoKey)?;
        Self::from_der(&der)
    }

    /// Loads a key from its DER form (any of the three encodings).
    pub fn from_der(der: &PrivateKeyDer<'_>) -> Result<Self, KeyError> {
        match der {
            PrivateKeyDer::Pkcs8(k) => {
                let bytes = k.secret_pkcs8_der();
                for curve in [Curve::P256, Curve::P384] {
                    if let Ok(kp) = EcdsaKeyPair::from_pkcs8(ec_signing_alg(curve), bytes) {
                        return Self::from_ec(kp, curve);
                    }
                }
                match RsaKeyPair::from_pkcs8(bytes) {
                    Ok(kp) => Self::from_rsa(kp, "PKCS#8"),
                    Err(e) => Err(KeyError::Unsupported {
                        format: "PKCS#8",
                        reason: format!("not an ECDSA P-256/P-384 or RSA key meshca can use ({e})"),
                    }),
                }
            }
            PrivateKeyDer::Pkcs1(k) => {
                let kp = RsaKeyPair::from_der(k.secret_pkcs1_der())
                    .map_err(|e| KeyError::Unsupported { format: "PKCS#1", reason: e.to_string() })?;
                Self::from_rsa(kp, "PKCS#1")
            }
            PrivateKeyDer::Sec1(k) => {
                for curve in [Curve::P256, Curve::P384] {
                    if let Ok(kp) = EcdsaKeyPair::from_private_key_der(ec_signing_alg(curve), k.secret_sec1_der()) {
                        return Self::from_ec(kp, curve);
                    }
                }
                Err(KeyError::Unsupported {
                    format: "SEC1",
                    reason: "only P-256 and P-384 EC keys are accepted".to_string(),
                })
            }
            _ => Err(KeyError::NoKey),
        }
    }

    /// The kind of key.
    pub fn kind(&self) -> PublicKeyKind {
        self.kind
    }

    /// The DER `SubjectPublicKeyInfo` of the public half.
    pub fn public_key_spki(&self) -> &[u8] {
        &self.spki
    }

    /// The key as PKCS#8 DER. Only for writing the key to its owner.
    pub fn pkcs8_der(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The key as PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`), in a buffer wiped on drop.
    pub fn to_pkcs8_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(der_util::pem_encode("PRIVATE KEY", &self.pkcs8))
    }

    /// The signature algorithm identifier (DER) for certificates and CSRs this key signs.
    pub(crate) fn signature_algorithm_der(&self) -> &'static [u8] {
        match self.kind {
            PublicKeyKind::Ec(Curve::P256) => der_util::ALG_ECDSA_SHA256,
            PublicKeyKind::Ec(Curve::P384) => der_util::ALG_ECDSA_SHA384,
            PublicKeyKind::Rsa { .. } => der_util::ALG_RSA_SHA256,
        }
    }

    /// Signs `msg` with this key's signature algorithm (the one `signature_algorithm_der` names).
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, KeyError> {
        let rng = SystemRandom::new();
        match &self.inner {
            Inner::Ec(kp) => kp.sign(&rng, msg).map(|s| s.as_ref().to_vec()).map_err(|_| KeyError::Sign(self.kind)),
            Inner::Rsa(kp) => {
                let mut sig = vec![0u8; kp.public_modulus_len()];
                kp.sign(&signature::RSA_PKCS1_SHA256, &rng, msg, &mut sig).map_err(|_| KeyError::Sign(self.kind))?;
                Ok(sig)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn algorithm_names_round_trip() {
        for alg in KeyAlgorithm::ALL {
            assert_eq!(alg.as_str().parse::<KeyAlgorithm>().expect("parses"), alg);
        }
        let err = "ed25519".parse::<KeyAlgorithm>().expect_err("unknown");
        assert!(err.to_string().contains("ecdsa-p256"), "{err}");
    }

    #[test]
    fn generated_keys_reload_from_their_pkcs8_pem_with_the_same_public_key() {
        for alg in [KeyAlgorithm::EcdsaP256, KeyAlgorithm::EcdsaP384, KeyAlgorithm::Rsa2048] {
            let key = PrivateKey::generate(alg).expect("generate");
            assert_eq!(key.kind(), alg.kind());
            let pem = key.to_pkcs8_pem();
            assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
            let again = PrivateKey::from_pem(pem.as_bytes()).expect("reload");
            assert_eq!(again.public_key_spki(), key.public_key_spki());
        }
    }

    #[test]
    fn debug_never_shows_key_material() {
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).expect("generate");
        let dbg = format!("{key:?}");
        assert!(dbg.contains("elided"));
        let pem = key.to_pkcs8_pem();
        let body: String = pem.lines().nth(1).unwrap_or_default().chars().take(20).collect();
        assert!(!dbg.contains(&body));
    }

    #[test]
    fn garbage_encrypted_and_oversized_inputs_get_specific_errors() {
        assert!(matches!(PrivateKey::from_pem(b"hello"), Err(KeyError::NoKey)));
        let enc = b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n";
        assert!(matches!(PrivateKey::from_pem(enc), Err(KeyError::Encrypted)));
        let big = vec![b'A'; MAX_KEY_PEM_BYTES + 1];
        assert!(matches!(PrivateKey::from_pem(&big), Err(KeyError::TooLarge { .. })));
        let bad = b"-----BEGIN PRIVATE KEY-----\nMAMCAQA=\n-----END PRIVATE KEY-----\n";
        assert!(matches!(PrivateKey::from_pem(bad), Err(KeyError::Unsupported { .. })));
    }
}
