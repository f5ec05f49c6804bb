//! Certificate revocation lists (RFC 5280 §5): signing them, reading them back, and the rule
//! istiod applies to the `ca-crl.pem` of a `cacerts` bundle.
//!
//! meshca signs v2 CRLs with a CRL number, an authority key identifier, a nextUpdate and a
//! reason code per entry, through the same [`CaSigner`] that signs certificates (the key never
//! leaves it). Reading is strict DER, like certificates: a CRL either parses completely or is
//! refused with the reason.
//!
//! istiod (`security/pkg/pki/util/keycertbundle.go`, `Verify`) refuses a whole bundle whose
//! `ca-crl.pem` is not empty unless, for *every* certificate in `cert-chain.pem` (the cluster
//! intermediate, any intermediate above it, and the root), some CRL in the file is signed by that
//! certificate, which must be a CA allowed to sign CRLs. [`check_chain_coverage`] is that rule;
//! every writer of `ca-crl.pem` checks it first, so a CRL istiod would reject is never written.

use std::time::SystemTime;

use const_oid::AssociatedOid;
use const_oid::db::rfc5280;
use der::asn1::OctetString;
use der::{Decode, Encode};
use spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoRef};
use x509_cert::Version;
use x509_cert::certificate::Rfc5280;
use x509_cert::crl::{CertificateList, RevokedCert, TbsCertList};
use x509_cert::ext::Extension;
use x509_cert::ext::pkix::crl::{CrlNumber, CrlReason};
use x509_cert::ext::pkix::{AuthorityKeyIdentifier, KeyUsages};
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::time::Time;

use crate::cert::{Cert, MAX_BUNDLE_BYTES};
use crate::der_util::{self, SignatureError};
use crate::issue::{CaSigner, IssueError};

/// The PEM label of a CRL.
pub const PEM_LABEL: &str = "X509 CRL";

/// Why a certificate was revoked (RFC 5280 §5.3.1), as far as meshca revokes certificates.
/// `certificateHold` is left out on purpose: a meshca revocation is final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Reason {
    /// No reason given.
    #[default]
    Unspecified,
    /// The certificate's key is (or may be) known to someone else.
    KeyCompromise,
    /// The key of a CA above it is compromised.
    CaCompromise,
    /// The subject's name or other information changed.
    AffiliationChanged,
    /// The certificate was replaced.
    Superseded,
    /// The certificate is no longer needed (e.g. a removed cluster).
    CessationOfOperation,
    /// A privilege it carried was withdrawn.
    PrivilegeWithdrawn,
}

impl Reason {
    /// Every reason, in RFC order.
    pub const ALL: [Reason; 7] = [
        Reason::Unspecified,
        Reason::KeyCompromise,
        Reason::CaCompromise,
        Reason::AffiliationChanged,
        Reason::Superseded,
        Reason::CessationOfOperation,
        Reason::PrivilegeWithdrawn,
    ];

