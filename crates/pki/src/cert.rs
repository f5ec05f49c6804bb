//! A parsed X.509 certificate with the fields meshca checks, decoded once.
//!
//! Parsing is strict DER (RFC 5280): certificates meshca must reason about — roots users bring,
//! bundles read back from disk — either parse completely, extensions included, or are refused
//! with the reason. Duplicate extensions and malformed known extensions are errors.

use std::fmt;
use std::time::SystemTime;

use const_oid::AssociatedOid;
use const_oid::ObjectIdentifier;
use const_oid::db::rfc5280;
use der::{Decode, Encode};
use spki::SubjectPublicKeyInfoRef;
use x509_cert::Certificate as X509;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, KeyUsages, NameConstraints, SubjectAltName,
    SubjectKeyIdentifier,
};

use crate::der_util::{self, PublicKeyError, SignatureError};
use crate::key::PublicKeyKind;

/// Largest PEM bundle accepted anywhere (cert-chain.pem, root-cert.pem, user-provided material).
pub const MAX_BUNDLE_BYTES: usize = 1024 * 1024;

/// Why certificate input was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    /// The input is larger than [`MAX_BUNDLE_BYTES`].
    #[error("certificate input is {len} bytes, more than the {max}-byte limit")]
    TooLarge {
        /// Input length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// No certificate was found in the input.
    #[error("no PEM CERTIFICATE block found")]
    Empty,
    /// The PEM framing is broken.
    #[error("malformed PEM: {0}")]
    Pem(String),
    /// A PEM block that is not a certificate appeared where only certificates belong.
    #[error("unexpected PEM block {0:?} where only CERTIFICATE blocks are allowed")]
    UnexpectedBlock(String),
    /// The DER does not decode as an X.509 certificate.
    #[error("malformed certificate: {0}")]
    Der(String),
    /// A known extension does not decode.
    #[error("malformed {name} extension: {reason}")]
    Extension {
        /// Extension name.
        name: &'static str,
        /// Decoder message.
        reason: String,
    },
    /// An extension appears twice (RFC 5280 §4.2 forbids it).
    #[error("duplicate {0} extension")]
    DuplicateExtension(String),
    /// The subject public key is not one meshca can use.
    #[error("certificate {subject}: {source}")]
    PublicKey {
        /// Certificate subject.
        subject: String,
        /// What was wrong with the key.
        source: PublicKeyError,
    },
    /// Expected exactly one certificate.
    #[error("expected exactly one certificate, found {0}")]
    NotSingle(usize),
}

/// The extensions meshca reads, decoded at parse time.
#[derive(Debug, Clone, Default)]
struct Extensions {
    basic_constraints: Option<BasicConstraints>,
    key_usage: Option<KeyUsage>,
    ext_key_usage: Option<Vec<ObjectIdentifier>>,
    uri_sans: Vec<String>,
    dns_sans: Vec<String>,
    san_critical: bool,
    subject_key_id: Option<Vec<u8>>,
    authority_key_id: Option<Vec<u8>>,
    name_constraints: Option<NameConstraints>,
    unknown_critical: Vec<ObjectIdentifier>,
}

/// A parsed certificate.
#[derive(Clone)]
pub struct Cert {
    der: Vec<u8>,
    x509: X509,
    subject_der: Vec<u8>,
    issuer_der: Vec<u8>,
    spki_der: Vec<u8>,
    key_kind: PublicKeyKind,
    not_before: SystemTime,
    not_after: SystemTime,
    ext: Extensions,
}

impl fmt::Debug for Cert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cert")
            .field("subject", &self.subject())
            .field("serial", &self.serial_hex())
            .field("not_after", &self.not_after)
            .finish()
    }
}

impl PartialEq for Cert {
    fn eq(&self, other: &Self) -> bool {
        self.der == other.der
    }
}
impl Eq for Cert {}

fn decode_ext<'a, T: Decode<'a, Error = der::Error>>(name: &'static str, bytes: &'a [u8]) -> Result<T, CertError> {
    T::from_der(bytes).map_err(|e| CertError::Extension { name, reason: e.to_string() })
}

