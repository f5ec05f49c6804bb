//! End to end: several meshes under one management plane, on `meshca up --meshes 2 --clusters 4`
//! (two clusters per mesh) run as a real process and driven with the real CLI (`meshca status -o
//! json`, `meshca rotate`) and the OpenSSL CLI. Two runs at once: the meshes apart, and with
//! `--federate` (each mesh's policy federating with the other through the management plane's own
//! SPIFFE bundle endpoint).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use meshca_pki::{Cert, RootSet};
use serde_json::Value;

/// How long a run may take to show what is waited for (first traffic, a rotation reaching the
/// clusters): generous, since both runs share the machine; nothing here measures time.
const WAIT: Duration = Duration::from_secs(90);

const MESH_1: [&str; 2] = ["cluster-1", "cluster-2"];
const MESH_2: [&str; 2] = ["cluster-3", "cluster-4"];

/// A `meshca up` run in `<d>/<name>`.
struct Run {
    proc: Proc,
    dir: PathBuf,
    topology: Value,
}

impl Run {
    fn spawn(d: &Path, name: &str, args: &[&str]) -> (Proc, PathBuf) {
        let dir = d.join(name);
        let mut all = vec!["up", "--dir", dir.to_str().unwrap(), "--meshes", "2", "--clusters", "4"];
        all.extend_from_slice(args);
        (spawn_meshca(name, d, &all), dir)
    }

    /// Waits for the run's `topology.json`.
    fn started((mut proc, dir): (Proc, PathBuf)) -> Run {
        let topology = wait_for(WAIT, "topology.json", || {
            proc.assert_running();
            json_file(&dir.join("topology.json"))
        });
        Run { proc, dir, topology }
    }

    fn creds(&self) -> String {
        self.topology["management_plane"]["credentials"].as_str().unwrap().to_string()
    }

    fn cluster(&self, name: &str) -> &Value {
        self.topology["clusters"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap()
    }

    fn cacerts(&self, name: &str) -> PathBuf {
        PathBuf::from(self.cluster(name)["cacerts_dir"].as_str().unwrap())
    }

    /// The bundles `name`'s agent wrote for the trust domains its mesh federates with.
    fn federated_file(&self, name: &str, td: &str) -> PathBuf {
        self.dir.join(name).join("store/istio-system/meshca-federated-bundles").join(format!("{td}.pem"))
    }

    /// `meshca status -o json` with the run's operator credentials.
    fn status(&self) -> Value {
        let (ok, out, err) = run(&["status", "-o", "json", "--credentials", &self.creds()]);
        assert!(ok, "meshca status: {err}");
        serde_json::from_str(&out).unwrap()
    }

    /// `status.json` (while it runs) or `summary.json` (once stopped).
    fn numbers(&self, file: &str) -> Option<Value> {
        json_file(&self.dir.join(file))
    }

    /// Ctrl-C; the run must exit 0 (no handshake within a mesh failed); its `summary.json`.
    fn stop(mut self) -> Value {
        self.proc.signal("INT");
        let status = self.proc.wait_exit(Duration::from_secs(30));
        let log = std::fs::read_to_string(self.dir.join("meshca-up.log")).unwrap_or_default();
        assert!(status.success(), "meshca up failed ({status}):\n{}\n{log}", self.proc.log_text());
        self.numbers("summary.json").expect("summary.json")
    }

    /// A leaf from `cluster`'s workload CA for an OpenSSL key (its sleep token), written out.
    fn leaf(&self, d: &Path, cluster: &str) -> (ChainFiles, PathBuf) {
        let c = self.cluster(cluster);
        let ca = &c["workload_ca"];
        let token = std::fs::read_to_string(c["token_file"].as_str().unwrap()).unwrap();
        let name = format!("{}-{cluster}", self.dir.file_name().unwrap().to_str().unwrap());
        let csr = openssl_csr(d, &name, OpensslKey::P256, &[]);
        let rt = tokio::runtime::Runtime::new().unwrap();
        let chain = rt
            .block_on(async {
                let mut client = ca_client(
                    ca["address"].as_str().unwrap(),
                    Path::new(ca["ca_file"].as_str().unwrap()),
                    ca["server_name"].as_str().unwrap(),
                );
                create_certificate(&mut client, csr_request(&csr, Some(token.trim()), Some(cluster), 0)).await
            })
            .unwrap_or_else(|s| panic!("{cluster} refused a leaf: {s:?}"));
        (write_chain(d, &name, &chain), d.join(format!("{name}.key")))
    }
}

fn mesh<'a>(status: &'a Value, policy: &str) -> &'a Value {
    status["meshes"].as_array().unwrap().iter().find(|m| m["policy"] == policy).unwrap()
}