    /// The RFC 5280 name (`keyCompromise`), which is also what OpenSSL prints (as "Key Compromise").
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Unspecified => "unspecified",
            Reason::KeyCompromise => "keyCompromise",
            Reason::CaCompromise => "cACompromise",
            Reason::AffiliationChanged => "affiliationChanged",
            Reason::Superseded => "superseded",
            Reason::CessationOfOperation => "cessationOfOperation",
            Reason::PrivilegeWithdrawn => "privilegeWithdrawn",
        }
    }

    fn to_x509(self) -> CrlReason {
        match self {
            Reason::Unspecified => CrlReason::Unspecified,
            Reason::KeyCompromise => CrlReason::KeyCompromise,
            Reason::CaCompromise => CrlReason::CaCompromise,
            Reason::AffiliationChanged => CrlReason::AffiliationChanged,
            Reason::Superseded => CrlReason::Superseded,
            Reason::CessationOfOperation => CrlReason::CessationOfOperation,
            Reason::PrivilegeWithdrawn => CrlReason::PrivilegeWithdrawn,
        }
    }

    fn from_x509(r: CrlReason) -> Option<Reason> {
        Reason::ALL.into_iter().find(|m| m.to_x509() == r)
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Reason {
    type Err = CrlError;

    /// The RFC name in any case (`keyCompromise`, `keycompromise`), or with dashes
    /// (`key-compromise`).
    fn from_str(s: &str) -> Result<Self, CrlError> {
        let wanted: String = s.chars().filter(|c| *c != '-' && *c != '_').collect();
        Reason::ALL
            .into_iter()
            .find(|r| r.as_str().eq_ignore_ascii_case(&wanted))
            .ok_or_else(|| CrlError::UnknownReason(bounded(s)))
    }
}

fn bounded(s: &str) -> String {
    s.chars().take(64).collect()
}

/// One revoked certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// Its serial, uppercase hex (as [`Cert::serial_hex`] prints it).
    pub serial_hex: String,
    /// When it was revoked.
    pub revoked_at: SystemTime,
    /// Why.
    pub reason: Reason,
}

/// What a CRL says, before it is signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlParams {
    /// The CRL number: grows with every CRL the same issuer signs (RFC 5280 §5.2.3).
    pub number: u64,
    /// thisUpdate.
    pub this_update: SystemTime,
    /// nextUpdate: relying parties treat the CRL as stale after it, so it is re-signed before.
    pub next_update: SystemTime,
    /// The revoked certificates (may be empty: istiod needs a CRL from every CA of the chain,
    /// whether it revoked anything or not).
    pub revoked: Vec<Revoked>,
}

/// Why a CRL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CrlError {
    /// The input is larger than the bundle limit.
    #[error("CRL input is {len} bytes, more than the {max}-byte limit")]
    TooLarge {
        /// Input length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The PEM framing is broken.
    #[error("malformed PEM: {0}")]
    Pem(String),
    /// A PEM block that is not a CRL.
    #[error("unexpected PEM block {0:?} where only X509 CRL blocks are allowed")]
    UnexpectedBlock(String),
    /// The DER does not decode as a CRL.
    #[error("malformed CRL: {0}")]
    Der(String),
    /// The CRL is not a v2 CRL, or misses what RFC 5280 requires of a conforming issuer.
    #[error("CRL of {issuer}: {what}")]
    Profile {
        /// Issuer name.
        issuer: String,
        /// What is missing or wrong.
        what: String,
    },
    /// The certificate checked as issuer is not the CRL's issuer.
    #[error("CRL issued by {crl_issuer} is not from {cert}")]
    OtherIssuer {
        /// The CRL's issuer.
        crl_issuer: String,
        /// The certificate tried.
        cert: String,
    },
    /// The issuer may not sign CRLs (not a CA, or a keyUsage without cRLSign).
    #[error("{subject} may not sign CRLs (it must be a CA whose keyUsage, if any, includes cRLSign)")]
    NotACrlSigner {
        /// Certificate subject.
        subject: String,
    },
    /// The signature does not verify with the issuer's key.
    #[error("CRL of {issuer}: {source}")]
    Signature {
        /// Issuer name.
        issuer: String,
        /// Why.
        #[source]
        source: SignatureError,
    },
    /// istiod's rule: some certificates of the chain have no CRL signed by them.
    #[error("missing CRL signed by {}: istiod refuses such a ca-crl.pem", .0.join("; "))]
    MissingFor(Vec<String>),
    /// A revocation reason meshca does not know.
    #[error(
        "unknown revocation reason {0:?} (one of unspecified, keyCompromise, cACompromise, affiliationChanged, superseded, cessationOfOperation, privilegeWithdrawn)"
    )]
    UnknownReason(String),
    /// A serial that is not hexadecimal.
    #[error("{0:?} is not a certificate serial in hexadecimal")]
    BadSerial(String),
}

