//! Shared helpers for the end-to-end tests: real `meshca` processes on 127.0.0.1, the OpenSSL
//! CLI, and polling (the generic parts from `meshca_testsupport`).
#![allow(dead_code, clippy::unwrap_used)]

pub mod rotation;
pub mod user_pki;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use meshca_pki::CaBundle;
use meshca_pki::bundle::BundleFiles;
// What every test binary may use; each uses a different part.
#[allow(unused_imports)]
pub use meshca_testsupport::process::signal;
#[allow(unused_imports)]
pub use meshca_testsupport::wait::json_file;
#[allow(unused_imports)]
pub use meshca_testsupport::{
    Ports, Proc, eventually, openssl, openssl_ok, random_hex, repo, wait_for, wait_until, write_secret,
};

/// The binary under test.
pub fn meshca() -> &'static str {
    env!("CARGO_BIN_EXE_meshca")
}

/// Starts `meshca ARGS` (logging at `info`) with its output in `dir/<name>.log`.
pub fn spawn_meshca(name: &str, dir: &Path, args: &[&str]) -> Proc {
    spawn_meshca_logging(name, dir, args, "info")
}

/// [`spawn_meshca`] with the log filter `rust_log` (e.g. `info,meshca_agent=debug` for the
/// agent's every attempt, which it logs at debug level: at info it says a persisting error once).
pub fn spawn_meshca_logging(name: &str, dir: &Path, args: &[&str], rust_log: &str) -> Proc {
    let mut cmd = Command::new(meshca());
    cmd.args(args).env("RUST_LOG", rust_log);
    Proc::spawn(cmd, name, dir)
}

/// [`spawn_meshca`] with the open-file limit lowered to `nofile` for the child alone (bash's
/// `ulimit -n`, then `exec`: the process under test is meshca itself, so signals reach it).
pub fn spawn_meshca_with_nofile(name: &str, dir: &Path, nofile: u32, args: &[&str]) -> Proc {
    let mut cmd = Command::new("bash");
    cmd.arg("-c").arg(format!("ulimit -n {nofile} && exec \"$0\" \"$@\"")).arg(meshca()).args(args);
    cmd.env("RUST_LOG", "info");
    Proc::spawn(cmd, name, dir)
}