fn cluster_status<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["clusters"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap()
}

/// The roots of a cacerts folder's `root-cert.pem`.
fn roots(cacerts: &Path) -> RootSet {
    RootSet::from_pem(&std::fs::read(cacerts.join("root-cert.pem")).unwrap()).unwrap()
}

/// `openssl verify` of a cluster's intermediate (through its chain) against `root`.
fn verify_cacerts_against(cacerts: &Path, root: &Path) -> (bool, String) {
    let (ok, out) = openssl(
        cacerts,
        &["verify", "-x509_strict", "-CAfile", root.to_str().unwrap(), "-untrusted", "cert-chain.pem", "ca-cert.pem"],
    );
    (ok && out.contains("ca-cert.pem: OK"), out)
}

/// What must stay as it is in mesh-2 while mesh-1 rotates: each cluster's intermediate serial
/// (as the management plane records it and as its `cacerts` serves it) and root set.
fn mesh_2_state(up: &Run) -> Vec<(String, String, String)> {
    let st = up.status();
    let mut out = vec![("mesh-2".to_string(), mesh(&st, "mesh-2")["rootSetFingerprint"].to_string(), String::new())];
    for c in MESH_2 {
        let served = valid_bundle(&up.cacerts(c)).unwrap();
        assert_eq!(served.ca_cert().serial_hex(), cluster_status(&st, c)["intermediateSerial"].as_str().unwrap());
        out.push((c.to_string(), served.ca_cert().serial_hex(), roots(&up.cacerts(c)).fingerprint()));
    }
    out
}