/// A parsed CRL.
#[derive(Clone)]
pub struct Crl {
    der: Vec<u8>,
    issuer_der: Vec<u8>,
    issuer: String,
    number: u64,
    authority_key_id: Option<Vec<u8>>,
    this_update: SystemTime,
    next_update: SystemTime,
    revoked: Vec<Revoked>,
}

impl std::fmt::Debug for Crl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Crl")
            .field("issuer", &self.issuer)
            .field("number", &self.number)
            .field("next_update", &self.next_update)
            .field("revoked", &self.revoked.len())
            .finish()
    }
}

impl PartialEq for Crl {
    fn eq(&self, other: &Self) -> bool {
        self.der == other.der
    }
}
impl Eq for Crl {}

fn ext<T: Encode + AssociatedOid>(value: &T) -> Result<Extension, IssueError> {
    Ok(Extension { extn_id: T::OID, critical: false, extn_value: OctetString::new(value.to_der()?)? })
}

/// Decodes a serial written in hex (any case, optional colons) to the DER INTEGER contents.
pub fn serial_bytes(serial_hex: &str) -> Result<Vec<u8>, CrlError> {
    let clean: String = serial_hex.chars().filter(|c| *c != ':').collect();
    let bad = || CrlError::BadSerial(bounded(serial_hex));
    if clean.is_empty() || clean.len() > 42 {
        return Err(bad());
    }
    let padded = if clean.len() % 2 == 1 { format!("0{clean}") } else { clean };
    hex::decode(padded).map_err(|_| bad())
}

impl CaSigner {
    /// Signs a CRL as this CA: issuer = its subject, authority key identifier = its key
    /// identifier, signed with its key. Refused when its certificate may not sign CRLs (a
    /// keyUsage without cRLSign): istiod and OpenSSL would reject such a CRL.
    pub fn sign_crl(&self, params: &CrlParams) -> Result<Crl, IssueError> {
        let cert = self.cert();
        if !cert.allows_key_usage(KeyUsages::CRLSign) {
            return Err(IssueError::NoCrlSign { subject: cert.subject() });
        }
        let sig_alg = self.key().signature_algorithm_der();
        let revoked = params
            .revoked
            .iter()
            .map(|r| {
                let serial = serial_bytes(&r.serial_hex).map_err(|e| IssueError::Encoding(e.to_string()))?;
                Ok(RevokedCert {
                    serial_number: SerialNumber::<Rfc5280>::new(&serial)?,
                    revocation_date: Time::try_from(r.revoked_at)?,
                    crl_entry_extensions: Some(vec![ext(&r.reason.to_x509())?]),
                })
            })
            .collect::<Result<Vec<_>, IssueError>>()?;
        let tbs = TbsCertList::<Rfc5280> {
            version: Version::V2,
            signature: AlgorithmIdentifierOwned::from_der(sig_alg)?,
            issuer: Name::from_der(cert.subject_der())?,
            this_update: Time::try_from(params.this_update)?,
            next_update: Some(Time::try_from(params.next_update)?),
            revoked_certificates: if revoked.is_empty() { None } else { Some(revoked) },
            crl_extensions: Some(vec![
                self.authority_key_id_extension().clone(),
                ext(&CrlNumber::try_from(params.number)?)?,
            ]),
        };
        let tbs_der = tbs.to_der()?;
        let signature = self.key().sign(&tbs_der)?;
        let der = der_util::assemble_signed(&tbs_der, sig_alg, &signature)?;
        Crl::from_der(der).map_err(|e| IssueError::Encoding(e.to_string()))
    }
}

