//! Peer verification for SPIFFE certificates, as a rustls server- and client-certificate
//! verifier.
//!
//! rustls' stock server verifier matches DNS names and IP addresses only; workload leaves carry a
//! single URI SAN, so a workload dialling another needs its own verifier: the chain is checked
//! with rustls-webpki against the current root set, then the peer's SPIFFE ID against a
//! [`PeerPolicy`]. The roots can be replaced at run time (root rotation: A → A+B → B), and so can
//! the CRLs the whole chain is checked against (see [`crate::revocation`] for the policy: unknown
//! status allowed, and a grace for leaves issued before their CA was revoked).

use std::sync::Arc;

use arc_swap::ArcSwap;
use meshca_pki::{Cert, RootSet, SpiffeId, TrustDomain};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};

use crate::revocation::{self, CrlSet, RevocationGrace};
use crate::{TlsError, provider};

/// Which peer identities are accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerPolicy {
    /// Any SPIFFE ID in this trust domain.
    TrustDomain(TrustDomain),
    /// Exactly one of these IDs.
    AnyOf(Vec<SpiffeId>),
    /// Any URI SAN starting with this prefix (e.g. `spiffe://meshca.internal/`).
    UriPrefix(String),
}

impl PeerPolicy {
    fn allows(&self, uris: &[String]) -> bool {
        match self {
            PeerPolicy::TrustDomain(td) => {
                uris.iter().filter_map(|u| u.parse::<SpiffeId>().ok()).any(|id| id.trust_domain() == td)
            }
            PeerPolicy::AnyOf(ids) => uris.iter().any(|u| ids.iter().any(|id| id.to_string() == *u)),
            PeerPolicy::UriPrefix(p) => uris.iter().any(|u| u.starts_with(p.as_str())),
        }
    }
}

/// The SPIFFE ID in a peer certificate (its first URI SAN that parses as one).
pub fn peer_spiffe_id(cert: &CertificateDer<'_>) -> Option<SpiffeId> {
    let c = Cert::from_der(cert.to_vec()).ok()?;
    c.uri_sans().iter().find_map(|u| u.parse().ok())
}

/// The trusted roots: as trust anchors for rustls-webpki, and as certificates (the issuers of the
/// CRLs that revoke an intermediate).
#[derive(Debug)]
struct Roots {
    anchors: Vec<TrustAnchor<'static>>,
    certs: Vec<Cert>,
}

impl Roots {
    fn new(roots: &RootSet) -> Result<Self, TlsError> {
        let anchors = roots
            .iter()
            .map(|r| {
                webpki::anchor_from_trusted_cert(&CertificateDer::from(r.der()))
                    .map(|a| a.to_owned())
                    .map_err(|e| TlsError::Roots(format!("{}: {e:?}", r.subject())))
            })
            .collect::<Result<_, _>>()?;
        Ok(Roots { anchors, certs: roots.iter().cloned().collect() })
    }
}

/// Verifies SPIFFE peers against a swappable root set and swappable CRLs.
#[derive(Debug)]
pub struct SpiffeVerifier {
    roots: ArcSwap<Roots>,
    crls: ArcSwap<CrlSet>,
    grace: RevocationGrace,
    policy: PeerPolicy,
    algorithms: WebPkiSupportedAlgorithms,
    client_auth_mandatory: bool,
}

impl SpiffeVerifier {
    /// A verifier trusting `roots` and accepting peers allowed by `policy`, with no CRL. As a
    /// client-certificate verifier, `client_auth_mandatory` says whether a client without a
    /// certificate may connect (the management plane allows it for registration only, and checks
    /// per call).
    pub fn new(roots: &RootSet, policy: PeerPolicy, client_auth_mandatory: bool) -> Result<Arc<Self>, TlsError> {
        Self::with_revocation(roots, policy, client_auth_mandatory, RevocationGrace::NONE)
    }

    /// Like [`Self::new`], for a verifier that will be given CRLs ([`Self::set_crls`]) and
    /// accepts leaves issued before their CA's revocation for `grace` after it.
    pub fn with_revocation(
        roots: &RootSet,
        policy: PeerPolicy,
        client_auth_mandatory: bool,
        grace: RevocationGrace,
    ) -> Result<Arc<Self>, TlsError> {
        Ok(Arc::new(SpiffeVerifier {
            roots: ArcSwap::from_pointee(Roots::new(roots)?),
            crls: ArcSwap::from_pointee(CrlSet::default()),
            grace,
            policy,
            algorithms: provider::get().signature_verification_algorithms,
            client_auth_mandatory,
        }))
    }

