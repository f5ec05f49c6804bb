//! CRLs for meshca's peer verifiers, and the grace that keeps healthy workloads working while a
//! revoked cluster's leaves are replaced.
//!
//! The check itself is rustls-webpki's: every certificate of the verified path (the leaf and each
//! CA above it) against the CRLs its issuer signed (only those are handed to it:
//! [`CrlSet::signed_on_path`]); a certificate whose issuer published no CRL
//! here has an unknown status and is accepted (a cluster's own CRL reaches only that cluster, the
//! root's reaches every cluster). A stale CRL (past its nextUpdate) still counts: a management
//! plane that cannot re-sign must not take the mesh down, and what it revoked stays revoked.
//!
//! The grace: when the management plane revokes a cluster's intermediate, that cluster's
//! workloads still hold leaves it signed until they renew under the new one (`meshca up`'s
//! workloads do so as soon as the CRL names their issuer). A verifier therefore keeps accepting
//! a leaf under a revoked CA for [`RevocationGrace`] after the revocation date the CRL records —
//! but only a leaf issued *before* the revocation (NotBefore, which meshca backdates by
//! [`meshca_pki::issue::BACKDATE`], at or before the revocation date minus that backdating). A
//! leaf minted after the revocation (with the stolen key) is refused at once, and so is a revoked
//! end-entity certificate. The grace is counted from the date in the CRL, not from when this
//! verifier read it, so every verifier stops accepting at the same moment however late its CRL
//! arrived. docs/architecture.md ("Revocation in the data path") has the reasoning for its length.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshca_pki::{Cert, Crl};
use rustls_pki_types::UnixTime;

use crate::TlsError;

/// How long after a CA's revocation date its earlier leaves are still accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RevocationGrace(pub Duration);

impl RevocationGrace {
    /// No grace: a CRL entry is enforced from the moment it is read.
    pub const NONE: RevocationGrace = RevocationGrace(Duration::ZERO);
    /// `meshca up`'s default: 20 s. The revoked cluster's workloads renew within about a second of
    /// the CRL reaching them (docs/benchmarks.md, figure (b)), and the CRL reaches every cluster
    /// within a second of `meshca revoke`; 20 s is a wide margin that still keeps the whole
    /// response (CRL everywhere, then enforcement) well inside a minute.
    pub const DEFAULT: RevocationGrace = RevocationGrace(Duration::from_secs(20));
}

/// The CRLs a verifier checks: as rustls-webpki wants them, and parsed by meshca (for the
/// revocation dates the grace is counted from).
#[derive(Default)]
pub struct CrlSet {
    webpki: Vec<webpki::CertRevocationList<'static>>,
    parsed: Vec<Crl>,
}

impl std::fmt::Debug for CrlSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrlSet").field("crls", &self.parsed).finish()
    }
}

impl CrlSet {
    /// The set holding `crls`; refused whole when rustls-webpki cannot use one of them.
    pub fn new(crls: &[Crl]) -> Result<Arc<Self>, TlsError> {
        let webpki = crls
            .iter()
            .map(|c| {
                webpki::OwnedCertRevocationList::from_der(c.der())
                    .map(webpki::CertRevocationList::from)
                    .map_err(|e| TlsError::Crl(format!("CRL from {} (number {}): {e:?}", c.issuer(), c.number())))
            })
            .collect::<Result<_, _>>()?;
        Ok(Arc::new(CrlSet { webpki, parsed: crls.to_vec() }))
    }

    /// Whether the set is empty (nothing to check).
    pub fn is_empty(&self) -> bool {
        self.parsed.is_empty()
    }

    /// The parsed CRLs.
    pub fn crls(&self) -> &[Crl] {
        &self.parsed
    }

    /// The CRLs as rustls-webpki reads them, in the order of [`Self::crls`].
    pub(crate) fn webpki(&self) -> &[webpki::CertRevocationList<'static>] {
        &self.webpki
    }