impl Crl {
    /// Parses one DER CRL. meshca reads only v2 CRLs with a CRL number and a nextUpdate (what
    /// RFC 5280 §5 requires of conforming issuers, and what it needs to know when to refresh).
    pub fn from_der(der: Vec<u8>) -> Result<Self, CrlError> {
        let list = CertificateList::<Rfc5280>::from_der(&der).map_err(|e| CrlError::Der(e.to_string()))?;
        let tbs = &list.tbs_cert_list;
        let issuer = tbs.issuer.to_string();
        let profile = |what: &str| CrlError::Profile { issuer: issuer.clone(), what: what.to_string() };
        if tbs.version != Version::V2 {
            return Err(profile("not a v2 CRL"));
        }
        let issuer_der = tbs.issuer.to_der().map_err(|e| CrlError::Der(e.to_string()))?;
        let next_update = tbs.next_update.ok_or_else(|| profile("no nextUpdate"))?.to_system_time();
        let mut number = None;
        let mut authority_key_id = None;
        for e in tbs.crl_extensions.iter().flatten() {
            let bytes = e.extn_value.as_bytes();
            if e.extn_id == rfc5280::ID_CE_CRL_NUMBER {
                let n = CrlNumber::from_der(bytes).map_err(|e| profile(&format!("malformed CRL number: {e}")))?;
                let b = n.0.as_bytes();
                if b.len() > 8 {
                    return Err(profile("CRL number larger than meshca handles (64 bits)"));
                }
                number = Some(b.iter().fold(0u64, |acc, x| (acc << 8) | u64::from(*x)));
            } else if e.extn_id == AuthorityKeyIdentifier::OID {
                let aki = AuthorityKeyIdentifier::from_der(bytes)
                    .map_err(|e| profile(&format!("malformed authority key identifier: {e}")))?;
                authority_key_id = aki.key_identifier.map(|k| k.as_bytes().to_vec());
            } else if e.critical {
                return Err(profile(&format!("unknown critical extension {}", e.extn_id)));
            }
        }
        let number = number.ok_or_else(|| profile("no CRL number"))?;
        let mut revoked = Vec::new();
        for r in tbs.revoked_certificates.iter().flatten() {
            let mut reason = Reason::Unspecified;
            for e in r.crl_entry_extensions.iter().flatten() {
                if e.extn_id == CrlReason::OID {
                    let code = CrlReason::from_der(e.extn_value.as_bytes())
                        .map_err(|e| profile(&format!("malformed reason code: {e}")))?;
                    reason = Reason::from_x509(code).unwrap_or(Reason::Unspecified);
                } else if e.critical {
                    return Err(profile(&format!("unknown critical entry extension {}", e.extn_id)));
                }
            }
            revoked.push(Revoked {
                serial_hex: hex::encode_upper(r.serial_number.as_bytes()),
                revoked_at: r.revocation_date.to_system_time(),
                reason,
            });
        }
        Ok(Crl {
            issuer,
            issuer_der,
            number,
            authority_key_id,
            this_update: tbs.this_update.to_system_time(),
            next_update,
            revoked,
            der,
        })
    }

    /// Parses every CRL in a PEM bundle (several concatenated `X509 CRL` blocks, as in
    /// `ca-crl.pem`). Empty input is an empty list; any other block is an error.
    pub fn parse_pem_bundle(pem: &[u8]) -> Result<Vec<Crl>, CrlError> {
        if pem.len() > MAX_BUNDLE_BYTES {
            return Err(CrlError::TooLarge { len: pem.len(), max: MAX_BUNDLE_BYTES });
        }
        let blocks = der_util::pem_blocks(pem).map_err(|e| CrlError::Pem(e.to_string()))?;
        blocks
            .into_iter()
            .map(
                |(label, der)| {
                    if label == PEM_LABEL { Crl::from_der(der) } else { Err(CrlError::UnexpectedBlock(label)) }
                },
            )
            .collect()
    }

    /// The DER.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// The PEM.
    pub fn to_pem(&self) -> String {
        der_util::pem_encode(PEM_LABEL, &self.der)
    }

