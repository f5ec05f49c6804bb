//! The SPIFFE trust bundle document (SPIFFE Trust Domain and Bundle specification, §4): a JSON
//! Web Key Set whose `x509-svid` keys each carry one X.509 authority in `x5c`, with the
//! `spiffe_sequence` and `spiffe_refresh_hint` members.
//!
//! Both directions live here so they cannot drift apart: [`Bundle::to_document`] is what
//! meshca's bundle endpoint serves for its root set, and [`Bundle::parse`] is how a bundle fetched
//! from another trust domain is read and checked before any of its roots is trusted. The JWK
//! members themselves are `jsonwebtoken`'s types (`kty`/`crv`/`x`/`y`, `n`/`e`, `use`, `x5c`), so
//! meshca does not hand-write JOSE.
//!
//! Like `meshca-pki`, this crate does no I/O and reads no clock: `now` is a parameter.
#![forbid(unsafe_code)]

use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::jwk::{
    AlgorithmParameters, CommonParameters, EllipticCurve, EllipticCurveKeyParameters, EllipticCurveKeyType, Jwk,
    PublicKeyUse, RSAKeyParameters, RSAKeyType,
};
use meshca_pki::{Cert, CertError, Curve, PublicKeyComponents, PublicKeyError, TrustDomain};
use serde::{Deserialize, Serialize};

/// The `use` of a key that is an X.509 authority (the X509-SVID specification, §6). Keys with any
/// other `use` (`jwt-svid`, unknown ones) are ignored, as the bundle specification requires.
pub const X509_SVID_USE: &str = "x509-svid";

/// The largest bundle document read. A bundle of a few dozen roots is tens of kilobytes; a
/// document past this is refused before it is parsed, so a hostile endpoint cannot make the
/// management plane hold or parse an arbitrary amount of JSON.
pub const MAX_DOCUMENT_BYTES: usize = 256 * 1024;

/// A trust domain's bundle: its X.509 authorities, with the publisher's sequence number and
/// refresh hint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// The trust domain the authorities vouch for. A bundle document does not name it: it is
    /// what the document was fetched *for* (the operator's `<trust domain, endpoint>` pair).
    pub trust_domain: TrustDomain,
    /// `spiffe_sequence`: grows with every change of the authorities (0 when absent).
    pub sequence: u64,
    /// `spiffe_refresh_hint`: how often consumers should fetch it again, when given.
    pub refresh_hint: Option<Duration>,
    /// The X.509 authorities (CA certificates), deduplicated, in document order.
    pub authorities: Vec<Cert>,
}

/// The document as JSON: the keys, and the two SPIFFE members.
#[derive(Serialize, Deserialize)]
struct Document<K> {
    keys: Vec<K>,
    #[serde(rename = "spiffe_sequence", default, skip_serializing_if = "Option::is_none")]
    sequence: Option<u64>,
    #[serde(rename = "spiffe_refresh_hint", default, skip_serializing_if = "Option::is_none")]
    refresh_hint: Option<u64>,
}

/// Why a bundle document was refused. Nothing of a refused document is used.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The document is larger than [`MAX_DOCUMENT_BYTES`].
    #[error("the bundle document is {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// Its size (or the size read so far).
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Not JSON, or not the shape of a JWK Set.
    #[error("the bundle document is not a SPIFFE bundle (a JWK Set): {0}")]
    Json(#[source] serde_json::Error),
    /// No key has `use: x509-svid`: the trust domain would have no X.509 authority.
    #[error("the bundle for {trust_domain} has no x509-svid key: it names no X.509 authority")]
    NoX509Authorities {
        /// The trust domain it was read for.
        trust_domain: TrustDomain,
    },
    /// One `x509-svid` key is unusable; the whole document is refused.
    #[error("key {index} of the bundle for {trust_domain}: {source}")]
    Key {
        /// The trust domain it was read for.
        trust_domain: TrustDomain,
        /// Its position in `keys` (from 0).
        index: usize,
        /// What is wrong with it.
        #[source]
        source: KeyError,
    },
    /// A certificate meshca publishes carries a key it cannot express as a JWK.
    #[error("root {subject} cannot be published as a JWK: {source}")]
    Encode {
        /// Its subject.
        subject: String,
        /// Why.
        #[source]
        source: PublicKeyError,
    },
}

