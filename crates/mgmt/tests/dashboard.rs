//! The dashboard as the management plane serves it, in-process but over real TLS sockets: the
//! whole server (`serve_with` with a dashboard listener) on a manual clock, and an HTTPS client
//! (hyper over rustls) that trusts only the relay CA. What a browser without a credential gets
//! (the login page, never data), the login token's session and its cookie, the operator's client
//! certificate, certificates that must not open it, the security headers, and the document the
//! page renders being exactly the one `meshca status -o json` prints.
//!
//! The page itself, in a real Chromium, is tested in `crates/meshca/tests/dashboard_browser.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use meshca_clock::{Clock, ManualClock};
use meshca_dashboard::LoginToken;
use meshca_mgmt::records::{self, ClusterRecord, IssuedLog, IssuedRecord, StatusRecord};
use meshca_mgmt::relay::RelayCa;
use meshca_mgmt::server::creds;
use meshca_mgmt::{DashboardListener, ServeWith, ServerOptions, Settings};
use meshca_pki::{Cert, KeyAlgorithm, PrivateKey, RootSet};
use meshca_policy::Policy;
use meshca_proto::identity::Caller;
use meshca_proto::mgmt::GetStatusRequest;
use meshca_proto::mgmt::operator_client::OperatorClient;
use meshca_store::dir::DirStore;
use meshca_store::{Precondition, typed};
use meshca_tls::{ClientAuth, Identity, ServerTrust, Versions};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// A management plane with its dashboard, and what a client needs to reach it.
struct Plane {
    dir: tempfile::TempDir,
    clock: ManualClock,
    store: Arc<DirStore>,
    grpc: SocketAddr,
    dashboard: SocketAddr,
    token: LoginToken,
    stop: CancellationToken,
}

impl Drop for Plane {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Plane {
    async fn start() -> Plane {
        meshca_tls::provider::install();
        let dir = tempfile::tempdir().unwrap();
        // Real time, frozen: clients check the certificates against the wall clock.
        let clock = ManualClock::new(SystemTime::now());
        let store = Arc::new(DirStore::open(dir.path().join("store")).unwrap());
        let token = LoginToken::generate().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dashboard = listener.local_addr().unwrap();
        let opts = ServerOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            hostnames: vec!["localhost".into()],
            policy_yaml: None,
            default_policy: Policy::generated_default(Duration::from_secs(3600)),
            operator_dir: Some(dir.path().join("operator")),
            settings: Settings::default(),
            issue_burst: 5,
            issue_per_minute: 6.0,
            metrics_listen: None,
            metrics_token: None,
            peer_rate: meshca_mgmt::server::DEFAULT_PEER_RATE,
            serve: meshca_serve::ServeConfig::default(),
        };
        let with = ServeWith {
            clock: clock.shared(),
            dashboard: Some(DashboardListener { listener, login: token.digest() }),
            ..Default::default()
        };
        let stop = CancellationToken::new();
        let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
        let server_store = store.clone();
        let server_stop = stop.clone();
        tokio::spawn(async move {
            let r = meshca_mgmt::serve_with(
                server_store,
                opts,
                with,
                move |a| {
                    let _ = bound_tx.send(a);
                },
                server_stop.cancelled_owned(),
            )
            .await;
            if let Err(e) = r {
                eprintln!("management plane: {e}");
            }
        });
        let grpc = bound_rx.await.expect("the management plane starts");
        Plane { dir, clock, store, grpc, dashboard, token, stop }
    }

    fn operator_dir(&self) -> PathBuf {
        self.dir.path().join("operator")
    }

    fn relay(&self) -> RootSet {
        RootSet::from_pem(&std::fs::read(self.operator_dir().join(creds::RELAY_CA)).unwrap()).unwrap()
    }

    /// A client that trusts the relay CA and presents nothing.
    fn anonymous(&self) -> rustls::ClientConfig {
        meshca_tls::client_config(ServerTrust::Roots(&self.relay()), ClientAuth::None, Versions::Tls13).unwrap()
    }

