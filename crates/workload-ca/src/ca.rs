//! The CA in service: the validated `cacerts` bundle, swapped atomically when a new one arrives.
//!
//! The bundle is read from a directory — the agent's store layout, a mounted Secret, or the Vault
//! agent's memory-backed folder — and polled. A new bundle is validated exactly as istiod does
//! (and must keep the root set a subset or superset of the current one) before it replaces the
//! current one; requests in flight finish with the bundle they started with. An invalid bundle is
//! refused loudly and the last good one stays in service. A directory that cannot be *read*
//! (out of file descriptors, permissions) is reported as exactly that — never mistaken for a
//! missing bundle — and the last good bundle stays in service too.
//!
//! `ca-crl.pem` is read with the bundle. A bundle whose `ca-cert.pem` (or a CA above it) a CRL
//! from its issuer revokes is refused, like any invalid bundle; when the CRL revoking it arrives
//! for the bundle *in service*, that bundle is marked revoked and nothing is signed with it any
//! more (requests are answered UNAVAILABLE) until the agent writes the new intermediate.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use meshca_clock::{SharedClock, unix};
use meshca_pki::bundle::{self, BundleFiles, CaBundle};
use meshca_pki::chain::rfc3339;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// How often the `cacerts` directory is checked.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// A loaded bundle and what is derived from it once.
pub struct CaState {
    /// The validated bundle.
    pub bundle: CaBundle,
    /// PEMs returned after the leaf, one element each: the signing certificate and every CA
    /// above it below the root, then — as the last element — the whole root set
    /// (`root-cert.pem`, one PEM block per root). Workloads learn the roots they trust from the
    /// last element (istio-agent does), so during a root rotation they learn both roots; outside
    /// one the last element is the one root, as before.
    pub chain_pems: Vec<String>,
    /// Digest of the files it was loaded from.
    pub digest: [u8; 32],
    /// Set when `ca-crl.pem` revokes the signing certificate (or a CA above it): nothing is
    /// signed with this bundle. Says which certificate, for the caller and the log.
    pub revoked: Option<String>,
}

impl CaState {
    fn new(bundle: CaBundle, digest: [u8; 32], revoked: Option<String>) -> Arc<Self> {
        let mut chain_pems = bundle.signer().chain_pems();
        // The chain ends with the root it was issued under, which the root set contains.
        chain_pems.pop();
        chain_pems.push(bundle.roots().to_pem());
        Arc::new(CaState { bundle, chain_pems, digest, revoked })
    }
}

/// Which certificate of `bundle`'s chain the CRLs in `crl_pem` revoke (each checked against a
/// CRL signed by its own issuer), or why the CRL file is refused (istiod refuses a bundle whose
/// `ca-crl.pem` does not parse).
pub fn revocation(bundle: &CaBundle, crl_pem: &[u8]) -> Result<Option<String>, String> {
    let crls = meshca_pki::Crl::parse_pem_bundle(crl_pem).map_err(|e| format!("{}: {e}", bundle::CA_CRL))?;
    Ok(meshca_pki::crl::revoked_in_chain(&crls, bundle.signer().chain())
        .map(|(serial, subject)| format!("{subject} (serial {serial}) is revoked by {}", bundle::CA_CRL)))
}

/// Reads `dir/name`: `None` when it does not exist; any other failure is an error, so that running
/// out of file descriptors is not taken for a missing file.
fn read_optional(dir: &Path, name: &str) -> Result<Option<Vec<u8>>, ReadError> {
    let path = dir.join(name);
    match std::fs::read(&path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => {
            let exhausted = meshca_serve::fd::exhaustion(&source);
            Err(ReadError { path: path.display().to_string(), exhausted, source })
        }
    }
}

/// Reads `ca-crl.pem` from `dir` (missing: empty).
fn read_crl(dir: &Path) -> Result<Vec<u8>, ReadError> {
    Ok(read_optional(dir, bundle::CA_CRL)?.unwrap_or_default())
}

