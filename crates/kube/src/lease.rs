//! Leader election with a `coordination.k8s.io/v1` Lease, as Kubernetes' own controllers do it,
//! publishing the view the management plane's replicas act on ([`meshca_mgmt::replica::Leader`]).
//!
//! # The rules (`lease_duration` D > `renew_deadline` + `retry_period`)
//!
//! - The holder renews every `retry_period` by writing `renewTime` with compare-and-swap on the
//!   Lease's resource version. It considers itself leader only until `renew_deadline` after the
//!   *start* of its last successful renewal; past that it must not sign (and the server exits).
//! - A follower never trusts another machine's clock to decide expiry: it times the lease from
//!   when it *saw* the record change (crediting at most one `retry_period` of the record's own
//!   age, so a dead leader's last renewal is dated close to when it happened) and tries to take
//!   over only after D of no change. Taking over is a compare-and-swap too: of several followers,
//!   one wins.
//! - So a follower takes over at least D − `retry_period` after the leader's last renewal, while
//!   the old leader stopped signing at most `renew_deadline` after it: the two terms never
//!   overlap (clock rates being equal). After a leader dies, a follower leads within D of the
//!   death (plus one API round trip).
//!
//! The leader's `host:port` rides on the Lease as the annotation [`ADDRESS_ANNOTATION`], so
//! followers know where to forward connections.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use meshca_mgmt::replica::Leader;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{FIELD_MANAGER, api_status};

/// Annotation on the Lease: the leader's address for forwarded connections.
pub const ADDRESS_ANNOTATION: &str = "meshca.io/leader-address";

/// How the election runs.
#[derive(Debug, Clone)]
pub struct ElectionConfig {
    /// Namespace of the Lease (the management plane's).
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's identity (its pod name); must be unique among the replicas.
    pub identity: String,
    /// Where this replica accepts connections, for followers to forward to (`host:port`).
    pub address: Option<String>,
    /// How long followers wait without seeing a renewal before taking over.
    pub lease_duration: Duration,
    /// How long the leader keeps leading without a successful renewal.
    pub renew_deadline: Duration,
    /// How often the leader renews and followers look.
    pub retry_period: Duration,
}

impl ElectionConfig {
    /// Kubernetes' defaults (15 s / 10 s / 2 s) for `identity`.
    pub fn new(namespace: &str, name: &str, identity: &str) -> Self {
        ElectionConfig {
            namespace: namespace.to_string(),
            name: name.to_string(),
            identity: identity.to_string(),
            address: None,
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }

    /// Checks the timing rule of the module documentation.
    pub fn validate(&self) -> Result<(), String> {
        if self.renew_deadline + self.retry_period >= self.lease_duration {
            return Err(format!(
                "the lease duration ({:?}) must exceed the renew deadline ({:?}) plus the retry period ({:?}), or two replicas could both lead",
                self.lease_duration, self.renew_deadline, self.retry_period
            ));
        }
        if self.identity.is_empty() {
            return Err("the replica identity is empty".into());
        }
        Ok(())
    }
}

/// What a follower remembers of the record it last saw.
struct Observed {
    version: String,
    /// When (locally) the record is taken to have been written.
    at: Instant,
}

/// A running election: its view, and the task that keeps it (owned: [`Election::stop`] ends it).
pub struct Election {
    view: watch::Receiver<Leader>,
    stop: CancellationToken,
    task: JoinHandle<()>,
    client: Client,
    config: ElectionConfig,
}

/// Starts the election; [`Election::view`] always holds the current view.
pub fn spawn(client: Client, config: ElectionConfig) -> Election {
    let (tx, view) = watch::channel(Leader::Unknown);
    let stop = CancellationToken::new();
    let task = tokio::spawn(run(Api::namespaced(client.clone(), &config.namespace), config.clone(), tx, stop.clone()));
    Election { view, stop, task, client, config }
}

impl Election {
    /// The view the management plane acts on.
    pub fn view(&self) -> watch::Receiver<Leader> {
        self.view.clone()
    }

