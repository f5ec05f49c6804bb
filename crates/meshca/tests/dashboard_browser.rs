//! The dashboard in a real browser: Debian's Chromium, headless, driven over the DevTools protocol
//! (chromiumoxide), trusting exactly the dashboard's serving key (`--ignore-certificate-errors-spki-list`
//! with the key of a certificate the test first verified against the relay CA itself).
//!
//! - Against a real `meshca up`: the printed URL logs in; the page loads without a console error;
//!   every cluster shows with the serial of the intermediate in its `cacerts`; the timeline has
//!   one bar per certificate; `meshca rotate cluster-1` shows on the page within 10 s without a
//!   reload; nothing secret is in the page; after logging out there is a login page and no data.
//! - Readability at 200 clusters: the page rendering a status document with 200 clusters (made
//!   by `meshca_mgmt::status::document`, as the server makes it) has no overlapping label and
//!   no text overflowing its card, measured on the page's own layout.
//!
//! Screenshots of the tree and of the timeline are saved under `$CARGO_TARGET_TMPDIR/dashboard/`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use chromiumoxide::Page;
use chromiumoxide::cdp::browser_protocol::emulation::SetDeviceMetricsOverrideParams;
use chromiumoxide::cdp::browser_protocol::log::EventEntryAdded;
use chromiumoxide::cdp::browser_protocol::page::{CaptureScreenshotFormat, Viewport};
use chromiumoxide::cdp::js_protocol::runtime::{EventConsoleApiCalled, EventExceptionThrown};
use chromiumoxide::page::ScreenshotParams;
use common::*;
use futures::StreamExt;
use meshca_pki::{Cert, RootSet};
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Where the screenshots go.
fn output_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The base64 SHA-256 of the public key of the certificate the dashboard at `port` serves, after
/// checking that it chains to `relay` for `localhost` (rustls does, trusting nothing else).
fn serving_key_pin(port: u16, relay: &RootSet) -> String {
    meshca_tls::provider::install();
    let config = meshca_tls::client_config(
        meshca_tls::ServerTrust::Roots(relay),
        meshca_tls::ClientAuth::None,
        meshca_tls::Versions::Tls13,
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let leaf = rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.unwrap();
        tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    });
    let cert = Cert::from_der(leaf).unwrap();
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cert.spki_der());
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

/// Headless Chromium with a fresh profile, killed when dropped.
struct Chromium {
    rt: tokio::runtime::Runtime,
    browser: chromiumoxide::Browser,
    _proc: Proc,
    _profile: tempfile::TempDir,
}

impl Chromium {
    /// Starts Chromium trusting the serving key `pin` (and no other certificate error).
    fn start(dir: &Path, pin: &str) -> Chromium {
        let bin = meshca_testsupport::peers::peer_bin("MESHCA_CHROMIUM_BIN", "scripts/peers/chromium.sh");
        let profile = tempfile::tempdir().unwrap();
        let mut cmd = std::process::Command::new(bin);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            &format!("--user-data-dir={}", profile.path().display()),
            &format!("--ignore-certificate-errors-spki-list={pin}"),
            "about:blank",
        ]);
        let mut proc = Proc::spawn(cmd, "chromium", dir);
        // Chromium writes its DevTools port and browser path here once it listens.
        let active = profile.path().join("DevToolsActivePort");
        let ws = wait_for(Duration::from_secs(30), "Chromium's DevTools port", || {
            proc.assert_running();
            let text = std::fs::read_to_string(&active).ok()?;
            let mut lines = text.lines();
            let (port, path) = (lines.next()?, lines.next()?);
            Some(format!("ws://127.0.0.1:{port}{path}"))
        });
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (browser, mut handler) = rt.block_on(chromiumoxide::Browser::connect(ws)).unwrap();
        rt.spawn(async move { while handler.next().await.is_some() {} });
        Chromium { rt, browser, _proc: proc, _profile: profile }
    }

    /// A new tab of `width`×`height` CSS pixels that records every console error, uncaught
    /// exception and browser log error (failed loads, CSP violations).
    fn tab(&self, width: i64, height: i64) -> Tab<'_> {
        let problems = Arc::new(Mutex::new(Vec::new()));
        let page = self.rt.block_on(async {
            let page = self.browser.new_page("about:blank").await.unwrap();
            page.execute(SetDeviceMetricsOverrideParams::new(width, height, 1.0, false)).await.unwrap();
            let mut console = page.event_listener::<EventConsoleApiCalled>().await.unwrap();
            let mut exceptions = page.event_listener::<EventExceptionThrown>().await.unwrap();
            let mut log = page.event_listener::<EventEntryAdded>().await.unwrap();
            page.enable_log().await.unwrap();
            let p = problems.clone();
            tokio::spawn(async move {
                while let Some(e) = console.next().await {
                    let kind = format!("{:?}", e.r#type).to_lowercase();
                    if kind.contains("error") || kind.contains("assert") {
                        let args: Vec<String> = e
                            .args
                            .iter()
                            .map(|a| a.value.as_ref().map(|v| v.to_string()).unwrap_or_default())
                            .collect();
                        p.lock().unwrap().push(format!("console.{kind}: {}", args.join(" ")));
                    }
                }
            });
            let p = problems.clone();
            tokio::spawn(async move {
                while let Some(e) = exceptions.next().await {
                    p.lock().unwrap().push(format!("uncaught: {:?}", e.exception_details));
                }
            });
            let p = problems.clone();
            tokio::spawn(async move {
                while let Some(e) = log.next().await {
                    let level = format!("{:?}", e.entry.level).to_lowercase();
                    if level.contains("error") {
                        p.lock().unwrap().push(format!("log {level}: {} {:?}", e.entry.text, e.entry.url));
                    }
                }
            });
            page
        });
        Tab { chromium: self, page, problems }
    }
}

