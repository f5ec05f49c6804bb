//! A real kube-apiserver (1.20, built by `scripts/peers/kube-apiserver.sh`) with its own etcd,
//! started from Rust for the tests of this crate and of `meshca` (feature `testing`; not part
//! of meshca proper).
//!
//! The binary comes from `MESHCA_KUBE_APISERVER_BIN` (set by `.ci/run`), else from
//! `scripts/peers/kube-apiserver.sh path` (the cache). Each [`ApiServer`] is one cluster: its own
//! etcd data directory, serving CA, service-account signing key and ports, all on 127.0.0.1; it is
//! killed when dropped. The admin is the static token `admintoken` (group `system:masters`).
//! There is no controller-manager: tests create ServiceAccounts and bindings themselves (see
//! [`ApiServer::apply_yaml`], which applies the `deploy/` manifests as they are).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};

use crate::Connection;

/// The static admin token of every test API server.
pub const ADMIN_TOKEN: &str = "admintoken";

/// The repository root (this crate is `crates/kube`).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// The kube-apiserver binary.
pub fn apiserver_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MESHCA_KUBE_APISERVER_BIN").map(PathBuf::from).filter(|p| p.is_file()) {
        return p;
    }
    let script = repo().join("scripts/peers/kube-apiserver.sh");
    let out = Command::new("bash").arg(&script).arg("path").stderr(Stdio::inherit()).output().unwrap();
    let path = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().trim().to_string();
    assert!(
        out.status.success() && Path::new(&path).is_file(),
        "no kube-apiserver: set MESHCA_KUBE_APISERVER_BIN or run `bash {} build` (root, ~6 min)",
        script.display()
    );
    PathBuf::from(path)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("the openssl CLI must be installed");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// One cluster's API server and etcd.
pub struct ApiServer {
    pub dir: PathBuf,
    pub url: String,
    /// The CA that signed the serving certificate.
    pub ca: PathBuf,
    /// A file holding [`ADMIN_TOKEN`].
    pub admin_token_file: PathBuf,
    etcd: Child,
    apiserver: Child,
    bin: PathBuf,
    api_args: Vec<String>,
    etcd_port: u16,
}

fn spawn_apiserver(bin: &Path, args: &[String], dir: &Path) -> Child {
    let log =
        |name: &str| Stdio::from(std::fs::OpenOptions::new().create(true).append(true).open(dir.join(name)).unwrap());
    Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log("kube-apiserver.log"))
        .stderr(log("kube-apiserver.err.log"))
        .spawn()
        .unwrap()
}

