//! Issuing certificates: the root, cluster-intermediate and leaf profiles of docs/architecture.md ("Certificate profiles").
//!
//! A [`CaSigner`] is a CA certificate, its key and its chain up to the root. It pre-encodes what
//! every certificate it signs shares (issuer name, authority key identifier, signature algorithm),
//! so signing a leaf is: a random serial, a few small extensions, one signature.

use std::time::{Duration, SystemTime};

use const_oid::AssociatedOid;
use const_oid::db::rfc5280;
use der::asn1::{AnyRef, Ia5String, OctetString, UintRef};
use der::flagset::FlagSet;
use der::{Decode, Encode, Sequence};
use x509_cert::certificate::Version;
use x509_cert::ext::Extension;
use x509_cert::ext::pkix::constraints::name::GeneralSubtree;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, KeyUsages, NameConstraints, SubjectAltName,
    SubjectKeyIdentifier,
};
use x509_cert::time::{Time, Validity};

use crate::cert::{Cert, CertError};
use crate::der_util;
use crate::key::{KeyError, PrivateKey};
use crate::name::{self, NameAttr, NameError};
use crate::spiffe::{SpiffeId, TrustDomain};

/// How far NotBefore is backdated, to absorb clock skew between issuer and relying parties
/// (Istio does the same).
pub const BACKDATE: Duration = Duration::from_secs(120);

/// Why a certificate could not be issued.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// The signer's key is not the key of its certificate.
    #[error("the private key does not match the certificate {subject}")]
    KeyMismatch {
        /// Certificate subject.
        subject: String,
    },
    /// The signer certificate is not a CA.
    #[error("certificate {subject} is not a CA (basicConstraints CA:TRUE is missing)")]
    NotACa {
        /// Certificate subject.
        subject: String,
    },
    /// The signer certificate may not sign certificates.
    #[error("certificate {subject} has a keyUsage without keyCertSign, so it cannot sign certificates")]
    NoKeyCertSign {
        /// Certificate subject.
        subject: String,
    },
    /// The signer's pathLenConstraint forbids another CA below it.
    #[error(
        "certificate {subject} has pathlen:{path_len}, which forbids issuing a CA with pathlen:{requested} below it"
    )]
    PathLen {
        /// Certificate subject.
        subject: String,
        /// Its pathLenConstraint.
        path_len: u8,
        /// The pathlen asked for the new CA.
        requested: u8,
    },
    /// The signer has expired; nothing can be issued from it.
    #[error("signer {subject} expired; nothing can be issued from it")]
    SignerExpired {
        /// Certificate subject.
        subject: String,
    },
    /// The signer certificate may not sign CRLs.
    #[error(
        "certificate {subject} has a keyUsage without cRLSign, so it cannot sign the CRLs istiod needs from every CA in the chain"
    )]
    NoCrlSign {
        /// Certificate subject.
        subject: String,
    },
    /// A zero lifetime was requested.
    #[error("certificate lifetime must be positive")]
    ZeroTtl,
    /// A leaf with neither a SPIFFE ID nor a DNS name.
    #[error("a leaf certificate needs a SPIFFE ID or at least one DNS name")]
    NoIdentity,
    /// A DNS name or constraint is not a valid hostname.
    #[error("invalid DNS name {0:?}")]
    DnsName(String),
    /// The chain given for the signer does not start with the signer's certificate.
    #[error("the signer chain must start with the signer certificate")]
    ChainOrder,
    /// A subject name could not be built.
    #[error(transparent)]
    Name(#[from] NameError),
    /// The signer's key failed to sign.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The issued certificate failed to parse back (a bug if it ever happens).
    #[error("issued certificate does not parse: {0}")]
    Cert(#[from] CertError),
    /// DER encoding failed.
    #[error("encoding failed: {0}")]
    Encoding(String),
}

impl From<der::Error> for IssueError {
    fn from(e: der::Error) -> Self {
        IssueError::Encoding(e.to_string())
    }
}

/// The profile of a self-signed root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootParams {
    /// `O=` of the subject.
    pub organization: String,
    /// `CN=` of the subject.
    pub common_name: String,
    /// Lifetime.
    pub ttl: Duration,
}

impl RootParams {
    /// `O=<org>, CN=<org> Root CA`, ten years.
    pub fn new(organization: &str) -> Self {
        RootParams {
            organization: organization.to_string(),
            common_name: format!("{organization} Root CA"),
            ttl: Duration::from_secs(10 * 365 * 24 * 3600),
        }
    }
}