/// A browser tab.
struct Tab<'a> {
    chromium: &'a Chromium,
    page: Page,
    problems: Arc<Mutex<Vec<String>>>,
}

impl Tab<'_> {
    fn goto(&self, url: &str) {
        self.chromium.rt.block_on(self.page.goto(url)).unwrap();
    }

    /// The value of the JavaScript function `f` (e.g. `() => document.title`) in the page.
    fn eval<T: DeserializeOwned>(&self, f: &str) -> T {
        let r = self.chromium.rt.block_on(self.page.evaluate_function(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        r.into_value().unwrap_or_else(|e| panic!("{f}: {e}"))
    }

    /// Waits until `f` returns something other than `null`, and returns it.
    fn wait<T: DeserializeOwned>(&self, timeout: Duration, what: &str, f: &str) -> T {
        wait_for(timeout, what, || {
            let r = self.chromium.rt.block_on(self.page.evaluate_function(f)).ok()?;
            r.into_value::<Option<T>>().ok().flatten()
        })
    }

    /// Saves a PNG of the element `selector` (all of it, also what is below the fold).
    fn screenshot(&self, selector: &str, path: &Path) {
        let r: Vec<f64> = self.eval(&format!(
            "() => {{ const r = document.querySelector('{selector}').getBoundingClientRect(); \
             return [r.left + scrollX, r.top + scrollY, r.width, r.height]; }}"
        ));
        let mut params = ScreenshotParams::builder()
            .format(CaptureScreenshotFormat::Png)
            .clip(Viewport { x: r[0], y: r[1], width: r[2], height: r[3], scale: 1.0 })
            .build();
        params.cdp_params.capture_beyond_viewport = Some(true);
        let png = self.chromium.rt.block_on(self.page.screenshot(params)).unwrap();
        std::fs::write(path, png).unwrap();
        eprintln!("screenshot: {}", path.display());
    }

    fn problems(&self) -> Vec<String> {
        self.problems.lock().unwrap().clone()
    }

    /// Waits for a logged problem containing `needle` (one the test caused on purpose) and
    /// removes it, so the check for the page's own problems later sees only those.
    fn take_problem(&self, timeout: Duration, needle: &str) {
        wait_until(timeout, &format!("the browser to log {needle:?}"), || {
            let mut p = self.problems.lock().unwrap();
            match p.iter().position(|e| e.contains(needle)) {
                Some(i) => {
                    p.remove(i);
                    true
                }
                None => false,
            }
        });
    }
}

/// Measures the page's layout: text in the timeline that overlaps other text, cards or nodes of
/// the tree that overlap each other, text that overflows its box in a card.
const LAYOUT: &str = r#"() => {
  const rects = (sel) => [...document.querySelectorAll(sel)]
    .map((e) => ({ e, r: e.getBoundingClientRect() }))
    .filter((b) => b.r.width > 0 && b.r.height > 0);
  const name = (e) => `${e.tagName}.${e.getAttribute('class')}:${e.textContent.slice(0, 40)}`;
  const overlaps = (list) => {
    const out = [];
    for (let i = 0; i < list.length; i++) {
      for (let j = i + 1; j < list.length; j++) {
        const a = list[i].r, b = list[j].r;
        if (a.left < b.right - 0.5 && b.left < a.right - 0.5 && a.top < b.bottom - 0.5 && b.top < a.bottom - 0.5) {
          out.push(`${name(list[i].e)} / ${name(list[j].e)}`);
        }
      }
    }
    return out;
  };
  const texts = rects('#timeline svg text');
  const boxes = rects('#tree .card, #tree .node');
  const overflowing = [...document.querySelectorAll('#tree .card dd, #tree .card .name, #tree .node dd, #tree .group-head')]
    .filter((e) => e.scrollWidth > e.clientWidth + 1)
    .map((e) => e.textContent);
  const body = document.querySelector('#timeline .tl-body');
  const rows = [...document.querySelectorAll('#tl-rows g.row')];
  return {
    texts: texts.length,
    textOverlaps: overlaps(texts).slice(0, 10),
    boxes: boxes.length,
    boxOverlaps: overlaps(boxes).slice(0, 10),
    overflowing: overflowing.slice(0, 10),
    rows: rows.length,
    rowHeight: rows.length > 1 ? rows[1].getBoundingClientRect().top - rows[0].getBoundingClientRect().top : 0,
    timelineScrolls: body.scrollHeight > body.clientHeight,
    timelineHeight: document.getElementById('timeline').getBoundingClientRect().height,
    viewport: innerHeight,
  };
}"#;

