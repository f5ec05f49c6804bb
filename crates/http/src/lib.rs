//! A small HTTP/1.1 client on hyper and tokio-rustls, for the few outbound calls meshca makes:
//! Vault's API, and fetching other trust domains' SPIFFE bundles.
//!
//! One connection per request: these callers make a handful of calls now and then, so pooling
//! buys nothing and a fresh connection is one less state to get wrong after an outage.
//! Everything — connect, TLS handshake, request, response body — runs under one deadline, and
//! the connection is driven inside the request's own future, so a server that hangs (stopped,
//! not dead) costs a timeout and leaves no task behind. The body is read up to a limit and no
//! further, so a hostile server cannot make the caller hold an arbitrary amount of data.
//!
//! How the server is authenticated is the caller's choice: it passes the rustls configuration
//! (a CA file's roots for Vault; Web PKI roots or a SPIFFE verifier for a bundle endpoint).
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// A response.
#[derive(Debug)]
pub struct Response {
    /// The HTTP status.
    pub status: u16,
    /// The body (at most the client's limit).
    pub body: Bytes,
}

/// Why a request got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The address is not `http(s)://host[:port]` (with a path where one is allowed).
    #[error("{0}")]
    Url(String),
    /// The request could not be built (a header value that HTTP cannot carry).
    #[error("{0}")]
    Request(String),
    /// The TCP connection failed.
    #[error("connecting to {authority}: {source}")]
    Connect {
        /// `host:port`.
        authority: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed (the server's certificate was refused, most often).
    #[error("TLS handshake with {authority}: {source}")]
    Handshake {
        /// `host:port`.
        authority: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// HTTP itself failed.
    #[error("HTTP: {0}")]
    Http(#[source] hyper::Error),
    /// The body is larger than the client's limit.
    #[error("the answer from {authority} is larger than {limit} bytes")]
    TooLarge {
        /// `host:port`.
        authority: String,
        /// The limit.
        limit: usize,
    },
    /// Reading the body failed.
    #[error("reading the answer from {authority}: {reason}")]
    Body {
        /// `host:port`.
        authority: String,
        /// Why.
        reason: String,
    },
    /// Nothing (or not all of it) came back in time.
    #[error("no answer from {authority} within {after:?}")]
    Timeout {
        /// `host:port`.
        authority: String,
        /// The deadline.
        after: Duration,
    },
}

/// An `http(s)://host[:port][/path]` address, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// `https`?
    pub https: bool,
    /// The host (an IPv6 address without brackets).
    pub host: String,
    /// The port (the scheme's default when absent).
    pub port: u16,
    /// The path and query, `/` when absent.
    pub path: String,
}

impl Url {
    /// Parses `http(s)://host[:port][/path]`. User information (`user@`) is refused: nothing
    /// meshca calls takes credentials in the URL.
    pub fn parse(url: &str) -> Result<Url, HttpError> {
        let bad = |why: String| HttpError::Url(format!("{url:?}: {why}"));
        let (https, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(bad("must start with http:// or https://".into()));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.contains('@') {
            return Err(bad("user information (user@host) is not accepted".into()));
        }
        let default_port = if https { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(|| bad("unclosed [ in the host".into()))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| bad(format!("bad port {p:?}")))?,
                None if after.is_empty() => default_port,
                None => return Err(bad(format!("unexpected {after:?} after the host"))),
            };
            (h.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse().map_err(|_| bad(format!("bad port {p:?}")))?),
                None => (authority.to_string(), default_port),
            }
        };
        if host.is_empty() {
            return Err(bad("no host".into()));
        }
        Ok(Url { https, host, port, path: path.to_string() })
    }

    /// `host:port` as sent in `Host` (IPv6 in brackets).
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// A client for one server.
pub struct Client {
    host: String,
    port: u16,
    authority: String,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    timeout: Duration,
    max_body: usize,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("authority", &self.authority).field("tls", &self.tls.is_some()).finish()
    }
}

