//! A small HTTP/1.1 client for Vault's API, on hyper and tokio-rustls (already in meshca's tree).
//!
//! One connection per request: the Vault mode makes a handful of calls per intermediate, so
//! pooling buys nothing and a fresh connection is one less state to get wrong after an outage.
//! Everything — connect, TLS handshake, request, response body — runs under one deadline, and
//! the connection is driven inside the request's own future, so a Vault that hangs (stopped,
//! not dead) costs a timeout and leaves no task behind.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Largest response body accepted (Vault's answers are a few KB).
const MAX_BODY: usize = 1 << 20;

/// Where system CA bundles usually are, when no CA file is given for an https Vault.
const SYSTEM_BUNDLES: [&str; 3] =
    ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem"];

/// A response.
pub(crate) struct Response {
    pub status: u16,
    pub body: Bytes,
}

/// A client for one base address (`http(s)://host[:port]`).
pub(crate) struct HttpClient {
    host: String,
    port: u16,
    /// `host:port` as sent in `Host`.
    authority: String,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    timeout: Duration,
}

/// Splits `http(s)://host[:port][/]` into (https?, host, port).
pub(crate) fn parse_base(url: &str) -> Result<(bool, String, u16), String> {
    let (https, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(format!("{url:?} must start with http:// or https://"));
    };
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') || authority.contains('@') {
        return Err(format!("{url:?} must be just a scheme, a host and an optional port (Vault serves /v1/ itself)"));
    }
    let default_port = if https { 443 } else { 80 };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or_else(|| format!("{url:?}: unclosed [ in the host"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| format!("{url:?}: bad port {p:?}"))?,
            None if after.is_empty() => default_port,
            None => return Err(format!("{url:?}: unexpected {after:?} after the host")),
        };
        (h.to_string(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().map_err(|_| format!("{url:?}: bad port {p:?}"))?),
            None => (authority.to_string(), default_port),
        }
    };
    if host.is_empty() {
        return Err(format!("{url:?} has no host"));
    }
    Ok((https, host, port))
}

impl HttpClient {
    /// A client for `base`. For https, the server is verified against `ca_file` (PEM), or the
    /// system bundle when none is given.
    pub(crate) fn new(base: &str, ca_file: Option<&Path>, timeout: Duration) -> Result<Self, String> {
        let (https, host, port) = parse_base(base)?;
        let authority = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
        let tls = if https {
            let roots = load_roots(ca_file)?;
            let mut config = meshca_tls::client_config(
                meshca_tls::ServerTrust::Store(roots),
                meshca_tls::ClientAuth::None,
                meshca_tls::Versions::Tls13And12,
            )
            .map_err(|e| format!("TLS configuration: {e}"))?;
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            let name =
                ServerName::try_from(host.clone()).map_err(|e| format!("{host:?} is not a TLS server name: {e}"))?;
            Some((TlsConnector::from(Arc::new(config)), name))
        } else {
            None
        };
        Ok(HttpClient { host, port, authority, tls, timeout })
    }

    /// Sends one request; `headers` values marked sensitive are never printed by hyper.
    pub(crate) async fn send(
        &self,
        method: http::Method,
        path_and_query: &str,
        headers: &[(&str, &str, bool)],
        body: Option<Vec<u8>>,
    ) -> Result<Response, String> {
        let mut builder = http::Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(http::header::HOST, &self.authority)
            .header(http::header::CONNECTION, "close")
            .header(http::header::ACCEPT, "application/json");
        if body.is_some() {
            builder = builder.header(http::header::CONTENT_TYPE, "application/json");
        }
        for (name, value, sensitive) in headers {
            let mut v = http::HeaderValue::from_str(value).map_err(|_| format!("header {name} has a bad value"))?;
            v.set_sensitive(*sensitive);
            builder = builder.header(*name, v);
        }
        let req = builder
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| format!("building the request: {e}"))?;
        let exchange = async {
            let tcp = TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| format!("connecting to {}: {e}", self.authority))?;
            let _ = tcp.set_nodelay(true);
            match &self.tls {
                Some((connector, name)) => {
                    let tls = connector
                        .connect(name.clone(), tcp)
                        .await
                        .map_err(|e| format!("TLS handshake with {}: {e}", self.authority))?;
                    exchange(TokioIo::new(tls), req).await
                }
                None => exchange(TokioIo::new(tcp), req).await,
            }
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| format!("no answer from {} within {:?}", self.authority, self.timeout))?
    }
}

/// One request/response on a fresh connection, driving the connection in this future.
async fn exchange<T>(io: TokioIo<T>, req: http::Request<Full<Bytes>>) -> Result<Response, String>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(io).await.map_err(|e| format!("HTTP: {e}"))?;
    let call = async {
        let resp = sender.send_request(req).await.map_err(|e| format!("HTTP: {e}"))?;
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| format!("reading the response: {e}"))?
            .to_bytes();
        Ok(Response { status, body })
    };
    tokio::pin!(call, conn);
    let mut conn_done = false;
    loop {
        tokio::select! {
            r = &mut call => return r,
            c = &mut conn, if !conn_done => {
                conn_done = true;
                if let Err(e) = c {
                    return Err(format!("HTTP connection: {e}"));
                }
            }
        }
    }
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
        assert_eq!(parse_base("http://127.0.0.1:8200"), Ok((false, "127.0.0.1".into(), 8200)));
        assert_eq!(parse_base("https://vault.example.com/"), Ok((true, "vault.example.com".into(), 443)));
        assert_eq!(parse_base("https://[::1]:8200"), Ok((true, "::1".into(), 8200)));
        for bad in ["vault:8200", "http://", "http://h:x", "https://h/v1", "http://u@h", "https://[::1"] {
            assert!(parse_base(bad).is_err(), "{bad}");
        }
    }
}