#[derive(serde::Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
struct Layout {
    texts: usize,
    text_overlaps: Vec<String>,
    boxes: usize,
    box_overlaps: Vec<String>,
    overflowing: Vec<String>,
    rows: usize,
    row_height: f64,
    timeline_scrolls: bool,
    timeline_height: f64,
    viewport: f64,
}

fn assert_readable(l: &Layout, what: &str) {
    assert!(l.texts > 0 && l.boxes > 0, "{what}: nothing measured: {l:?}");
    assert!(l.text_overlaps.is_empty(), "{what}: overlapping labels in the timeline: {:#?}", l.text_overlaps);
    assert!(l.box_overlaps.is_empty(), "{what}: overlapping nodes in the tree: {:#?}", l.box_overlaps);
    assert!(l.overflowing.is_empty(), "{what}: text overflowing its box: {:#?}", l.overflowing);
    assert!(l.timeline_height <= l.viewport, "{what}: the timeline fits on one screen: {l:?}");
}

/// The certificates of one cluster's `cacerts` ca-cert.pem.
fn cacerts_serial(cluster: &Value) -> String {
    let dir = Path::new(cluster["cacerts_dir"].as_str().unwrap());
    Cert::from_pem(&std::fs::read(dir.join("ca-cert.pem")).unwrap()).unwrap().serial_hex()
}

