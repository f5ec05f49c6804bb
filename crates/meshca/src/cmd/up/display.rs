//! What `meshca up` prints and writes while it runs: the live counts, `status.json` and
//! `summary.json`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use meshca_pki::CaBundle;
use meshca_pki::chain::rfc3339;
use serde::Serialize;

use super::workload::Workload;

/// The live (and final) numbers, also written to `status.json`.
#[derive(Serialize, Default, Clone)]
pub struct Summary {
    /// Handshakes between workloads of one mesh (every handshake, with one mesh).
    pub handshakes_ok: u64,
    pub handshakes_failed: u64,
    /// Leaf requests of the sample workloads that failed.
    pub leaves_failed: u64,
    /// The root rotation's phase (`Idle` when none is in progress); with several meshes each
    /// one's, `mesh-1 Idle, mesh-2 Distributing`.
    pub root_rotation: String,
    /// Each mesh.
    pub meshes: Vec<MeshSummary>,
    /// With several meshes: the probes of other meshes' workloads.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cross_mesh: Option<CrossMesh>,
    pub clusters: Vec<ClusterSummary>,
    pub running_seconds: u64,
}

/// One mesh's numbers.
#[derive(Serialize, Default, Clone)]
pub struct MeshSummary {
    /// Its policy's name.
    pub name: String,
    pub trust_domain: String,
    /// Its root rotation's phase (`Idle` when none is in progress).
    pub root_rotation: String,
    pub clusters: Vec<String>,
    /// Handshakes among its workloads.
    pub handshakes_ok: u64,
    pub handshakes_failed: u64,
}

/// Probes of workloads in other meshes: refused unless the meshes federate.
#[derive(Serialize, Default, Clone)]
pub struct CrossMesh {
    /// Whether the meshes federate (`--federate`).
    pub federated: bool,
    pub ok: u64,
    pub refused: u64,
    /// Why the last refused probe was refused.
    pub last_refusal: String,
}

#[derive(Serialize, Default, Clone)]
pub struct ClusterSummary {
    pub name: String,
    /// Its mesh's policy.
    pub mesh: String,
    pub intermediate_serial: String,
    pub intermediate_not_after: String,
    pub intermediate_rotations: u64,
    pub leaves_issued: u64,
    pub leaves_failed: u64,
    pub handshakes_ok: u64,
    pub handshakes_failed: u64,
    /// Serials of the intermediates that signed its sample workloads' current leaves.
    pub workload_issuers: Vec<String>,
    pub last_error: String,
}

/// A cluster as the display tracks it: which intermediate it serves, and how often it changed.
pub struct ClusterRun {
    pub name: String,
    pub mesh: String,
    pub cacerts: PathBuf,
    pub serial: String,
    pub rotations: u64,
}

pub fn short(s: &str) -> String {
    s.chars().take(12).collect()
}

/// A mesh as the display tracks it: where its records (its root rotation's journal) are.
pub struct MeshRun {
    pub name: String,
    pub trust_domain: String,
    pub keys: meshca_mgmt::records::Keyspace,
}

/// What the display follows.
pub struct Runs {
    pub meshes: Vec<MeshRun>,
    pub clusters: Vec<ClusterRun>,
    /// Whether the meshes federate (`--federate`).
    pub federated: bool,
}

