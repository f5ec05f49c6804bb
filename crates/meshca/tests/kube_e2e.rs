//! Kubernetes mode end to end, against three real kube-apiservers (+ etcd): one management
//! cluster and two workload clusters, each set up with the `deploy/` manifests as they are and
//! every meshca process running with the service-account token those manifests define.
//!
//! Proven here: the CRD's schema refuses a policy with no CA mode or two; agents register and
//! write `istio-system/cacerts` (type Opaque, the four keys and `ca-crl.pem` with a CRL from every
//! CA of the chain, the managed-by label) that passes `openssl verify`; the policy's status shows both clusters with their serials, NotAfters and
//! conditions, and the audit log records the policy applied through the resource once; the agent's credentials get 403 for every other Secret operation while the agent
//! works; the workload CA authenticates callers by TokenReview (audience `istio-ca`, `clusterid`
//! choosing the API server) and issues exactly `spiffe://cluster.local/ns/<ns>/sa/<sa>`, and
//! refuses a token the API server vouches for whose `exp` is out of range.
#![allow(clippy::unwrap_used)]

mod common;
mod kube_support;

use std::path::Path;
use std::time::Duration;

use common::*;
use kube::Api;
use kube::api::DynamicObject;
use kube_support::*;
use serde_json::{Value, json};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_management_cluster_and_two_workload_clusters_on_real_api_servers() {
    let started = std::time::Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let mgmt_api = cluster(d, "mgmt").await;
    let c1 = cluster(d, "cluster-1").await;
    let c2 = cluster(d, "cluster-2").await;
    eprintln!("three API servers up in {:?}", started.elapsed());

    // ---- The CRD: the schema refuses no CA mode and two; the deploy/ policy is accepted.
    install_management(&mgmt_api).await;
    let admin = mgmt_api.admin().await;
    let policy_doc: Value = serde_saphyr::from_str(&manifest("management/policy.yaml")).unwrap();
    for (what, config) in
        [("no CA mode", json!({})), ("two CA modes", json!({"generated": {}, "secretRef": {"name": "my-root"}}))]
    {
        let mut bad = policy_doc.clone();
        bad["metadata"]["name"] = json!("bad");
        bad["spec"]["config"] = config;
        let err = mgmt_api.apply_value(&admin, bad).await.expect_err(what);
        let text = err.to_string();
        assert!(text.contains("spec.config") && (text.contains("422") || text.contains("Invalid")), "{what}: {text}");
        eprintln!("CRD schema refused {what}: {text}");
    }
    let mut bad_ratio = policy_doc.clone();
    bad_ratio["metadata"]["name"] = json!("bad-ratio");
    bad_ratio["spec"]["intermediateCertOptions"]["secretRotationGracePeriodRatio"] = json!(1.5);
    assert!(mgmt_api.apply_value(&admin, bad_ratio).await.is_err(), "a ratio outside (0, 1)");
    mgmt_api.apply_yaml(&manifest("management/policy.yaml")).await;
    mgmt_api.apply_yaml(&manifest("management/server.yaml")).await;

    // ---- The management plane, as the service account of deploy/management/rbac.yaml.
    let server_token = sa_token_file(&mgmt_api, d, "meshca", "meshca-server").await;
    // Reserved: the replica advertises its address before it binds it.
    let port = Ports::one();
    let mut extra = kube_flags(&mgmt_api, &server_token);
    extra.extend(["--replica-id".into(), "replica-a".into(), "--advertise-address".into(), port.addr(0)]);
    let extra_refs: Vec<&str> = extra.iter().map(String::as_str).collect();
    let m = tokio::task::block_in_place(|| Mgmt::start_on(d, &port, &extra_refs));

    // ---- Two workload clusters, each with deploy/workload/rbac.yaml and the agent's own token.
    let mut agents = Vec::new();
    for (name, api) in [("cluster-1", &c1), ("cluster-2", &c2)] {
        install_workload_rbac(api).await;
        api.apply_yaml(&manifest("workload/agent.yaml")).await;
        api.apply_yaml(&manifest("workload/workload-ca.yaml")).await;
        let token = sa_token_file(api, d, "meshca-system", "meshca-agent").await;
        let (bootstrap, relay) = tokio::task::block_in_place(|| m.add_cluster(d, name));
        if name == "cluster-2" {
            // A cacerts someone else made is there already: the agent leaves it alone ...
            api.apply_yaml("apiVersion: v1\nkind: Secret\nmetadata: { name: cacerts, namespace: istio-system }\ndata: { ca-cert.pem: Zm9yZWlnbg== }\n").await;
            let mut refusing = kube_support::agent(d, name, &m.addr, &bootstrap, &relay, &kube_flags(api, &token));
            eventually(Duration::from_secs(30), "the agent to refuse a foreign cacerts", || async {
                refusing.log_text().contains("was not written by meshca; refusing to overwrite it").then_some(())
            })
            .await;
            let untouched = cacerts(api).await.unwrap();
            assert!(untouched.metadata.labels.is_none(), "the foreign cacerts was relabelled");
            assert_eq!(untouched.data.unwrap().len(), 1, "the foreign cacerts was rewritten");
            refusing.kill();
            // ... until it is told to adopt it (registered already: its identity is in its Secret).
            let mut flags = kube_flags(api, &token);
            flags.push("--adopt-existing".into());
            agents.push(kube_support::agent(d, name, &m.addr, &bootstrap, &relay, &flags));
            continue;
        }
        agents.push(kube_support::agent(d, name, &m.addr, &bootstrap, &relay, &kube_flags(api, &token)));
    }

    // ---- cacerts appears in each cluster's istio-system, as istiod needs it.
    let mut serials = Vec::new();
    let mut roots = Vec::new();
    for (name, api) in [("cluster-1", &c1), ("cluster-2", &c2)] {
        let secret = eventually(Duration::from_secs(60), &format!("{name}'s cacerts"), || async {
            let managed = |s: &k8s_openapi::api::core::v1::Secret| {
                s.metadata.labels.as_ref().is_some_and(|l| l.contains_key("app.kubernetes.io/managed-by"))
            };
            // With ca-crl.pem: it comes with the first bundle, or right after it once the root's
            // CRL is published.
            let crl =
                |s: &k8s_openapi::api::core::v1::Secret| s.data.as_ref().is_some_and(|d| d.contains_key("ca-crl.pem"));
            cacerts(api).await.filter(managed).filter(crl)
        })
        .await;
        assert_eq!(secret.type_.as_deref(), Some("Opaque"));
        let keys: Vec<&String> = secret.data.as_ref().unwrap().keys().collect();
        assert_eq!(keys, ["ca-cert.pem", "ca-crl.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"]);
        let labels = secret.metadata.labels.clone().unwrap_or_default();
        assert_eq!(labels.get("app.kubernetes.io/managed-by").map(String::as_str), Some("meshca"));
        let annotations = secret.metadata.annotations.clone().unwrap_or_default();
        assert_eq!(annotations.get("meshca.io/cluster").map(String::as_str), Some(name));
        // One update wrote all four keys, as meshca (cluster-2's was adopted from another writer).
        let managers: Vec<String> =
            secret.metadata.managed_fields.iter().flatten().filter_map(|f| f.manager.clone()).collect();
        assert!(managers.contains(&"meshca".to_string()), "{managers:?}");
        let dir = write_secret_dir(&secret, &d.join(format!("{name}-cacerts")));
        openssl_verify_cacerts(&dir);
        let bundle = valid_bundle(&dir).unwrap();
        assert!(bundle.ca_cert().subject().contains(name), "{}", bundle.ca_cert().subject());
        let crls = meshca_pki::Crl::parse_pem_bundle(&std::fs::read(dir.join("ca-crl.pem")).unwrap()).unwrap();
        meshca_pki::crl::check_chain_coverage(&crls, bundle.signer().chain()).unwrap();
        serials.push(annotations["meshca.io/serial"].clone());
        roots.push(std::fs::read(dir.join("root-cert.pem")).unwrap());
    }
    assert_eq!(roots[0], roots[1], "both clusters trust the same root");

    // ---- The policy's status shows both clusters.
    let rtp: Api<DynamicObject> = Api::namespaced_with(admin.clone(), "meshca", &meshca_kube::policy::api_resource());
    let mut last = Value::Null;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Ok(obj) = rtp.get("mesh").await
            && let Some(st) = obj.data.get("status")
        {
            last = st.clone();
            let ready = st["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            if ready {
                break last.clone();
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the policy status never showed both clusters ready; last: {last:#}\nserver log:\n{}",
            m.proc.log_text()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    eprintln!("policy status: {}", serde_json::to_string_pretty(&status).unwrap());
    assert_eq!(status["caMode"], "generated");
    assert!(status["rootSetFingerprint"].as_str().unwrap().len() > 10);
    assert_eq!(status["observedGeneration"], 1);
    for (i, name) in ["cluster-1", "cluster-2"].iter().enumerate() {
        let c = status["clusters"].as_array().unwrap().iter().find(|c| c["name"] == *name).unwrap();
        assert_eq!(c["phase"], "Ready", "{c}");
        assert_eq!(c["intermediateSerial"], serials[i].as_str(), "{c}");
        assert!(c["intermediateNotAfter"].as_str().unwrap().ends_with('Z'), "{c}");
        assert_eq!(c["rootSetFingerprint"], status["rootSetFingerprint"], "{c}");
    }
    for kind in ["Accepted", "Ready"] {
        let cond = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == kind).unwrap();
        assert_eq!(cond["status"], "True", "{cond}");
        assert!(cond["lastTransitionTime"].as_str().unwrap().ends_with('Z'), "{cond}");
    }
    // The policy put in force from the resource (applied with the API, never through meshca's
    // operator API) is in the audit log exactly once, by the resource's name.
    let (ok, out, err) = tokio::task::block_in_place(|| run(&["audit", "-o", "json", "--credentials", &m.creds()]));
    assert!(ok, "{err}");
    let entries: Vec<Value> = serde_json::from_str(&out).unwrap();
    let applied: Vec<&Value> = entries.iter().filter(|e| e["action"] == "policy-applied").collect();
    assert_eq!(applied.len(), 1, "{out}");
    assert_eq!(applied[0]["actor"], "kubernetes RootTrustPolicy meshca/mesh", "{out}");
    assert_eq!(applied[0]["details"]["policyGeneration"], status["policyGeneration"], "{out}");
    // The issued-serial log is a Secret in the management cluster.
    let issued = mgmt_secret_record(&mgmt_api, "issued-cluster-1").await;
    assert_eq!(issued["records"][0]["serial"], serials[0].as_str());

    // ---- RBAC: with the agent's own token, every other Secret operation is 403.
    let agent_token = std::fs::read_to_string(d.join("kube-cluster-1-meshca-system-meshca-agent.token")).unwrap();
    let denied = [
        ("GET", "/api/v1/namespaces/istio-system/secrets/istio-ca-secret", None),
        ("GET", "/api/v1/namespaces/istio-system/secrets", None),
        ("GET", "/api/v1/namespaces/kube-system/secrets", None),
        ("GET", "/api/v1/secrets", None),
        ("GET", "/api/v1/namespaces/meshca-system/secrets/meshca-bootstrap", None),
        (
            "POST",
            "/api/v1/namespaces/istio-system/secrets",
            Some(json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "evil"}})),
        ),
        (
            "PATCH",
            "/api/v1/namespaces/istio-system/secrets/evil?fieldManager=x",
            Some(json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "evil"}})),
        ),
        (
            "PATCH",
            "/api/v1/namespaces/kube-system/secrets/cacerts?fieldManager=x",
            Some(json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "cacerts"}})),
        ),
        ("DELETE", "/api/v1/namespaces/istio-system/secrets/cacerts", None),
        ("GET", "/api/v1/namespaces/istio-system/configmaps", None),
    ];
    for (method, path, body) in denied {
        let (code, v) = c1.raw(&agent_token, method, path, body).await;
        assert_eq!(code, 403, "{method} {path} as the agent: {v}");
    }
    let (code, v) = c1.raw(&agent_token, "GET", "/api/v1/namespaces/istio-system/secrets/cacerts", None).await;
    assert_eq!(code, 200, "the agent reads its own cacerts: {v}");
    // The management plane's token reaches nothing outside its namespace either.
    let server_tok = std::fs::read_to_string(&server_token).unwrap();
    for path in [
        "/api/v1/namespaces/kube-system/secrets",
        "/api/v1/secrets",
        "/apis/coordination.k8s.io/v1/namespaces/meshca/leases/other",
    ] {
        let (code, v) = mgmt_api.raw(&server_tok, "GET", path, None).await;
        assert_eq!(code, 403, "{path} as the management plane: {v}");
    }
    // ... and the agent, with exactly those permissions, still works: an operator rotation
    // re-issues and rewrites cacerts.
    let (ok, out, err) = tokio::task::block_in_place(|| run(&["rotate", "cluster-1", "--credentials", &m.creds()]));
    assert!(ok, "{out}{err}");
    eventually(Duration::from_secs(60), "cluster-1's rotated cacerts", || async {
        let s = cacerts(&c1).await?;
        (s.metadata.annotations?.get("meshca.io/serial")? != &serials[0]).then_some(())
    })
    .await;
    for a in &agents {
        let log = a.log_text();
        // (StoreError::Forbidden reads "permission denied on …"; hex serials may contain "403".)
        assert!(!log.contains("permission denied") && !log.contains("forbidden"), "{}: {log}", a.name);
    }

    // ---- The workload CA: TokenReview with cluster-1's API server, clusterid for cluster-2's.
    let istiod_token = sa_token_file(&c1, d, "istio-system", "istiod").await;
    let istiod2_token = c2.token("istio-system", "istiod", None, Duration::from_secs(3600)).await;
    let kubeconfig2 = d.join("cluster-2.kubeconfig");
    kubeconfig(&c2, &istiod2_token, &kubeconfig2);
    let mirror = d.join("workload-ca-cacerts");
    let mut args: Vec<String> = vec![
        "workload-ca".into(),
        "--cacerts".into(),
        mirror.display().to_string(),
        "--cacerts-secret".into(),
        "istio-system/cacerts".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--tokenreview".into(),
        "--token-cache-ttl".into(),
        "2s".into(),
        "--cluster-name".into(),
        "cluster-1".into(),
        "--remote-cluster".into(),
        format!("cluster-2={}", kubeconfig2.display()),
    ];
    // As istiod's service account: TokenReview, and (no kubelet here) reading cacerts by name.
    args.extend(kube_flags(&c1, &istiod_token));
    let args_ref: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut wca = spawn_meshca("workload-ca", d, &args_ref);
    let root_file = mirror.join("root-cert.pem");
    let (ca_addr, _) = tokio::task::block_in_place(|| workload_ca_addrs(&mut wca));

    for ns_sa in [("app", "sleep"), ("app", "doomed"), ("app", "revoked")] {
        c1.apply_yaml(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{ name: {} }}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {{ name: {}, namespace: {} }}\n",
            ns_sa.0, ns_sa.1, ns_sa.0
        ))
        .await;
    }
    c2.apply_yaml("apiVersion: v1\nkind: Namespace\nmetadata: { name: web }\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: { name: front, namespace: web }\n").await;
    let good = c1.token("app", "sleep", Some("istio-ca"), Duration::from_secs(3600)).await;
    let wrong_aud = c1.token("app", "sleep", Some("not-istio-ca"), Duration::from_secs(3600)).await;
    let doomed = c1.token("app", "doomed", Some("istio-ca"), Duration::from_secs(3600)).await;
    let remote = c2.token("web", "front", Some("istio-ca"), Duration::from_secs(3600)).await;
    let (code, v) = c1
        .raw(meshca_kube::testing::ADMIN_TOKEN, "DELETE", "/api/v1/namespaces/app/serviceaccounts/doomed", None)
        .await;
    assert_eq!(code, 200, "{v}");

    let csr = openssl_csr(d, "leaf", OpensslKey::P256, &[]);
    let mut client = ca_client(&ca_addr, &root_file, "istiod.istio-system.svc");
    let chain = create_certificate(&mut client, csr_request(&csr, Some(&good), None, 3600)).await.unwrap();
    let leaf = meshca_pki::Cert::from_pem(chain[0].as_bytes()).unwrap();
    assert_eq!(leaf.uri_sans(), ["spiffe://cluster.local/ns/app/sa/sleep".to_string()]);
    let files = write_chain(d, "leaf-chain", &chain);
    let (ok, out) = openssl_verify_leaf(d, &files, &root_file);
    assert!(ok, "{out}");
    // Same token again: served from the cache, same identity.
    let again = create_certificate(&mut client, csr_request(&csr, Some(&good), Some("cluster-1"), 3600)).await.unwrap();
    assert_eq!(meshca_pki::Cert::from_pem(again[0].as_bytes()).unwrap().uri_sans(), leaf.uri_sans());

    // A token accepted (and cached) whose service account is then deleted is refused once the
    // workload CA's cache (--token-cache-ttl 2s) and the API server's own (10 s) have let go of it.
    let revoked = c1.token("app", "revoked", Some("istio-ca"), Duration::from_secs(3600)).await;
    create_certificate(&mut client, csr_request(&csr, Some(&revoked), None, 3600)).await.unwrap();
    let (code, v) = c1
        .raw(meshca_kube::testing::ADMIN_TOKEN, "DELETE", "/api/v1/namespaces/app/serviceaccounts/revoked", None)
        .await;
    assert_eq!(code, 200, "{v}");
    let deleted = std::time::Instant::now();
    eventually(Duration::from_secs(60), "the revoked token to be refused", || async {
        let mut client = ca_client(&ca_addr, &root_file, "istiod.istio-system.svc");
        match create_certificate(&mut client, csr_request(&csr, Some(&revoked), None, 3600)).await {
            Err(e) if e.code() == Code::Unauthenticated => Some(()),
            _ => None,
        }
    })
    .await;
    eprintln!("a revoked token was refused {:?} after its service account was deleted", deleted.elapsed());

    for (what, token, cluster) in [
        ("a token for another audience", &wrong_aud, None),
        ("a token of a deleted service account", &doomed, None),
        ("cluster-2's token reviewed by cluster-1", &remote, Some("cluster-1")),
        ("a token with an unknown clusterid", &good, Some("cluster-9")),
        ("garbage", &"not-a-token".to_string(), None),
    ] {
        let err = create_certificate(&mut client, csr_request(&csr, Some(token), cluster, 3600)).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{what}: {err:?}");
        eprintln!("refused {what}: {}", err.message());
    }
    // A token the API server vouches for (its own signing key, a live service account) whose
    // exp is 9e18: within Go's int64 seconds, far past any time meshca does arithmetic on. The
    // TokenReview path used to read it unchecked (UNIX_EPOCH + exp; 2^63 and more panicked the
    // request task); now it is refused like every out-of-range time claim.
    let far = resign_with_exp(d, &c1, &good, 9_000_000_000_000_000_000);
    let err = create_certificate(&mut client, csr_request(&csr, Some(&far), None, 3600)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("exp claim") && err.message().contains("out of range"), "{err:?}");
    // clusterid selects cluster-2's API server, which vouches for its own service account.
    let chain =
        create_certificate(&mut client, csr_request(&csr, Some(&remote), Some("cluster-2"), 3600)).await.unwrap();
    let leaf = meshca_pki::Cert::from_pem(chain[0].as_bytes()).unwrap();
    assert_eq!(leaf.uri_sans(), ["spiffe://cluster.local/ns/web/sa/front".to_string()]);

    assert!(!wca.log_text().contains(&good), "a token is in the workload CA's log");
    drop(wca);
    drop(agents);
    drop(m);
    eprintln!("done in {:?}", started.elapsed());
}

