//! Watching a root rotation from outside: every `cacerts` version each cluster held (polled from
//! its directory), and the operator's view of the rotation (`meshca status -o json`,
//! `meshca rotate root`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshca_pki::Cert;
use meshca_testsupport::rotation::Held;
use serde_json::Value;

use super::{
    ChainFiles, OpensslKey, Proc, TlsParty, ca_client, create_certificate, csr_request, json_file, openssl,
    openssl_csr, run, write_chain,
};

/// `root-cert.pem` and `cert-chain.pem` of the version `dir/..data` names now; `None` when there
/// is none yet, or when the version went away while it was read.
fn read_version(dir: &Path) -> Option<(Vec<u8>, Vec<u8>)> {
    let data = dir.join(std::fs::read_link(dir.join("..data")).ok()?);
    let roots = std::fs::read(data.join("root-cert.pem")).ok()?;
    let chain = std::fs::read(data.join("cert-chain.pem")).ok()?;
    (!roots.is_empty() && !chain.is_empty()).then_some((roots, chain))
}

/// The versions seen, with each `root-cert.pem` as written.
type Seen = Arc<Mutex<Vec<(Held, Vec<u8>)>>>;

/// Every distinct `cacerts` version each cluster held, polled from outside.
pub struct CacertsLog {
    stop: Arc<AtomicBool>,
    seen: Seen,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CacertsLog {
    /// Polls each cluster of `meshca up`'s topology (its `cacerts_dir`).
    pub fn start(up: &Value) -> CacertsLog {
        let clusters: Vec<(String, PathBuf)> = up["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["name"].as_str().unwrap().to_string(), PathBuf::from(c["cacerts_dir"].as_str().unwrap())))
            .collect();
        CacertsLog::of_dirs(clusters)
    }

    /// Polls each cluster's `cacerts` directory (`(name, dir)`) every 50 ms. A directory store's
    /// object and a memory folder are laid out the same way (the kubelet's): the four files are
    /// read from the data directory `..data` names, so they always belong to one version.
    pub fn of_dirs(clusters: Vec<(String, PathBuf)>) -> CacertsLog {
        let stop = Arc::new(AtomicBool::new(false));
        let seen: Seen = Arc::default();
        let (s, log) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                for (name, dir) in &clusters {
                    let Some((roots_pem, chain_pem)) = read_version(dir) else { continue };
                    let chain = Cert::parse_pem_bundle(&chain_pem).unwrap();
                    let held = Held {
                        cluster: name.clone(),
                        roots: Cert::parse_pem_bundle(&roots_pem).unwrap().iter().map(Cert::fingerprint).collect(),
                        chain_root: chain.last().unwrap().fingerprint(),
                    };
                    let mut log = log.lock().unwrap();
                    if log.iter().rev().find(|(h, _)| &h.cluster == name) != Some(&(held.clone(), roots_pem.clone())) {
                        log.push((held, roots_pem));
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        CacertsLog { stop, seen, thread: Some(thread) }
    }

    pub fn held(&self) -> Vec<Held> {
        self.seen.lock().unwrap().iter().map(|(h, _)| h.clone()).collect()
    }

    pub fn latest(&self, cluster: &str) -> Option<Held> {
        self.held().into_iter().rev().find(|h| h.cluster == cluster)
    }

    /// Each distinct root-cert.pem of `cluster`, in order, as the subjects OpenSSL lists.
    pub fn openssl_root_sets(&self, d: &Path, cluster: &str) -> Vec<Vec<String>> {
        let files: Vec<Vec<u8>> =
            self.seen.lock().unwrap().iter().filter(|(h, _)| h.cluster == cluster).map(|(_, p)| p.clone()).collect();
        let mut out: Vec<Vec<String>> = Vec::new();
        for (i, pem) in files.iter().enumerate() {
            let f = d.join(format!("{cluster}-roots-{i}.pem"));
            std::fs::write(&f, pem).unwrap();
            let (ok, text) = openssl(d, &["storeutl", "-noout", "-certs", "-text", f.to_str().unwrap()]);
            assert!(ok, "{text}");
            let subjects: Vec<String> =
                text.lines().filter_map(|l| l.trim().strip_prefix("Subject: ").map(str::to_string)).collect();
            if out.last() != Some(&subjects) {
                out.push(subjects);
            }
        }
        out
    }
}

impl Drop for CacertsLog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `meshca status -o json`.
pub fn status(creds: &str) -> Value {
    let (ok, out, err) = run(&["status", "-o", "json", "--credentials", creds]);
    assert!(ok, "meshca status: {err}");
    serde_json::from_str(&out).unwrap()
}

pub fn phase(st: &Value) -> String {
    st["rootRotation"]["phase"].as_str().unwrap().to_string()
}

/// `meshca rotate root [--abort]`; its stdout.
pub fn rotate_root(creds: &str, abort: bool) -> String {
    let mut args = vec!["rotate", "root", "--credentials", creds];
    if abort {
        args.push("--abort");
    }
    let (ok, out, err) = run(&args);
    assert!(ok, "meshca {args:?}: {out}{err}");
    out
}

/// The message of the `RootRotationStalled` alert naming `cluster` in `meshca status -o json`.
pub fn stalled_alert(st: &Value, cluster: &str) -> Option<String> {
    st["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["kind"] == "RootRotationStalled" && a["cluster"] == cluster)
        .map(|a| a["message"].as_str().unwrap().to_string())
}

/// A leaf from `cluster`'s workload CA for an OpenSSL key, its chain written for OpenSSL.
pub struct Leaf {
    pub key: PathBuf,
    pub files: ChainFiles,
    pub chain: Vec<String>,
}

impl Leaf {
    pub fn get(up: &Value, d: &Path, cluster: &str, name: &str) -> Leaf {
        let c = up["clusters"].as_array().unwrap().iter().find(|c| c["name"] == cluster).unwrap();
        let ca = &c["workload_ca"];
        let token = std::fs::read_to_string(c["token_file"].as_str().unwrap()).unwrap();
        let csr = openssl_csr(d, name, OpensslKey::P256, &[]);
        let rt = tokio::runtime::Runtime::new().unwrap();
        let chain = rt.block_on(async {
            let mut client = ca_client(
                ca["address"].as_str().unwrap(),
                Path::new(ca["ca_file"].as_str().unwrap()),
                ca["server_name"].as_str().unwrap(),
            );
            create_certificate(&mut client, csr_request(&csr, Some(token.trim()), Some(cluster), 0)).await.unwrap()
        });
        Leaf { key: d.join(format!("{name}.key")), files: write_chain(d, name, &chain), chain }
    }

    /// The root its intermediate was issued under, by fingerprint.
    pub fn chain_root(&self, roots: &[Cert]) -> String {
        let int = Cert::from_pem(self.chain[1].as_bytes()).unwrap();
        roots.iter().find(|r| int.verify_signed_by(r).is_ok()).map(Cert::fingerprint).unwrap_or_default()
    }

    /// The roots in the last element (what the workload learns to trust).
    pub fn trusted(&self) -> Vec<Cert> {
        Cert::parse_pem_bundle(self.chain.last().unwrap().as_bytes()).unwrap()
    }

    pub fn party(&self) -> TlsParty<'_> {
        TlsParty { chain: &self.files, key: &self.key, trust: &self.files.root }
    }
}

/// Stops `meshca up` with Ctrl-C and checks its summary: not one failed handshake or leaf
/// request of the sample workloads, and plenty of successful ones.
pub fn stop_and_check(mut proc: Proc, dir: &Path) -> Value {
    proc.signal("INT");
    let status = proc.wait_exit(Duration::from_secs(30));
    let log = std::fs::read_to_string(dir.join("meshca-up.log")).unwrap_or_default();
    assert!(status.success(), "meshca up: {status}\n{}\n{log}", proc.log_text());
    let summary = json_file(&dir.join("summary.json")).expect("summary.json");
    eprintln!("summary.json: {summary:#}");
    assert_eq!(summary["handshakes_failed"], 0, "{summary:#}\n{log}");
    assert_eq!(summary["leaves_failed"], 0, "{summary:#}\n{log}");
    assert!(summary["handshakes_ok"].as_u64().unwrap() > 300, "{summary:#}");
    summary
}