fn digest(files: &BundleFiles, crl: &[u8]) -> [u8; 32] {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for (name, data) in files.entries().into_iter().chain([(bundle::CA_CRL, crl)]) {
        ctx.update(name.as_bytes());
        ctx.update(&(data.len() as u64).to_be_bytes());
        ctx.update(data);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// A `cacerts` file that exists but cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("reading {path}: {}{source}", exhausted.map(|e| format!("{} — ", e.explain())).unwrap_or_default())]
pub struct ReadError {
    /// The file.
    pub path: String,
    /// Set when the process (or the system) is out of file descriptors or memory: the file is
    /// there, it could not be opened.
    pub exhausted: Option<meshca_serve::fd::Exhausted>,
    /// Why (e.g. "Too many open files").
    #[source]
    pub source: std::io::Error,
}

/// Reads the four `cacerts` files from `dir`, the way istiod reads a mounted Secret: through the
/// `..data` symlinks. A missing file reads as empty (bundle validation then names it); any other
/// failure is an error, so that running out of file descriptors is not taken for a missing file.
pub fn read_cacerts_dir(dir: &Path) -> Result<BundleFiles, ReadError> {
    let mut failure = None;
    let files = BundleFiles::from_lookup(|name| match read_optional(dir, name) {
        Ok(b) => b,
        Err(e) => {
            failure.get_or_insert(e);
            None
        }
    });
    match failure {
        Some(e) => Err(e),
        None => Ok(files),
    }
}

/// A refused (or unreadable) bundle being tracked by [`CaHolder::poll`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pending {
    /// Bad content with this digest, reported once it was seen twice.
    Refused {
        /// Its digest.
        digest: [u8; 32],
        /// Whether it was reported.
        reported: bool,
    },
    /// The directory could not be read; reported once until it reads again.
    Unreadable {
        /// The error, as reported.
        error: String,
    },
}

/// The CA in service, shared by request handlers.
pub struct CaHolder {
    current: ArcSwap<CaState>,
    dir: PathBuf,
    metrics: Arc<Metrics>,
    clock: SharedClock,
    /// The serial of the intermediate in service whose expiry was reported (once).
    expired: std::sync::Mutex<Option<String>>,
}

/// Why the initial load failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The files could not be read.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The bundle is not one istiod would accept.
    #[error("{dir}: {source}")]
    Invalid {
        /// The directory.
        dir: String,
        /// Why.
        #[source]
        source: meshca_pki::BundleError,
    },
    /// `ca-crl.pem` refuses the bundle (it revokes the intermediate, or does not parse).
    #[error("{dir}: {reason}")]
    Revoked {
        /// The directory.
        dir: String,
        /// Why.
        reason: String,
    },
}

impl CaHolder {
    /// Loads and validates the bundle in `dir`, at the clock's time.
    pub fn load(dir: &Path, metrics: Arc<Metrics>, clock: SharedClock) -> Result<Arc<Self>, LoadError> {
        let files = read_cacerts_dir(dir)?;
        let crl = read_crl(dir)?;
        let bundle = CaBundle::validate(&files, clock.now())
            .map_err(|source| LoadError::Invalid { dir: dir.display().to_string(), source })?;
        let refused = |reason| LoadError::Revoked { dir: dir.display().to_string(), reason };
        if let Some(reason) = revocation(&bundle, &crl).map_err(refused)? {
            return Err(refused(reason));
        }
        let state = CaState::new(bundle, digest(&files, &crl), None);
        let holder = Arc::new(CaHolder {
            current: ArcSwap::new(state),
            dir: dir.to_path_buf(),
            metrics,
            clock,
            expired: std::sync::Mutex::new(None),
        });
        holder.publish_gauges();
        Ok(holder)
    }

    /// The bundle in service now.
    pub fn current(&self) -> Arc<CaState> {
        self.current.load_full()
    }

    /// The clock the CA runs on.
    pub fn clock(&self) -> &SharedClock {
        &self.clock
    }

    fn publish_gauges(&self) {
        let st = self.current.load();
        self.metrics.root_expiry.set(unix(st.bundle.roots().earliest_expiry()));
        let chain_end = st.bundle.signer().chain().iter().map(|c| c.not_after()).min().unwrap_or(std::time::UNIX_EPOCH);
        self.metrics.chain_expiry.set(unix(chain_end));
    }

