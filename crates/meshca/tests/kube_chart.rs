//! The Helm charts and istiod's Deployment, with the real `helm` (v4, `scripts/peers/helm.sh`) and
//! one real kube-apiserver (+ etcd) shared by every step that needs one.
//!
//! Proven here: both charts lint and render for each CA mode, and refuse a bad mode or the wrong
//! namespace with a clear message; `deploy/` is exactly what the charts render; every rendered
//! object is accepted by the API server (server-side dry run); `helm install`, `helm upgrade`
//! (changing the CA mode) and `helm uninstall` leave exactly the expected objects (RBAC rules, the
//! CRD served, the policy's mode). Then, with the RBAC `helm install` granted and nothing more,
//! the agent restarts istiod once after the first `cacerts` (a second reconcile changes nothing),
//! adds the Vault agent sidecar in Vault mode and removes it when the policy leaves Vault mode
//! (istiod's own fields untouched), and reports — condition and alert — a forbidden patch and a
//! missing Deployment while keeping `cacerts` right. There is no controller-manager or kubelet:
//! Deployments are stored and checked as objects, never rolled out.
#![allow(clippy::unwrap_used)]

mod common;
mod kube_support;
mod vault_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::rbac::v1::Role;
use kube::api::{Api, DynamicObject};
use kube::{Client, ResourceExt};
use kube_support::*;
use meshca_kube::testing::ApiServer;
use serde_json::{Value, json};
use vault_support::{Storage, Vault};

const MODES: [&str; 4] = ["generated", "secretRef", "intermediateRef", "vault"];

fn helm_bin() -> PathBuf {
    meshca_testsupport::peers::peer_bin("MESHCA_HELM_BIN", "scripts/peers/helm.sh")
}