#[test]
fn the_dashboard_of_meshca_up_shows_the_live_mesh_in_chromium() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // Intermediates long enough that only the forced rotation below changes a serial.
    let (mut up, topology) = start_up(d, &["--clusters", "3", "--intermediate-ttl", "20m", "--leaf-ttl", "60s"]);
    let printed = up.log_text();
    let login_url = printed
        .split_whitespace()
        .find(|w| w.starts_with("https://localhost:") && w.contains("/#token="))
        .unwrap_or_else(|| panic!("meshca up prints the dashboard's URL with its login token:\n{printed}"))
        .to_string();
    let (url, token) = login_url.split_once("#token=").unwrap();
    assert_eq!(topology["management_plane"]["dashboard"], url, "topology.json has the URL, without the token");
    let port: u16 = url.trim_start_matches("https://localhost:").trim_end_matches('/').parse().unwrap();
    let credentials = PathBuf::from(topology["management_plane"]["credentials"].as_str().unwrap());
    let relay = RootSet::from_pem(&std::fs::read(credentials.join("relay-ca.pem")).unwrap()).unwrap();
    let chromium = Chromium::start(d, &serving_key_pin(port, &relay));
    let tab = chromium.tab(1400, 1000);

    // Without the token: the login page, and the data endpoint says 401.
    tab.goto(url);
    let login: Value = tab.wait(
        Duration::from_secs(10),
        "the login page",
        "() => document.getElementById('login-form') ? { clusters: document.querySelectorAll('[data-cluster]').length, \
         text: document.body.innerText } : null",
    );
    assert_eq!(login["clusters"], 0);
    assert!(!login["text"].as_str().unwrap().contains("cluster-1"), "{login}");
    let api: u16 = tab.eval("() => fetch('/api/status').then((r) => r.status)");
    assert_eq!(api, 401);
    // The browser logs that refused fetch as an error; it was this test's, not the page's. The log
    // event arrives on its own time, so wait for it and take out exactly it (and nothing else).
    tab.take_problem(Duration::from_secs(10), "401 (Unauthorized)");

    // The printed URL logs in and shows every cluster with the serial in its cacerts.
    tab.goto("about:blank");
    tab.goto(&login_url);
    let clusters = topology["clusters"].as_array().unwrap();
    let expected: Vec<(String, String)> =
        clusters.iter().map(|c| (c["name"].as_str().unwrap().to_string(), cacerts_serial(c))).collect();
    let shown = || -> Vec<(String, String)> {
        tab.eval(
            "() => [...document.querySelectorAll('[data-cluster]')].map((c) => \
             [c.dataset.cluster, c.querySelector('dd.serial').textContent])",
        )
    };
    wait_until(Duration::from_secs(30), "every cluster with its cacerts serial", || {
        up.assert_running();
        shown() == expected
    });
    let location: String = tab.eval("() => location.href");
    assert!(!location.contains(token), "the token leaves the address bar once used: {location}");

    // One bar per certificate of the tree: the roots and each cluster's intermediate.
    let doc: Value = tab.eval("() => fetch('/api/status').then((r) => r.json())");
    let bars: Vec<String> =
        tab.eval("() => [...document.querySelectorAll('#tl-rows rect.cert-bar')].map((b) => b.dataset.serial)");
    let mut want: Vec<String> =
        doc["roots"].as_array().unwrap().iter().map(|r| r["serial"].as_str().unwrap().into()).collect();
    want.extend(expected.iter().map(|(_, s)| s.clone()));
    let (mut got, mut want) = (bars.clone(), want);
    got.sort();
    want.sort();
    assert_eq!(got, want, "one bar per certificate");
    assert_readable(&tab.eval(LAYOUT), "3 clusters");
    let out = output_dir();
    tab.screenshot("#tree-panel", &out.join("tree.png"));
    tab.screenshot("#timeline-panel", &out.join("timeline.png"));

    // A forced rotation shows within 10 s, without a reload (a reload would drop the marker).
    let _: bool = tab.eval("() => { window.__sameDocument = true; return true; }");
    let old = &expected[0].1;
    let (ok, out_text, err) = run(&["rotate", "cluster-1", "--credentials", credentials.to_str().unwrap()]);
    assert!(ok, "meshca rotate: {out_text}{err}");
    let asked = Instant::now();
    let fresh: String = tab.wait(
        Duration::from_secs(10),
        "cluster-1's new serial on the page",
        &format!(
            "() => {{ const s = document.querySelector('[data-cluster=\"cluster-1\"] dd.serial').textContent; \
             const bar = document.querySelector('rect.cert-bar[data-cert=\"cluster:cluster-1\"]').dataset.serial; \
             return s !== '{old}' && bar === s ? s : null; }}"
        ),
    );
    eprintln!("the rotation showed on the page after {:?}", asked.elapsed());
    assert!(tab.eval::<bool>("() => window.__sameDocument === true"), "the page was not reloaded");
    wait_until(Duration::from_secs(10), "cluster-1's cacerts has the serial the page shows", || {
        cacerts_serial(&clusters[0]) == fresh
    });
    let rotations: String = tab.eval("() => document.getElementById('rotations-panel').innerText");
    assert!(rotations.contains("No root rotation in progress."), "an Idle rotation, nothing more: {rotations}");
    assert!(!rotations.contains("Distributing"), "no phase list while Idle: {rotations}");
    let history: String = tab.eval("() => document.getElementById('history').innerText");
    assert!(history.contains("forced"), "the forced issuance is in the history: {history}");
    tab.screenshot("body", &out.join("dashboard.png"));

    // Nothing secret is in the page: not the token, not the session cookie (HttpOnly), no key.
    let page: String = tab.eval("() => document.documentElement.outerHTML + document.cookie");
    assert!(!page.contains(token) && !page.contains("PRIVATE KEY") && !page.contains("meshca-session"));
    let problems = tab.problems();
    assert!(problems.is_empty(), "the page logged errors: {problems:#?}");

    // Logging out leaves a login page and no data.
    let _: bool = tab.eval("() => { document.querySelector('form[action=\"/logout\"] button').click(); return true; }");
    let _: bool = tab.wait(
        Duration::from_secs(10),
        "the login page after logging out",
        "() => document.getElementById('login-form') ? true : null",
    );
    assert_eq!(tab.eval::<u16>("() => fetch('/api/status').then((r) => r.status)"), 401);
    signal(up.pid(), "INT");
    up.wait_exit(Duration::from_secs(30));
}