impl Client {
    /// A client for the server of `url` (its path is the caller's to send). An https `url`
    /// needs `tls`, whose verifier authenticates the server (under the URL's host as server
    /// name); ALPN is set to HTTP/1.1. Each request must finish within `timeout` and its body
    /// fit in `max_body` bytes.
    pub fn new(
        url: &Url,
        tls: Option<rustls::ClientConfig>,
        timeout: Duration,
        max_body: usize,
    ) -> Result<Self, HttpError> {
        let tls = match (url.https, tls) {
            (false, _) => None,
            (true, None) => return Err(HttpError::Url("an https address needs a TLS configuration".into())),
            (true, Some(mut config)) => {
                config.alpn_protocols = vec![b"http/1.1".to_vec()];
                let name = ServerName::try_from(url.host.clone())
                    .map_err(|e| HttpError::Url(format!("{:?} is not a TLS server name: {e}", url.host)))?;
                Some((TlsConnector::from(Arc::new(config)), name))
            }
        };
        Ok(Client { host: url.host.clone(), port: url.port, authority: url.authority(), tls, timeout, max_body })
    }

    /// Sends one request; `headers` values marked sensitive are never printed by hyper.
    pub async fn send(
        &self,
        method: http::Method,
        path_and_query: &str,
        headers: &[(&str, &str, bool)],
        body: Option<Vec<u8>>,
    ) -> Result<Response, HttpError> {
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
            let mut v = http::HeaderValue::from_str(value)
                .map_err(|_| HttpError::Request(format!("header {name} has a bad value")))?;
            v.set_sensitive(*sensitive);
            builder = builder.header(*name, v);
        }
        let req = builder
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| HttpError::Request(format!("building the request: {e}")))?;
        let exchange = async {
            let authority = || self.authority.clone();
            let tcp = TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|source| HttpError::Connect { authority: authority(), source })?;
            let _ = tcp.set_nodelay(true);
            match &self.tls {
                Some((connector, name)) => {
                    let tls = connector
                        .connect(name.clone(), tcp)
                        .await
                        .map_err(|source| HttpError::Handshake { authority: authority(), source })?;
                    self.exchange(TokioIo::new(tls), req).await
                }
                None => self.exchange(TokioIo::new(tcp), req).await,
            }
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| HttpError::Timeout { authority: self.authority.clone(), after: self.timeout })?
    }

    /// One request/response on a fresh connection, driving the connection in this future.
    async fn exchange<T>(&self, io: TokioIo<T>, req: http::Request<Full<Bytes>>) -> Result<Response, HttpError>
    where
        T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(io).await.map_err(HttpError::Http)?;
        let call = async {
            let resp = sender.send_request(req).await.map_err(HttpError::Http)?;
            let status = resp.status().as_u16();
            let body = Limited::new(resp.into_body(), self.max_body).collect().await.map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    HttpError::TooLarge { authority: self.authority.clone(), limit: self.max_body }
                } else {
                    HttpError::Body { authority: self.authority.clone(), reason: e.to_string() }
                }
            })?;
            Ok(Response { status, body: body.to_bytes() })
        };
        tokio::pin!(call, conn);
        let mut conn_done = false;
        loop {
            tokio::select! {
                r = &mut call => return r,
                c = &mut conn, if !conn_done => {
                    conn_done = true;
                    if let Err(e) = c {
                        return Err(HttpError::Http(e));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_scheme_host_port_and_path() {
        let u = Url::parse("https://bundle.example:8443/spiffe/bundle").expect("url");
        assert_eq!(
            (u.https, u.host.as_str(), u.port, u.path.as_str()),
            (true, "bundle.example", 8443, "/spiffe/bundle")
        );
        assert_eq!(u.authority(), "bundle.example:8443");
        let u = Url::parse("http://127.0.0.1:8200").expect("url");
        assert_eq!((u.https, u.port, u.path.as_str()), (false, 8200, "/"));
        let u = Url::parse("https://[::1]/").expect("url");
        assert_eq!((u.host.as_str(), u.port, u.authority()), ("::1", 443, "[::1]:443".to_string()));
        for bad in ["vault:8200", "http://", "http://h:x", "http://u@h", "https://[::1", "ftp://h"] {
            assert!(Url::parse(bad).is_err(), "{bad}");
        }
    }
}