    /// Ends the election (no more renewals or takeovers) and, if this replica holds the lease,
    /// gives it up so a follower takes over at its next look instead of after the lease duration.
    /// Call it once the server has stopped signing (after `serve_with` returned). Bounded: the
    /// release gets at most `retry_period` (the lease then simply expires as after a crash).
    pub async fn stop(self) {
        self.stop.cancel();
        if let Err(e) = self.task.await
            && e.is_panic()
        {
            tracing::error!(error = %e, "the leader election task panicked");
        }
        let bound = self.config.retry_period.max(Duration::from_secs(1));
        if tokio::time::timeout(bound, release(self.client, &self.config)).await.is_err() {
            tracing::warn!(lease = %self.config.name, "releasing the leader lease timed out; it will expire instead");
        }
    }
}

async fn run(api: Api<Lease>, cfg: ElectionConfig, tx: watch::Sender<Leader>, stop: CancellationToken) {
    let mut observed: Option<Observed> = None;
    let mut last_error = String::new();
    loop {
        if tx.is_closed() || stop.is_cancelled() {
            return;
        }
        let started = Instant::now();
        // A call that hangs must not stall the election: a leader's claim runs out by itself
        // (`Leader::Me { until }`), and a follower must get to look again.
        let attempt = tokio::select! {
            _ = stop.cancelled() => return,
            a = tokio::time::timeout(cfg.renew_deadline, step(&api, &cfg, &mut observed, started)) => a,
        };
        let result = attempt.unwrap_or_else(|_| Err(format!("no answer within {:?}", cfg.renew_deadline)));
        let wake = match result {
            Ok((view, wake)) => {
                if !last_error.is_empty() {
                    tracing::info!(lease = %cfg.name, "the leader lease is reachable again");
                    last_error.clear();
                }
                let was = tx.borrow().clone();
                match (&was, &view) {
                    (Leader::Me { .. }, Leader::Me { .. }) => {}
                    (_, Leader::Me { .. }) => {
                        tracing::info!(identity = %cfg.identity, lease = %cfg.name, "became the leader")
                    }
                    (Leader::Me { .. }, other) => {
                        tracing::warn!(identity = %cfg.identity, now = ?other, "no longer the leader")
                    }
                    (a, b) if a != b => tracing::info!(leader = ?b, "leader observed"),
                    _ => {}
                }
                tx.send_replace(view);
                wake
            }
            Err(e) => {
                if e != last_error {
                    tracing::warn!(lease = %cfg.name, error = %e, "leader election: the lease could not be read or written");
                    last_error = e;
                }
                // A leader that cannot renew keeps its (time-bounded) claim until it runs out;
                // `Leader::Me { until }` expresses that without a change here.
                started + cfg.retry_period
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
}

fn now_micro() -> MicroTime {
    MicroTime(Timestamp::now())
}

/// One look at the lease: renew, take over or follow. Returns the view and when to look again.
async fn step(
    api: &Api<Lease>,
    cfg: &ElectionConfig,
    observed: &mut Option<Observed>,
    started: Instant,
) -> Result<(Leader, Instant), String> {
    let current = api.get_opt(&cfg.name).await.map_err(|e| e.to_string())?;
    let Some(lease) = current else {
        // Nobody has ever led: create the lease holding it.
        return match create(api, cfg).await? {
            true => Ok((Leader::Me { until: started + cfg.renew_deadline }, started + cfg.retry_period)),
            false => Ok((Leader::Unknown, Instant::now())),
        };
    };
    let version = lease.metadata.resource_version.clone().unwrap_or_default();
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());

    if holder.as_deref() == Some(cfg.identity.as_str()) {
        // Ours: renew.
        return match write(api, lease, cfg, false).await? {
            true => Ok((Leader::Me { until: started + cfg.renew_deadline }, started + cfg.retry_period)),
            // Someone took it (or edited it) since we read it: look again at once.
            false => Ok((Leader::Unknown, Instant::now())),
        };
    }

    // Another holder (or none): time it from when its record last changed.
    let now = Instant::now();
    if observed.as_ref().map(|o| o.version.as_str()) != Some(version.as_str()) {
        let age = spec
            .renew_time
            .as_ref()
            .and_then(|t| Timestamp::now().duration_since(t.0).try_into().ok())
            .map(|d: Duration| d.min(cfg.retry_period))
            .unwrap_or_default();
        *observed = Some(Observed { version: version.clone(), at: now.checked_sub(age).unwrap_or(now) });
    }
    let duration = spec
        .lease_duration_seconds
        .filter(|s| *s > 0)
        .map(|s| Duration::from_secs(s as u64))
        .unwrap_or(cfg.lease_duration);
    let expires = observed.as_ref().map(|o| o.at + duration).unwrap_or(now);
    if holder.is_none() || now >= expires {
        return match write(api, lease, cfg, true).await? {
            true => {
                *observed = None;
                Ok((Leader::Me { until: started + cfg.renew_deadline }, started + cfg.retry_period))
            }
            false => Ok((Leader::Unknown, Instant::now() + Duration::from_millis(100))),
        };
    }
    let address = lease.metadata.annotations.as_ref().and_then(|a| a.get(ADDRESS_ANNOTATION)).cloned();
    let view = Leader::Other { holder: holder.unwrap_or_default(), address };
    // Look again after the retry period, or exactly when the lease would expire.
    Ok((view, (now + cfg.retry_period).min(expires)))
}

/// Creates the lease held by this replica; `Ok(false)` when another replica created it first.
/// A create through apply, like the store's (see [`crate::store`]): RBAC can then name the
/// Lease, and the impossible resource version makes it create-only.
async fn create(api: &Api<Lease>, cfg: &ElectionConfig) -> Result<bool, String> {
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(cfg.name.clone()),
            namespace: Some(cfg.namespace.clone()),
            resource_version: Some("18446744073709551615".into()),
            annotations: cfg.address.as_ref().map(|a| [(ADDRESS_ANNOTATION.to_string(), a.clone())].into()),
            labels: Some([(crate::MANAGED_BY.0.to_string(), crate::MANAGED_BY.1.to_string())].into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(cfg.identity.clone()),
            lease_duration_seconds: Some(cfg.lease_duration.as_secs() as i32),
            acquire_time: Some(now_micro()),
            renew_time: Some(now_micro()),
            lease_transitions: Some(0),
            ..Default::default()
        }),
    };
    match api.patch(&cfg.name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&lease)).await {
        Ok(_) => Ok(true),
        Err(e) if matches!(api_status(&e), Some((409, _))) => Ok(false),
        Err(e) => Err(e.to_string()),
    }
}