/// A synthetic mesh of `n` clusters in every state, on your own intermediate (the management
/// intermediate of bring-your-own-intermediate mode) under a root, as the status document the
/// server would make of it.
fn synthetic_document(n: usize, now: i64) -> Value {
    use meshca_proto::mgmt::{Alert, CertificateSummary, ClusterStatus, ClusterView, IssuedRecord, MeshStatus};
    use meshca_proto::{AlertKind, IssueReason, Phase};
    let root = CertificateSummary {
        subject: "CN=meshca Root CA,O=meshca".into(),
        serial: "4E1D".repeat(10),
        not_before: now - 86400,
        not_after: now + 10 * 365 * 86400,
        fingerprint: "ab".repeat(32),
        key_algorithm: "ECDSA P-256".into(),
        issuer_fingerprint: String::new(),
    };
    let upstream = CertificateSummary {
        subject: "CN=Example Corp Issuing CA 7,OU=PKI,O=Example Corp".into(),
        serial: "7A11".repeat(10),
        not_before: now - 3600,
        not_after: now + 2 * 365 * 86400,
        fingerprint: "cd".repeat(32),
        key_algorithm: "ECDSA P-384".into(),
        issuer_fingerprint: root.fingerprint.clone(),
    };
    let life = 30 * 86400;
    let clusters = (1..=n)
        .map(|i| {
            // Long names are real: DNS labels of up to 63 characters.
            let name = if i % 17 == 0 {
                format!("prod-eu-west-{i}-payments-and-ledger-services-cluster")
            } else {
                format!("cluster-{i}")
            };
            let issued_at = now - (i as i64 * 7919) % life;
            let mut phase = Phase::Ready;
            let mut not_after = issued_at + life;
            let mut last_error = String::new();
            if i % 23 == 0 {
                phase = Phase::Degraded;
                last_error =
                    "connecting to the management plane at mgmt.example.internal:7443: connection refused".into();
            }
            if i % 41 == 0 {
                not_after = now - 300;
            }
            let serial =
                format!("{:032X}{:08X}", (i as u128).wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C834), i);
            ClusterView {
                name,
                registered: true,
                enrolled: true,
                connected: i % 29 != 0,
                last_seen: now - 3,
                status: Some(ClusterStatus {
                    phase: phase as i32,
                    intermediate_serial: serial.clone(),
                    intermediate_not_before: issued_at,
                    intermediate_not_after: not_after,
                    next_renewal: issued_at + life * 8 / 10,
                    last_renewal: issued_at,
                    last_error,
                    key_location: "store".into(),
                    ..Default::default()
                }),
                issued: vec![IssuedRecord {
                    serial,
                    not_before: issued_at - 120,
                    not_after,
                    issued_at,
                    reason: IssueReason::Renewal as i32,
                    key_algorithm: "ECDSA P-256".into(),
                    issuer_fingerprint: upstream.fingerprint.clone(),
                    // One cluster whose intermediate in service was just revoked (`meshca revoke`).
                    revoked_at: if i == 3 { now - 5 } else { 0 },
                    revocation_reason: if i == 3 { "keyCompromise".into() } else { String::new() },
                    revoked_by: if i == 3 { "operator/admin".into() } else { String::new() },
                }],
                policy: "mesh".into(),
                ..Default::default()
            }
        })
        .collect();
    let st = MeshStatus {
        trust_domain: "cluster.local".into(),
        ca_mode: "intermediateRef".into(),
        upstream_intermediate_subject: upstream.subject.clone(),
        upstream_intermediate_not_after: upstream.not_after,
        upstream_intermediate: Some(upstream),
        root_set_fingerprint: format!("sha256:{}", root.fingerprint),
        root_not_after: root.not_after,
        root_rotation_threshold: root.not_after - life,
        roots: vec![root],
        clusters,
        alerts: vec![Alert {
            kind: AlertKind::ClusterNotReporting as i32,
            cluster: "cluster-29".into(),
            message: "cluster-29 last reported 5m ago".into(),
            policy: "mesh".into(),
        }],
        now,
        ..Default::default()
    };
    meshca_mgmt::status::document(&st)
}

/// A fixed status document.
struct Fixed(Value);

#[async_trait::async_trait]
impl meshca_dashboard::StatusSource for Fixed {
    async fn document(&self) -> Result<Value, meshca_dashboard::SourceError> {
        Ok(self.0.clone())
    }
}