    /// Checks the directory once; swaps in a new valid bundle. Returns whether it swapped.
    /// `pending` remembers a bad bundle, so a writer caught mid-update (a directory written file
    /// by file) is not reported until the same bad content is seen twice, and a bad bundle is
    /// reported once, not on every poll.
    pub fn poll(&self, pending: &mut Option<Pending>) -> bool {
        self.check_expiry();
        let files = match read_cacerts_dir(&self.dir).and_then(|f| Ok((f, read_crl(&self.dir)?))) {
            Ok(f) => f,
            Err(e) => {
                let error = e.to_string();
                if !matches!(pending, Some(Pending::Unreadable { error: seen }) if *seen == error) {
                    tracing::error!(
                        %error,
                        serving = %self.current.load().bundle.ca_cert().serial_hex(),
                        "cannot read the cacerts directory; the last good bundle stays in service"
                    );
                    self.metrics.reload_failures.inc();
                    *pending = Some(Pending::Unreadable { error });
                }
                return false;
            }
        };
        let (files, crl) = files;
        let d = digest(&files, &crl);
        if d == self.current.load().digest {
            *pending = None;
            return false;
        }
        let result = CaBundle::validate(&files, self.clock.now()).map_err(|e| e.to_string()).and_then(|b| {
            bundle::check_root_transition(self.current.load().bundle.roots(), b.roots()).map_err(|e| e.to_string())?;
            let revoked = revocation(&b, &crl)?;
            Ok((b, revoked))
        });
        let current = self.current.load_full();
        let result = match result {
            // The bundle in service itself is revoked: it stays loaded (there is nothing better)
            // but signs nothing from now on.
            Ok((b, Some(reason))) if b.ca_cert() == current.bundle.ca_cert() => {
                if current.revoked.is_none() {
                    tracing::error!(
                        dir = %self.dir.display(),
                        %reason,
                        "the cluster intermediate in service is REVOKED: nothing is signed with it; requests are answered UNAVAILABLE until the agent writes a new cacerts"
                    );
                }
                self.current.store(CaState::new(b, d, Some(reason)));
                *pending = None;
                return true;
            }
            Ok((_, Some(reason))) => Err(reason),
            Ok((b, None)) => Ok(b),
            Err(e) => Err(e),
        };
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
                self.current.store(CaState::new(b, d, None));
                self.metrics.reloads.inc();
                self.publish_gauges();
                *pending = None;
                true
            }
            Err(reason) => {
                match pending {
                    Some(Pending::Refused { digest, reported }) if *digest == d => {
                        if !*reported {
                            tracing::error!(
                                dir = %self.dir.display(),
                                %reason,
                                serving = %self.current.load().bundle.ca_cert().serial_hex(),
                                "REFUSED a new cacerts bundle; the last good one stays in service"
                            );
                            self.metrics.reload_failures.inc();
                            *reported = true;
                        }
                    }
                    _ => *pending = Some(Pending::Refused { digest: d, reported: false }),
                }
                false
            }
        }
    }

    /// Notices, once per intermediate, that the one in service has expired: an error in the log
    /// and `meshca_workload_ca_intermediate_expired` at 1, until a new bundle is loaded. (The
    /// agent reports it too, and the management plane alerts on it.)
    fn check_expiry(&self) {
        let st = self.current.load();
        let ca = st.bundle.ca_cert();
        let now = self.clock.now();
        let mut reported = self.expired.lock().unwrap_or_else(|p| p.into_inner());
        if ca.not_after() <= now {
            let serial = ca.serial_hex();
            if reported.as_ref() != Some(&serial) {
                tracing::error!(
                    %serial,
                    expired_at = %rfc3339(ca.not_after()),
                    dir = %self.dir.display(),
                    "the cluster intermediate in service has EXPIRED: requests are answered UNAVAILABLE, and TLS clients refuse the serving certificate that chains through it, until the agent writes a new cacerts"
                );
                self.metrics.intermediate_expired.set(1);
                *reported = Some(serial);
            }
        } else if reported.take().is_some() {
            self.metrics.intermediate_expired.set(0);
        }
    }

    /// Polls until `cancel` fires, calling `on_reload` after each swap.
    pub async fn watch(self: Arc<Self>, on_reload: impl Fn(&CaState) + Send + 'static, cancel: CancellationToken) {
        let mut pending = None;
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let me = self.clone();
            let mut p = pending.clone();
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