    /// The issuer as an RFC 4514 string.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The CRL number.
    pub fn number(&self) -> u64 {
        self.number
    }

    /// The authority key identifier, when present.
    pub fn authority_key_id(&self) -> Option<&[u8]> {
        self.authority_key_id.as_deref()
    }

    /// thisUpdate.
    pub fn this_update(&self) -> SystemTime {
        self.this_update
    }

    /// nextUpdate.
    pub fn next_update(&self) -> SystemTime {
        self.next_update
    }

    /// The revoked certificates.
    pub fn revoked(&self) -> &[Revoked] {
        &self.revoked
    }

    /// Whether the serial (uppercase hex) is listed.
    pub fn lists(&self, serial_hex: &str) -> bool {
        self.revoked.iter().any(|r| r.serial_hex.eq_ignore_ascii_case(serial_hex))
    }

    /// Whether `cert` issued this CRL: same name, a CA allowed to sign CRLs, and its key made
    /// the signature. The same conditions as Go's `CheckSignatureFrom`, which istiod uses.
    pub fn verify_signed_by(&self, cert: &Cert) -> Result<(), CrlError> {
        if cert.subject_der() != self.issuer_der {
            return Err(CrlError::OtherIssuer { crl_issuer: self.issuer.clone(), cert: cert.subject() });
        }
        if !cert.is_ca() || !cert.allows_key_usage(KeyUsages::CRLSign) {
            return Err(CrlError::NotACrlSigner { subject: cert.subject() });
        }
        let signature = |source| CrlError::Signature { issuer: self.issuer.clone(), source };
        let signed = der_util::split_signed(&self.der).map_err(|_| signature(SignatureError::Invalid))?;
        let spki =
            SubjectPublicKeyInfoRef::from_der(cert.spki_der()).map_err(|_| signature(SignatureError::Invalid))?;
        der_util::verify_signature(&spki, cert.key_kind(), &signed.algorithm, signed.tbs, signed.signature)
            .map_err(signature)
    }

    /// Whether `cert` is revoked by this CRL, which must be signed by `issuer` (the certificate
    /// above `cert` in its chain); a CRL from anyone else says nothing about it.
    pub fn revokes(&self, cert: &Cert, issuer: &Cert) -> bool {
        cert.issuer_der() == self.issuer_der && self.lists(&cert.serial_hex()) && self.verify_signed_by(issuer).is_ok()
    }
}

/// istiod's rule for `ca-crl.pem`: every certificate of `chain` (`cert-chain.pem`, the
/// intermediate first, the root last) has at least one CRL in `crls` signed by it.
pub fn check_chain_coverage(crls: &[Crl], chain: &[Cert]) -> Result<(), CrlError> {
    let missing: Vec<String> =
        chain.iter().filter(|c| !crls.iter().any(|crl| crl.verify_signed_by(c).is_ok())).map(Cert::subject).collect();
    if missing.is_empty() { Ok(()) } else { Err(CrlError::MissingFor(missing)) }
}

/// The first certificate of `chain` (issuer above each one, the root last) that a CRL in `crls`,
/// signed by its issuer, revokes: `(serial, subject)`.
pub fn revoked_in_chain(crls: &[Crl], chain: &[Cert]) -> Option<(String, String)> {
    chain
        .windows(2)
        .find(|w| crls.iter().any(|crl| crl.revokes(&w[0], &w[1])))
        .map(|w| (w[0].serial_hex(), w[0].subject()))
}

/// The CRLs of `crls` that `cert` signed.
pub fn signed_by<'a>(crls: &'a [Crl], cert: &Cert) -> Vec<&'a Crl> {
    crls.iter().filter(|c| c.verify_signed_by(cert).is_ok()).collect()
}

/// The PEM file of several CRLs, in order.
pub fn to_pem_bundle<'a>(crls: impl IntoIterator<Item = &'a Crl>) -> String {
    crls.into_iter().map(Crl::to_pem).collect()
}
