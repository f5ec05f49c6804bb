//! A real kube-apiserver (built by `scripts/peers/kube-apiserver.sh`) with its own etcd, started
//! from Rust for the tests of this crate and of `meshca` (feature `testing`; not part of meshca
//! proper).
//!
//! The binary comes from `MESHCA_KUBE_APISERVER_BIN` (set by `scripts/test.sh`), else from the
//! peers cache ([`meshca_testsupport::peers::peer_bin`]). Each [`ApiServer`] is one cluster: its own
//! etcd data directory, serving CA, service-account signing key and reserved ports, all on
//! 127.0.0.1; it is killed when dropped. The admin is the static token `admintoken` (group
//! `system:masters`). There is no controller-manager: tests create ServiceAccounts and bindings
//! themselves (see [`ApiServer::apply_yaml`]), and Deployments are stored but never rolled out.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use meshca_testsupport::{Ports, Proc, openssl_ok};

use crate::Connection;

/// The static admin token of every test API server.
pub const ADMIN_TOKEN: &str = "admintoken";

/// The kube-apiserver binary.
pub fn apiserver_bin() -> PathBuf {
    meshca_testsupport::peers::peer_bin("MESHCA_KUBE_APISERVER_BIN", "scripts/peers/kube-apiserver.sh")
}

/// One cluster's API server and etcd.
pub struct ApiServer {
    pub dir: PathBuf,
    pub url: String,
    /// The CA that signed the serving certificate.
    pub ca: PathBuf,
    /// A file holding [`ADMIN_TOKEN`].
    pub admin_token_file: PathBuf,
    // Declared before `ports`: the processes die before their ports are released.
    apiserver: Proc,
    etcd: Proc,
    api_args: Vec<String>,
    /// etcd's client port, its peer port, the API server's port; held across restarts.
    ports: Ports,
}

fn spawn_apiserver(args: &[String], dir: &Path) -> Proc {
    let mut cmd = Command::new(apiserver_bin());
    cmd.args(args);
    Proc::spawn(cmd, "kube-apiserver", dir)
}

/// A P-256 CA and a serving certificate for 127.0.0.1 / localhost / the in-cluster name, and the
/// RSA key the API server signs service-account tokens with.
fn make_certs(dir: &Path) {
    let certs = dir.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    openssl_ok(&certs, &["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key"]);
    openssl_ok(
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
    openssl_ok(&certs, &["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "apiserver.key"]);
    openssl_ok(
        &certs,
        &["req", "-new", "-key", "apiserver.key", "-subj", "/CN=kube-apiserver", "-out", "apiserver.csr"],
    );
    std::fs::write(
        certs.join("ext"),
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
         extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\n",
    )
    .unwrap();
    openssl_ok(
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
    openssl_ok(dir, &["genrsa", "-out", "sa.key", "2048"]);
    openssl_ok(dir, &["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"]);
}

impl ApiServer {
    /// Starts etcd and kube-apiserver in `dir` and waits until `/readyz` answers (~5–15 s).
    pub async fn start(dir: &Path) -> ApiServer {
        std::fs::create_dir_all(dir).unwrap();
        let dir = dir.canonicalize().unwrap();
        let certs = dir.join("certs");
        make_certs(&dir);
        std::fs::write(dir.join("tokens.csv"), format!("{ADMIN_TOKEN},admin,1,\"system:masters\"\n")).unwrap();
        let admin_token_file = dir.join("admin-token");
        std::fs::write(&admin_token_file, ADMIN_TOKEN).unwrap();

        let ports = Ports::reserve(3);
        let (client, peer, api_port) = (ports.port(0), ports.port(1), ports.port(2));
        let mut etcd = Command::new("etcd");
        etcd.args(["--name", "meshca-test", "--data-dir"])
            .arg(dir.join("etcd"))
            .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!("--initial-cluster=meshca-test=http://127.0.0.1:{peer}"));
        let etcd = Proc::spawn(etcd, "etcd", &dir);
        let api_args: Vec<String> = [
            format!("--etcd-servers=http://127.0.0.1:{client}"),
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
            "--endpoint-reconciler-type=none".into(),
        ]
        .into();
        let apiserver = spawn_apiserver(&api_args, &dir);
        let mut server = ApiServer {
            url: format!("https://127.0.0.1:{api_port}"),
            ca: certs.join("ca.crt"),
            admin_token_file,
            dir,
            apiserver,
            etcd,
            api_args,
            ports,
        };
        server.wait_ready().await;
        server
    }

    /// Waits until `/readyz` says `ok`; panics with the logs if the API server exits or takes
    /// longer than two minutes (a loaded 2-core machine needs ~15 s).
    async fn wait_ready(&mut self) {
        let client = self.admin().await;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let req = http::Request::get("/readyz").body(Vec::new()).unwrap();
            if let Ok(text) = client.request_text(req).await
                && text.trim() == "ok"
            {
                return;
            }
            self.etcd.assert_running();
            self.apiserver.assert_running();
            assert!(Instant::now() < deadline, "kube-apiserver not ready:\n{}", self.apiserver.log_text());
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
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
        let f = self.dir.join(format!("token-{}", meshca_testsupport::random_hex(4)));
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
    apply_with(client, value, &PatchParams::apply("meshca-test").force()).await
}

/// A server-side dry run of applying one object (validation, defaulting and admission; nothing
/// is stored), for the kinds meshca's manifests and charts use.
pub async fn dry_run_value(client: &Client, value: serde_json::Value) -> Result<DynamicObject, kube::Error> {
    apply_with(client, value, &PatchParams::apply("meshca-test").dry_run()).await
}

async fn apply_with(
    client: &Client,
    value: serde_json::Value,
    params: &PatchParams,
) -> Result<DynamicObject, kube::Error> {
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
    api.patch(&name, params, &Patch::Apply(&obj)).await
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
        self.apiserver.kill();
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
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.ports.port(0))).unwrap();
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
        self.apiserver = spawn_apiserver(&self.api_args, &self.dir);
        self.wait_ready().await;
    }
}
