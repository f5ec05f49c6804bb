//! The CA in service: the validated `cacerts` bundle, swapped atomically when a new one arrives.
//!
//! The bundle is read from a directory — the agent's store layout, a mounted Secret, or the Vault
//! agent's memory-backed folder — and polled. A new bundle is validated exactly as istiod does
//! (and must keep the root set a subset or superset of the current one) before it replaces the
//! current one; requests in flight finish with the bundle they started with. An invalid bundle is
//! refused loudly and the last good one stays in service.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use meshca_pki::bundle::{self, BundleFiles, CaBundle};
use meshca_pki::chain::rfc3339;

use crate::metrics::Metrics;

/// How often the `cacerts` directory is checked.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// A loaded bundle and what is derived from it once.
pub struct CaState {
    /// The validated bundle.
    pub bundle: CaBundle,
    /// PEMs returned after the leaf: the signing certificate up to the root.
    pub chain_pems: Vec<String>,
    /// Digest of the files it was loaded from.
    pub digest: [u8; 32],
}

impl CaState {
    fn new(bundle: CaBundle, digest: [u8; 32]) -> Arc<Self> {
        let chain_pems = bundle.signer().chain_pems();
        Arc::new(CaState { bundle, chain_pems, digest })
    }
}

fn digest(files: &BundleFiles) -> [u8; 32] {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for (name, data) in files.entries() {
        ctx.update(name.as_bytes());
        ctx.update(&(data.len() as u64).to_be_bytes());
        ctx.update(data);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// Reads the four files from `dir` (missing ones read as empty, which validation names).
pub fn read_dir(dir: &Path) -> BundleFiles {
    BundleFiles::from_lookup(|name| std::fs::read(dir.join(name)).ok())
}

/// A refused bundle being tracked by [`CaHolder::poll`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    digest: [u8; 32],
    reported: bool,
}

/// The CA in service, shared by request handlers.
pub struct CaHolder {
    current: ArcSwap<CaState>,
    dir: PathBuf,
    metrics: Arc<Metrics>,
}

/// Why the initial load failed.
#[derive(Debug, thiserror::Error)]
#[error("{dir}: {reason}")]
pub struct LoadError {
    /// The directory.
    pub dir: String,
    /// Why.
    pub reason: String,
}

impl CaHolder {
    /// Loads and validates the bundle in `dir`.
    pub fn load(dir: &Path, metrics: Arc<Metrics>) -> Result<Arc<Self>, LoadError> {
        let files = read_dir(dir);
        let bundle = CaBundle::validate(&files, SystemTime::now())
            .map_err(|e| LoadError { dir: dir.display().to_string(), reason: e.to_string() })?;
        let state = CaState::new(bundle, digest(&files));
        let holder = Arc::new(CaHolder { current: ArcSwap::new(state), dir: dir.to_path_buf(), metrics });
        holder.publish_gauges();
        Ok(holder)
    }

    /// The bundle in service now.
    pub fn current(&self) -> Arc<CaState> {
        self.current.load_full()
    }

    fn publish_gauges(&self) {
        let st = self.current.load();
        let unix = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
        self.metrics.root_expiry.set(unix(st.bundle.roots().earliest_expiry()));
        let chain_end =
            st.bundle.signer().chain().iter().map(|c| c.not_after()).min().unwrap_or(SystemTime::UNIX_EPOCH);
        self.metrics.chain_expiry.set(unix(chain_end));
    }

    /// Checks the directory once; swaps in a new valid bundle. Returns whether it swapped.
    /// `pending` remembers a bad bundle, so a writer caught mid-update (a directory written file
    /// by file) is not reported until the same bad content is seen twice, and a bad bundle is
    /// reported once, not on every poll.
    pub fn poll(&self, pending: &mut Option<Pending>) -> bool {
        let files = read_dir(&self.dir);
        let d = digest(&files);
        if d == self.current.load().digest {
            *pending = None;
            return false;
        }
        let result = CaBundle::validate(&files, SystemTime::now()).map_err(|e| e.to_string()).and_then(|b| {
            bundle::check_root_transition(self.current.load().bundle.roots(), b.roots()).map_err(|e| e.to_string())?;
            Ok(b)
        });
        match result {
            Ok(b) => {
                let ca = b.ca_cert();
                tracing::info!(
                    dir = %self.dir.display(),
                    serial = %ca.serial_hex(),
                    not_after = %rfc3339(ca.not_after()),
                    roots = %b.roots().fingerprint(),
                    "loaded a new cacerts bundle; new leaves are signed by it"
                );
                self.current.store(CaState::new(b, d));
                self.metrics.reloads.inc();
                self.publish_gauges();
                *pending = None;
                true
            }
            Err(reason) => {
                match pending {
                    Some(p) if p.digest == d => {
                        if !p.reported {
                            tracing::error!(
                                dir = %self.dir.display(),
                                %reason,
                                serving = %self.current.load().bundle.ca_cert().serial_hex(),
                                "REFUSED a new cacerts bundle; the last good one stays in service"
                            );
                            self.metrics.reload_failures.inc();
                            p.reported = true;
                        }
                    }
                    _ => *pending = Some(Pending { digest: d, reported: false }),
                }
                false
            }
        }
    }

    /// Polls forever, calling `on_reload` after each swap.
    pub async fn watch(self: Arc<Self>, on_reload: impl Fn(&CaState) + Send + 'static) {
        let mut pending = None;
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let me = self.clone();
            let mut p = pending;
            let (swapped, p) = match tokio::task::spawn_blocking(move || {
                let s = me.poll(&mut p);
                (s, p)
            })
            .await
            {
                Ok(r) => r,
                Err(_) => continue,
            };
            pending = p;
            if swapped {
                on_reload(&self.current());
            }
        }
    }
}