fn parse_extensions(x509: &X509) -> Result<Extensions, CertError> {
    let mut out = Extensions::default();
    let mut seen: Vec<ObjectIdentifier> = Vec::new();
    for e in x509.tbs_certificate().extensions().map(|v| v.as_slice()).unwrap_or(&[]) {
        if seen.contains(&e.extn_id) {
            return Err(CertError::DuplicateExtension(der_util::oid_name(&e.extn_id)));
        }
        seen.push(e.extn_id);
        let v = e.extn_value.as_bytes();
        match e.extn_id {
            BasicConstraints::OID => {
                out.basic_constraints = Some(decode_ext("basicConstraints", v)?);
            }
            KeyUsage::OID => out.key_usage = Some(decode_ext("keyUsage", v)?),
            ExtendedKeyUsage::OID => {
                let eku: ExtendedKeyUsage = decode_ext("extendedKeyUsage", v)?;
                out.ext_key_usage = Some(eku.0);
            }
            SubjectAltName::OID => {
                let san: SubjectAltName = decode_ext("subjectAltName", v)?;
                out.san_critical = e.critical;
                for name in san.0 {
                    match name {
                        GeneralName::UniformResourceIdentifier(u) => out.uri_sans.push(u.to_string()),
                        GeneralName::DnsName(d) => out.dns_sans.push(d.to_string()),
                        _ => {}
                    }
                }
            }
            SubjectKeyIdentifier::OID => {
                let ski: SubjectKeyIdentifier = decode_ext("subjectKeyIdentifier", v)?;
                out.subject_key_id = Some(ski.0.as_bytes().to_vec());
            }
            AuthorityKeyIdentifier::OID => {
                let aki: AuthorityKeyIdentifier = decode_ext("authorityKeyIdentifier", v)?;
                out.authority_key_id = aki.key_identifier.map(|k| k.as_bytes().to_vec());
            }
            NameConstraints::OID => {
                out.name_constraints = Some(decode_ext("nameConstraints", v)?);
            }
            // Extensions a path validator may ignore even when critical are the ones it
            // understands; everything else critical makes the certificate unusable (RFC 5280
            // §4.2). Certificate policies are accepted as they do not restrict meshca's use.
            rfc5280::ID_CE_CERTIFICATE_POLICIES => {}
            other if e.critical => out.unknown_critical.push(other),
            _ => {}
        }
    }
    Ok(out)
}

impl Cert {
    /// Parses one DER certificate.
    pub fn from_der(der: Vec<u8>) -> Result<Self, CertError> {
        let x509 = X509::from_der(&der).map_err(|e| CertError::Der(e.to_string()))?;
        let tbs = x509.tbs_certificate();
        let enc = |n: &x509_cert::name::Name| n.to_der().map_err(|e| CertError::Der(e.to_string()));
        let subject_der = enc(tbs.subject())?;
        let issuer_der = enc(tbs.issuer())?;
        let spki_der = tbs.subject_public_key_info().to_der().map_err(|e| CertError::Der(e.to_string()))?;
        let spki = SubjectPublicKeyInfoRef::from_der(&spki_der).map_err(|e| CertError::Der(e.to_string()))?;
        let key_kind = der_util::public_key_kind(&spki)
            .map_err(|source| CertError::PublicKey { subject: tbs.subject().to_string(), source })?;
        let ext = parse_extensions(&x509)?;
        let not_before = tbs.validity().not_before.to_system_time();
        let not_after = tbs.validity().not_after.to_system_time();
        Ok(Cert { der, x509, subject_der, issuer_der, spki_der, key_kind, not_before, not_after, ext })
    }

    /// Parses every certificate in a PEM bundle, in order. Any non-certificate block is an error.
    pub fn parse_pem_bundle(pem: &[u8]) -> Result<Vec<Cert>, CertError> {
        if pem.len() > MAX_BUNDLE_BYTES {
            return Err(CertError::TooLarge { len: pem.len(), max: MAX_BUNDLE_BYTES });
        }
        let blocks = der_util::pem_blocks(pem).map_err(|e| CertError::Pem(e.to_string()))?;
        if blocks.is_empty() {
            return Err(CertError::Empty);
        }
        blocks
            .into_iter()
            .map(
                |(label, der)| {
                    if label == "CERTIFICATE" { Cert::from_der(der) } else { Err(CertError::UnexpectedBlock(label)) }
                },
            )
            .collect()
    }

    /// Parses a PEM input that must hold exactly one certificate.
    pub fn from_pem(pem: &[u8]) -> Result<Cert, CertError> {
        let mut certs = Cert::parse_pem_bundle(pem)?;
        match certs.len() {
            1 => Ok(certs.remove(0)),
            n => Err(CertError::NotSingle(n)),
        }
    }

    /// The DER encoding.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// The PEM encoding.
    pub fn to_pem(&self) -> String {
        der_util::pem_encode("CERTIFICATE", &self.der)
    }

    /// The serial number in uppercase hex, as `openssl x509 -serial` prints it.
    pub fn serial_hex(&self) -> String {
        hex::encode_upper(self.x509.tbs_certificate().serial_number().as_bytes())
    }

    /// The subject as an RFC 4514 string.
    pub fn subject(&self) -> String {
        self.x509.tbs_certificate().subject().to_string()
    }

    /// The issuer as an RFC 4514 string.
    pub fn issuer(&self) -> String {
        self.x509.tbs_certificate().issuer().to_string()
    }

    /// The DER of the subject name.
    pub fn subject_der(&self) -> &[u8] {
        &self.subject_der
    }

