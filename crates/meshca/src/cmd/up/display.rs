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
    pub handshakes_ok: u64,
    pub handshakes_failed: u64,
    /// Leaf requests of the sample workloads that failed.
    pub leaves_failed: u64,
    /// The root rotation's phase (`Idle` when none is in progress).
    pub root_rotation: String,
    pub clusters: Vec<ClusterSummary>,
    pub running_seconds: u64,
}

#[derive(Serialize, Default, Clone)]
pub struct ClusterSummary {
    pub name: String,
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
    pub cacerts: PathBuf,
    pub serial: String,
    pub rotations: u64,
}

pub fn short(s: &str) -> String {
    s.chars().take(12).collect()
}

/// The current numbers, noting intermediate rotations since the last call; the root rotation's
/// phase as the management plane's journal (in `mgmt_store`) says.
pub async fn collect(
    runs: &mut [ClusterRun],
    workloads: &[Arc<Workload>],
    mgmt_store: &dyn meshca_store::Store,
    started: Instant,
    now: SystemTime,
) -> Summary {
    let root_rotation =
        match meshca_mgmt::rotation::controller::read_journal(mgmt_store, &meshca_mgmt::records::Keyspace::legacy())
            .await
        {
            Ok(j) => j.value.rotation.map(|r| r.phase.name().to_string()).unwrap_or_else(|| "Idle".into()),
            Err(e) => format!("unknown ({e})"),
        };
    let mut s = Summary { running_seconds: started.elapsed().as_secs(), root_rotation, ..Default::default() };
    for r in runs.iter_mut() {
        let mut c = ClusterSummary { name: r.name.clone(), ..Default::default() };
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
        }
        s.handshakes_ok += c.handshakes_ok;
        s.handshakes_failed += c.handshakes_failed;
        s.leaves_failed += c.leaves_failed;
        s.clusters.push(c);
    }
    s
}

pub fn print_status(s: &Summary) {
    say!(
        "[{:>5}s] handshakes ok {}  failed {}  root rotation {}",
        s.running_seconds,
        s.handshakes_ok,
        s.handshakes_failed,
        s.root_rotation
    );
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