/// The profile of a cluster intermediate (or any CA meshca signs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntermediateParams {
    /// `O=` of the subject.
    pub organization: String,
    /// `CN=` of the subject.
    pub common_name: String,
    /// The cluster, written as `L=`; Istio's own recipe does the same.
    pub cluster: String,
    /// The mesh trust domain, written as the URI SAN `spiffe://<td>`.
    pub trust_domain: TrustDomain,
    /// Lifetime before clamping to the signer's NotAfter.
    pub ttl: Duration,
    /// pathLenConstraint; 0 for a cluster intermediate, which only signs leaves.
    pub path_len: u8,
    /// Permitted DNS subtrees; empty means no nameConstraints extension.
    pub permitted_dns_domains: Vec<String>,
}

impl IntermediateParams {
    /// A cluster intermediate with the default profile: pathlen 0, 30 days, no name constraints.
    pub fn cluster(organization: &str, cluster: &str, trust_domain: TrustDomain) -> Self {
        IntermediateParams {
            organization: organization.to_string(),
            common_name: crate::profile::INTERMEDIATE_COMMON_NAME.to_string(),
            cluster: cluster.to_string(),
            trust_domain,
            ttl: Duration::from_secs(30 * 24 * 3600),
            path_len: 0,
            permitted_dns_domains: Vec::new(),
        }
    }
}

/// The profile of a leaf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafParams {
    /// The workload identity: the only SAN a workload leaf carries.
    pub identity: Option<SpiffeId>,
    /// DNS names, for serving certificates (the workload CA's own).
    pub dns_names: Vec<String>,
    /// Lifetime before clamping to the signer's NotAfter.
    pub ttl: Duration,
}

impl LeafParams {
    /// A workload leaf for `identity`.
    pub fn workload(identity: SpiffeId, ttl: Duration) -> Self {
        LeafParams { identity: Some(identity), dns_names: Vec::new(), ttl }
    }
}

/// A certificate just issued, with the facts callers record about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// The DER.
    pub der: Vec<u8>,
    /// Serial, uppercase hex.
    pub serial_hex: String,
    /// NotBefore as written.
    pub not_before: SystemTime,
    /// NotAfter as written (after clamping).
    pub not_after: SystemTime,
}

impl Issued {
    /// PEM of the certificate.
    pub fn to_pem(&self) -> String {
        der_util::pem_encode("CERTIFICATE", &self.der)
    }

    /// Parses the certificate.
    pub fn parse(&self) -> Result<Cert, CertError> {
        Cert::from_der(self.der.clone())
    }
}

/// RFC 5280 TBSCertificate, with the parts meshca pre-encodes carried as raw DER.
#[derive(Sequence)]
struct Tbs<'a> {
    #[asn1(context_specific = "0", tag_mode = "EXPLICIT")]
    version: Version,
    serial: UintRef<'a>,
    signature: AnyRef<'a>,
    issuer: AnyRef<'a>,
    validity: Validity,
    subject: AnyRef<'a>,
    spki: AnyRef<'a>,
    #[asn1(context_specific = "3", tag_mode = "EXPLICIT")]
    extensions: Vec<Extension>,
}

fn extension<T: Encode + AssociatedOid>(critical: bool, value: &T) -> Result<Extension, IssueError> {
    Ok(Extension { extn_id: T::OID, critical, extn_value: OctetString::new(value.to_der()?)? })
}

/// RFC 7093 method 1: the leftmost 160 bits of SHA-256 over the subjectPublicKey bits.
fn key_identifier(spki_der: &[u8]) -> Result<Vec<u8>, IssueError> {
    let spki = spki::SubjectPublicKeyInfoRef::from_der(spki_der)?;
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, spki.subject_public_key.raw_bytes());
    Ok(digest.as_ref()[..20].to_vec())
}

/// A positive serial of 159 random bits (20 bytes, top bit clear, never zero).
fn random_serial() -> Result<[u8; 20], IssueError> {
    let mut serial = [0u8; 20];
    loop {
        aws_lc_rs::rand::fill(&mut serial).map_err(|_| IssueError::Encoding("random source failed".into()))?;
        serial[0] &= 0x7f;
        if serial[0] != 0 {
            return Ok(serial);
        }
    }
}

fn validate_dns_name(name: &str) -> Result<Ia5String, IssueError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if !ok {
        return Err(IssueError::DnsName(name.to_string()));
    }
    Ia5String::new(name).map_err(|_| IssueError::DnsName(name.to_string()))
}

