//! Chain verification: does a certificate chain to a root in a root set, at a given time, for a
//! given use?
//!
//! rustls-webpki verifies end-entity certificates only (it refuses a CA as the target), while
//! meshca must also verify CA certificates (a cluster intermediate against the root set, the way
//! istiod checks `cacerts`). So path building and the RFC 5280 checks meshca relies on are done
//! here for every target; for leaves, webpki is run as well, so leaf acceptance (name constraints
//! included) matches what rustls will later decide in a handshake.

use std::time::{SystemTime, UNIX_EPOCH};

use const_oid::db::rfc5280;
use rustls_pki_types::{CertificateDer, UnixTime};
use x509_cert::ext::pkix::KeyUsages;

use crate::cert::Cert;
use crate::der_util::SignatureError;
use crate::rootset::RootSet;

/// Longest path (target to root, inclusive) meshca will build.
pub const MAX_PATH_LEN: usize = 8;

/// What the target certificate is being verified for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// A CA that signs certificates (a cluster intermediate, a user's intermediate).
    Ca,
    /// A TLS server leaf.
    ServerAuth,
    /// A TLS client leaf.
    ClientAuth,
}

/// Why a chain did not verify. Each variant names the certificate at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A certificate is past its NotAfter.
    #[error("{subject} expired at {not_after}")]
    Expired {
        /// Certificate subject.
        subject: String,
        /// Its NotAfter, RFC 3339.
        not_after: String,
    },
    /// A certificate's NotBefore is in the future.
    #[error("{subject} is not valid before {not_before}")]
    NotYetValid {
        /// Certificate subject.
        subject: String,
        /// Its NotBefore, RFC 3339.
        not_before: String,
    },
    /// No certificate among the intermediates and roots issued this one.
    #[error("no issuer found for {subject} (issuer {issuer}) among the chain and the trusted roots")]
    UnknownIssuer {
        /// Certificate subject.
        subject: String,
        /// Its issuer name.
        issuer: String,
    },
    /// The issuer's key did not verify the signature.
    #[error("signature of {subject} by {issuer} does not verify: {source}")]
    BadSignature {
        /// Certificate subject.
        subject: String,
        /// Candidate issuer subject.
        issuer: String,
        /// Why.
        source: SignatureError,
    },
    /// An issuer in the path is not a CA.
    #[error("{subject} is used as an issuer but is not a CA")]
    IssuerNotCa {
        /// Certificate subject.
        subject: String,
    },
    /// An issuer in the path may not sign certificates.
    #[error("{subject} is used as an issuer but its keyUsage lacks keyCertSign")]
    IssuerNoKeyCertSign {
        /// Certificate subject.
        subject: String,
    },
    /// An issuer's pathLenConstraint is exceeded.
    #[error("{subject} has pathlen:{path_len} but {below} CA certificate(s) follow it in the path")]
    PathLenExceeded {
        /// Certificate subject.
        subject: String,
        /// Its constraint.
        path_len: u8,
        /// How many intermediates follow.
        below: usize,
    },
    /// A critical extension meshca does not understand.
    #[error("{subject} has an unsupported critical extension {extension}")]
    UnknownCriticalExtension {
        /// Certificate subject.
        subject: String,
        /// The extension.
        extension: String,
    },
    /// The path would be longer than [`MAX_PATH_LEN`].
    #[error("chain for {subject} is longer than {MAX_PATH_LEN} certificates")]
    TooLong {
        /// Target subject.
        subject: String,
    },
    /// The target is not fit for the requested use.
    #[error("{subject} cannot be used for {usage:?}: {reason}")]
    WrongUsage {
        /// Target subject.
        subject: String,
        /// The use asked for.
        usage: Usage,
        /// What is missing.
        reason: &'static str,
    },
    /// rustls-webpki refused the leaf chain.
    #[error("leaf chain refused by rustls-webpki: {0}")]
    Webpki(String),
}

/// Formats a time as RFC 3339 for messages.
pub fn rfc3339(t: SystemTime) -> String {
    der::DateTime::from_system_time(t).map(|d| d.to_string()).unwrap_or_else(|_| format!("{t:?}"))
}

/// Checks `now` is inside `c`'s validity window.
pub fn check_validity(c: &Cert, now: SystemTime) -> Result<(), ChainError> {
    if now > c.not_after() {
        return Err(ChainError::Expired { subject: c.subject(), not_after: rfc3339(c.not_after()) });
    }
    if now < c.not_before() {
        return Err(ChainError::NotYetValid { subject: c.subject(), not_before: rfc3339(c.not_before()) });
    }
    Ok(())
}

fn check_extensions(c: &Cert) -> Result<(), ChainError> {
    match c.unknown_critical_extensions().into_iter().next() {
        Some(extension) => Err(ChainError::UnknownCriticalExtension { subject: c.subject(), extension }),
        None => Ok(()),
    }
}

fn check_target(c: &Cert, usage: Usage) -> Result<(), ChainError> {
    let wrong = |reason| Err(ChainError::WrongUsage { subject: c.subject(), usage, reason });
    match usage {
        Usage::Ca => {
            if !c.is_ca() {
                return wrong("it is not a CA");
            }
            if !c.allows_key_usage(KeyUsages::KeyCertSign) {
                return wrong("its keyUsage lacks keyCertSign");
            }
        }
        Usage::ServerAuth | Usage::ClientAuth => {
            if c.is_ca() {
                return wrong("it is a CA, not a leaf");
            }
            if !c.allows_key_usage(KeyUsages::DigitalSignature) {
                return wrong("its keyUsage lacks digitalSignature");
            }
            let eku = if usage == Usage::ServerAuth { rfc5280::ID_KP_SERVER_AUTH } else { rfc5280::ID_KP_CLIENT_AUTH };
            if !c.allows_extended_key_usage(eku) {
                return wrong("its extendedKeyUsage does not include it");
            }
        }
    }
    Ok(())
}