/// Runs helm in the repository with `args`; (success, stdout, stderr).
fn helm(kubeconfig: Option<&Path>, args: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new(helm_bin());
    cmd.current_dir(repo()).args(args);
    // A private home: no user configuration or cache is read or written.
    let home = std::env::temp_dir().join("meshca-helm-home");
    cmd.env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_DATA_HOME", home.join("data"));
    if let Some(k) = kubeconfig {
        cmd.env("KUBECONFIG", k);
    }
    let out = cmd.output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn helm_ok(kubeconfig: Option<&Path>, args: &[&str]) -> String {
    let (ok, out, err) = helm(kubeconfig, args);
    assert!(ok, "helm {}: {out}{err}", args.join(" "));
    out
}

/// The values that select `mode` (and give Vault mode its one required value).
fn mode_args(mode: &str) -> Vec<String> {
    let mut v = vec!["--set".to_string(), format!("policy.caMode={mode}")];
    if mode == "vault" {
        v.extend(["--set".into(), "policy.vault.server=https://vault.example.com:8200".into()]);
    }
    v
}

/// Every object of a multi-document YAML stream.
fn objects(yaml: &str) -> Vec<Value> {
    yaml.split("\n---")
        .map(str::trim)
        .filter(|d| !d.lines().all(|l| l.trim_start().starts_with('#') || l.trim().is_empty()))
        .map(|d| serde_saphyr::from_str(d).unwrap_or_else(|e| panic!("{e}\n{d}")))
        .collect()
}

fn render(chart: &str, ns: &str, extra: &[String]) -> Vec<Value> {
    let mut args = vec!["template", "meshca", chart, "--namespace", ns, "--include-crds"];
    args.extend(extra.iter().map(String::as_str));
    objects(&helm_ok(None, &args))
}

#[test]
fn charts_lint_and_render_for_every_ca_mode_and_deploy_is_what_they_render() {
    for mode in MODES {
        let extra = mode_args(mode);
        let mut args = vec!["lint", "charts/meshca-management", "--strict", "--namespace", "meshca"];
        args.extend(extra.iter().map(String::as_str));
        helm_ok(None, &args);
        let objs = render("charts/meshca-management", "meshca", &extra);
        let policy = objs.iter().find(|o| o["kind"] == "RootTrustPolicy").unwrap();
        let config = policy["spec"]["config"].as_object().unwrap();
        assert_eq!(config.keys().collect::<Vec<_>>(), [mode], "{mode}: exactly one CA mode");
        // Every pod runs hardened.
        for d in objs.iter().filter(|o| o["kind"] == "Deployment") {
            assert_hardened(d);
        }
        let crd = objs.iter().find(|o| o["kind"] == "CustomResourceDefinition").unwrap();
        assert_eq!(crd["metadata"]["name"], "roottrustpolicies.meshca.io");
    }
    for (istiod, vault) in [(false, false), (true, false), (true, true)] {
        let extra: Vec<String> = vec![
            "--set".into(),
            format!("istiod.manage={istiod}"),
            "--set".into(),
            format!("vaultAgent.enabled={vault}"),
        ];
        let mut args = vec!["lint", "charts/meshca-cluster", "--strict", "--namespace", "meshca-system"];
        args.extend(extra.iter().map(String::as_str));
        helm_ok(None, &args);
        let objs = render("charts/meshca-cluster", "meshca-system", &extra);
        for d in objs.iter().filter(|o| o["kind"] == "Deployment") {
            assert_hardened(d);
        }
        let roles: Vec<&str> =
            objs.iter().filter(|o| o["kind"] == "Role").map(|o| o["metadata"]["name"].as_str().unwrap()).collect();
        assert_eq!(roles.contains(&"meshca-agent-istiod"), istiod, "{roles:?}");
        assert_eq!(roles.contains(&"meshca-vault-agent-identity"), vault, "{roles:?}");
        let agent_deployment =
            objs.iter().find(|o| o["metadata"]["name"] == "meshca-agent" && o["kind"] == "Deployment").unwrap();
        let args = agent_deployment["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
        assert_eq!(args.contains("--istiod-deployment=istio-system/istiod"), istiod, "{args}");
        assert_eq!(args.contains("--vault-agent-image="), vault, "{args}");
    }

    // Refusals that name what to change.
    let (ok, _, err) =
        helm(None, &["template", "m", "charts/meshca-management", "-n", "meshca", "--set", "policy.caMode=nope"]);
    assert!(!ok && err.contains("policy.caMode is \"nope\""), "{err}");
    let (ok, _, err) =
        helm(None, &["template", "m", "charts/meshca-management", "-n", "meshca", "--set", "policy.caMode=vault"]);
    assert!(!ok && err.contains("policy.vault.server"), "{err}");
    let (ok, _, err) = helm(None, &["template", "m", "charts/meshca-management", "-n", "default"]);
    assert!(!ok && err.contains("namespace meshca"), "{err}");
    let (ok, _, err) = helm(None, &["template", "m", "charts/meshca-cluster", "-n", "default"]);
    assert!(!ok && err.contains("namespace meshca-system"), "{err}");

    // deploy/ (what the other Kubernetes tests apply) is exactly the charts' output.
    let out = Command::new("bash")
        .arg(repo().join("scripts/render-deploy.sh"))
        .arg("--check")
        .env("MESHCA_HELM_BIN", helm_bin())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Non-root, read-only root file system, no privilege escalation, no capabilities, the default
/// seccomp profile, resources set.
fn assert_hardened(d: &Value) {
    let name = &d["metadata"]["name"];
    let pod = &d["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{name}");
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault", "{name}");
    for c in pod["containers"].as_array().unwrap() {
        let sc = &c["securityContext"];
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{name}");
        assert!(c["resources"]["requests"].is_object() && c["resources"]["limits"]["memory"].is_string(), "{name}");
    }
}

/// A kubeconfig with the admin token, for helm.
fn admin_kubeconfig(api: &ApiServer, d: &Path) -> PathBuf {
    let p = d.join("admin.kubeconfig");
    kubeconfig(api, meshca_kube::testing::ADMIN_TOKEN, &p);
    p
}

/// Server-side dry run of `obj` (validation, defaulting, admission; nothing stored).
async fn dry_run(client: &Client, obj: &Value) -> Result<(), String> {
    meshca_kube::testing::dry_run_value(client, obj.clone()).await.map(drop).map_err(|e| e.to_string())
}

/// `helm install|upgrade` of the cluster chart without the workload CA, with or without istiod
/// management.
fn cluster_chart(kubeconfig: &Path, verb: &str, manage_istiod: bool) {
    let manage = format!("istiod.manage={manage_istiod}");
    let args = [
        verb,
        "meshca",
        "charts/meshca-cluster",
        "-n",
        "meshca-system",
        "--set",
        &manage,
        "--set",
        "workloadCA.enabled=false",
    ];
    helm_ok(Some(kubeconfig), &args);
}

fn rules(role: &Role) -> Value {
    serde_json::to_value(role.rules.clone().unwrap_or_default()).unwrap()
}

async fn role(client: &Client, ns: &str, name: &str) -> Option<Role> {
    Api::<Role>::namespaced(client.clone(), ns).get_opt(name).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_installs_upgrades_and_uninstalls_and_the_agent_wires_istiod() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let api = cluster(d, "one").await;
    eprintln!("API server up in {:?}", started.elapsed());
    let admin = api.admin().await;
    let kc = admin_kubeconfig(&api, d);
    namespaces(&api, &["meshca", "meshca-system", "istio-system"]).await;

    // ---- Every object each mode renders is accepted by the API server (dry run).
    api.apply_yaml(&manifest("crds/roottrustpolicies.meshca.io.yaml")).await;
    let t = Instant::now();
    let crd_served = || async {
        let rtp: Api<DynamicObject> =
            Api::namespaced_with(admin.clone(), "meshca", &meshca_kube::policy::api_resource());
        rtp.list(&Default::default()).await.ok()
    };
    eventually(Duration::from_secs(20), "the CRD served", crd_served).await;
    let mut checked = 0;
    for mode in MODES {
        for obj in render("charts/meshca-management", "meshca", &mode_args(mode)) {
            dry_run(&admin, &obj)
                .await
                .unwrap_or_else(|e| panic!("{mode}: {} {}: {e}", obj["kind"], obj["metadata"]["name"]));
            checked += 1;
        }
    }
    for extra in [
        vec![],
        vec!["--set".to_string(), "istiod.manage=true".into(), "--set".into(), "vaultAgent.enabled=true".into()],
    ] {
        for obj in render("charts/meshca-cluster", "meshca-system", &extra) {
            dry_run(&admin, &obj).await.unwrap_or_else(|e| panic!("{} {}: {e}", obj["kind"], obj["metadata"]["name"]));
            checked += 1;
        }
    }
    // A policy with two modes is refused by the schema the chart installs.
    let mut bad =
        render("charts/meshca-management", "meshca", &[]).into_iter().find(|o| o["kind"] == "RootTrustPolicy").unwrap();
    bad["spec"]["config"]["secretRef"] = json!({"name": "x"});
    let err = dry_run(&admin, &bad).await.unwrap_err();
    assert!(err.contains("spec.config"), "{err}");
    eprintln!("{checked} rendered objects accepted by dry run in {:?}", t.elapsed());

    // ---- helm install, upgrade (another CA mode), uninstall of the management chart.
    let t = Instant::now();
    helm_ok(Some(&kc), &["install", "meshca", "charts/meshca-management", "-n", "meshca"]);
    let rtp: Api<DynamicObject> = Api::namespaced_with(admin.clone(), "meshca", &meshca_kube::policy::api_resource());
    let policy = rtp.get("mesh").await.unwrap();
    assert_eq!(
        policy.data["spec"]["config"],
        json!({"generated": {"keyAlgorithm": "ecdsa-p256", "orgName": "meshca", "ttl": "87600h"}})
    );
    let server_role = role(&admin, "meshca", "meshca-server").await.unwrap();
    assert_eq!(
        rules(&server_role),
        json!([
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]},
            {"apiGroups": ["meshca.io"], "resources": ["roottrustpolicies"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["meshca.io"], "resources": ["roottrustpolicies/status"], "verbs": ["get", "update", "patch"]},
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": ["meshca-leader"], "verbs": ["get", "create", "update", "patch"]},
        ])
    );
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), "meshca");
    assert_eq!(deployments.get("meshca-server").await.unwrap().spec.unwrap().replicas, Some(3));
    helm_ok(
        Some(&kc),
        &[
            "upgrade",
            "meshca",
            "charts/meshca-management",
            "-n",
            "meshca",
            "--set",
            "policy.caMode=secretRef",
            "--set",
            "policy.secretRef.name=my-root",
        ],
    );
    let policy = rtp.get("mesh").await.unwrap();
    assert_eq!(policy.data["spec"]["config"], json!({"secretRef": {"name": "my-root", "namespace": "meshca"}}));
    assert!(policy.metadata.generation.unwrap() >= 2);
    helm_ok(Some(&kc), &["uninstall", "meshca", "-n", "meshca"]);
    eventually(Duration::from_secs(30), "the uninstalled objects gone", || async {
        (deployments.get_opt("meshca-server").await.unwrap().is_none()
            && role(&admin, "meshca", "meshca-server").await.is_none()
            && rtp.get_opt("mesh").await.unwrap().is_none())
        .then_some(())
    })
    .await;
    // Helm never deletes a chart's CRDs (and with them every policy): still served.
    assert!(crd_served().await.is_some(), "the CRD is kept and served after uninstall");
    eprintln!("management chart installed, upgraded and uninstalled in {:?}", t.elapsed());

    // ---- The cluster chart, with istiod management: the RBAC the agent below runs with.
    cluster_chart(&kc, "install", true);
    let istiod_role = role(&admin, "istio-system", "meshca-agent-istiod").await.unwrap();
    assert_eq!(
        rules(&istiod_role),
        json!([{"apiGroups": ["apps"], "resources": ["deployments"], "resourceNames": ["istiod"], "verbs": ["get", "patch"]}])
    );
    assert_eq!(
        rules(&role(&admin, "istio-system", "meshca-agent-cacerts").await.unwrap()),
        json!([
            {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["cacerts"], "verbs": ["get", "list", "watch", "create", "update", "patch"]},
            {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["meshca-federated-bundles"], "verbs": ["get", "create", "update", "patch", "delete"]}
        ])
    );

    istiod_wiring(&api, d, &kc).await;
    eprintln!("done in {:?}", started.elapsed());
}