    /// The DER of the issuer name.
    pub fn issuer_der(&self) -> &[u8] {
        &self.issuer_der
    }

    /// The numbers of the public key (a JSON Web Key's `x`/`y` or `n`/`e`).
    pub fn public_key_components(&self) -> Result<der_util::PublicKeyComponents, PublicKeyError> {
        der_util::public_key_components(&self.spki_der)
    }

    /// The DER `SubjectPublicKeyInfo`.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki_der
    }

    /// The kind of public key.
    pub fn key_kind(&self) -> PublicKeyKind {
        self.key_kind
    }

    /// Start of validity.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// End of validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Whether `now` is inside the validity window.
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now <= self.not_after
    }

    /// `true` when basicConstraints says CA:TRUE.
    pub fn is_ca(&self) -> bool {
        self.ext.basic_constraints.as_ref().is_some_and(|b| b.ca)
    }

    /// Whether this certificate may sign certificates: CA:TRUE and a key usage (when present)
    /// allowing keyCertSign.
    pub fn can_sign_certificates(&self) -> bool {
        self.is_ca() && self.allows_key_usage(KeyUsages::KeyCertSign)
    }

    /// The pathLenConstraint, when present on a CA.
    pub fn path_len(&self) -> Option<u8> {
        self.ext.basic_constraints.as_ref().and_then(|b| if b.ca { b.path_len_constraint } else { None })
    }

    /// Whether the key usage permits `usage`; an absent extension permits everything (RFC 5280).
    pub fn allows_key_usage(&self, usage: KeyUsages) -> bool {
        self.ext.key_usage.as_ref().is_none_or(|ku| ku.0.contains(usage))
    }

    /// Whether a keyUsage extension is present.
    pub fn has_key_usage_extension(&self) -> bool {
        self.ext.key_usage.is_some()
    }

    /// Whether the extended key usage permits `purpose`; absent permits everything.
    pub fn allows_extended_key_usage(&self, purpose: ObjectIdentifier) -> bool {
        const ANY_EKU: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.37.0");
        self.ext.ext_key_usage.as_ref().is_none_or(|v| v.contains(&purpose) || v.contains(&ANY_EKU))
    }

    /// The URI subject alternative names.
    pub fn uri_sans(&self) -> &[String] {
        &self.ext.uri_sans
    }

    /// The DNS subject alternative names.
    pub fn dns_sans(&self) -> &[String] {
        &self.ext.dns_sans
    }

    /// Whether the SAN extension is marked critical.
    pub fn san_is_critical(&self) -> bool {
        self.ext.san_critical
    }

    /// The subject key identifier, if present.
    pub fn subject_key_id(&self) -> Option<&[u8]> {
        self.ext.subject_key_id.as_deref()
    }

    /// The authority key identifier's keyIdentifier, if present.
    pub fn authority_key_id(&self) -> Option<&[u8]> {
        self.ext.authority_key_id.as_deref()
    }

    /// Permitted DNS subtrees from nameConstraints (empty when there are none).
    pub fn permitted_dns_domains(&self) -> Vec<String> {
        self.ext
            .name_constraints
            .as_ref()
            .and_then(|nc| nc.permitted_subtrees.as_ref())
            .map(|subtrees| {
                subtrees
                    .iter()
                    .filter_map(|s| match &s.base {
                        GeneralName::DnsName(d) => Some(d.to_string()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Critical extensions meshca does not understand, by name.
    pub fn unknown_critical_extensions(&self) -> Vec<String> {
        self.ext.unknown_critical.iter().map(der_util::oid_name).collect()
    }

    /// `true` when subject and issuer names are identical.
    pub fn is_self_issued(&self) -> bool {
        self.subject_der == self.issuer_der
    }

    /// SHA-256 fingerprint of the DER, lowercase hex.
    pub fn fingerprint(&self) -> String {
        der_util::sha256_hex(&self.der)
    }

    /// Checks that `issuer`'s key signed this certificate.
    pub fn verify_signed_by(&self, issuer: &Cert) -> Result<(), SignatureError> {
        let signed = der_util::split_signed(&self.der).map_err(|_| SignatureError::Invalid)?;
        let spki = SubjectPublicKeyInfoRef::from_der(&issuer.spki_der).map_err(|_| SignatureError::Invalid)?;
        der_util::verify_signature(&spki, issuer.key_kind, &signed.algorithm, signed.tbs, signed.signature)
    }

    /// Whether `key_spki` (a DER `SubjectPublicKeyInfo`) is this certificate's public key.
    pub fn has_public_key(&self, key_spki: &[u8]) -> bool {
        self.spki_der == key_spki
    }
}

/// Seconds from `now` until `t`, negative when `t` is in the past.
pub fn seconds_until(now: SystemTime, t: SystemTime) -> i64 {
    match t.duration_since(now) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}