impl ApiServer {
    /// Starts etcd and kube-apiserver in `dir` and waits until `/readyz` answers (~5–10 s).
    pub async fn start(dir: &Path) -> ApiServer {
        let bin = apiserver_bin();
        std::fs::create_dir_all(dir.join("certs")).unwrap();
        let dir = dir.canonicalize().unwrap();
        let certs = dir.join("certs");
        openssl(&certs, &["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key"]);
        openssl(
            &certs,
            &[
                "req",
                "-x509",
                "-new",
                "-key",
                "ca.key",
                "-sha256",
                "-days",
                "30",
                "-subj",
                "/CN=meshca-test-kube-ca",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                "-out",
                "ca.crt",
            ],
        );
        openssl(&certs, &["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "apiserver.key"]);
        openssl(
            &certs,
            &["req", "-new", "-key", "apiserver.key", "-subj", "/CN=kube-apiserver", "-out", "apiserver.csr"],
        );
        std::fs::write(
            certs.join("ext"),
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\n",
        )
        .unwrap();
        openssl(
            &certs,
            &[
                "x509",
                "-req",
                "-in",
                "apiserver.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-sha256",
                "-days",
                "30",
                "-extfile",
                "ext",
                "-out",
                "apiserver.crt",
            ],
        );
        openssl(&dir, &["genrsa", "-out", "sa.key", "2048"]);
        openssl(&dir, &["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"]);
        std::fs::write(dir.join("tokens.csv"), format!("{ADMIN_TOKEN},admin,1,\"system:masters\"\n")).unwrap();
        let admin_token_file = dir.join("admin-token");
        std::fs::write(&admin_token_file, ADMIN_TOKEN).unwrap();

        let mut last_log = String::new();
        for _ in 0..3 {
            let (client_port, peer_port, api_port) = (free_port(), free_port(), free_port());
            let _ = std::fs::remove_dir_all(dir.join("etcd"));
            let log = |name: &str| Stdio::from(std::fs::File::create(dir.join(name)).unwrap());
            let etcd = Command::new("etcd")
                .args(["--name", "meshca-test", "--data-dir"])
                .arg(dir.join("etcd"))
                .arg(format!("--listen-client-urls=http://127.0.0.1:{client_port}"))
                .arg(format!("--advertise-client-urls=http://127.0.0.1:{client_port}"))
                .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"))
                .arg(format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"))
                .arg(format!("--initial-cluster=meshca-test=http://127.0.0.1:{peer_port}"))
                .stdin(Stdio::null())
                .stdout(log("etcd.log"))
                .stderr(log("etcd.err.log"))
                .spawn()
                .expect("etcd (Debian etcd-server) must be installed");
            let api_args: Vec<String> = [
                format!("--etcd-servers=http://127.0.0.1:{client_port}"),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                format!("--secure-port={api_port}"),
                format!("--tls-cert-file={}", certs.join("apiserver.crt").display()),
                format!("--tls-private-key-file={}", certs.join("apiserver.key").display()),
                format!("--client-ca-file={}", certs.join("ca.crt").display()),
                "--service-cluster-ip-range=10.0.0.0/24".into(),
                "--service-account-issuer=https://kubernetes.default.svc".into(),
                format!("--service-account-key-file={}", dir.join("sa.pub").display()),
                format!("--service-account-signing-key-file={}", dir.join("sa.key").display()),
                "--authorization-mode=RBAC".into(),
                format!("--token-auth-file={}", dir.join("tokens.csv").display()),
                "--insecure-port=0".into(),
                "--endpoint-reconciler-type=none".into(),
            ]
            .into();
            let apiserver = spawn_apiserver(&bin, &api_args, &dir);
            let url = format!("https://127.0.0.1:{api_port}");
            let server = ApiServer {
                dir: dir.clone(),
                url,
                ca: certs.join("ca.crt"),
                admin_token_file: admin_token_file.clone(),
                etcd,
                apiserver,
                bin: bin.clone(),
                api_args,
                etcd_port: client_port,
            };
            if server.wait_ready(Duration::from_secs(60)).await {
                return server;
            }
            last_log = std::fs::read_to_string(dir.join("kube-apiserver.err.log")).unwrap_or_default();
            drop(server);
        }
        panic!("kube-apiserver did not become ready; last log:\n{last_log}");
    }

    async fn wait_ready(&self, timeout: Duration) -> bool {
        let client = self.admin().await;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let req = http::Request::get("/readyz").body(Vec::new()).unwrap();
            if let Ok(text) = client.request_text(req).await
                && text.trim() == "ok"
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        false
    }

    /// How meshca reaches this API server with the token in `token_file`.
    pub fn connection(&self, token_file: &Path) -> Connection {
        Connection::Direct {
            url: self.url.clone(),
            ca_file: Some(self.ca.clone()),
            token_file: Some(token_file.to_path_buf()),
        }
    }

    /// A client as the admin.
    pub async fn admin(&self) -> Client {
        crate::connect(&self.connection(&self.admin_token_file)).await.unwrap()
    }

    /// A client with `token` (written to a file in the server's directory).
    pub async fn client_with_token(&self, token: &str) -> Client {
        let f = self.dir.join(format!("token-{}", crate::testing::random_suffix()));
        std::fs::write(&f, token).unwrap();
        crate::connect(&self.connection(&f)).await.unwrap()
    }

    /// Applies every document of a multi-document YAML manifest as the admin (server-side apply),
    /// for the kinds meshca's manifests use.
    pub async fn apply_yaml(&self, yaml: &str) {
        apply_yaml(&self.admin().await, yaml).await.unwrap_or_else(|e| panic!("{e}"));
    }

    /// Applies one object (as JSON) with `client`.
    pub async fn apply_value(&self, client: &Client, value: serde_json::Value) -> Result<DynamicObject, kube::Error> {
        apply_value(client, value).await
    }
}

/// Applies every document of a multi-document YAML manifest with `client` (server-side apply).
pub async fn apply_yaml(client: &Client, yaml: &str) -> Result<(), String> {
    for doc in yaml.split("\n---").map(str::trim) {
        if doc.lines().all(|l| l.trim_start().starts_with('#') || l.trim().is_empty()) {
            continue;
        }
        let value: serde_json::Value = serde_saphyr::from_str(doc).map_err(|e| format!("manifest: {e}\n{doc}"))?;
        let what =
            format!("{} {}", value["kind"].as_str().unwrap_or("?"), value["metadata"]["name"].as_str().unwrap_or("?"));
        apply_value(client, value).await.map_err(|e| format!("applying {what}: {e}"))?;
    }
    Ok(())
}

/// Applies one object (as JSON) with `client`, for the kinds meshca's manifests use.
pub async fn apply_value(client: &Client, value: serde_json::Value) -> Result<DynamicObject, kube::Error> {
    {
        let api_version = value["apiVersion"].as_str().unwrap().to_string();
        let kind = value["kind"].as_str().unwrap().to_string();
        let (group, version) = match api_version.split_once('/') {
            Some((g, v)) => (g.to_string(), v.to_string()),
            None => (String::new(), api_version.clone()),
        };
        let (plural, namespaced) = match kind.as_str() {
            "Namespace" => ("namespaces", false),
            "ServiceAccount" => ("serviceaccounts", true),
            "Secret" => ("secrets", true),
            "Role" => ("roles", true),
            "RoleBinding" => ("rolebindings", true),
            "ClusterRole" => ("clusterroles", false),
            "ClusterRoleBinding" => ("clusterrolebindings", false),
            "CustomResourceDefinition" => ("customresourcedefinitions", false),
            "RootTrustPolicy" => ("roottrustpolicies", true),
            "Lease" => ("leases", true),
            // Workloads are applied to prove they are valid; nothing runs them here.
            "Deployment" => ("deployments", true),
            "Service" => ("services", true),
            "ConfigMap" => ("configmaps", true),
            other => panic!("apply_value: kind {other} is not in the test table"),
        };
        let gvk = GroupVersionKind::gvk(&group, &version, &kind);
        let ar = ApiResource::from_gvk_with_plural(&gvk, plural);
        let obj: DynamicObject = serde_json::from_value(value).unwrap();
        let name = obj.metadata.name.clone().unwrap();
        let api: Api<DynamicObject> = match (&obj.metadata.namespace, namespaced) {
            (Some(ns), true) => Api::namespaced_with(client.clone(), ns, &ar),
            (None, true) => Api::default_namespaced_with(client.clone(), &ar),
            _ => Api::all_with(client.clone(), &ar),
        };
        api.patch(&name, &PatchParams::apply("meshca-test").force(), &Patch::Apply(&obj)).await
    }
}

impl ApiServer {
    /// A TokenRequest token for `ns/sa`: for `audience`, or the API server's own (which
    /// authenticates to it) when `None`.
    pub async fn token(&self, ns: &str, sa: &str, audience: Option<&str>, ttl: Duration) -> String {
        let api: Api<ServiceAccount> = Api::namespaced(self.admin().await, ns);
        let req = TokenRequest {
            spec: TokenRequestSpec {
                audiences: audience.map(|a| vec![a.to_string()]).unwrap_or_default(),
                expiration_seconds: Some(ttl.as_secs() as i64),
                ..Default::default()
            },
            ..Default::default()
        };
        let out: TokenRequest = api.create_subresource("token", sa, &PostParams::default(), &req).await.unwrap();
        out.status.unwrap().token
    }

    /// Writes a token for `ns/sa` (authenticating to this API server) to `path`.
    pub async fn token_file(&self, ns: &str, sa: &str, path: &Path) {
        let t = self.token(ns, sa, None, Duration::from_secs(3600)).await;
        std::fs::write(path, t).unwrap();
    }

    /// The raw status code and body of a request as the holder of `token`.
    pub async fn raw(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let client = self.client_with_token(token).await;
        let mut req = http::Request::builder().method(method).uri(path);
        let bytes = match body {
            Some(b) => {
                req = req.header(
                    "content-type",
                    if method == "PATCH" { "application/apply-patch+yaml" } else { "application/json" },
                );
                serde_json::to_vec(&b).unwrap()
            }
            None => Vec::new(),
        };
        let req = req.body(bytes).unwrap();
        match client.request::<serde_json::Value>(req).await {
            Ok(v) => (200, v),
            Err(kube::Error::Api(s)) => (s.code, serde_json::json!({"message": s.message, "reason": s.reason})),
            Err(e) => panic!("{method} {path}: {e}"),
        }
    }

    /// Stops the API server (etcd keeps running), e.g. to test an outage.
    pub fn kill_apiserver(&mut self) {
        let _ = self.apiserver.kill();
        let _ = self.apiserver.wait();
    }

    /// Compacts etcd's history up to now, so no watch can resume from an older resource
    /// version: the API server answers such a watch 410 Gone (through etcd's JSON gateway).
    pub fn compact_etcd(&self) {
        let range = self.etcd_post("/v3/kv/range", r#"{"key":"Lw==","range_end":"MA==","count_only":true}"#);
        let revision = range["header"]["revision"].as_str().unwrap().to_string();
        self.etcd_post("/v3/kv/compaction", &format!(r#"{{"revision":"{revision}","physical":true}}"#));
    }

    fn etcd_post(&self, path: &str, body: &str) -> serde_json::Value {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.etcd_port)).unwrap();
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "etcd {path}: {out}");
        let json = out.split("\r\n\r\n").nth(1).unwrap_or_default();
        serde_json::from_str(json).unwrap_or_else(|e| panic!("etcd {path}: {e}: {json}"))
    }

    /// Starts the API server again on the same port and etcd (after [`Self::kill_apiserver`]).
    /// Its watch cache starts empty, so a watch resuming from an older resource version is
    /// answered 410 Gone and must list again.
    pub async fn restart_apiserver(&mut self) {
        self.apiserver = spawn_apiserver(&self.bin, &self.api_args, &self.dir);
        assert!(self.wait_ready(Duration::from_secs(60)).await, "kube-apiserver did not come back");
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        for c in [&mut self.apiserver, &mut self.etcd] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// 8 random hex characters.
pub fn random_suffix() -> String {
    let mut b = [0u8; 4];
    aws_lc_rs::rand::fill(&mut b).unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}