/// What is wrong with one `x509-svid` key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// `x5c` must hold exactly one certificate, the authority itself.
    #[error("x5c holds {count} certificates; an x509-svid key must carry exactly one")]
    X5cCount {
        /// How many it holds.
        count: usize,
    },
    /// The `x5c` entry is not standard base64.
    #[error("x5c is not base64 DER: {0}")]
    X5cBase64(#[source] base64::DecodeError),
    /// The `x5c` certificate does not parse.
    #[error("the x5c certificate: {0}")]
    Cert(#[source] CertError),
    /// The certificate cannot sign certificates, so it cannot be an authority.
    #[error("{subject} is not a CA (basicConstraints CA:TRUE with keyCertSign is required of an X.509 authority)")]
    NotACa {
        /// Its subject.
        subject: String,
    },
    /// The authority has expired.
    #[error("{subject} expired at {not_after}")]
    Expired {
        /// Its subject.
        subject: String,
        /// Its NotAfter (RFC 3339).
        not_after: String,
    },
    /// The certificate names a SPIFFE trust domain other than the one the bundle is for.
    #[error("{subject} belongs to trust domain {found} (its URI SAN), not {expected}")]
    WrongTrustDomain {
        /// Its subject.
        subject: String,
        /// The trust domain its SAN names.
        found: String,
        /// The bundle's trust domain.
        expected: TrustDomain,
    },
    /// The JWK's members do not describe a key meshca reads (EC P-256/P-384 or RSA).
    #[error("the JWK is not an EC (P-256, P-384) or RSA public key: {0}")]
    Unsupported(String),
    /// The JWK's public key is not the certificate's.
    #[error("the JWK's public key is not the key of its x5c certificate {subject}")]
    KeyMismatch {
        /// The certificate's subject.
        subject: String,
    },
}

impl Bundle {
    /// The bundle document: one `x509-svid` key per authority, `spiffe_sequence` and (when
    /// set) `spiffe_refresh_hint`. Pretty-printed for people who `curl` it.
    pub fn to_document(&self) -> Result<String, BundleError> {
        let keys = self.authorities.iter().map(authority_jwk).collect::<Result<Vec<_>, _>>()?;
        let doc = Document {
            keys,
            sequence: Some(self.sequence),
            refresh_hint: self.refresh_hint.map(|d| d.as_secs().max(1)),
        };
        // Serializing owned strings and numbers into a String cannot fail.
        serde_json::to_string_pretty(&doc).map_err(BundleError::Json)
    }

    /// Reads a bundle document fetched for `trust_domain` and checks every `x509-svid` key at
    /// `now`: exactly one certificate in `x5c`, a CA that can sign certificates, not expired,
    /// no SPIFFE URI SAN of another trust domain, and a JWK whose key is the certificate's.
    /// Keys with another `use` are ignored. One bad key refuses the whole document (a
    /// partially trusted bundle would hide the fault from the operator).
    pub fn parse(doc: &[u8], trust_domain: &TrustDomain, now: SystemTime) -> Result<Bundle, BundleError> {
        if doc.len() > MAX_DOCUMENT_BYTES {
            return Err(BundleError::TooLarge { size: doc.len(), limit: MAX_DOCUMENT_BYTES });
        }
        // Keys are read as plain JSON first: a key of another use may be of a type or with
        // members this crate does not model, and must not fail the document.
        let parsed: Document<serde_json::Value> = serde_json::from_slice(doc).map_err(BundleError::Json)?;
        let mut authorities: Vec<Cert> = Vec::new();
        for (index, key) in parsed.keys.into_iter().enumerate() {
            if key.get("use").and_then(serde_json::Value::as_str) != Some(X509_SVID_USE) {
                continue;
            }
            let cert = read_authority(key, trust_domain, now).map_err(|source| BundleError::Key {
                trust_domain: trust_domain.clone(),
                index,
                source,
            })?;
            if !authorities.contains(&cert) {
                authorities.push(cert);
            }
        }
        if authorities.is_empty() {
            return Err(BundleError::NoX509Authorities { trust_domain: trust_domain.clone() });
        }
        Ok(Bundle {
            trust_domain: trust_domain.clone(),
            sequence: parsed.sequence.unwrap_or(0),
            refresh_hint: parsed.refresh_hint.filter(|s| *s > 0).map(Duration::from_secs),
            authorities,
        })
    }

    /// The authorities as a PEM bundle, one certificate per block.
    pub fn to_pem(&self) -> String {
        self.authorities.iter().map(Cert::to_pem).collect()
    }
}

fn authority_jwk(cert: &Cert) -> Result<Jwk, BundleError> {
    let encode = |source| BundleError::Encode { subject: cert.subject(), source };
    let algorithm = match cert.public_key_components().map_err(encode)? {
        PublicKeyComponents::Ec { curve, x, y } => AlgorithmParameters::EllipticCurve(EllipticCurveKeyParameters {
            key_type: EllipticCurveKeyType::EC,
            curve: match curve {
                Curve::P256 => EllipticCurve::P256,
                Curve::P384 => EllipticCurve::P384,
            },
            x: URL_SAFE_NO_PAD.encode(x),
            y: URL_SAFE_NO_PAD.encode(y),
        }),
        PublicKeyComponents::Rsa { n, e } => AlgorithmParameters::RSA(RSAKeyParameters {
            key_type: RSAKeyType::RSA,
            n: URL_SAFE_NO_PAD.encode(n),
            e: URL_SAFE_NO_PAD.encode(e),
        }),
    };
    Ok(Jwk {
        common: CommonParameters {
            public_key_use: Some(PublicKeyUse::Other(X509_SVID_USE.into())),
            x509_chain: Some(vec![STANDARD.encode(cert.der())]),
            ..CommonParameters::default()
        },
        algorithm,
    })
}

fn read_authority(key: serde_json::Value, trust_domain: &TrustDomain, now: SystemTime) -> Result<Cert, KeyError> {
    let jwk: Jwk = serde_json::from_value(key).map_err(|e| KeyError::Unsupported(e.to_string()))?;
    let chain = jwk.common.x509_chain.as_deref().unwrap_or_default();
    let [der] = chain else {
        return Err(KeyError::X5cCount { count: chain.len() });
    };
    let der = STANDARD.decode(der).map_err(KeyError::X5cBase64)?;
    let cert = Cert::from_der(der).map_err(KeyError::Cert)?;
    if !cert.can_sign_certificates() {
        return Err(KeyError::NotACa { subject: cert.subject() });
    }
    if cert.not_after() < now {
        return Err(KeyError::Expired {
            subject: cert.subject(),
            not_after: meshca_pki::chain::rfc3339(cert.not_after()),
        });
    }
    for uri in cert.uri_sans() {
        if let Some(found) = spiffe_trust_domain(uri)
            && found != trust_domain.as_str()
        {
            return Err(KeyError::WrongTrustDomain {
                subject: cert.subject(),
                found: found.to_string(),
                expected: trust_domain.clone(),
            });
        }
    }
    if !jwk_matches(&jwk.algorithm, &cert)? {
        return Err(KeyError::KeyMismatch { subject: cert.subject() });
    }
    Ok(cert)
}

/// The trust domain of a `spiffe://` URI (a CA's SAN is often just `spiffe://<td>`).
fn spiffe_trust_domain(uri: &str) -> Option<&str> {
    let rest = uri.strip_prefix("spiffe://")?;
    Some(rest.split_once('/').map_or(rest, |(td, _)| td))
}

/// Whether the JWK's public key numbers are the certificate's.
fn jwk_matches(params: &AlgorithmParameters, cert: &Cert) -> Result<bool, KeyError> {
    let decode = |field: &str, v: &str| {
        URL_SAFE_NO_PAD.decode(v).map_err(|e| KeyError::Unsupported(format!("{field} is not base64url: {e}")))
    };
    let components = cert.public_key_components().map_err(|e| KeyError::Unsupported(e.to_string()))?;
    Ok(match (params, components) {
        (AlgorithmParameters::EllipticCurve(p), PublicKeyComponents::Ec { curve, x, y }) => {
            let same_curve =
                matches!((&p.curve, curve), (EllipticCurve::P256, Curve::P256) | (EllipticCurve::P384, Curve::P384));
            same_curve && decode("x", &p.x)? == x && decode("y", &p.y)? == y
        }
        (AlgorithmParameters::RSA(p), PublicKeyComponents::Rsa { n, e }) => {
            // base64urlUInt has no leading zeros (RFC 7518 §2); tolerate them anyway.
            let strip = |v: Vec<u8>| v.into_iter().skip_while(|b| *b == 0).collect::<Vec<u8>>();
            strip(decode("n", &p.n)?) == strip(n) && strip(decode("e", &p.e)?) == strip(e)
        }
        (AlgorithmParameters::EllipticCurve(_) | AlgorithmParameters::RSA(_), _) => false,
        (other, _) => return Err(KeyError::Unsupported(format!("kty {}", kty_name(other)))),
    })
}

/// A key type's name for an error, never its members (an `oct` key's `k` is a secret).
fn kty_name(params: &AlgorithmParameters) -> &str {
    match params {
        AlgorithmParameters::OctetKey(_) => "oct",
        AlgorithmParameters::OctetKeyPair(_) => "OKP",
        AlgorithmParameters::Other(o) => match o.fields.get("kty").and_then(serde_json::Value::as_str) {
            Some(k) if k.len() <= 16 && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') => k,
            Some(_) => "(unreadable)",
            None => "(missing)",
        },
        _ => "(unknown)",
    }
}

#[cfg(test)]
mod tests;