struct Body<'a> {
    subject_der: &'a [u8],
    spki_der: &'a [u8],
    not_before: SystemTime,
    not_after: SystemTime,
    extensions: Vec<Extension>,
}

/// A CA able to sign: its certificate, key, and chain up to and including the root.
pub struct CaSigner {
    cert: Cert,
    key: PrivateKey,
    chain: Vec<Cert>,
    aki: Extension,
}

impl std::fmt::Debug for CaSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaSigner").field("cert", &self.cert).field("key", &"[secret elided]").finish()
    }
}

impl CaSigner {
    /// Makes a signer from a CA certificate, its key and its chain (the certificate first, the
    /// root last; `[cert]` for a root). Checks the key matches and the certificate may sign.
    pub fn new(key: PrivateKey, chain: Vec<Cert>) -> Result<Self, IssueError> {
        let cert = chain.first().cloned().ok_or(IssueError::ChainOrder)?;
        if !cert.has_public_key(key.public_key_spki()) {
            return Err(IssueError::KeyMismatch { subject: cert.subject() });
        }
        if !cert.is_ca() {
            return Err(IssueError::NotACa { subject: cert.subject() });
        }
        if !cert.allows_key_usage(KeyUsages::KeyCertSign) {
            return Err(IssueError::NoKeyCertSign { subject: cert.subject() });
        }
        let key_id = match cert.subject_key_id() {
            Some(id) => id.to_vec(),
            None => key_identifier(cert.spki_der())?,
        };
        let aki = extension(
            false,
            &AuthorityKeyIdentifier {
                key_identifier: Some(OctetString::new(key_id)?),
                authority_cert_issuer: None,
                authority_cert_serial_number: None,
            },
        )?;
        Ok(CaSigner { cert, key, chain, aki })
    }

    /// Creates a self-signed root with the root profile and returns its signer.
    pub fn new_root(key: PrivateKey, params: &RootParams, now: SystemTime) -> Result<Self, IssueError> {
        if params.ttl.is_zero() {
            return Err(IssueError::ZeroTtl);
        }
        let subject = name::build_name(&[
            (NameAttr::Organization, &params.organization),
            (NameAttr::CommonName, &params.common_name),
        ])?;
        let spki = key.public_key_spki().to_vec();
        let extensions = vec![
            extension(true, &BasicConstraints { ca: true, path_len_constraint: None })?,
            extension(true, &KeyUsage(KeyUsages::KeyCertSign | KeyUsages::CRLSign))?,
            extension(false, &SubjectKeyIdentifier(OctetString::new(key_identifier(&spki)?)?))?,
        ];
        let body = Body {
            subject_der: &subject,
            spki_der: &spki,
            not_before: now - BACKDATE,
            not_after: now + params.ttl,
            extensions,
        };
        let issued = sign_tbs(&key, &subject, body)?;
        let cert = Cert::from_der(issued.der)?;
        CaSigner::new(key, vec![cert])
    }

    /// The signer's certificate.
    pub fn cert(&self) -> &Cert {
        &self.cert
    }

    /// The chain from the signer's certificate up to and including the root.
    pub fn chain(&self) -> &[Cert] {
        &self.chain
    }

    /// The root at the end of the chain.
    pub fn root(&self) -> &Cert {
        self.chain.last().unwrap_or(&self.cert)
    }

    /// The authority key identifier extension of everything this CA signs.
    pub(crate) fn authority_key_id_extension(&self) -> &Extension {
        &self.aki
    }

    /// The signer's key (for writing it to its owner only).
    pub fn key(&self) -> &PrivateKey {
        &self.key
    }

    fn window(&self, now: SystemTime, ttl: Duration) -> Result<(SystemTime, SystemTime), IssueError> {
        if ttl.is_zero() {
            return Err(IssueError::ZeroTtl);
        }
        if self.cert.not_after() <= now {
            return Err(IssueError::SignerExpired { subject: self.cert.subject() });
        }
        Ok((now - BACKDATE, (now + ttl).min(self.cert.not_after())))
    }