    /// A client presenting a relay-CA identity for `caller`.
    async fn identity(&self, caller: Caller) -> rustls::ClientConfig {
        let relay = RelayCa::load_or_create(self.store.as_ref(), self.clock.now()).await.unwrap();
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let cert =
            relay.issue_identity(key.public_key_spki(), &caller, Duration::from_secs(3600), self.clock.now()).unwrap();
        let id = Identity::new(&cert, &[], &key);
        meshca_tls::client_config(ServerTrust::Roots(&self.relay()), ClientAuth::Identity(id), Versions::Tls13).unwrap()
    }

    /// A cluster that registered and reported, so the document has a cluster in it.
    async fn add_cluster(&self, name: &str) {
        let now = meshca_clock::unix(self.clock.now());
        let rec = ClusterRecord { name: name.into(), registered_at: now, ..Default::default() };
        typed::put(self.store.as_ref(), &records::cluster(name).unwrap(), &rec, Precondition::Absent).await.unwrap();
        let st = StatusRecord {
            reported_at: now,
            phase: meshca_proto::Phase::Ready,
            intermediate_serial: "0A1B2C".into(),
            intermediate_not_before: now - 60,
            intermediate_not_after: now + 3000,
            next_renewal: now + 2400,
            key_location: "store".into(),
            ..Default::default()
        };
        typed::put(self.store.as_ref(), &records::status(name).unwrap(), &st, Precondition::Any).await.unwrap();
        let issued = IssuedLog::from_records(vec![IssuedRecord {
            serial: "0A1B2C".into(),
            not_after: now + 3000,
            issued_at: now - 60,
            reason: meshca_proto::IssueReason::Initial,
            not_before: now - 180,
            key_algorithm: "ECDSA P-256".into(),
            policy_generation: String::new(),
            public_key_sha256: String::new(),
            issuer_fingerprint: String::new(),
        }]);
        let stored = issued.to_secret(meshca_store::Store::partial_writes(self.store.as_ref())).unwrap();
        meshca_store::Store::put(self.store.as_ref(), &records::issued(name).unwrap(), &stored, Precondition::Any)
            .await
            .unwrap();
    }
}

/// An HTTP response.
struct Resp {
    status: u16,
    headers: hyper::HeaderMap,
    body: String,
}

impl Resp {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }
}

/// One HTTP/1.1 request over a fresh TLS connection to `addr` (server name `localhost`).
async fn request(
    addr: SocketAddr,
    config: rustls::ClientConfig,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<Resp, String> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let tls = connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req =
        hyper::Request::builder().method(method).uri(path).header("host", format!("localhost:{}", addr.port()));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = sender
        .send_request(req.body(Full::new(Bytes::from(body.to_string()))).unwrap())
        .await
        .map_err(|e| format!("{e}: {:?}", std::error::Error::source(&e)))?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Resp { status, headers, body: String::from_utf8_lossy(&body).into_owned() })
}

async fn get(p: &Plane, config: rustls::ClientConfig, path: &str, cookie: Option<&str>) -> Resp {
    let headers: Vec<(&str, &str)> = cookie.map(|c| vec![("cookie", c)]).unwrap_or_default();
    request(p.dashboard, config, "GET", path, &headers, "").await.unwrap()
}

async fn login(p: &Plane, token: &str, extra: &[(&str, &str)]) -> Resp {
    let mut headers = vec![("content-type", "application/x-www-form-urlencoded")];
    headers.extend_from_slice(extra);
    request(p.dashboard, p.anonymous(), "POST", "/login", &headers, &format!("token={token}")).await.unwrap()
}

/// The `name=value` of a `Set-Cookie` header, as a browser sends it back.
fn cookie_of(resp: &Resp) -> String {
    resp.header("set-cookie").split(';').next().unwrap().to_string()
}