/// istiod's Deployment as Istio's chart makes it (the parts that matter here): the container
/// `discovery` running as 1337 with the optional Secret `cacerts` at /etc/cacerts.
fn istiod_deployment() -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": { "name": "istiod", "namespace": "istio-system" },
        "spec": {
            "selector": { "matchLabels": { "app": "istiod" } },
            "template": {
                "metadata": { "labels": { "app": "istiod" } },
                "spec": {
                    "serviceAccountName": "istiod",
                    "containers": [{
                        "name": "discovery", "image": "docker.io/istio/pilot:1.28.0",
                        "args": ["discovery", "--monitoringAddr=:15014"],
                        "securityContext": { "runAsUser": 1337, "runAsGroup": 1337, "runAsNonRoot": true },
                        "volumeMounts": [ { "name": "cacerts", "mountPath": "/etc/cacerts", "readOnly": true } ],
                    }],
                    "volumes": [ { "name": "cacerts", "secret": { "secretName": "cacerts", "optional": true } } ],
                },
            },
        },
    })
}

async fn get_istiod(api: &ApiServer) -> Deployment {
    Api::<Deployment>::namespaced(api.admin().await, "istio-system").get("istiod").await.unwrap()
}

fn template_annotations(d: &Deployment) -> std::collections::BTreeMap<String, String> {
    d.spec.as_ref().unwrap().template.metadata.as_ref().and_then(|m| m.annotations.clone()).unwrap_or_default()
}