    /// Signs a CA certificate for `spki_der` with the intermediate profile.
    pub fn sign_intermediate(
        &self,
        spki_der: &[u8],
        params: &IntermediateParams,
        now: SystemTime,
    ) -> Result<Issued, IssueError> {
        if let Some(limit) = self.cert.path_len()
            && (limit == 0 || params.path_len > limit - 1)
        {
            return Err(IssueError::PathLen {
                subject: self.cert.subject(),
                path_len: limit,
                requested: params.path_len,
            });
        }
        let (not_before, not_after) = self.window(now, params.ttl)?;
        let subject = name::build_name(&[
            (NameAttr::Organization, &params.organization),
            (NameAttr::CommonName, &params.common_name),
            (NameAttr::Locality, &params.cluster),
        ])?;
        let mut extensions = vec![
            extension(true, &BasicConstraints { ca: true, path_len_constraint: Some(params.path_len) })?,
            extension(true, &KeyUsage(KeyUsages::KeyCertSign | KeyUsages::CRLSign | KeyUsages::DigitalSignature))?,
            extension(false, &SubjectKeyIdentifier(OctetString::new(key_identifier(spki_der)?)?))?,
            self.aki.clone(),
            extension(
                false,
                &SubjectAltName(vec![GeneralName::UniformResourceIdentifier(Ia5String::new(
                    &params.trust_domain.uri(),
                )?)]),
            )?,
        ];
        if !params.permitted_dns_domains.is_empty() {
            let permitted = params
                .permitted_dns_domains
                .iter()
                .map(|d| {
                    Ok(GeneralSubtree { base: GeneralName::DnsName(validate_dns_name(d)?), minimum: 0, maximum: None })
                })
                .collect::<Result<Vec<_>, IssueError>>()?;
            extensions.push(extension(
                true,
                &NameConstraints { permitted_subtrees: Some(permitted), excluded_subtrees: None },
            )?);
        }
        let body = Body { subject_der: &subject, spki_der, not_before, not_after, extensions };
        sign_tbs(&self.key, self.cert.subject_der(), body)
    }

    /// Signs a leaf for `spki_der` with the leaf profile.
    pub fn sign_leaf(&self, spki_der: &[u8], params: &LeafParams, now: SystemTime) -> Result<Issued, IssueError> {
        let mut sans = Vec::with_capacity(1 + params.dns_names.len());
        if let Some(id) = &params.identity {
            sans.push(GeneralName::UniformResourceIdentifier(Ia5String::new(&id.to_string())?));
        }
        for d in &params.dns_names {
            sans.push(GeneralName::DnsName(validate_dns_name(d)?));
        }
        if sans.is_empty() {
            return Err(IssueError::NoIdentity);
        }
        let (not_before, not_after) = self.window(now, params.ttl)?;
        let extensions = vec![
            // Subject is empty, so RFC 5280 §4.2.1.6 requires the SAN to be critical.
            extension(true, &SubjectAltName(sans))?,
            extension(true, &KeyUsage(FlagSet::from(KeyUsages::DigitalSignature) | KeyUsages::KeyEncipherment))?,
            extension(false, &ExtendedKeyUsage(vec![rfc5280::ID_KP_SERVER_AUTH, rfc5280::ID_KP_CLIENT_AUTH]))?,
            extension(true, &BasicConstraints { ca: false, path_len_constraint: None })?,
            extension(false, &SubjectKeyIdentifier(OctetString::new(key_identifier(spki_der)?)?))?,
            self.aki.clone(),
        ];
        let body = Body { subject_der: name::EMPTY_NAME_DER, spki_der, not_before, not_after, extensions };
        sign_tbs(&self.key, self.cert.subject_der(), body)
    }

    /// The PEM list a workload CA returns after the leaf: the chain up to the root, one PEM each.
    pub fn chain_pems(&self) -> Vec<String> {
        self.chain.iter().map(Cert::to_pem).collect()
    }
}

fn sign_tbs(key: &PrivateKey, issuer_der: &[u8], body: Body<'_>) -> Result<Issued, IssueError> {
    let serial = random_serial()?;
    let sig_alg = key.signature_algorithm_der();
    let not_before = Time::try_from(body.not_before)?;
    let not_after = Time::try_from(body.not_after)?;
    let tbs = Tbs {
        version: Version::V3,
        serial: UintRef::new(&serial)?,
        signature: AnyRef::from_der(sig_alg)?,
        issuer: AnyRef::from_der(issuer_der)?,
        validity: Validity::new(not_before, not_after),
        subject: AnyRef::from_der(body.subject_der)?,
        spki: AnyRef::from_der(body.spki_der)?,
        extensions: body.extensions,
    };
    let tbs_der = tbs.to_der()?;
    let signature = key.sign(&tbs_der)?;
    let der = der_util::assemble_signed(&tbs_der, sig_alg, &signature)?;
    Ok(Issued {
        der,
        serial_hex: hex::encode_upper(serial),
        not_before: not_before.to_system_time(),
        not_after: not_after.to_system_time(),
    })
}
