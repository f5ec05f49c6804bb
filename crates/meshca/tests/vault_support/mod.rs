//! HashiCorp Vault (built by `scripts/peers/vault.sh`) for the Vault-mode tests, set up with curl
//! — an oracle independent of meshca's own Vault client — exactly as `docs/peers.md` proves.
//!
//! The binary: `MESHCA_VAULT_BIN` (set by `scripts/test.sh`), else the peers cache, else a build
//! (`meshca_testsupport::peers::peer_bin`).
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::{Ports, Proc, random_hex};

/// The Vault binary.
pub fn vault_bin() -> PathBuf {
    meshca_testsupport::peers::peer_bin("MESHCA_VAULT_BIN", "scripts/peers/vault.sh")
}

/// `curl` a JSON API; returns (HTTP status, JSON body or Null).
pub fn curl(method: &str, url: &str, headers: &[String], cacert: Option<&Path>, body: Option<&Value>) -> (u16, Value) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "30", "-X", method, "-w", "\n%{http_code}", "-H", "Content-Type: application/json"]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    if let Some(ca) = cacert {
        cmd.arg("--cacert").arg(ca);
    }
    if body.is_some() {
        cmd.args(["--data-binary", "@-"]);
    }
    cmd.arg(url).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("curl must be installed");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        if let Some(b) = body {
            stdin.write_all(b.to_string().as_bytes()).unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (json, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    let status = code.trim().parse().unwrap_or(0);
    (status, serde_json::from_str(json).unwrap_or(Value::Null))
}

/// How Vault is run.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// `vault server -dev`: in-memory, unsealed, given root token.
    Dev,
    /// `vault server -dev -dev-tls`: the same over https, with its own CA.
    DevTls,
    /// A real server with file storage: init + unseal; survives a restart (same data).
    File,
}

/// A Vault server started by a test; killed when dropped.
pub struct Vault {
    child: Option<Proc>,
    pub dir: PathBuf,
    /// Its API port (and the next, its cluster port), held across restarts.
    ports: Ports,
    pub port: u16,
    pub addr: String,
    pub root_token: String,
    pub ca: Option<PathBuf>,
    storage: Storage,
    unseal_key: Option<String>,
}

