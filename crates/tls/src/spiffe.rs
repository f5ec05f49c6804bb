//! Peer verification for SPIFFE certificates, as a rustls server- and client-certificate
//! verifier.
//!
//! rustls' stock server verifier matches DNS names and IP addresses only; workload leaves carry a
//! single URI SAN, so a workload dialling another needs its own verifier: the chain is checked
//! with rustls-webpki against the current root set, then the peer's SPIFFE ID against a
//! [`PeerPolicy`]. The roots can be replaced at run time (root rotation: A → A+B → B), and so can
//! the CRLs the whole chain is checked against (see [`crate::revocation`] for the policy: unknown
//! status allowed, and a grace for leaves issued before their CA was revoked).
//!
//! Federation ([`SpiffeVerifier::set_federation`]): once the verifier knows its own trust domain
//! and the bundles of the foreign ones, a peer's chain is checked against the roots of the
//! trust domain its SPIFFE ID names, and only those: the mesh's own roots for the mesh's own
//! trust domain, a foreign bundle for its trust domain, nothing for any other. A foreign root can
//! thus never vouch for an SVID of the mesh (or of a third trust domain).

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
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
    /// Any SPIFFE ID of a trust domain the verifier holds roots for: its own, or a federated one
    /// ([`SpiffeVerifier::set_federation`]; without it, the own roots' only).
    Trusted,
}

impl PeerPolicy {
    fn allows(&self, uris: &[String]) -> bool {
        match self {
            PeerPolicy::TrustDomain(td) => {
                uris.iter().filter_map(|u| u.parse::<SpiffeId>().ok()).any(|id| id.trust_domain() == td)
            }
            PeerPolicy::AnyOf(ids) => uris.iter().any(|u| ids.iter().any(|id| id.to_string() == *u)),
            PeerPolicy::UriPrefix(p) => uris.iter().any(|u| u.starts_with(p.as_str())),
            // The chain was checked against the roots of the peer's trust domain.
            PeerPolicy::Trusted => uris.iter().any(|u| u.parse::<SpiffeId>().is_ok()),
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

/// The trust domains a verifier accepts, each with its own roots.
#[derive(Debug)]
struct Federation {
    own: TrustDomain,
    foreign: BTreeMap<TrustDomain, Arc<Roots>>,
}

/// Verifies SPIFFE peers against a swappable root set and swappable CRLs.
#[derive(Debug)]
pub struct SpiffeVerifier {
    roots: ArcSwap<Roots>,
    federation: ArcSwapOption<Federation>,
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
            federation: ArcSwapOption::empty(),
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

    /// Federates: from now on a peer of trust domain `own` is checked against the roots of
    /// [`SpiffeVerifier::new`] / [`SpiffeVerifier::set_roots`], a peer of one of `foreign`'s trust
    /// domains against that bundle's roots only, and any other peer is refused. A bundle for
    /// `own` is refused (it would let a foreign root vouch for the mesh), as is one named twice.
    pub fn set_federation(&self, own: &TrustDomain, foreign: &[(TrustDomain, RootSet)]) -> Result<(), TlsError> {
        let mut map = BTreeMap::new();
        for (td, roots) in foreign {
            if td == own {
                return Err(TlsError::Roots(format!("a federated bundle for the own trust domain {own} is refused")));
            }
            if map.insert(td.clone(), Arc::new(Roots::new(roots)?)).is_some() {
                return Err(TlsError::Roots(format!("two federated bundles for trust domain {td}")));
            }
        }
        self.federation.store(Some(Arc::new(Federation { own: own.clone(), foreign: map })));
        Ok(())
    }

    /// The roots a peer presenting `uris` is checked against: all the own roots without
    /// federation; with it, those of the trust domain of its SPIFFE ID (exactly one, or none).
    fn roots_for(&self, uris: &[String]) -> Result<Arc<Roots>, Error> {
        let Some(f) = self.federation.load_full() else { return Ok(self.roots.load_full()) };
        let refuse = || Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure);
        let ids: Vec<SpiffeId> = uris.iter().filter_map(|u| u.parse().ok()).collect();
        let [id] = ids.as_slice() else { return Err(refuse()) };
        if id.trust_domain() == &f.own {
            Ok(self.roots.load_full())
        } else {
            f.foreign.get(id.trust_domain()).cloned().ok_or_else(refuse)
        }
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
        let leaf = Cert::from_der(end_entity.to_vec()).map_err(|e| other(Arc::new(e)))?;
        let roots = self.roots_for(leaf.uri_sans())?;
        let path = ee
            .verify_for_usage(self.algorithms.all, &roots.anchors, intermediates, now, usage, None, None)
            .map_err(pki_err)?;
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

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use meshca_pki::{CaSigner, KeyAlgorithm, LeafParams, PrivateKey, RootParams};

    use super::*;

    const T: u64 = 1_780_000_000;

    fn root(org: &str) -> CaSigner {
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).expect("key");
        CaSigner::new_root(key, &RootParams::new(org), SystemTime::UNIX_EPOCH + Duration::from_secs(T)).expect("root")
    }

    /// A workload leaf for `id` signed by `ca`.
    fn leaf(ca: &CaSigner, id: &str) -> CertificateDer<'static> {
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).expect("key");
        let params = LeafParams::workload(id.parse().expect("id"), Duration::from_secs(3600));
        let issued = ca.sign_leaf(key.public_key_spki(), &params, SystemTime::UNIX_EPOCH + Duration::from_secs(T));
        CertificateDer::from(issued.expect("leaf").der)
    }