/// The dashboard as the management plane serves it (the relay CA's serving certificate, a login
/// token), rendering the fixed document `doc`; returns its port, the login token and the key pin
/// Chromium trusts.
fn serve_fixed(
    rt: &tokio::runtime::Runtime,
    d: &Path,
    doc: Value,
    now: SystemTime,
) -> (u16, meshca_dashboard::LoginToken, String) {
    meshca_tls::provider::install();
    let store = meshca_store::dir::DirStore::open(d.join("store")).unwrap();
    let relay = rt.block_on(meshca_mgmt::relay::RelayCa::load_or_create(&store, now)).unwrap();
    let (cert, key) = relay.issue_serving(&["localhost".to_string()], Duration::from_secs(3600), now).unwrap();
    let serving = meshca_tls::SwappableCert::new(meshca_tls::Identity::new(&cert, &[], &key).certified_key().unwrap());
    let tls = meshca_dashboard::server_config(relay.roots(), serving).unwrap();
    let token = meshca_dashboard::LoginToken::generate().unwrap();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let port = listener.local_addr().unwrap().port();
    let dashboard = meshca_dashboard::Dashboard {
        source: Arc::new(Fixed(doc)),
        login: token.digest(),
        clock: meshca_clock::system(),
    };
    rt.spawn(meshca_dashboard::serve(listener, tls, dashboard, std::future::pending()));
    let pin = serving_key_pin(port, relay.roots());
    (port, token, pin)
}

#[test]
fn two_hundred_clusters_stay_readable() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let now = SystemTime::now();
    let mut doc = synthetic_document(200, meshca_clock::unix(now));
    // A root rotation in Draining, in the shape `meshca status -o json` reports it
    // (`status::document`): a time wait, one phase change per step so far.
    let t = meshca_clock::unix(now);
    let root = |cn: &str, serial: &str| serde_json::json!({"subject": format!("CN={cn}"), "serial": serial, "notAfter": t + 86400 * 365});
    doc["rootRotation"] = serde_json::json!({
        "phase": "Draining",
        "phaseSince": t - 600,
        "id": "rot-7",
        "startedAt": t - 7200,
        "trigger": "operator",
        "aborted": false,
        "from": root("Old Root", "0a0a"),
        "to": root("New Root", "0b0b"),
        "nextStepAt": t + 3600,
        "waitingFor": [{"cluster": "", "reason": "leaves signed under the old root to expire"}],
        "converged": [{"cluster": "cluster-1", "since": t - 500}],
        "transitions": [
            {"phase": "Distributing", "at": t - 7200, "note": "operator"},
            {"phase": "Switching", "at": t - 1200, "note": "every cluster trusts both roots"},
            {"phase": "Draining", "at": t - 600, "note": "every cluster signs under the new root"},
        ],
        "note": "",
    });
    let (port, token, pin) = serve_fixed(&rt, d, doc, now);
    let chromium = Chromium::start(d, &pin);
    let tab = chromium.tab(1280, 900);
    tab.goto(&format!("https://localhost:{port}/#token={}", token.secret()));
    let _: bool = tab.wait(
        Duration::from_secs(20),
        "200 clusters on the page",
        "() => document.querySelectorAll('[data-cluster]').length === 200 || null",
    );
    let layout: Layout = tab.eval(LAYOUT);
    eprintln!("{layout:?}");
    assert_eq!(
        layout.rows, 202,
        "a timeline row per certificate: the root, the management intermediate, 200 clusters'"
    );
    // The tree: root → the management intermediate → the clusters it signed.
    let tree: Vec<String> = tab.eval(
        "() => [document.querySelector('#tree .tier.upstream [data-cert]').dataset.cert, \
         document.querySelector('#tree .group-head').textContent]",
    );
    assert_eq!(tree[0], format!("upstream:{}", "cd".repeat(32)));
    assert!(tree[1].starts_with("signed by the management intermediate CN=Example Corp Issuing CA 7"), "{tree:?}");
    assert!(layout.row_height >= 20.0, "rows stay readable: {layout:?}");
    assert!(layout.timeline_scrolls, "200 rows scroll inside the timeline: {layout:?}");
    assert_readable(&layout, "200 clusters");
    // A long name is shortened in the timeline, with the whole of it in its tooltip.
    let long: Vec<String> = tab.eval(
        "() => { const t = document.querySelector('g.row[data-row=\"cluster:prod-eu-west-17-payments-and-ledger-services-cluster\"] text.row-label'); \
         return [t.firstChild.nodeValue, t.querySelector('title').textContent]; }",
    );
    assert!(long[0].ends_with('…') && long[1].contains("prod-eu-west-17-payments"), "{long:?}");
    // The root rotation: its phase among the five, and what it waits for.
    let rotation: Vec<String> = tab.eval(
        "() => [document.querySelector('#root-rotation li.current').textContent, \
         document.getElementById('root-rotation').innerText]",
    );
    assert_eq!(rotation[0], "Draining");
    for shown in [
        "leaves signed under the old root to expire",
        "not before",
        "(in ", // the next step's time, an hour away (1h0m or 59m59s by when the page renders)
        "CN=Old Root",
        "CN=New Root",
        "1 of 200 clusters",
        "Switching at",
        "started by operator",
    ] {
        assert!(rotation[1].contains(shown), "{shown:?} in {rotation:?}");
    }
    assert!(!rotation[1].contains("No root rotation in progress"), "{rotation:?}");
    // The cluster whose intermediate in service is revoked shows as revoked, and only it.
    let revoked: Vec<String> = tab.eval(
        "() => [...document.querySelectorAll('[data-cluster][data-state=\"revoked\"]')].map((c) => c.dataset.cluster)",
    );
    assert_eq!(revoked, ["cluster-3"], "{revoked:?}");
    // Filtering by state narrows the tree and the timeline together.
    let degraded: usize =
        tab.eval("() => { document.querySelector('.chip[data-state=\"degraded\"]').click(); return document.querySelectorAll('[data-cluster]').length; }");
    let rows: usize = tab.eval("() => document.querySelectorAll('#tl-rows g.row.cluster').length");
    assert!(degraded > 0 && degraded < 200 && rows == degraded, "{degraded} cards, {rows} rows");
    let _: bool = tab.eval("() => { document.querySelector('.chip[data-state=\"degraded\"]').click(); return true; }");
    let out = output_dir();
    tab.screenshot("#tree-panel", &out.join("tree-200.png"));
    tab.screenshot("#timeline-panel", &out.join("timeline-200.png"));
    let problems = tab.problems();
    assert!(problems.is_empty(), "the page logged errors: {problems:#?}");
}