    /// The indices of the CRLs that a CA of the verified path `chain` (the end entity first, each
    /// issuer after the certificate it issued) signed: its name and a signature its key made.
    /// rustls-webpki picks a CRL by issuer name alone, so two CAs with one name (a re-keyed root
    /// during a rotation) would otherwise fail each other's chains.
    pub fn signed_on_path(&self, chain: &[Cert]) -> Vec<usize> {
        let cas = chain.get(1..).unwrap_or_default();
        (0..self.parsed.len()).filter(|&i| cas.iter().any(|ca| self.parsed[i].verify_signed_by(ca).is_ok())).collect()
    }
}

/// Revocation options over `refs`: the whole chain, unknown status allowed, stale CRLs counted.
/// `None` when there is no CRL to check against.
pub(crate) fn options<'a>(refs: &'a [&'a webpki::CertRevocationList<'a>]) -> Option<webpki::RevocationOptions<'a>> {
    let builder = webpki::RevocationOptionsBuilder::new(refs).ok()?;
    Some(
        builder
            .with_depth(webpki::RevocationCheckDepth::Chain)
            .with_status_policy(webpki::UnknownStatusPolicy::Allow)
            .with_expiration_policy(webpki::ExpirationPolicy::Ignore)
            .build(),
    )
}

/// rustls' time as a `SystemTime`.
pub(crate) fn system_time(now: UnixTime) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(now.as_secs())
}

/// Why a chain with a revoked certificate is refused after all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The end-entity certificate itself is revoked: no grace.
    #[error("the certificate {serial} is revoked")]
    EndEntity {
        /// Its serial.
        serial: String,
    },
    /// A CA of the chain was revoked longer ago than the grace.
    #[error("{subject} (serial {serial}) was revoked more than {grace:?} ago")]
    GraceOver {
        /// The revoked CA.
        subject: String,
        /// Its serial.
        serial: String,
        /// The grace.
        grace: Duration,
    },
    /// The certificate below a revoked CA was issued after the revocation.
    #[error("issued by {subject} (serial {serial}) after its revocation")]
    IssuedAfter {
        /// The revoked CA.
        subject: String,
        /// Its serial.
        serial: String,
    },
    /// rustls-webpki found a revocation this check cannot place: refused, never guessed.
    #[error("a certificate of the chain is revoked")]
    Unplaced,
}

/// The grace decision for a chain that rustls-webpki verified but found revoked: `chain` is the
/// verified path (the end entity first, the trust anchor's certificate last), `crls` the CRLs it
/// was checked against. Accepted only when every revoked certificate of the chain is a CA revoked
/// less than `grace` before `now`, and the certificate below it was issued before the revocation.
pub fn within_grace(chain: &[Cert], crls: &[Crl], now: SystemTime, grace: RevocationGrace) -> Result<(), Refused> {
    let mut placed = false;
    for (i, pair) in chain.windows(2).enumerate() {
        let (cert, issuer) = (&pair[0], &pair[1]);
        let serial = cert.serial_hex();
        let Some(entry) = crls
            .iter()
            .filter(|crl| crl.revokes(cert, issuer))
            .flat_map(|crl| crl.revoked().iter().filter(|r| r.serial_hex.eq_ignore_ascii_case(&serial)))
            .min_by_key(|r| r.revoked_at)
        else {
            continue;
        };
        placed = true;
        if i == 0 {
            return Err(Refused::EndEntity { serial });
        }
        let subject = cert.subject();
        if now >= entry.revoked_at + grace.0 {
            return Err(Refused::GraceOver { subject, serial, grace: grace.0 });
        }
        let below = &chain[i - 1];
        if below.not_before() + meshca_pki::issue::BACKDATE > entry.revoked_at {
            return Err(Refused::IssuedAfter { subject, serial });
        }
    }
    if placed { Ok(()) } else { Err(Refused::Unplaced) }
}