/// Renews (`acquire: false`) or takes over the lease read as `lease`, by compare-and-swap on its
/// resource version. `Ok(false)`: someone else wrote it first.
async fn write(api: &Api<Lease>, mut lease: Lease, cfg: &ElectionConfig, acquire: bool) -> Result<bool, String> {
    let spec = lease.spec.get_or_insert_with(Default::default);
    if acquire {
        spec.holder_identity = Some(cfg.identity.clone());
        spec.acquire_time = Some(now_micro());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.lease_duration_seconds = Some(cfg.lease_duration.as_secs() as i32);
    spec.renew_time = Some(now_micro());
    let annotations = lease.metadata.annotations.get_or_insert_with(Default::default);
    match &cfg.address {
        Some(a) => annotations.insert(ADDRESS_ANNOTATION.to_string(), a.clone()),
        None => annotations.remove(ADDRESS_ANNOTATION),
    };
    lease.metadata.managed_fields = None;
    match api
        .replace(&cfg.name, &PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() }, &lease)
        .await
    {
        Ok(_) => Ok(true),
        Err(e) if matches!(api_status(&e), Some((409, _))) => Ok(false),
        Err(e) => Err(e.to_string()),
    }
}

/// Gives the lease up (on a clean shutdown) so a follower takes over at once instead of after
/// the lease duration. Only if this replica still holds it; the election must be stopped first,
/// or it would take the released lease right back ([`Election::stop`] does both, in order).
async fn release(client: Client, cfg: &ElectionConfig) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let Ok(Some(mut lease)) = api.get_opt(&cfg.name).await else { return };
    let spec = lease.spec.get_or_insert_with(Default::default);
    if spec.holder_identity.as_deref() != Some(cfg.identity.as_str()) {
        return;
    }
    spec.holder_identity = None;
    // A duration of 1 s: followers may take over at once.
    spec.lease_duration_seconds = Some(1);
    lease.metadata.managed_fields = None;
    match api
        .replace(&cfg.name, &PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() }, &lease)
        .await
    {
        Ok(_) => tracing::info!(lease = %cfg.name, "released the leader lease"),
        Err(e) => tracing::warn!(lease = %cfg.name, error = %e, "releasing the leader lease failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timing_rule_is_enforced() {
        let mut c = ElectionConfig::new("meshca", "meshca-leader", "a");
        assert!(c.validate().is_ok());
        c.renew_deadline = Duration::from_secs(14);
        assert!(c.validate().is_err());
    }
}