    /// Replaces the trusted roots for later handshakes.
    pub fn set_roots(&self, roots: &RootSet) -> Result<(), TlsError> {
        self.roots.store(Arc::new(Roots::new(roots)?));
        Ok(())
    }

    /// Replaces the CRLs for later handshakes (all of them: CRLs no longer given are forgotten).
    /// A set rustls-webpki cannot use is refused and the current one kept.
    pub fn set_crls(&self, crls: &[meshca_pki::Crl]) -> Result<(), TlsError> {
        self.crls.store(CrlSet::new(crls)?);
        Ok(())
    }

    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<(), Error> {
        let leaf = self.verify_chain(end_entity, intermediates, now, usage)?;
        if self.policy.allows(leaf.uri_sans()) {
            Ok(())
        } else {
            Err(Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure))
        }
    }

    /// The chain check without the peer policy: `end_entity` chains to the roots for `usage`,
    /// and no certificate of its path is revoked (beyond the grace). Returns the end entity.
    pub fn verify_chain(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<Cert, Error> {
        let ee = webpki::EndEntityCert::try_from(end_entity).map_err(pki_err)?;
        let roots = self.roots.load();
        let path = ee
            .verify_for_usage(self.algorithms.all, &roots.anchors, intermediates, now, usage, None, None)
            .map_err(pki_err)?;
        let leaf = Cert::from_der(end_entity.to_vec()).map_err(|e| other(Arc::new(e)))?;
        let crls = self.crls.load();
        if !crls.is_empty() {
            let used: Vec<CertificateDer<'_>> = path.intermediate_certificates().map(|c| c.der()).collect();
            let mut chain = vec![leaf.clone()];
            for der in &used {
                chain.push(Cert::from_der(der.to_vec()).map_err(|e| other(Arc::new(e)))?);
            }
            // The anchor webpki chose is one of ours: its certificate ends the chain.
            let anchor = roots.anchors.iter().position(|a| std::ptr::eq(a, path.anchor()));
            chain.extend(anchor.map(|i| roots.certs[i].clone()));
            self.check_revocation(&ee, &roots, &crls, &chain, &used, now, usage)?;
        }
        Ok(leaf)
    }

    /// rustls-webpki's revocation check of the verified path `chain` (the end entity first, the
    /// anchor's certificate last; `used`: its intermediates), against the CRLs signed by an issuer
    /// on that path — so a CRL from another CA with the same name (a re-keyed root during a
    /// rotation) is never taken for the issuer's — then the grace for a revoked CA's leaves.
    #[allow(clippy::too_many_arguments)]
    fn check_revocation(
        &self,
        ee: &webpki::EndEntityCert<'_>,
        roots: &Roots,
        crls: &CrlSet,
        chain: &[Cert],
        used: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<(), Error> {
        let relevant = crls.signed_on_path(chain);
        let refs = relevant.iter().map(|&i| &crls.webpki()[i]).collect::<Vec<_>>();
        let Some(options) = revocation::options(&refs) else { return Ok(()) };
        match ee.verify_for_usage(self.algorithms.all, &roots.anchors, used, now, usage, Some(options), None) {
            Ok(_) => Ok(()),
            Err(webpki::Error::CertRevoked) => {
                let parsed: Vec<meshca_pki::Crl> = relevant.iter().map(|&i| crls.crls()[i].clone()).collect();
                revocation::within_grace(chain, &parsed, revocation::system_time(now), self.grace).map_err(|why| {
                    tracing::debug!(%why, "refusing a peer certificate");
                    Error::InvalidCertificate(rustls::CertificateError::Revoked)
                })
            }
            Err(e) => Err(pki_err(e)),
        }
    }
}

fn other(e: Arc<dyn std::error::Error + Send + Sync>) -> Error {
    Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(e)))
}

fn pki_err(e: webpki::Error) -> Error {
    use rustls::CertificateError as C;
    Error::InvalidCertificate(match e {
        webpki::Error::CertExpired { .. } => C::Expired,
        webpki::Error::CertNotValidYet { .. } => C::NotValidYet,
        webpki::Error::UnknownIssuer => C::UnknownIssuer,
        webpki::Error::InvalidSignatureForPublicKey => C::BadSignature,
        webpki::Error::CertRevoked => C::Revoked,
        other => C::Other(rustls::OtherError(Arc::new(other))),
    })
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        self.verify(end_entity, intermediates, now, webpki::KeyUsage::server_auth())?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for SpiffeVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.verify(end_entity, intermediates, now, webpki::KeyUsage::client_auth())?;
        Ok(ClientCertVerified::assertion())
    }

    fn client_auth_mandatory(&self) -> bool {
        self.client_auth_mandatory
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