fn assert_security_headers(r: &Resp, what: &str) {
    let csp = r.header("content-security-policy");
    assert_eq!(csp, meshca_dashboard::http::CSP, "{what}");
    for directive in ["default-src 'self'", "frame-ancestors 'none'", "object-src 'none'", "base-uri 'none'"] {
        assert!(csp.contains(directive), "{what}: {directive} in {csp}");
    }
    assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"), "{what}: {csp}");
    assert_eq!(r.header("x-content-type-options"), "nosniff", "{what}");
    assert_eq!(r.header("x-frame-options"), "DENY", "{what}");
    assert_eq!(r.header("referrer-policy"), "same-origin", "{what}");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_credential_there_is_a_login_page_and_no_data() {
    let p = Plane::start().await;
    p.add_cluster("cluster-1").await;
    let page = get(&p, p.anonymous(), "/", None).await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains(r#"<form method="post" action="/login""#), "{}", page.body);
    assert!(!page.body.contains("cluster-1") && !page.body.contains("/app.js"), "the login page holds no data");
    assert_eq!(page.header("cache-control"), "no-store");
    assert_security_headers(&page, "login page");

    let api = get(&p, p.anonymous(), "/api/status", None).await;
    assert_eq!(api.status, 401, "{}", api.body);
    assert!(!api.body.contains("cluster-1") && !api.body.contains("trustDomain"), "{}", api.body);
    assert_security_headers(&api, "401");
    // A made-up session cookie is no credential either.
    let forged = get(&p, p.anonymous(), "/api/status", Some("__Host-meshca-session=AAAA")).await;
    assert_eq!(forged.status, 401);
    let wrong = login(&p, "not-the-token", &[]).await;
    assert_eq!(wrong.status, 401);
    assert!(wrong.body.contains("That is not this server's login token"), "{}", wrong.body);
    assert!(wrong.headers.get("set-cookie").is_none());
    // Static files hold no data and are public; they are still under the same headers.
    let js = get(&p, p.anonymous(), "/app.js", None).await;
    assert_eq!((js.status, js.header("content-type")), (200, "text/javascript; charset=utf-8"));
    assert_security_headers(&js, "app.js");
    assert_eq!(get(&p, p.anonymous(), "/nothing-here", None).await.status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_login_token_opens_a_session_until_it_expires_or_logs_out() {
    let p = Plane::start().await;
    p.add_cluster("cluster-1").await;
    let ok = login(&p, p.token.secret(), &[("origin", &format!("https://localhost:{}", p.dashboard.port()))]).await;
    assert_eq!(ok.status, 303, "{}", ok.body);
    assert_eq!(ok.header("location"), "/");
    let set = ok.header("set-cookie");
    for attribute in ["Path=/", "Secure", "HttpOnly", "SameSite=Strict", "Max-Age=43200"] {
        assert!(set.split("; ").any(|a| a == attribute), "{attribute} in {set}");
    }
    assert!(set.starts_with("__Host-meshca-session="), "{set}");
    let cookie = cookie_of(&ok);
    assert!(!cookie.contains(p.token.secret()), "the session id is not the token");

    let page = get(&p, p.anonymous(), "/", Some(&cookie)).await;
    assert!(page.body.contains(r#"<script src="/app.js" defer></script>"#), "the dashboard page: {}", page.body);
    let api = get(&p, p.anonymous(), "/api/status", Some(&cookie)).await;
    assert_eq!(api.status, 200, "{}", api.body);
    let doc: serde_json::Value = serde_json::from_str(&api.body).unwrap();
    assert_eq!(doc["clusters"][0]["name"], "cluster-1");
    assert_eq!(doc["clusters"][0]["intermediateSerial"], "0A1B2C");

    // The session ends with its expiry, on the management plane's clock.
    p.clock.advance(meshca_dashboard::SESSION_TTL - Duration::from_secs(1));
    assert_eq!(get(&p, p.anonymous(), "/api/status", Some(&cookie)).await.status, 200);
    p.clock.advance(Duration::from_secs(1));
    assert_eq!(get(&p, p.anonymous(), "/api/status", Some(&cookie)).await.status, 401, "expired");

    // Logging out ends a session at once and clears the cookie.
    let cookie = cookie_of(&login(&p, p.token.secret(), &[]).await);
    assert_eq!(get(&p, p.anonymous(), "/api/status", Some(&cookie)).await.status, 200);
    let out = request(p.dashboard, p.anonymous(), "POST", "/logout", &[("cookie", &cookie)], "").await.unwrap();
    assert_eq!(out.status, 303);
    assert!(out.header("set-cookie").contains("Max-Age=0"), "{}", out.header("set-cookie"));
    assert_eq!(get(&p, p.anonymous(), "/api/status", Some(&cookie)).await.status, 401, "logged out");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_form_from_another_site_cannot_log_in() {
    let p = Plane::start().await;
    for headers in
        [vec![("origin", "https://evil.example")], vec![("origin", "null")], vec![("sec-fetch-site", "cross-site")]]
    {
        let r = login(&p, p.token.secret(), &headers).await;
        assert_eq!(r.status, 403, "{headers:?}");
        assert!(r.headers.get("set-cookie").is_none(), "{headers:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_operator_certificate_opens_it_and_no_other_certificate_does() {
    let p = Plane::start().await;
    p.add_cluster("cluster-1").await;
    // The credentials `meshca server` wrote for the operator.
    let operator = creds::client_config(&p.operator_dir()).unwrap();
    let api = get(&p, operator, "/api/status", None).await;
    assert_eq!(api.status, 200, "{}", api.body);
    assert!(api.body.contains("cluster-1"));
    let another = p.identity(Caller::Operator { name: "alice".into() }).await;
    assert!(get(&p, another, "/", None).await.body.contains("/app.js"), "any operator's certificate opens it");

    // A cluster's agent identity, from the same relay CA, is refused in the handshake.
    let agent = p.identity(Caller::Agent { cluster: "cluster-1".into() }).await;
    let r = request(p.dashboard, agent, "GET", "/api/status", &[], "").await;
    assert!(r.is_err(), "an agent's certificate must not open the dashboard: {:?}", r.map(|r| r.status));

    // An operator-looking identity from another CA is refused too.
    let other = meshca_pki::CaSigner::new_root(
        PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(),
        &meshca_pki::RootParams {
            organization: "meshca".into(),
            common_name: "meshca relay CA".into(),
            ttl: Duration::from_secs(3600),
        },
        p.clock.now(),
    )
    .unwrap();
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let id =
        meshca_pki::SpiffeId::new(meshca_pki::TrustDomain::new("meshca.internal").unwrap(), "operator/admin").unwrap();
    let cert: Cert = other
        .sign_leaf(
            key.public_key_spki(),
            &meshca_pki::LeafParams::workload(id, Duration::from_secs(600)),
            p.clock.now(),
        )
        .unwrap()
        .parse()
        .unwrap();
    let forged = meshca_tls::client_config(
        ServerTrust::Roots(&p.relay()),
        ClientAuth::Identity(Identity::new(&cert, &[], &key)),
        Versions::Tls13,
    )
    .unwrap();
    let r = request(p.dashboard, forged, "GET", "/api/status", &[], "").await;
    assert!(r.is_err(), "a certificate from another CA must not open the dashboard");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_page_renders_the_document_meshca_status_prints() {
    let p = Plane::start().await;
    p.add_cluster("cluster-1").await;
    p.add_cluster("cluster-2").await;
    // What `meshca status -o json` prints: the operator API's status through status::document.
    meshca_tls::provider::install();
    let channel =
        meshca_tls::grpc::channel(&p.grpc.to_string(), creds::client_config(&p.operator_dir()).unwrap(), "localhost")
            .unwrap();
    let st = OperatorClient::new(channel).get_status(GetStatusRequest::default()).await.unwrap().into_inner();
    let cli = meshca_mgmt::status::document(&st);
    let cookie = cookie_of(&login(&p, p.token.secret(), &[]).await);
    let api = get(&p, p.anonymous(), "/api/status", Some(&cookie)).await;
    assert_eq!(api.header("content-type"), "application/json");
    let page: serde_json::Value = serde_json::from_str(&api.body).unwrap();
    // The clock stands still, so even `now` and "connected" agree.
    assert_eq!(page, cli);
    assert_eq!(page["clusters"].as_array().map(Vec::len), Some(2));
}

/// Every file in a folder (recursively), as text.
fn files_under(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let path = e.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else if let Ok(text) = std::fs::read_to_string(&path) {
            out.push((path, text));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn no_key_token_or_secret_reaches_the_page() {
    let p = Plane::start().await;
    p.add_cluster("cluster-1").await;
    let ok = login(&p, p.token.secret(), &[]).await;
    let cookie = cookie_of(&ok);
    let session = cookie.split_once('=').unwrap().1.to_string();
    let mut bodies = vec![ok.body];
    for path in ["/", "/api/status", "/app.js", "/login.js", "/app.css", "/d3.min.js", "/favicon.svg"] {
        bodies.push(get(&p, p.anonymous(), path, Some(&cookie)).await.body);
    }
    bodies.push(get(&p, p.anonymous(), "/", None).await.body);
    bodies.push(login(&p, "wrong", &[]).await.body);
    // Every secret the management plane holds: the keys and tokens in its store and the
    // operator's credentials (the base64 lines of each PEM key, which a leak would carry).
    let mut secrets = vec![p.token.secret().to_string(), session];
    for (_, text) in files_under(p.dir.path()) {
        if text.contains("PRIVATE KEY") {
            secrets.extend(text.lines().filter(|l| !l.starts_with("-----") && l.len() > 20).map(str::to_string));
        }
    }
    assert!(secrets.len() > 4, "the root, relay and operator keys were found: {}", secrets.len());
    for body in &bodies {
        assert!(!body.contains("PRIVATE KEY"));
        for s in &secrets {
            assert!(!body.contains(s.as_str()), "a secret reached the page");
        }
    }
}

/// The page reads the status document by field name; a field renamed on one side only would
/// leave the page silently blank. Every field the page reads is in the document the server makes
/// (here with a reporting cluster and its issuance record, a silent one and its alert, and the
/// root), and the page's script reads each of them.
#[tokio::test(flavor = "multi_thread")]
async fn every_field_the_page_reads_is_in_the_document() {
    let p = Plane::start().await;
    p.add_cluster("cluster-1").await;
    // Registered and never reported: an alert.
    let rec = ClusterRecord { name: "cluster-2".into(), registered_at: 1, ..Default::default() };
    typed::put(p.store.as_ref(), &records::cluster("cluster-2").unwrap(), &rec, Precondition::Absent).await.unwrap();
    let cookie = cookie_of(&login(&p, p.token.secret(), &[]).await);
    let doc: serde_json::Value =
        serde_json::from_str(&get(&p, p.anonymous(), "/api/status", Some(&cookie)).await.body).unwrap();
    let script = std::str::from_utf8(meshca_dashboard::assets::find("/app.js").unwrap().body).unwrap();
    // What app.js reads of each object of the document, by name.
    let fields: [(&str, &serde_json::Value, &str); 6] = [
        (
            "document",
            &doc,
            "trustDomain caMode rootSetFingerprint policyGeneration policyError now rootNotAfter \
             rootRotationThreshold roots upstreamIntermediate clusters alerts",
        ),
        ("root", &doc["roots"][0], "subject serial notBefore notAfter fingerprint keyAlgorithm"),
        (
            "cluster",
            &doc["clusters"][0],
            "name registered enrolled connected lastSeen phase intermediateSerial intermediateNotAfter \
             intermediateNotBefore intermediateCertNotBefore keyAlgorithm issuerFingerprint lastRenewal \
             nextRenewal lastError keyLocation issued",
        ),
        ("issued record", &doc["clusters"][0]["issued"][0], "serial notAfter issuedAt reason keyAlgorithm"),
        ("upstream", &doc["upstreamIntermediate"], "subject notAfter"),
        ("alert", &doc["alerts"][0], "kind cluster message"),
    ];
    for (what, value, names) in fields {
        for name in names.split_whitespace() {
            assert!(value.get(name).is_some(), "the {what} has no {name:?}: {value}");
            assert!(script.contains(&format!(".{name}")), "app.js does not read {what}.{name}");
        }
    }
}