async fn mgmt_secret_record(api: &meshca_kube::testing::ApiServer, name: &str) -> Value {
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(api.admin().await, "meshca");
    let s = secrets.get(name).await.unwrap();
    serde_json::from_slice(&s.data.unwrap()["record.json"].0).unwrap()
}

/// `token` (a service-account JWT of `api`) with its `exp` claim set to `exp`, signed again with
/// the API server's own service-account key (RS256, with the OpenSSL CLI), header kept.
fn resign_with_exp(d: &Path, api: &meshca_kube::testing::ApiServer, token: &str, exp: u64) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut parts = token.split('.');
    let (header, payload) = (parts.next().unwrap(), parts.next().unwrap());
    let mut claims: Value = serde_json::from_slice(&b64.decode(payload).unwrap()).unwrap();
    claims["exp"] = Value::from(exp);
    let signing_input = format!("{header}.{}", b64.encode(serde_json::to_vec(&claims).unwrap()));
    std::fs::write(d.join("resign.txt"), &signing_input).unwrap();
    let key = api.dir.join("sa.key");
    openssl_ok(d, &["dgst", "-sha256", "-sign", key.to_str().unwrap(), "-out", "resign.sig", "resign.txt"]);
    format!("{signing_input}.{}", b64.encode(std::fs::read(d.join("resign.sig")).unwrap()))
}