    fn roots(ca: &CaSigner) -> RootSet {
        RootSet::from_certs(vec![ca.root().clone()]).expect("roots")
    }

    fn td(s: &str) -> TrustDomain {
        TrustDomain::new(s).expect("td")
    }

    /// Whether `v` accepts `cert` as a client and as a server.
    fn accepts(v: &SpiffeVerifier, cert: &CertificateDer<'_>) -> bool {
        let now = UnixTime::since_unix_epoch(Duration::from_secs(T + 60));
        let client = v.verify_client_cert(cert, &[], now).is_ok();
        let name = ServerName::try_from("workload").expect("name");
        let server = v.verify_server_cert(cert, &[], &name, &[], now).is_ok();
        assert_eq!(client, server, "client and server verification agree");
        client
    }

    #[test]
    fn a_foreign_svid_is_accepted_for_its_trust_domain_only_and_only_once_federated() {
        let (mesh, other) = (root("mesh"), root("other"));
        let v = SpiffeVerifier::new(&roots(&mesh), PeerPolicy::Trusted, true).expect("verifier");
        let own = leaf(&mesh, "spiffe://mesh.example/ns/a/sa/a");
        let foreign = leaf(&other, "spiffe://other.example/ns/b/sa/b");
        let foreign_claiming_ours = leaf(&other, "spiffe://mesh.example/ns/a/sa/a");
        let foreign_claiming_a_third = leaf(&other, "spiffe://third.example/ns/c/sa/c");
        let ours_claiming_foreign = leaf(&mesh, "spiffe://other.example/ns/b/sa/b");

        // Not federated: the foreign root is unknown.
        assert!(accepts(&v, &own));
        assert!(!accepts(&v, &foreign), "no federation, no foreign SVID");

        v.set_federation(&td("mesh.example"), &[(td("other.example"), roots(&other))]).expect("federate");
        assert!(accepts(&v, &own));
        assert!(accepts(&v, &foreign), "a federated trust domain's SVID under its bundle");
        assert!(!accepts(&v, &foreign_claiming_ours), "a foreign root never vouches for the mesh's own trust domain");
        assert!(!accepts(&v, &foreign_claiming_a_third), "nor for a trust domain not federated");
        assert!(!accepts(&v, &ours_claiming_foreign), "the mesh's roots do not vouch for a foreign trust domain");

        // Federation dropped (an empty set): the foreign SVID is refused again.
        v.set_federation(&td("mesh.example"), &[]).expect("unfederate");
        assert!(!accepts(&v, &foreign));
        assert!(accepts(&v, &own));
    }

    #[test]
    fn a_bundle_for_the_own_trust_domain_is_refused() {
        let mesh = root("mesh");
        let v = SpiffeVerifier::new(&roots(&mesh), PeerPolicy::Trusted, true).expect("verifier");
        let e = v.set_federation(&td("mesh.example"), &[(td("mesh.example"), roots(&root("evil")))]).expect_err("own");
        assert!(e.to_string().contains("own trust domain mesh.example"), "{e}");
    }
}