/// Two RootTrustPolicies in one `meshca up` (2 clusters each) are two meshes: different trust
/// domains and generated roots (`meshca status -o json`'s `meshes`), each cluster's intermediate
/// chaining to its own mesh's root in `openssl verify` and not to the other's. Apart, a
/// cross-mesh handshake is refused (the sample workloads' probes, and OpenSSL mutual TLS with
/// leaves of both meshes each trusting its own root); with `--federate`, each cluster's agent
/// holds the other mesh's root under that trust domain, every probe succeeds, and so does the
/// OpenSSL exchange trusting the own root and the federated bundle. Re-issuing a mesh-1 cluster's
/// intermediate (`meshca rotate cluster-1`) and rotating mesh-1's root (`meshca rotate root
/// --policy mesh-1`, once it reached mesh-1's clusters) leave mesh-2's intermediates and root as
/// they were; no handshake within a mesh fails in either run.
#[test]
fn two_meshes_in_one_up_are_apart_until_they_federate_and_rotate_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // Both at once: they share nothing but the machine.
    let apart = Run::spawn(d, "apart", &[]);
    let joined = Run::spawn(d, "joined", &["--federate"]);
    let apart = Run::started(apart);
    let joined = Run::started(joined);

    // Two meshes, as topology.json and the management plane say.
    let meshes = apart.topology["meshes"].as_array().unwrap();
    let listed: Vec<(&str, &str, Vec<&str>)> = meshes
        .iter()
        .map(|m| {
            let clusters = m["clusters"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
            (m["policy"].as_str().unwrap(), m["trust_domain"].as_str().unwrap(), clusters)
        })
        .collect();
    assert_eq!(
        listed,
        [("mesh-1", "mesh-1.cluster.local", MESH_1.to_vec()), ("mesh-2", "mesh-2.cluster.local", MESH_2.to_vec())]
    );
    let st = apart.status();
    let (m1, m2) = (mesh(&st, "mesh-1"), mesh(&st, "mesh-2"));
    assert_eq!(
        (m1["trustDomain"].as_str(), m2["trustDomain"].as_str()),
        (Some("mesh-1.cluster.local"), Some("mesh-2.cluster.local"))
    );
    assert_ne!(m1["rootSetFingerprint"], m2["rootSetFingerprint"], "each mesh has its own root: {st:#}");
    for (policy, clusters) in [("mesh-1", MESH_1), ("mesh-2", MESH_2)] {
        for c in clusters {
            assert_eq!(cluster_status(&st, c)["policy"], policy, "{st:#}");
            assert_eq!(apart.cluster(c)["trust_domain"], format!("{policy}.cluster.local"));
        }
    }

    // Each mesh's root, from its first cluster's root-cert.pem, is the one the management plane
    // holds for it; every cluster's intermediate chains to its own mesh's root only.
    let mut root_files = Vec::new();
    for (policy, clusters) in [("mesh-1", MESH_1), ("mesh-2", MESH_2)] {
        let pem = std::fs::read(apart.cacerts(clusters[0]).join("root-cert.pem")).unwrap();
        let root = Cert::from_pem(&pem).unwrap();
        assert_eq!(root.fingerprint(), mesh(&st, policy)["roots"][0]["fingerprint"].as_str().unwrap());
        let file = d.join(format!("root-{policy}.pem"));
        std::fs::write(&file, pem).unwrap();
        root_files.push(file);
    }
    for (own, other, clusters) in [(0, 1, MESH_1), (1, 0, MESH_2)] {
        for c in clusters {
            let (ok, out) = verify_cacerts_against(&apart.cacerts(c), &root_files[own]);
            assert!(ok, "{c} against its own mesh's root: {out}");
            let (ok, out) = verify_cacerts_against(&apart.cacerts(c), &root_files[other]);
            assert!(!ok, "{c} must not chain to the other mesh's root: {out}");
        }
    }

    // Apart: the sample workloads' cross-mesh probes are refused, traffic within each mesh flows.
    let s = wait_for(WAIT, "traffic in each mesh and refused cross-mesh probes", || {
        let s = apart.numbers("status.json")?;
        let flowing = s["meshes"].as_array()?.iter().all(|m| m["handshakes_ok"].as_u64() > Some(0));
        (flowing && s["cross_mesh"]["refused"].as_u64() > Some(0)).then_some(s)
    });
    assert_eq!(s["cross_mesh"]["ok"], 0, "{s:#}");
    assert_eq!(s["cross_mesh"]["federated"], false);
    // And in OpenSSL: a mesh-1 leaf and a mesh-2 leaf, each side trusting its own mesh's root.
    let (l1, k1) = apart.leaf(d, "cluster-1");
    let (l3, k3) = apart.leaf(d, "cluster-3");
    let r = openssl_mtls(
        d,
        &TlsParty { chain: &l1, key: &k1, trust: &root_files[0] },
        &TlsParty { chain: &l3, key: &k3, trust: &root_files[1] },
    );
    assert!(!r.succeeded() && !r.client_ok, "a cross-mesh handshake without federation must fail: {r:#?}");

    // Federated: every cluster holds the other mesh's root under its trust domain, and the
    // probes succeed.
    let jst = joined.status();
    for (clusters, other) in [(MESH_1, "mesh-2"), (MESH_2, "mesh-1")] {
        let held = mesh(&jst, other)["rootSetFingerprint"].as_str().unwrap().to_string();
        for c in clusters {
            let file = joined.federated_file(c, &format!("{other}.cluster.local"));
            let bundle = RootSet::from_pem(&std::fs::read(&file).unwrap()).unwrap();
            assert_eq!(bundle.fingerprint(), held, "{c}'s bundle of {other}");
        }
    }
    wait_for(WAIT, "cross-mesh probes accepted once federated", || {
        let s = joined.numbers("status.json")?;
        let flowing = s["meshes"].as_array()?.iter().all(|m| m["handshakes_ok"].as_u64() > Some(0));
        (flowing && s["cross_mesh"]["ok"].as_u64() > Some(0)).then_some(())
    });
    // OpenSSL trusting the own root and the bundle the agent wrote for the other trust domain.
    let (j1, jk1) = joined.leaf(d, "cluster-1");
    let (j3, jk3) = joined.leaf(d, "cluster-3");
    let trust = |c: &str, other: &str| {
        let file = d.join(format!("joined-trust-{c}.pem"));
        let mut pem = std::fs::read(joined.cacerts(c).join("root-cert.pem")).unwrap();
        pem.extend(std::fs::read(joined.federated_file(c, other)).unwrap());
        std::fs::write(&file, pem).unwrap();
        file
    };
    let (t1, t3) = (trust("cluster-1", "mesh-2.cluster.local"), trust("cluster-3", "mesh-1.cluster.local"));
    let r = openssl_mtls(
        d,
        &TlsParty { chain: &j1, key: &jk1, trust: &t1 },
        &TlsParty { chain: &j3, key: &jk3, trust: &t3 },
    );
    assert!(r.succeeded(), "a cross-mesh handshake once federated: {r:#?}");
    let summary = joined.stop();
    assert_eq!(summary["handshakes_failed"], 0, "{summary:#}");
    assert_eq!(summary["cross_mesh"]["federated"], true);
    assert_eq!(summary["cross_mesh"]["refused"], 0, "federated before traffic began: {summary:#}");
    assert!(summary["cross_mesh"]["ok"].as_u64().unwrap() > 0, "{summary:#}");

    // Rotating mesh-1 leaves mesh-2 alone: first one cluster's intermediate ...
    let before = mesh_2_state(&apart);
    let creds = apart.creds();
    let old = cluster_status(&apart.status(), "cluster-1")["intermediateSerial"].as_str().unwrap().to_string();
    let (ok, out, err) = run(&["rotate", "cluster-1", "--credentials", &creds]);
    assert!(ok && out.contains("cluster-1"), "{out}{err}");
    wait_for(WAIT, "cluster-1 to serve a new intermediate", || {
        let served = valid_bundle(&apart.cacerts("cluster-1")).ok()?.ca_cert().serial_hex();
        (served != old).then_some(())
    });
    assert_eq!(mesh_2_state(&apart), before, "re-issuing cluster-1 changed mesh-2");
    // ... then its root, which names its mesh.
    let (ok, _, err) = run(&["rotate", "root", "--credentials", &creds]);
    assert!(!ok && err.contains("several RootTrustPolicies (mesh-1, mesh-2)"), "{err}");
    let (ok, out, err) = run(&["rotate", "root", "--policy", "mesh-1", "--credentials", &creds]);
    assert!(ok, "{out}{err}");
    wait_for(WAIT, "mesh-1's clusters to trust both of its roots", || {
        MESH_1.iter().all(|c| roots(&apart.cacerts(c)).len() == 2).then_some(())
    });
    let st = apart.status();
    assert_ne!(mesh(&st, "mesh-1")["rootRotation"]["phase"], "Idle", "{st:#}");
    assert_eq!(mesh(&st, "mesh-2")["rootRotation"]["phase"], "Idle", "{st:#}");
    assert_eq!(mesh_2_state(&apart), before, "rotating mesh-1's root changed mesh-2");

    let summary = apart.stop();
    eprintln!("apart: {summary:#}");
    assert_eq!(summary["handshakes_failed"], 0, "{summary:#}");
    for m in summary["meshes"].as_array().unwrap() {
        assert!(m["handshakes_ok"].as_u64().unwrap() > 0, "{summary:#}");
        assert_eq!(m["handshakes_failed"], 0, "{summary:#}");
    }
    assert_eq!(summary["cross_mesh"]["ok"], 0, "{summary:#}");
    // Over the whole run, as up itself watched each cacerts: mesh-2's intermediates never changed.
    for c in summary["clusters"].as_array().unwrap() {
        let rotations = c["intermediate_rotations"].as_u64().unwrap();
        if MESH_2.contains(&c["name"].as_str().unwrap()) {
            assert_eq!(rotations, 0, "{summary:#}");
        }
    }
    assert!(summary["clusters"][0]["intermediate_rotations"].as_u64().unwrap() >= 1, "cluster-1 re-issued");
}