impl Runs {
    /// The current numbers, noting intermediate rotations since the last call; each mesh's root
    /// rotation phase as its journal in the management plane's store (`mgmt_store`) says.
    pub async fn collect(
        &mut self,
        workloads: &[Arc<Workload>],
        mgmt_store: &dyn meshca_store::Store,
        started: Instant,
        now: SystemTime,
    ) -> Summary {
        let mut s = Summary { running_seconds: started.elapsed().as_secs(), ..Default::default() };
        for m in &self.meshes {
            let root_rotation = match meshca_mgmt::rotation::controller::read_journal(mgmt_store, &m.keys).await {
                Ok(j) => j.value.rotation.map(|r| r.phase.name().to_string()).unwrap_or_else(|| "Idle".into()),
                Err(e) => format!("unknown ({e})"),
            };
            s.meshes.push(MeshSummary {
                name: m.name.clone(),
                trust_domain: m.trust_domain.clone(),
                root_rotation,
                ..Default::default()
            });
        }
        s.root_rotation = match s.meshes.as_slice() {
            [one] => one.root_rotation.clone(),
            all => all.iter().map(|m| format!("{} {}", m.name, m.root_rotation)).collect::<Vec<_>>().join(", "),
        };
        let mut cross = CrossMesh { federated: self.federated, ..Default::default() };
        for r in self.clusters.iter_mut() {
            let mut c = ClusterSummary { name: r.name.clone(), mesh: r.mesh.clone(), ..Default::default() };
            if let Ok(files) = meshca_workload_ca::ca::read_cacerts_dir(&r.cacerts)
                && let Ok(b) = CaBundle::validate(&files, now)
            {
                let serial = b.ca_cert().serial_hex();
                if serial != r.serial {
                    r.rotations += 1;
                    r.serial = serial;
                }
                c.intermediate_not_after = rfc3339(b.ca_cert().not_after());
            }
            c.intermediate_serial = r.serial.clone();
            c.intermediate_rotations = r.rotations;
            for w in workloads.iter().filter(|w| w.cluster == r.name) {
                c.handshakes_ok += w.counters.ok.load(Ordering::Relaxed);
                c.handshakes_failed += w.counters.failed.load(Ordering::Relaxed);
                c.leaves_issued += w.counters.leaves.load(Ordering::Relaxed);
                c.leaves_failed += w.counters.leaves_failed.load(Ordering::Relaxed);
                c.workload_issuers.push(w.issuer_serial.lock().await.clone());
                let e = w.counters.last_error.lock().await.clone();
                if !e.is_empty() {
                    c.last_error = e;
                }
                cross.ok += w.counters.cross_mesh_ok.load(Ordering::Relaxed);
                cross.refused += w.counters.cross_mesh_refused.load(Ordering::Relaxed);
                let refusal = w.counters.last_refusal.lock().await.clone();
                if !refusal.is_empty() {
                    cross.last_refusal = refusal;
                }
            }
            s.handshakes_ok += c.handshakes_ok;
            s.handshakes_failed += c.handshakes_failed;
            s.leaves_failed += c.leaves_failed;
            if let Some(m) = s.meshes.iter_mut().find(|m| m.name == c.mesh) {
                m.clusters.push(c.name.clone());
                m.handshakes_ok += c.handshakes_ok;
                m.handshakes_failed += c.handshakes_failed;
            }
            s.clusters.push(c);
        }
        if self.meshes.len() > 1 {
            s.cross_mesh = Some(cross);
        }
        s
    }
}

/// One line about the cross-mesh probes.
pub fn cross_mesh_line(c: &CrossMesh) -> String {
    let expect = if c.federated { "federated: expected ok" } else { "not federated: expected refused" };
    format!("cross-mesh probes ({expect})  ok {}  refused {}", c.ok, c.refused)
}

pub fn print_status(s: &Summary) {
    say!(
        "[{:>5}s] handshakes ok {}  failed {}  root rotation {}",
        s.running_seconds,
        s.handshakes_ok,
        s.handshakes_failed,
        s.root_rotation
    );
    if s.meshes.len() > 1 {
        for m in &s.meshes {
            say!(
                "         {} ({})  root rotation {}  ok {}  failed {}",
                m.name,
                m.trust_domain,
                m.root_rotation,
                m.handshakes_ok,
                m.handshakes_failed
            );
        }
    }
    if let Some(c) = &s.cross_mesh {
        say!("         {}", cross_mesh_line(c));
    }
    for c in &s.clusters {
        say!(
            "         {}  intermediate {} (until {}, {} rotations)  leaves {}  ok {}  failed {}{}",
            c.name,
            short(&c.intermediate_serial),
            c.intermediate_not_after,
            c.intermediate_rotations,
            c.leaves_issued,
            c.handshakes_ok,
            c.handshakes_failed,
            if c.last_error.is_empty() { String::new() } else { format!("  last error: {}", c.last_error) }
        );
    }
}
