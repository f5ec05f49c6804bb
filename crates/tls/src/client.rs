//! Client configurations, built in one place: which server to trust, which identity to present,
//! which protocol versions. Every meshca client (agents and operators to the management plane,
//! workloads to the workload CA and to each other, the Vault client) goes through
//! [`client_config`], so the provider and the version policy cannot drift apart.

use std::sync::Arc;

use meshca_pki::RootSet;
use rustls::ClientConfig;
use rustls::client::ResolvesClientCert;
use rustls::client::danger::ServerCertVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::{Identity, PeerPolicy, RevocationGrace, SpiffeVerifier, TlsError, provider};

/// How the client authenticates the server.
pub enum ServerTrust<'a> {
    /// A server certificate chaining to one of these roots, for the name dialled.
    Roots(&'a RootSet),
    /// Like `Roots`, and every certificate of the server's chain checked against these CRLs
    /// (as [`crate::SpiffeVerifier`] does, without a grace: only CRLs a CA of the path signed;
    /// a certificate whose issuer has no CRL here is accepted).
    RootsWithCrls(&'a RootSet, &'a [meshca_pki::Crl]),
    /// A ready-made root store (the system's, or a CA file's).
    Store(rustls::RootCertStore),
    /// A custom verifier (SPIFFE peers, whose certificates carry no DNS name).
    Verifier(Arc<dyn ServerCertVerifier>),
}

/// What the client presents.
pub enum ClientAuth {
    /// Nothing.
    None,
    /// A fixed certificate and key.
    Identity(Identity),
    /// A certificate that may change between connections (renewed identities).
    Resolver(Arc<dyn ResolvesClientCert>),
}

/// Which TLS versions the client offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Versions {
    /// TLS 1.3 only: meshca's own control plane and mesh traffic.
    Tls13,
    /// TLS 1.3 and 1.2: peers meshca does not control (Vault, stock Istio servers).
    Tls13And12,
}

/// Builds a rustls client configuration on meshca's crypto provider.
pub fn client_config(trust: ServerTrust<'_>, auth: ClientAuth, versions: Versions) -> Result<ClientConfig, TlsError> {
    let versions: &[&'static rustls::SupportedProtocolVersion] = match versions {
        Versions::Tls13 => &[&rustls::version::TLS13],
        Versions::Tls13And12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
    };
    let builder = ClientConfig::builder_with_provider(provider::get()).with_protocol_versions(versions)?;
    let builder = match trust {
        ServerTrust::Roots(roots) => builder.with_root_certificates(root_store(roots)?),
        ServerTrust::RootsWithCrls(roots, crls) if !crls.is_empty() => {
            let named = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(root_store(roots)?),
                provider::get(),
            )
            .build()
            .map_err(|e| TlsError::Roots(e.to_string()))?;
            let chain = SpiffeVerifier::with_revocation(
                roots,
                PeerPolicy::UriPrefix(String::new()),
                false,
                RevocationGrace::NONE,
            )?;
            chain.set_crls(crls)?;
            builder.dangerous().with_custom_certificate_verifier(Arc::new(NamedWithCrls { named, chain }))
        }
        ServerTrust::RootsWithCrls(roots, _) => builder.with_root_certificates(root_store(roots)?),
        ServerTrust::Store(store) => builder.with_root_certificates(store),
        ServerTrust::Verifier(v) => builder.dangerous().with_custom_certificate_verifier(v),
    };
    Ok(match auth {
        ClientAuth::None => builder.with_no_client_auth(),
        ClientAuth::Identity(id) => builder.with_client_auth_cert(id.chain.clone(), id.key())?,
        ClientAuth::Resolver(r) => builder.with_client_cert_resolver(r),
    })
}

/// A rustls root store holding `roots`.
pub fn root_store(roots: &RootSet) -> Result<rustls::RootCertStore, TlsError> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots.iter() {
        store.add(CertificateDer::from(r.der().to_vec())).map_err(|e| TlsError::Roots(e.to_string()))?;
    }
    Ok(store)
}

/// rustls' server verification (roots and the name dialled), then the chain's CRL check of a
/// [`SpiffeVerifier`] (its path-scoped CRLs: rustls' own CRL support picks a CRL by issuer name,
/// and a cluster's successive intermediates share one name).
#[derive(Debug)]
struct NamedWithCrls {
    named: Arc<rustls::client::WebPkiServerVerifier>,
    chain: Arc<SpiffeVerifier>,
}

impl ServerCertVerifier for NamedWithCrls {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.named.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        self.chain.verify_chain(end_entity, intermediates, now, webpki::KeyUsage::server_auth())?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.named.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.named.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.named.supported_verify_schemes()
    }
}