fn pod_spec(d: &Deployment) -> Value {
    serde_json::to_value(d.spec.as_ref().unwrap().template.spec.as_ref().unwrap()).unwrap()
}

fn cluster_istiod(m: &Mgmt) -> Value {
    status_cluster(&m.status_json(), "cluster-1").map(|c| c["istiod"].clone()).unwrap_or(Value::Null)
}

async fn cacerts_serial(api: &ApiServer) -> Option<String> {
    cacerts(api).await?.metadata.annotations?.get("meshca.io/serial").cloned()
}

/// Waits until the agent has reported at least twice more (every 2 s here): it has stepped past
/// whatever it was doing.
fn two_more_reports(m: &Mgmt) {
    let seen =
        |m: &Mgmt| status_cluster(&m.status_json(), "cluster-1").map(|c| c["lastSeen"].as_i64().unwrap()).unwrap_or(0);
    let start = seen(m);
    wait_until(Duration::from_secs(30), "two more reports", || seen(m) >= start + 4);
}

async fn istiod_wiring(api: &ApiServer, d: &Path, kc: &Path) {
    let t = Instant::now();
    api.apply_yaml(&serde_json::to_string(&istiod_deployment()).unwrap()).await;
    let original = pod_spec(&get_istiod(api).await);
    let m = tokio::task::block_in_place(|| Mgmt::start(d, &[]));
    let (bootstrap, relay) = tokio::task::block_in_place(|| m.add_cluster(d, "cluster-1"));
    // The agent's own service account, with the RBAC `helm install` created.
    let token = sa_token_file(api, d, "meshca-system", "meshca-agent").await;
    let mut flags = kube_flags(api, &token);
    flags.extend(["--istiod-deployment=istio-system/istiod".into(), "--vault-agent-image=meshca:test".into()]);
    let start_agent = || kube_support::agent(d, "cluster-1", &m.addr, &bootstrap, &relay, &flags);
    let mut agent = start_agent();

    // ---- The first cacerts restarts istiod, once, recording the serial.
    let serial = eventually(Duration::from_secs(60), "cacerts", || cacerts_serial(api)).await;
    let restarted = eventually(Duration::from_secs(30), "istiod restarted", || async {
        let d = get_istiod(api).await;
        template_annotations(&d).contains_key("meshca.io/restarted-for").then_some(d)
    })
    .await;
    let ann = template_annotations(&restarted);
    assert_eq!(ann.keys().collect::<Vec<_>>(), ["kubectl.kubernetes.io/restartedAt", "meshca.io/restarted-for"]);
    assert_eq!(ann["meshca.io/restarted-for"], serial);
    assert!(ann["kubectl.kubernetes.io/restartedAt"].ends_with('Z'), "{ann:?}");
    assert_eq!(pod_spec(&restarted), original, "a restart changes nothing but the annotations");
    let managers: Vec<String> = restarted.managed_fields().iter().filter_map(|f| f.manager.clone()).collect();
    assert!(managers.contains(&meshca_kube::istiod::RESTART_MANAGER.to_string()), "{managers:?}");
    let st = eventually(Duration::from_secs(30), "istiod reported", || async {
        let st = tokio::task::block_in_place(|| cluster_istiod(&m));
        (st["state"] == "Wired").then_some(st)
    })
    .await;
    assert_eq!(
        (st["restartedForSerial"].as_str(), st["deployment"].as_str()),
        (Some(serial.as_str()), Some("istio-system/istiod"))
    );

    // ---- A second reconcile (the agent restarted) changes nothing.
    let rv = restarted.resource_version().unwrap();
    agent.kill();
    let mut agent2 = start_agent();
    tokio::task::block_in_place(|| two_more_reports(&m));
    assert_eq!(get_istiod(api).await.resource_version().unwrap(), rv, "the agent's restart restarted nothing");
    eprintln!("restart once after the first cacerts: {:?}", t.elapsed());

    // ---- Vault mode: the sidecar, its init twin and the memory-backed volume; nothing else.
    // (autoRestartPods is not part of what shapes an intermediate; a new TTL is, and re-issues.)
    let policy = |config: &str, ttl: &str, auto: bool| {
        let options = format!("{{ keyAlgorithm: ecdsa-p256, ttl: {ttl} }}");
        let p = write_file(d, "policy.yaml", &format!("{}  autoRestartPods: {auto}\n", policy_yaml(config, &options)));
        let (ok, out, err) = run(&["policy", "apply", p.to_str().unwrap(), "--credentials", &m.creds()]);
        // On a loaded machine the CLI may stop waiting before the management plane has loaded
        // the stored policy; what follows waits for its effect anyway.
        assert!(ok || err.contains("the policy was stored but has not been loaded yet"), "{out}{err}");
    };
    // Vault mode on the mesh's own root: a real Vault whose `pki` mount holds the root meshca
    // generated (imported), so this is a change of CA mode only. (A mount with another root is a
    // root rotation, crates/meshca/tests/root_rotation_vault.rs; the management plane reads the
    // mount's root before it lets a policy name it.)
    let vault_server = tokio::task::block_in_place(|| {
        let vault = Vault::start(&d.join("vault"), Storage::Dev);
        let root = StoreView::mgmt(&m).get("meshca", "root-ca").expect("the generated root");
        let pem = |k: &str| String::from_utf8(root.get(k).unwrap().to_vec()).unwrap();
        vault.pki_mount("pki", "87600h");
        vault.ok(
            "POST",
            "pki/config/ca",
            json!({ "pem_bundle": format!("{}{}", pem("ca-cert.pem"), pem("ca-key.pem")) }),
        );
        vault
    });
    let vault = format!(
        "    vault: {{ server: \"{}\", caPath: pki/root/sign-intermediate, auth: {{ token: {{ tokenFile: /var/run/vault/token }} }} }}",
        vault_server.addr
    );
    tokio::task::block_in_place(|| policy(&vault, "720h", false));
    let wired = eventually(Duration::from_secs(30), "the sidecar", || async {
        let d = get_istiod(api).await;
        pod_spec(&d)["containers"].as_array().unwrap().iter().any(|c| c["name"] == "meshca-vault-agent").then_some(d)
    })
    .await;
    let spec = pod_spec(&wired);
    let names = |key: &str| -> Vec<String> {
        spec[key].as_array().into_iter().flatten().map(|c| c["name"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(names("containers"), ["discovery", "meshca-vault-agent"]);
    assert_eq!(names("initContainers"), ["meshca-vault-init"]);
    assert_eq!(names("volumes"), ["cacerts", "meshca-cacerts", "meshca-vault-bootstrap"]);
    let volume = spec["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "meshca-cacerts").unwrap();
    assert_eq!(volume["emptyDir"], json!({"medium": "Memory", "sizeLimit": "1Mi"}));
    let sidecar = spec["containers"].as_array().unwrap().iter().find(|c| c["name"] == "meshca-vault-agent").unwrap();
    assert!(
        sidecar["volumeMounts"]
            .as_array()
            .unwrap()
            .contains(&json!({"name": "meshca-cacerts", "mountPath": "/etc/cacerts"}))
    );
    assert_eq!(
        (&sidecar["securityContext"]["runAsUser"], &sidecar["image"]),
        (&json!(1337), &json!("meshca:test")),
        "istiod's user, so istiod can read the 0600 files"
    );
    let args = sidecar["args"].to_string();
    assert!(args.contains("--memory-dir=/etc/cacerts") && args.contains("--cluster=cluster-1"), "{args}");
    // istiod's own container: its fields as they were, plus exactly one mount and ROOT_CA_DIR.
    let discovery = &spec["containers"][0];
    let before = &original["containers"][0];
    for field in ["image", "args", "securityContext"] {
        assert_eq!(discovery[field], before[field], "{field} untouched");
    }
    assert_eq!(discovery["env"], json!([{"name": "ROOT_CA_DIR", "value": "/var/run/meshca/cacerts"}]));
    assert_eq!(
        discovery["volumeMounts"],
        json!([
            {"name": "cacerts", "mountPath": "/etc/cacerts", "readOnly": true},
            {"name": "meshca-cacerts", "mountPath": "/var/run/meshca/cacerts", "readOnly": true},
        ])
    );
    assert_eq!(template_annotations(&wired)["meshca.io/restarted-for"], serial, "Vault mode restarts nothing");
    eventually(Duration::from_secs(30), "the sidecar reported", || async {
        let st = tokio::task::block_in_place(|| cluster_istiod(&m));
        (st["vaultSidecar"] == true && st["state"] == "Wired").then_some(())
    })
    .await;
    // A second reconcile: nothing changes.
    let rv = wired.resource_version().unwrap();
    agent2.kill();
    let mut agent3 = start_agent();
    tokio::task::block_in_place(|| two_more_reports(&m));
    assert_eq!(get_istiod(api).await.resource_version().unwrap(), rv, "a second reconcile changed the Deployment");
    // cacerts (meshca's from before) is left as it was: the sidecar writes into memory.
    assert_eq!(cacerts_serial(api).await.unwrap(), serial);

    // ---- Leaving Vault mode removes exactly what was added.
    tokio::task::block_in_place(|| policy("    generated: {}", "720h", false));
    let deadline = Instant::now() + Duration::from_secs(30);
    let unwired = loop {
        let d = get_istiod(api).await;
        if !pod_spec(&d)["containers"].to_string().contains("meshca-vault-agent") {
            break d;
        }
        assert!(
            Instant::now() < deadline,
            "the sidecar was not removed; agent log:\n{}\nserver log:\n{}",
            agent3.log_text().lines().filter(|l| !l.contains("watch list error")).collect::<Vec<_>>().join("\n"),
            m.proc.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(pod_spec(&unwired), original, "leaving Vault mode restores istiod's pod exactly");
    assert_eq!(template_annotations(&unwired)["meshca.io/restarted-for"], serial);
    // Back to the generated CA of before: the cacerts in service is still current, nothing restarts.
    tokio::task::block_in_place(|| two_more_reports(&m));
    assert_eq!(cacerts_serial(api).await.unwrap(), serial);
    assert_eq!(template_annotations(&get_istiod(api).await)["meshca.io/restarted-for"], serial);
    let second = serial.clone();
    eprintln!("Vault sidecar added, idempotent, removed: {:?}", t.elapsed());

    // ---- RBAC forbids the patch (the chart without istiod.manage): reported, cacerts still right.
    cluster_chart(kc, "upgrade", false);
    assert!(role(&api.admin().await, "istio-system", "meshca-agent-istiod").await.is_none());
    tokio::task::block_in_place(|| policy("    generated: {}", "721h", true));
    let third = eventually(Duration::from_secs(60), "a third cacerts", || async {
        cacerts_serial(api).await.filter(|s| *s != second)
    })
    .await;
    let (st, alerts) = eventually(Duration::from_secs(60), "the forbidden patch reported", || async {
        let doc = tokio::task::block_in_place(|| m.status_json());
        let st = status_cluster(&doc, "cluster-1").unwrap()["istiod"].clone();
        (st["state"] == "Forbidden").then(|| (st, doc["alerts"].clone()))
    })
    .await;
    assert!(st["message"].as_str().unwrap().contains("istiod.manage"), "{st}");
    let alert =
        alerts.as_array().unwrap().iter().find(|a| a["kind"] == "IstiodNotWired").unwrap_or_else(|| panic!("{alerts}"));
    assert_eq!(alert["cluster"], "cluster-1");
    let secret = cacerts(api).await.unwrap();
    let dir = write_secret_dir(&secret, &d.join("cacerts-after-forbidden"));
    openssl_verify_cacerts(&dir);
    assert_eq!(cacerts_serial(api).await.unwrap(), third, "cacerts is written whatever istiod's RBAC");
    assert!(!agent3.log_text().contains("panicked"));

    // ---- istiod's Deployment missing (or named differently): reported after the agent's read.
    cluster_chart(kc, "upgrade", true);
    let admin = api.admin().await;
    Api::<Deployment>::namespaced(admin, "istio-system").delete("istiod", &Default::default()).await.unwrap();
    agent3.kill();
    let agent4 = start_agent();
    let st = eventually(Duration::from_secs(60), "the missing Deployment reported", || async {
        let st = tokio::task::block_in_place(|| cluster_istiod(&m));
        (st["state"] == "NotFound").then_some(st)
    })
    .await;
    assert!(st["message"].as_str().unwrap().contains("--istiod-deployment"), "{st}");
    assert!(
        tokio::task::block_in_place(|| m.status_json())["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["kind"] == "IstiodNotWired")
    );
    drop(agent4);
    eprintln!("istiod wiring checked in {:?}", t.elapsed());
}