/// Starts `meshca up --dir <d>/up ARGS` and waits for its `topology.json` (panicking with the
/// log if it exits first).
pub fn start_up(d: &Path, args: &[&str]) -> (Proc, serde_json::Value) {
    let dir = d.join("up");
    let mut all = vec!["up", "--dir", dir.to_str().unwrap()];
    all.extend_from_slice(args);
    let mut proc = spawn_meshca("up", d, &all);
    let topology = wait_for(Duration::from_secs(90), "topology.json", || {
        proc.assert_running();
        json_file(&dir.join("topology.json"))
    });
    (proc, topology)
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

/// Reads a cacerts directory (through the store's symlinks, as istiod would).
pub fn read_bundle(dir: &Path) -> BundleFiles {
    BundleFiles::from_lookup(|n| std::fs::read(dir.join(n)).ok())
}

/// Validates a cacerts directory now.
pub fn valid_bundle(dir: &Path) -> Result<CaBundle, String> {
    CaBundle::validate(&read_bundle(dir), SystemTime::now()).map_err(|e| e.to_string())
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
    /// Starts `meshca server` in `dir` on a port it chooses itself (it prints the address).
    pub fn start(dir: &Path, extra: &[&str]) -> Mgmt {
        Mgmt::start_at(dir, "127.0.0.1:0", extra)
    }

    /// Starts `meshca server` on the reserved `port` (its port 0): for a server that must come back
    /// on the address its agents know, or that advertises its address.
    pub fn start_on(dir: &Path, port: &Ports, extra: &[&str]) -> Mgmt {
        Mgmt::start_at(dir, &port.addr(0), extra)
    }

    fn start_at(dir: &Path, listen: &str, extra: &[&str]) -> Mgmt {
        Mgmt::start_in(dir, &dir.join("mgmt"), listen, extra)
    }

    /// Starts `meshca server` with its data in `data` (which may be elsewhere, e.g. on a small
    /// file system) and its log in `dir`, listening on `listen`.
    pub fn start_in(dir: &Path, data: &Path, listen: &str, extra: &[&str]) -> Mgmt {
        let data = data.to_path_buf();
        let mut args =
            vec!["server", "--data-dir", data.to_str().unwrap(), "--listen", listen, "--report-interval", "2s"];
        args.extend_from_slice(extra);
        let mut proc = spawn_meshca("server", dir, &args);
        let line = proc.wait_for_log(Duration::from_secs(30), "management plane listening on ");
        let addr = line.split(';').next().unwrap().trim().to_string();
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
    agent_at(dir, &format!("agent-{cluster}"), &dir.join(cluster), m, cluster, token, relay, extra)
}

/// Waits until a `meshca workload-ca` started with `--listen 127.0.0.1:0` (and perhaps
/// `--metrics-listen 127.0.0.1:0`) says where it listens; returns (gRPC address, metrics address).
pub fn workload_ca_addrs(proc: &mut Proc) -> (String, Option<String>) {
    let line = proc.wait_for_log(Duration::from_secs(30), "workload CA listening on ");
    let (addr, rest) = line.split_once(';').unwrap_or((&line, ""));
    let metrics = rest.split_once("metrics on http://").map(|(_, m)| m.trim_end_matches("/metrics").to_string());
    (addr.trim().to_string(), metrics)
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

/// Starts an agent for `cluster` with its store in `store` and its log in `dir/<name>.log`.
#[allow(clippy::too_many_arguments)]
pub fn agent_at(
    dir: &Path,
    name: &str,
    store: &Path,
    m: &Mgmt,
    cluster: &str,
    token: Option<&Path>,
    relay: Option<&Path>,
    extra: &[&str],
) -> Proc {
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
    spawn_meshca(name, dir, &args)
}

/// Synchronous access to a store from a test, alongside the processes using it: a cluster's
/// directory store, or the management plane's database (`<data-dir>/store.db`, which SQLite lets
/// another process read and write while the server runs).
pub struct StoreView {
    pub rt: tokio::runtime::Runtime,
    pub store: std::sync::Arc<dyn meshca_store::Store>,
}

impl StoreView {
    pub fn open(root: &Path) -> StoreView {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        StoreView { rt, store: std::sync::Arc::new(meshca_store::dir::DirStore::open(root).unwrap()) }
    }

    /// The management plane's store.
    pub fn mgmt(m: &Mgmt) -> StoreView {
        StoreView::database(&m.data)
    }

    /// The management-plane database in `data_dir` (`meshca server --data-dir`, `<up>/mgmt`).
    pub fn database(data_dir: &Path) -> StoreView {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let path = data_dir.join(meshca_store::migrate::DB_FILE);
        StoreView { rt, store: std::sync::Arc::new(meshca_store::sqlite::SqliteStore::open(path).unwrap()) }
    }

    fn key(ns: &str, name: &str) -> meshca_store::ObjectKey {
        meshca_store::ObjectKey::new(ns, name).unwrap()
    }

    pub fn get(&self, ns: &str, name: &str) -> Option<meshca_store::Secret> {
        self.rt.block_on(self.store.get(&Self::key(ns, name))).unwrap().map(|v| v.value)
    }

    /// A JSON record (the management plane's `record.json` objects).
    pub fn record(&self, ns: &str, name: &str) -> Option<serde_json::Value> {
        let s = self.get(ns, name)?;
        Some(serde_json::from_slice(s.get(meshca_store::typed::RECORD_KEY).unwrap()).unwrap())
    }

    pub fn list(&self, ns: &str) -> Vec<String> {
        self.rt.block_on(self.store.list(ns)).unwrap()
    }

    /// Writes an object whatever its version (an operator replacing a secret's contents).
    pub fn put(&self, ns: &str, name: &str, secret: &meshca_store::Secret) {
        use meshca_store::Precondition;
        self.rt.block_on(self.store.put(&Self::key(ns, name), secret, Precondition::Any)).unwrap();
    }

    /// Deletes an object (it must exist).
    pub fn delete(&self, ns: &str, name: &str) {
        use meshca_store::Precondition;
        self.rt.block_on(self.store.delete(&Self::key(ns, name), Precondition::Any)).unwrap();
    }

    /// Creates an object (it must not exist yet).
    pub fn create(&self, ns: &str, name: &str, secret: &meshca_store::Secret) {
        use meshca_store::Precondition;
        self.rt.block_on(self.store.put(&Self::key(ns, name), secret, Precondition::Absent)).unwrap();
    }
}

/// Writes `text` to `dir/name` and returns the path.
pub fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A RootTrustPolicy with the given `spec.config` body (indented under `config:`) and
/// `intermediateCertOptions` flow mapping.
pub fn policy_yaml(config: &str, options: &str) -> String {
    format!(
        "apiVersion: meshca.io/v1alpha1\nkind: RootTrustPolicy\nmetadata: {{ name: mesh }}\nspec:\n  config:\n{config}\n  intermediateCertOptions: {options}\n"
    )
}

/// The cluster named `name` in `meshca status -o json` output.
pub fn status_cluster(st: &serde_json::Value, name: &str) -> Option<serde_json::Value> {
    st["clusters"].as_array().unwrap().iter().find(|c| c["name"] == name).cloned()
}

// ---- Istio's CA API (the workload CA), OpenSSL-made keys and CSRs, OpenSSL mTLS ----

/// A client of Istio's CA API.
pub type CaClient =
    meshca_proto::istio::istio_certificate_service_client::IstioCertificateServiceClient<tonic::transport::Channel>;

/// A TLS client configuration trusting only the roots in the PEM file `ca_file`.
pub fn trusting(ca_file: &Path) -> rustls::ClientConfig {
    let pem = std::fs::read(ca_file).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in meshca_pki::Cert::parse_pem_bundle(&pem).unwrap() {
        roots.add(rustls::pki_types::CertificateDer::from(c.der().to_vec())).unwrap();
    }
    rustls::ClientConfig::builder_with_provider(meshca_tls::provider::get())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// A client of the workload CA at `address` that trusts only the roots in the PEM file `ca_file`
/// and checks the serving certificate for `server_name`, as istio-agent does. Call it inside a
/// tokio runtime: the channel connects lazily from a background task.
pub fn ca_client(address: &str, ca_file: &Path, server_name: &str) -> CaClient {
    CaClient::new(meshca_tls::grpc::channel(address, trusting(ca_file), server_name).unwrap())
}

/// A TCP connection to `address` from the loopback address `source` (any of 127.0.0.0/8 is this
/// machine, so a test can be several peers).
pub async fn connect_from(
    source: std::net::Ipv4Addr,
    address: std::net::SocketAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(std::net::SocketAddr::from((source, 0)))?;
    let tcp = socket.connect(address).await?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// [`ca_client`] whose connections come from the loopback address `source`.
pub fn ca_client_from(source: std::net::Ipv4Addr, address: &str, ca_file: &Path, server_name: &str) -> CaClient {
    let mut config = trusting(ca_file);
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string()).unwrap();
    let target: std::net::SocketAddr = address.parse().unwrap();
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5));
    CaClient::new(endpoint.connect_with_connector_lazy(tower::service_fn(move |_uri| {
        let (connector, name) = (connector.clone(), name.clone());
        async move {
            let tcp = connect_from(source, target).await?;
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    })))
}

/// A `CreateCertificate` request as istio-agent sends it: the PEM CSR, the lifetime asked for
/// (seconds), `authorization: Bearer <token>` when a token is given, and `clusterid` when a
/// cluster is given.
pub fn csr_request(
    csr: &str,
    token: Option<&str>,
    cluster: Option<&str>,
    validity_secs: i64,
) -> tonic::Request<meshca_proto::istio::IstioCertificateRequest> {
    let mut req = tonic::Request::new(meshca_proto::istio::IstioCertificateRequest {
        csr: csr.to_string(),
        validity_duration: validity_secs,
        metadata: None,
    });
    if let Some(t) = token {
        req.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    if let Some(c) = cluster {
        req.metadata_mut().insert("clusterid", c.parse().unwrap());
    }
    req
}

/// Sends a request; the returned chain (one PEM per element) or the gRPC status.
pub async fn create_certificate(
    client: &mut CaClient,
    req: tonic::Request<meshca_proto::istio::IstioCertificateRequest>,
) -> Result<Vec<String>, tonic::Status> {
    client.create_certificate(req).await.map(|r| r.into_inner().cert_chain)
}

/// Key types the OpenSSL CLI makes for test CSRs and certificates.
pub use meshca_testsupport::openssl::KeyType as OpensslKey;

/// Makes a key (`dir/<name>.key`) and a CSR (`dir/<name>.csr`) with `openssl req`; returns the
/// CSR PEM. The subject says `CN=<name>` (the workload CA must ignore it); `extra` is passed to
/// `openssl req` (e.g. `-addext` to ask for SANs or CA:TRUE).
pub fn openssl_csr(dir: &Path, name: &str, key: OpensslKey, extra: &[&str]) -> String {
    let keyfile = format!("{name}.key");
    let csrfile = format!("{name}.csr");
    let subj = format!("/CN={name}");
    let rsa;
    let mut args = vec!["req", "-new", "-nodes", "-keyout", &keyfile, "-out", &csrfile, "-subj", &subj];
    match key {
        OpensslKey::Rsa(bits) => {
            rsa = format!("rsa:{bits}");
            args.extend_from_slice(&["-newkey", &rsa]);
        }
        OpensslKey::P256 => args.extend_from_slice(&["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]),
    }
    args.extend_from_slice(extra);
    let (ok, out) = openssl(dir, &args);
    assert!(ok, "openssl req: {out}");
    std::fs::read_to_string(dir.join(csrfile)).unwrap()
}

/// A returned chain written out for the OpenSSL CLI.
#[derive(Debug, Clone)]
pub struct ChainFiles {
    /// The first element: the leaf.
    pub leaf: PathBuf,
    /// The elements between the leaf and the last one (the intermediates), concatenated.
    pub middle: PathBuf,
    /// The last element: the root set (one root, or both during a root rotation).
    pub root: PathBuf,
}

/// Writes `chain` (leaf first, root set last) as `dir/<name>-leaf.pem`, `-middle.pem`,
/// `-root.pem`. Every element holds one certificate, except the last, which is the root set
/// the workload is to trust (several roots during a root rotation).
pub fn write_chain(dir: &Path, name: &str, chain: &[String]) -> ChainFiles {
    assert!(chain.len() >= 3, "a leaf, at least one intermediate and the root; got {} element(s)", chain.len());
    for (i, pem) in chain.iter().enumerate() {
        let n = meshca_pki::Cert::parse_pem_bundle(pem.as_bytes()).unwrap_or_else(|e| panic!("element {i}: {e}")).len();
        if i + 1 < chain.len() {
            assert_eq!(n, 1, "element {i} must hold exactly one certificate");
        } else {
            meshca_pki::RootSet::from_pem(pem.as_bytes()).unwrap_or_else(|e| panic!("the last element: {e}"));
        }
    }
    let files = ChainFiles {
        leaf: dir.join(format!("{name}-leaf.pem")),
        middle: dir.join(format!("{name}-middle.pem")),
        root: dir.join(format!("{name}-root.pem")),
    };
    std::fs::write(&files.leaf, &chain[0]).unwrap();
    std::fs::write(&files.middle, chain[1..chain.len() - 1].concat()).unwrap();
    std::fs::write(&files.root, &chain[chain.len() - 1]).unwrap();
    files
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `openssl verify -x509_strict -CAfile <ca_file> -untrusted <middle> <leaf>`: (ok, output).
pub fn openssl_verify_leaf(dir: &Path, chain: &ChainFiles, ca_file: &Path) -> (bool, String) {
    let (ok, out) = openssl(
        dir,
        &["verify", "-x509_strict", "-CAfile", s(ca_file), "-untrusted", s(&chain.middle), s(&chain.leaf)],
    );
    (ok && out.contains(": OK"), out)
}

/// `openssl x509 -noout <args> -in <cert>`; panics if openssl fails.
pub fn openssl_x509(dir: &Path, cert: &Path, args: &[&str]) -> String {
    let mut all = vec!["x509", "-noout", "-in", s(cert)];
    all.extend_from_slice(args);
    let (ok, out) = openssl(dir, &all);
    assert!(ok, "openssl x509 {args:?}: {out}");
    out
}

/// Whether the private key in `key` (as OpenSSL reads it) is the one `cert` certifies: both
/// public keys as SubjectPublicKeyInfo PEM, compared.
pub fn openssl_key_matches(dir: &Path, key: &Path, cert: &Path) -> bool {
    let (ok1, from_key) = openssl(dir, &["pkey", "-in", s(key), "-pubout"]);
    let (ok2, from_cert) = openssl(dir, &["x509", "-in", s(cert), "-noout", "-pubkey"]);
    ok1 && ok2 && from_key.contains("BEGIN PUBLIC KEY") && from_key == from_cert
}

/// One side of an OpenSSL mTLS exchange.
pub struct TlsParty<'a> {
    /// The side's own leaf, key and intermediates.
    pub chain: &'a ChainFiles,
    /// Its private key.
    pub key: &'a Path,
    /// The roots it trusts for the peer.
    pub trust: &'a Path,
}

/// What an OpenSSL mTLS exchange printed.
#[derive(Debug)]
pub struct MtlsOutcome {
    /// `openssl s_server -brief` output.
    pub server: String,
    /// `openssl s_client` stdout (session summary and the data received).
    pub client: String,
    /// `openssl s_client` stderr.
    pub client_err: String,
    /// Whether s_client exited 0.
    pub client_ok: bool,
}

impl MtlsOutcome {
    /// Both sides verified the other with result 0, and data went both ways after that.
    pub fn succeeded(&self) -> bool {
        self.client_ok
            && self.client.contains("Verify return code: 0 (ok)")
            && self.client.contains(&MTLS_PING.chars().rev().collect::<String>())
            && self.server.contains("CONNECTION ESTABLISHED")
            && self.server.contains("Verification: OK")
    }
}

/// The line s_client sends; `s_server -rev` answers it reversed.
const MTLS_PING: &str = "ping-from-meshca-test";

fn listening(port: u16) -> bool {
    // Local address `0100007F:<PORT>` in state 0A (LISTEN).
    let want = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/tcp").unwrap_or_default().lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && f[1] == want && f[3] == "0A"
    })
}

/// Runs one mutual-TLS exchange with a TLS stack meshca does not use: `openssl s_server` with the
/// server's leaf (requiring a client certificate, `-Verify 2 -verify_return_error`, answering each
/// line reversed) and `openssl s_client` with the client's leaf (`-verify_return_error`). Each side
/// trusts only its own `trust` file. The leaves carry only a URI SAN, so no hostname is checked.
pub fn openssl_mtls(dir: &Path, server: &TlsParty<'_>, client: &TlsParty<'_>) -> MtlsOutcome {
    use std::io::Write;
    // Reserved for the whole exchange: s_server cannot bind port 0 and say which it got.
    let reserved = Ports::one();
    let port = reserved.port(0);
    let accept = reserved.addr(0);
    let mut server_cmd = Command::new("openssl");
    server_cmd
        .args(["s_server", "-accept", &accept, "-naccept", "1", "-rev", "-brief"])
        .args(["-cert", s(&server.chain.leaf), "-key", s(server.key), "-cert_chain", s(&server.chain.middle)])
        .args(["-CAfile", s(server.trust), "-Verify", "2", "-verify_return_error"])
        .current_dir(dir);
    let mut srv = Proc::spawn(server_cmd, &format!("s_server-{port}"), dir);
    wait_for(Duration::from_secs(10), "openssl s_server to listen", || listening(port).then_some(()));
    let connect = accept.clone();
    let mut cli = Command::new("openssl")
        .args(["s_client", "-connect", &connect, "-ign_eof"])
        .args(["-cert", s(&client.chain.leaf), "-key", s(client.key), "-cert_chain", s(&client.chain.middle)])
        .args(["-CAfile", s(client.trust), "-verify_return_error"])
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // `CLOSE` makes `s_server -rev` end the connection after answering, so s_client exits.
    let mut stdin = cli.stdin.take().unwrap();
    let _ = stdin.write_all(format!("{MTLS_PING}\nCLOSE\n").as_bytes());
    drop(stdin);
    let deadline = Instant::now() + Duration::from_secs(10);
    while cli.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = cli.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let cli = cli.wait_with_output().unwrap();
    // s_server exits after its one connection; give it a moment to flush, then kill it anyway.
    let deadline = Instant::now() + Duration::from_secs(3);
    while srv.exit_status().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let server_out = srv.log_text();
    drop(srv);
    MtlsOutcome {
        server: server_out,
        client: String::from_utf8_lossy(&cli.stdout).into_owned(),
        client_err: String::from_utf8_lossy(&cli.stderr).into_owned(),
        client_ok: cli.status.success(),
    }
}

/// A plain HTTP/1.1 GET (for `/metrics`): (status code, body).
pub fn http_get(addr: &str, path: &str, bearer: Option<&str>) -> (u16, String) {
    http_get_authorized(addr, path, bearer.map(|t| format!("Bearer {t}")).as_deref())
}

/// [`http_get`] with the `Authorization` header's whole value (any scheme spelling).
pub fn http_get_authorized(addr: &str, path: &str, authorization: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = authorization.map(|v| format!("Authorization: {v}\r\n")).unwrap_or_default();
    write!(tcp, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n").unwrap();
    let mut raw = String::new();
    tcp.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, body.to_string())
}

/// The value of the sample `name` (exact name, no labels) in a Prometheus text exposition.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.trim().parse().ok()).flatten()
    })
}

/// The value of the sample `name{reason="<label>"}` (one `reason` label) in a Prometheus text
/// exposition.
pub fn metric_labelled(text: &str, name: &str, reason: &str) -> Option<f64> {
    metric(text, &format!("{name}{{reason=\"{reason}\"}}"))
}

/// Runs `meshca ARGS` (log in `dir/<name>.log`) and asserts it refuses to start: it exits
/// non-zero within 30 s, its log says `says`, and it never said it was listening.
pub fn assert_refuses_to_start(name: &str, dir: &Path, args: &[&str], says: &str) {
    let mut p = spawn_meshca(name, dir, args);
    let status = p.wait_exit(Duration::from_secs(30));
    let log = p.log_text();
    assert!(!status.success() && log.contains(says) && !log.contains("listening"), "{name} ({status}):\n{log}");
}