impl Vault {
    /// Starts Vault in `dir` on a reserved port pair.
    pub fn start(dir: &Path, storage: Storage) -> Vault {
        std::fs::create_dir_all(dir).unwrap();
        let ports = Ports::reserve(2);
        let port = ports.port(0);
        let scheme = if storage == Storage::DevTls { "https" } else { "http" };
        let mut v = Vault {
            child: None,
            dir: dir.to_path_buf(),
            ports,
            port,
            addr: format!("{scheme}://127.0.0.1:{port}"),
            root_token: random_hex(16),
            ca: (storage == Storage::DevTls).then(|| dir.join("tls").join("vault-ca.pem")),
            storage,
            unseal_key: None,
        };
        v.spawn();
        if storage == Storage::File {
            let (s, init) = v.api_as("", "PUT", "sys/init", Some(json!({"secret_shares": 1, "secret_threshold": 1})));
            assert_eq!(s, 200, "vault init: {init}");
            v.root_token = init["root_token"].as_str().unwrap().to_string();
            v.unseal_key = Some(init["keys_base64"][0].as_str().unwrap().to_string());
            v.unseal();
        }
        v
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(vault_bin());
        cmd.env("HOME", &self.dir).env_remove("VAULT_TOKEN").env_remove("VAULT_ADDR");
        match self.storage {
            Storage::Dev | Storage::DevTls => {
                cmd.args(["server", "-dev", "-dev-no-store-token"])
                    .arg(format!("-dev-root-token-id={}", self.root_token))
                    .arg(format!("-dev-listen-address=127.0.0.1:{}", self.port));
                if self.storage == Storage::DevTls {
                    std::fs::create_dir_all(self.dir.join("tls")).unwrap();
                    cmd.arg("-dev-tls").arg(format!("-dev-tls-cert-dir={}", self.dir.join("tls").display()));
                }
            }
            Storage::File => {
                let config = self.dir.join("vault.hcl");
                std::fs::write(
                    &config,
                    format!(
                        "storage \"file\" {{ path = \"{}\" }}\nlistener \"tcp\" {{ address = \"127.0.0.1:{}\"\n  cluster_address = \"127.0.0.1:{}\"\n  tls_disable = true }}\napi_addr = \"http://127.0.0.1:{}\"\ncluster_addr = \"http://127.0.0.1:{}\"\ndisable_mlock = true\nui = false\n",
                        self.dir.join("data").display(),
                        self.port,
                        self.port + 1,
                        self.port,
                        self.port + 1
                    ),
                )
                .unwrap();
                cmd.arg("server").arg(format!("-config={}", config.display()));
            }
        }
        self.child = Some(Proc::spawn(cmd, "vault", &self.dir));
        // Up when sys/health answers at all (sealed/uninitialised answers are non-2xx).
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.ca.as_ref().is_none_or(|c| c.is_file()) {
                let (s, _) = curl("GET", &format!("{}/v1/sys/health", self.addr), &[], self.ca.as_deref(), None);
                if s != 0 {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "vault did not start:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn unseal(&self) {
        let key = self.unseal_key.clone().unwrap();
        let (s, body) = self.api_as("", "PUT", "sys/unseal", Some(json!({ "key": key })));
        assert!(s == 200 && body["sealed"] == json!(false), "unseal: {s} {body}");
        // Active and serving requests.
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.api("GET", "sys/health", None).0 != 200 {
            assert!(Instant::now() < deadline, "vault not active after unseal:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A Vault in `dir/vault` with an EC P-256 root at the PKI mount `pki` (10-year max TTL)
    /// and the minimal signer policy `meshca-signer` for it: the setup most tests share.
    pub fn with_signer(dir: &Path, storage: Storage) -> Vault {
        let vault = Vault::start(&dir.join("vault"), storage);
        vault.pki_root("pki", "87600h", "ec", 256);
        vault.signer_policy("meshca-signer", "pki", None);
        vault
    }

    /// The server's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("vault.log")).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().pid()
    }

    /// Sends a signal (`STOP`, `CONT`).
    pub fn signal(&self, sig: &str) {
        self.child.as_ref().unwrap().signal(sig);
    }

    /// SIGKILL and wait (a stopped Vault dies of SIGKILL too).
    pub fn kill(&mut self) {
        self.child = None;
    }

    /// Starts the same server again (same port, same storage) and unseals it.
    pub fn restart(&mut self) {
        assert!(self.storage == Storage::File, "only a file-storage Vault keeps its data across a restart");
        self.kill();
        self.spawn();
        self.unseal();
    }

    /// A call with the root token.
    pub fn api(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.api_as(&self.root_token, method, path, body)
    }

    /// A call with `token` (none when empty).
    pub fn api_as(&self, token: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let headers = if token.is_empty() { vec![] } else { vec![format!("X-Vault-Token: {token}")] };
        curl(method, &format!("{}/v1/{path}", self.addr), &headers, self.ca.as_deref(), body.as_ref())
    }

    /// Like [`Self::api`], asserting a 2xx answer.
    pub fn ok(&self, method: &str, path: &str, body: Value) -> Value {
        let (s, v) = self.api(method, path, Some(body));
        assert!((200..300).contains(&s), "{method} {path}: HTTP {s} {v}");
        v
    }

    /// Mounts a PKI engine at `mount` with a max lease TTL and a root of `key_type`/`bits`.
    pub fn pki_root(&self, mount: &str, max_ttl: &str, key_type: &str, bits: u32) -> String {
        self.ok("POST", &format!("sys/mounts/{mount}"), json!({"type": "pki"}));
        self.ok("POST", &format!("sys/mounts/{mount}/tune"), json!({"max_lease_ttl": max_ttl}));
        let v = self.ok(
            "POST",
            &format!("{mount}/root/generate/internal"),
            json!({"common_name": format!("{mount} test root"), "organization": "meshca", "key_type": key_type, "key_bits": bits, "ttl": "87600h"}),
        );
        v["data"]["certificate"].as_str().unwrap().to_string()
    }

    /// Mounts an empty PKI engine (for the `csrPath` flow's key generation).
    pub fn pki_mount(&self, mount: &str, max_ttl: &str) {
        self.ok("POST", &format!("sys/mounts/{mount}"), json!({"type": "pki"}));
        self.ok("POST", &format!("sys/mounts/{mount}/tune"), json!({"max_lease_ttl": max_ttl}));
    }

    /// The minimal policy of docs/vault.md, for the sign mount (and a generate mount).
    pub fn signer_policy(&self, name: &str, sign_mount: &str, generate_mount: Option<&str>) {
        let mut hcl = format!(
            "path \"{sign_mount}/root/sign-intermediate\" {{ capabilities = [\"update\"] }}\n\
             path \"auth/token/renew-self\" {{ capabilities = [\"update\"] }}\n\
             path \"auth/token/lookup-self\" {{ capabilities = [\"read\"] }}\n"
        );
        if let Some(g) = generate_mount {
            hcl.push_str(&format!("path \"{g}/intermediate/generate/exported\" {{ capabilities = [\"update\"] }}\n"));
        }
        self.ok("PUT", &format!("sys/policies/acl/{name}"), json!({ "policy": hcl }));
    }

    /// A token with `policies`.
    pub fn child_token(&self, policies: &[&str], ttl: &str) -> String {
        let v = self.ok("POST", "auth/token/create", json!({"policies": policies, "ttl": ttl}));
        v["auth"]["client_token"].as_str().unwrap().to_string()
    }

    /// Enables AppRole (once) and creates `role`; returns (role_id, secret_id).
    pub fn approle(&self, role: &str, policies: &[&str], token_ttl: &str) -> (String, String) {
        let _ = self.api("POST", "sys/auth/approle", Some(json!({"type": "approle"})));
        self.ok(
            "POST",
            &format!("auth/approle/role/{role}"),
            json!({"token_policies": policies, "token_ttl": token_ttl, "token_max_ttl": "4h"}),
        );
        let role_id = self.ok("GET", &format!("auth/approle/role/{role}/role-id"), Value::Null)["data"]["role_id"]
            .as_str()
            .unwrap()
            .to_string();
        let secret_id = self.ok("POST", &format!("auth/approle/role/{role}/secret-id"), json!({}))["data"]["secret_id"]
            .as_str()
            .unwrap()
            .to_string();
        (role_id, secret_id)
    }
}

/// Every regular file under `roots` (symlinks are not followed: each file is read once, where
/// it really is).
pub fn files_under(roots: &[&Path]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack: Vec<PathBuf> = roots.iter().map(|p| p.to_path_buf()).collect();
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else { continue };
        if meta.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&p) {
                stack.extend(rd.filter_map(|e| e.ok()).map(|e| e.path()));
            }
        } else if meta.is_file() {
            out.push(p);
        }
    }
    out
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// The byte strings that identify a private key whatever its encoding: the PEM text, the
/// PKCS#8 DER, and (EC) the raw private scalar, which every serialisation carries.
pub fn key_needles(pem: &[u8]) -> Vec<Vec<u8>> {
    let key = meshca_pki::PrivateKey::from_pem(pem).unwrap();
    let der = key.pkcs8_der().to_vec();
    let mut needles = vec![pem.to_vec(), der.clone()];
    // ECPrivateKey ::= SEQUENCE { version 1, privateKey OCTET STRING (32/48 bytes), ... }
    for len in [32usize, 48] {
        let marker = [0x02, 0x01, 0x01, 0x04, len as u8];
        if let Some(i) = der.windows(5).position(|w| w == marker) {
            needles.push(der[i + 5..i + 5 + len].to_vec());
        }
    }
    // The base64 body's lines (the PEM may be re-wrapped elsewhere; a 64-character line is as
    // unique as the key).
    for line in String::from_utf8_lossy(pem).lines().filter(|l| l.len() >= 60) {
        needles.push(line.as_bytes().to_vec());
    }
    needles
}

/// Files under `roots` holding any of `needles`.
pub fn files_holding(roots: &[&Path], needles: &[Vec<u8>]) -> Vec<PathBuf> {
    files_under(roots)
        .into_iter()
        .filter(|f| std::fs::read(f).is_ok_and(|data| needles.iter().any(|n| contains(&data, n))))
        .collect()
}

/// A RootTrustPolicy in Vault mode with the given `vault:` block (YAML flow mapping body).
pub fn vault_policy(dir: &Path, vault_block: &str, ttl: &str, ratio: f64, key_algorithm: &str) -> PathBuf {
    let p = dir.join("policy.yaml");
    std::fs::write(
        &p,
        format!(
            "apiVersion: meshca.io/v1alpha1\nkind: RootTrustPolicy\nmetadata: {{ name: mesh }}\nspec:\n  trustDomain: cluster.local\n  config:\n    vault: {{ {vault_block} }}\n  intermediateCertOptions: {{ ttl: {ttl}, secretRotationGracePeriodRatio: {ratio}, keyAlgorithm: {key_algorithm} }}\n"
        ),
    )
    .unwrap();
    p
}

/// A directory on tmpfs for a test's memory-backed `cacerts` folders; removed when dropped.
pub struct ShmDir(pub PathBuf);

impl ShmDir {
    pub fn new(tag: &str) -> ShmDir {
        let p = PathBuf::from("/dev/shm").join(format!("meshca-test-{tag}-{}", random_hex(6)));
        std::fs::create_dir_all(&p).unwrap();
        ShmDir(p)
    }
}

impl Drop for ShmDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What `statfs` says a folder is on (`tmpfs`, ...).
pub fn memdir_backing(d: &Path) -> String {
    meshca_vault::memdir::backing(d).unwrap().to_string()
}

/// Starts `meshca vault-agent` for `cluster`, its identity in `dir/<cluster>-state`, `cacerts`
/// in `mem`; `registration` is (bootstrap token file, relay CA) for the first start.
pub fn vault_agent(
    dir: &Path,
    m: &crate::common::Mgmt,
    cluster: &str,
    mem: &Path,
    registration: Option<(&Path, &Path)>,
    extra: &[&str],
) -> crate::common::Proc {
    let state = dir.join(format!("{cluster}-state"));
    let mut args = vec![
        "vault-agent",
        "--cluster",
        cluster,
        "--server",
        &m.addr,
        "--state-dir",
        state.to_str().unwrap(),
        "--memory-dir",
        mem.to_str().unwrap(),
        "--max-backoff",
        "2s",
    ];
    if let Some((token, relay)) = registration {
        args.extend_from_slice(&["--token-file", token.to_str().unwrap(), "--relay-ca", relay.to_str().unwrap()]);
    }
    args.extend_from_slice(extra);
    crate::common::spawn_meshca_logging(&format!("vault-agent-{cluster}"), dir, &args, AGENT_LOG)
}

/// The log filter of the processes these tests start: the agents' every failed attempt (logged
/// at debug level; at info a persisting error is said once), so a test can follow an outage.
pub const AGENT_LOG: &str = "info,meshca_agent=debug";

/// The agent's line for each failed attempt to obtain an intermediate (debug level).
pub fn is_failed_attempt(line: &str) -> bool {
    line.contains("DEBUG") && line.contains("could not obtain a new intermediate")
}

/// A log without its ANSI colours.
pub fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// One numeric field of every cluster in `meshca up`'s `status.json`.
pub fn per_cluster(status: &Value, field: &str) -> Vec<u64> {
    status["clusters"]
        .as_array()
        .map(|a| a.iter().map(|c| c[field].as_u64().unwrap_or(0)).collect())
        .unwrap_or_default()
}

/// Starts `meshca up --ca vault` (two clusters) in `up_dir`, the agents logging in with the
/// token in `token_file`, `cacerts` in memory folders under `shm`. `timing` is (intermediate
/// TTL, grace ratio, call interval); leaves live 12 s.
pub fn up_vault(
    dir: &Path,
    vault: &Vault,
    token_file: &Path,
    shm: &ShmDir,
    up_dir: &Path,
    timing: (&str, &str, &str),
) -> crate::common::Proc {
    up_vault_with(dir, vault, token_file, shm, up_dir, timing, &[])
}

/// [`up_vault`] with more `meshca up` arguments.
pub fn up_vault_with(
    dir: &Path,
    vault: &Vault,
    token_file: &Path,
    shm: &ShmDir,
    up_dir: &Path,
    timing: (&str, &str, &str),
    extra: &[&str],
) -> crate::common::Proc {
    let (ttl, ratio, interval) = timing;
    let mut args = vec![
        "up",
        "--ca",
        "vault",
        "--vault-addr",
        &vault.addr,
        "--vault-token-file",
        token_file.to_str().unwrap(),
        "--memory-dir-root",
        shm.0.to_str().unwrap(),
        "--dir",
        up_dir.to_str().unwrap(),
        "--intermediate-ttl",
        ttl,
        "--grace-ratio",
        ratio,
        "--leaf-ttl",
        "12s",
        "--call-interval",
        interval,
    ];
    args.extend_from_slice(extra);
    crate::common::spawn_meshca_logging("up", dir, &args, AGENT_LOG)
}