/// `curl` against `url` trusting the relay CA `ca`, with `extra` arguments; returns (HTTP status,
/// headers and body).
fn curl(ca: &Path, url: &str, extra: &[&str]) -> (u16, String) {
    let out = std::process::Command::new("curl")
        .args(["-sS", "-i", "--cacert", ca.to_str().unwrap(), "-w", "\n%{http_code}"])
        .args(extra)
        .arg(url)
        .output()
        .expect("curl is installed (.ci/run)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or((&text, "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// `meshca server --dashboard-addr` serves the dashboard to a client that is not a browser nor
/// meshca's: curl, trusting only the relay CA, gets the login page and a 401 without a credential,
/// a session for the printed token, and the status document with the operator's certificate.
#[test]
fn meshca_server_serves_the_dashboard_to_curl() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let mut m = Mgmt::start(d, &["--dashboard-addr", "127.0.0.1:0"]);
    // It prints the URL with the token on a line of its own.
    let rest = m.proc.wait_for_log(Duration::from_secs(30), "  https://localhost:");
    let login_url = format!("https://localhost:{}", rest.trim());
    let (url, token) = login_url.split_once("#token=").unwrap_or_else(|| panic!("{}", m.proc.log_text()));
    let creds = PathBuf::from(m.creds());
    let ca = creds.join("relay-ca.pem");

    let (code, page) = curl(&ca, url, &[]);
    assert_eq!(code, 200);
    assert!(
        page.contains("Login token") && page.to_lowercase().contains("content-security-policy: default-src 'self'"),
        "{page}"
    );
    let (code, body) = curl(&ca, &format!("{url}api/status"), &[]);
    assert_eq!(code, 401, "{body}");

    let (code, answer) = curl(&ca, &format!("{url}login"), &["--data-urlencode", &format!("token={token}")]);
    assert_eq!(code, 303, "{answer}");
    let cookie = answer
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .and_then(|c| c.split(';').next())
        .unwrap_or_else(|| panic!("a session cookie: {answer}"));
    let (code, doc) = curl(&ca, &format!("{url}api/status"), &["-H", &format!("cookie: {cookie}")]);
    assert_eq!(code, 200, "{doc}");
    assert!(doc.contains("\"trustDomain\":\"cluster.local\""), "{doc}");

    let cert = creds.join("operator.pem");
    let key = creds.join("operator-key.pem");
    let (code, doc) =
        curl(&ca, &format!("{url}api/status"), &["--cert", cert.to_str().unwrap(), "--key", key.to_str().unwrap()]);
    assert_eq!(code, 200, "the operator's certificate opens it: {doc}");
    assert!(doc.contains("\"caMode\":\"generated\""), "{doc}");
    m.proc.assert_running();
}

/// With two RootTrustPolicies the page shows one mesh at a time, picked in the header: its trust
/// domain, its root, its clusters only; the clusters in no mesh are counted, and the alert of a
/// cluster both policies claim shows with either mesh. The document is the overview
/// `meshca_mgmt::status::document` makes of `status::overview`'s shape.
#[test]
fn two_meshes_are_shown_one_at_a_time() {
    use meshca_proto::mgmt::{Alert, CertificateSummary, ClusterView, MeshStatus};
    let tmp = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let now = SystemTime::now();
    let t = meshca_clock::unix(now);
    let mesh = |policy: &str, td: &str, fp: &str| MeshStatus {
        policy: policy.into(),
        trust_domain: td.into(),
        ca_mode: "generated".into(),
        root_set_fingerprint: format!("sha256:{fp}"),
        roots: vec![CertificateSummary {
            subject: format!("CN={policy} root"),
            serial: fp.to_uppercase(),
            not_before: t - 3600,
            not_after: t + 86400 * 365,
            fingerprint: fp.repeat(32),
            key_algorithm: "ECDSA P-256".into(),
            issuer_fingerprint: String::new(),
        }],
        now: t,
        ..Default::default()
    };
    let cluster = |name: &str, policy: &str, placement: &str| ClusterView {
        name: name.into(),
        registered: true,
        enrolled: !policy.is_empty(),
        connected: true,
        last_seen: t,
        policy: policy.into(),
        placement: placement.into(),
        ..Default::default()
    };
    let conflict = "cluster clash is selected by RootTrustPolicies prod and staging";
    let st = MeshStatus {
        now: t,
        meshes: vec![mesh("prod", "prod.example", "aa"), mesh("staging", "staging.example", "bb")],
        clusters: vec![
            cluster("east-1", "prod", ""),
            cluster("east-2", "prod", ""),
            cluster("staging-1", "staging", ""),
            cluster("clash", "", conflict),
        ],
        alerts: vec![Alert {
            kind: meshca_proto::AlertKind::ClusterPolicyConflict as i32,
            cluster: "clash".into(),
            message: conflict.into(),
            policy: String::new(),
        }],
        ..Default::default()
    };
    let (port, token, pin) = serve_fixed(&rt, tmp.path(), meshca_mgmt::status::document(&st), now);
    let chromium = Chromium::start(tmp.path(), &pin);
    let tab = chromium.tab(1280, 900);
    tab.goto(&format!("https://localhost:{port}/#token={}", token.secret()));
    let shown = "() => { if (!document.querySelectorAll('[data-cluster]').length) return null; \
        return { picker: !document.getElementById('policy-pick').hidden, \
          options: [...document.querySelectorAll('#policy option')].map((o) => o.value), \
          facts: document.getElementById('mesh-facts').innerText, \
          clusters: [...document.querySelectorAll('[data-cluster]')].map((c) => c.dataset.cluster).sort(), \
          roots: [...document.querySelectorAll('#tree .tier.roots [data-cert]')].map((c) => c.dataset.cert), \
          alerts: document.getElementById('alerts').innerText }; }";
    let first: Value = tab.wait(Duration::from_secs(20), "the first mesh", shown);
    assert_eq!(first["picker"], true, "{first}");
    assert_eq!(first["options"], serde_json::json!(["prod", "staging"]));
    let facts = first["facts"].as_str().unwrap();
    assert!(facts.contains("prod.example") && !facts.contains("staging.example"), "{facts}");
    assert!(facts.contains("in no mesh") && facts.contains('1'), "{facts}");
    assert_eq!(first["clusters"], serde_json::json!(["east-1", "east-2"]));
    assert_eq!(first["roots"], serde_json::json!([format!("root:{}", "aa".repeat(32))]));
    assert!(first["alerts"].as_str().unwrap().contains("selected by RootTrustPolicies prod and staging"), "{first}");
    let _: bool = tab.eval(
        "() => { const s = document.getElementById('policy'); s.value = 'staging'; s.dispatchEvent(new Event('change')); return true; }",
    );
    let second: Value = tab.wait(
        Duration::from_secs(10),
        "the staging mesh",
        &shown.replace(
            "if (!document.querySelectorAll('[data-cluster]').length) return null;",
            "if (!document.getElementById('mesh-facts').innerText.includes('staging.example')) return null;",
        ),
    );
    assert_eq!(second["clusters"], serde_json::json!(["staging-1"]), "{second}");
    assert_eq!(second["roots"], serde_json::json!([format!("root:{}", "bb".repeat(32))]));
    let problems = tab.problems();
    assert!(problems.is_empty(), "the page logged errors: {problems:#?}");
}