/// Checks `cand` may issue the next certificate in `path` (target first).
fn check_issuer(cand: &Cert, path: &[&Cert], now: SystemTime) -> Result<(), ChainError> {
    if !cand.is_ca() {
        return Err(ChainError::IssuerNotCa { subject: cand.subject() });
    }
    if !cand.allows_key_usage(KeyUsages::KeyCertSign) {
        return Err(ChainError::IssuerNoKeyCertSign { subject: cand.subject() });
    }
    check_validity(cand, now)?;
    check_extensions(cand)?;
    if let Some(path_len) = cand.path_len() {
        // RFC 5280 §6.1.4 (l)/(m): count the non-self-issued CAs between cand and the target.
        let below = path.iter().skip(1).filter(|c| !c.is_self_issued()).count();
        if below > usize::from(path_len) {
            return Err(ChainError::PathLenExceeded { subject: cand.subject(), path_len, below });
        }
    }
    Ok(())
}

struct Search<'a> {
    intermediates: &'a [Cert],
    roots: &'a RootSet,
    now: SystemTime,
}

impl<'a> Search<'a> {
    /// Extends `path` (target first) up to a root. Tries every candidate issuer, so a stale
    /// intermediate next to a current one (same name, different key) does not break the search.
    fn extend(&self, path: &mut Vec<&'a Cert>) -> Result<(), ChainError> {
        let Some(&cur) = path.last() else {
            return Err(ChainError::TooLong { subject: String::new() });
        };
        let mut last_err = None;
        let candidates = self.roots.iter().chain(self.intermediates.iter());
        for cand in candidates {
            if cand.subject_der() != cur.issuer_der() || path.contains(&cand) {
                continue;
            }
            if let (Some(aki), Some(ski)) = (cur.authority_key_id(), cand.subject_key_id())
                && aki != ski
            {
                continue;
            }
            if let Err(e) = check_issuer(cand, path, self.now) {
                last_err = Some(e);
                continue;
            }
            if let Err(source) = cur.verify_signed_by(cand) {
                last_err = Some(ChainError::BadSignature { subject: cur.subject(), issuer: cand.subject(), source });
                continue;
            }
            if self.roots.contains(cand) {
                path.push(cand);
                return Ok(());
            }
            if path.len() + 1 >= MAX_PATH_LEN {
                last_err = Some(ChainError::TooLong { subject: path[0].subject() });
                continue;
            }
            path.push(cand);
            match self.extend(path) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    path.pop();
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or_else(|| ChainError::UnknownIssuer { subject: cur.subject(), issuer: cur.issuer() }))
    }
}

/// Verifies that `target` chains through `intermediates` to a root in `roots` at `now`, for
/// `usage`. Returns the path, target first and root last.
pub fn verify_chain<'a>(
    target: &'a Cert,
    intermediates: &'a [Cert],
    roots: &'a RootSet,
    now: SystemTime,
    usage: Usage,
) -> Result<Vec<&'a Cert>, ChainError> {
    check_validity(target, now)?;
    check_extensions(target)?;
    check_target(target, usage)?;
    let mut path = vec![target];
    if !(usage == Usage::Ca && roots.contains(target)) {
        Search { intermediates, roots, now }.extend(&mut path)?;
    }
    if usage != Usage::Ca {
        verify_leaf_with_webpki(target, intermediates, roots, now, usage)?;
    }
    Ok(path)
}

/// The signature algorithms meshca accepts, for webpki: the same set `der_util` verifies.
static WEBPKI_ALGS: &[&dyn rustls_pki_types::SignatureVerificationAlgorithm] = &[
    webpki::aws_lc_rs::ECDSA_P256_SHA256,
    webpki::aws_lc_rs::ECDSA_P256_SHA384,
    webpki::aws_lc_rs::ECDSA_P384_SHA256,
    webpki::aws_lc_rs::ECDSA_P384_SHA384,
    webpki::aws_lc_rs::RSA_PKCS1_2048_8192_SHA256,
    webpki::aws_lc_rs::RSA_PKCS1_2048_8192_SHA384,
    webpki::aws_lc_rs::RSA_PKCS1_2048_8192_SHA512,
];

fn verify_leaf_with_webpki(
    target: &Cert,
    intermediates: &[Cert],
    roots: &RootSet,
    now: SystemTime,
    usage: Usage,
) -> Result<(), ChainError> {
    let web = |e: webpki::Error| ChainError::Webpki(format!("{e:?}"));
    let root_ders: Vec<CertificateDer<'_>> = roots.iter().map(|r| CertificateDer::from(r.der())).collect();
    let anchors = root_ders
        .iter()
        .map(|d| webpki::anchor_from_trusted_cert(d).map(|a| a.to_owned()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(web)?;
    let inter: Vec<CertificateDer<'_>> = intermediates.iter().map(|c| CertificateDer::from(c.der())).collect();
    let ee_der = CertificateDer::from(target.der());
    let ee = webpki::EndEntityCert::try_from(&ee_der).map_err(web)?;
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let ku = if usage == Usage::ServerAuth { webpki::KeyUsage::server_auth() } else { webpki::KeyUsage::client_auth() };
    ee.verify_for_usage(WEBPKI_ALGS, &anchors, &inter, UnixTime::since_unix_epoch(since_epoch), ku, None, None)
        .map(|_| ())
        .map_err(web)
}
