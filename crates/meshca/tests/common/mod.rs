//! Shared helpers for the end-to-end tests: real `meshca` processes on 127.0.0.1, the OpenSSL
//! CLI, and polling.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use meshca_pki::CaBundle;
use meshca_pki::bundle::BundleFiles;

/// The binary under test.
pub fn meshca() -> &'static str {
    env!("CARGO_BIN_EXE_meshca")
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A child process, killed when dropped, logging to a file.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, dir: &Path, args: &[&str]) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let f = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let child = Command::new(meshca())
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(f.try_clone().unwrap()))
            .stderr(Stdio::from(f))
            .spawn()
            .unwrap();
        Proc { child, log, name: name.to_string() }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL and wait.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `meshca` to completion; returns (success, stdout, stderr).
pub fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(meshca()).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Polls `f` every 100 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Reads a cacerts directory (through the store's symlinks, as istiod would).
pub fn read_bundle(dir: &Path) -> BundleFiles {
    BundleFiles::from_lookup(|n| std::fs::read(dir.join(n)).ok())
}

/// Validates a cacerts directory now.
pub fn valid_bundle(dir: &Path) -> Result<CaBundle, String> {
    CaBundle::validate(&read_bundle(dir), SystemTime::now()).map_err(|e| e.to_string())
}

/// Runs `openssl` and returns (success, combined output).
pub fn openssl(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("the openssl CLI must be installed");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// `openssl verify` of a cacerts directory's CA certificate through its chain to its roots.
pub fn openssl_verify_cacerts(dir: &Path) {
    let (ok, out) = openssl(
        dir,
        &["verify", "-x509_strict", "-CAfile", "root-cert.pem", "-untrusted", "cert-chain.pem", "ca-cert.pem"],
    );
    assert!(ok && out.contains("ca-cert.pem: OK"), "{}: {out}", dir.display());
}

/// A management plane process plus the paths around it.
pub struct Mgmt {
    pub proc: Proc,
    pub data: PathBuf,
    pub addr: String,
}

impl Mgmt {
    pub fn start(dir: &Path, extra: &[&str]) -> Mgmt {
        let port = free_port();
        Mgmt::start_on(dir, port, extra)
    }

    pub fn start_on(dir: &Path, port: u16, extra: &[&str]) -> Mgmt {
        let data = dir.join("mgmt");
        let addr = format!("127.0.0.1:{port}");
        let mut args =
            vec!["server", "--data-dir", data.to_str().unwrap(), "--listen", &addr, "--report-interval", "2s"];
        args.extend_from_slice(extra);
        let proc = Proc::spawn("server", dir, &args);
        let m = Mgmt { proc, data, addr };
        let creds = m.creds();
        wait_for(Duration::from_secs(30), "the management plane to start", || {
            let (ok, _, _) = run(&["status", "--credentials", &creds]);
            ok.then_some(())
        });
        m
    }

    pub fn creds(&self) -> String {
        self.data.join("operator").to_str().unwrap().to_string()
    }

    /// `meshca cluster add`; returns (token file, relay CA file).
    pub fn add_cluster(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let token = dir.join(format!("{name}.token"));
        let relay = dir.join("relay-ca.pem");
        let (ok, out, err) = run(&[
            "cluster",
            "add",
            name,
            "--credentials",
            &self.creds(),
            "--token-out",
            token.to_str().unwrap(),
            "--relay-ca-out",
            relay.to_str().unwrap(),
        ]);
        assert!(ok, "{out}{err}");
        (token, relay)
    }

    pub fn status_json(&self) -> serde_json::Value {
        let (ok, out, err) = run(&["status", "-o", "json", "--credentials", &self.creds()]);
        assert!(ok, "{err}");
        serde_json::from_str(&out).unwrap()
    }
}

/// Starts an agent for `cluster` with its store under `dir/<cluster>`.
pub fn agent(dir: &Path, m: &Mgmt, cluster: &str, token: Option<&Path>, relay: Option<&Path>, extra: &[&str]) -> Proc {
    let store = dir.join(cluster);
    let mut args = vec![
        "agent",
        "--cluster",
        cluster,
        "--server",
        &m.addr,
        "--store-dir",
        store.to_str().unwrap(),
        "--max-backoff",
        "2s",
    ];
    if let Some(t) = token {
        args.extend_from_slice(&["--token-file", t.to_str().unwrap()]);
    }
    if let Some(r) = relay {
        args.extend_from_slice(&["--relay-ca", r.to_str().unwrap()]);
    }
    args.extend_from_slice(extra);
    Proc::spawn(&format!("agent-{cluster}"), dir, &args)
}

/// The cacerts directory of a cluster started with [`agent`].
pub fn cacerts_dir(dir: &Path, cluster: &str) -> PathBuf {
    dir.join(cluster).join("istio-system").join("cacerts")
}

/// Writes a short-lived policy (generated root) and returns its path.
pub fn short_policy(dir: &Path, ttl: &str, ratio: f64) -> PathBuf {
    let p = dir.join("policy.yaml");
    std::fs::write(
        &p,
        format!(
            "apiVersion: meshca.io/v1alpha1\nkind: RootTrustPolicy\nmetadata: {{ name: mesh }}\nspec:\n  config:\n    generated: {{}}\n  intermediateCertOptions: {{ ttl: {ttl}, secretRotationGracePeriodRatio: {ratio} }}\n"
        ),
    )
    .unwrap();
    p
}
