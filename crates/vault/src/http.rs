//! Vault's HTTP transport: `meshca-http`'s one-request client, with Vault's CA file (or the
//! system bundle) as the only roots and a base address without a path (Vault serves `/v1/`).

use std::path::Path;
use std::time::Duration;

use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// Largest response body accepted (Vault's answers are a few KB).
const MAX_BODY: usize = 1 << 20;

/// Where system CA bundles usually are, when no CA file is given for an https Vault.
const SYSTEM_BUNDLES: [&str; 3] =
    ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem"];

/// The client for one Vault server.
pub(crate) type HttpClient = meshca_http::Client;

/// Parses `http(s)://host[:port][/]`: Vault's address, without a path.
pub(crate) fn parse_base(url: &str) -> Result<meshca_http::Url, String> {
    let u = meshca_http::Url::parse(url).map_err(|e| e.to_string())?;
    if u.path != "/" {
        return Err(format!("{url:?} must be just a scheme, a host and an optional port (Vault serves /v1/ itself)"));
    }
    Ok(u)
}

/// A client for `base`. For https, the server is verified against `ca_file` (PEM), or the
/// system bundle when none is given.
pub(crate) fn client(base: &str, ca_file: Option<&Path>, timeout: Duration) -> Result<HttpClient, String> {
    let url = parse_base(base)?;
    let tls = if url.https {
        let roots = load_roots(ca_file)?;
        Some(
            meshca_tls::client_config(
                meshca_tls::ServerTrust::Store(roots),
                meshca_tls::ClientAuth::None,
                meshca_tls::Versions::Tls13And12,
            )
            .map_err(|e| format!("TLS configuration: {e}"))?,
        )
    } else {
        None
    };
    meshca_http::Client::new(&url, tls, timeout, MAX_BODY).map_err(|e| e.to_string())
}

fn load_roots(ca_file: Option<&Path>) -> Result<RootCertStore, String> {
    let (pem, from) = match ca_file {
        Some(p) => (std::fs::read(p).map_err(|e| format!("reading {}: {e}", p.display()))?, p.display().to_string()),
        None => {
            let env = std::env::var_os("SSL_CERT_FILE").map(std::path::PathBuf::from);
            let candidates = env.into_iter().chain(SYSTEM_BUNDLES.iter().map(std::path::PathBuf::from));
            let mut found = None;
            for c in candidates {
                if let Ok(b) = std::fs::read(&c) {
                    found = Some((b, c.display().to_string()));
                    break;
                }
            }
            found.ok_or_else(|| {
                "no CA file for Vault's TLS certificate: set spec.config.vault.tls.caFile (or --vault-ca-file)"
                    .to_string()
            })?
        }
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("{from}: {e}"))?;
        roots.add(cert).map_err(|e| format!("{from}: {e}"))?;
    }
    if roots.is_empty() {
        return Err(format!("{from} holds no PEM certificate"));
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::parse_base;

    #[test]
    fn base_addresses() {
        let split = |u: &str| parse_base(u).map(|u| (u.https, u.host, u.port));
        assert_eq!(split("http://127.0.0.1:8200"), Ok((false, "127.0.0.1".into(), 8200)));
        assert_eq!(split("https://vault.example.com/"), Ok((true, "vault.example.com".into(), 443)));
        assert_eq!(split("https://[::1]:8200"), Ok((true, "::1".into(), 8200)));
        for bad in ["vault:8200", "http://", "http://h:x", "https://h/v1", "http://u@h", "https://[::1"] {
            assert!(parse_base(bad).is_err(), "{bad}");
        }
    }
}
