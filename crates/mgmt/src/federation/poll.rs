//! Federation in: the leader polls the bundle endpoint of every foreign trust domain the policy
//! names (`spec.federation`) with [`fetch`], steps each with [`Federated::observe`], and keeps
//! the outcome in the store ([`FederationRecord`]): the trust streams hand the last good bundles
//! to the clusters, and the status raises `FederationFailing` while a fetch fails.
//!
//! The leader only, like the CRL publisher: followers forward every agent connection to the
//! leader, so the leader's streams are the ones that carry the bundles; one poller per mesh keeps
//! the foreign endpoint's load independent of the replica count; and because the record is in the
//! store, a new leader starts from the last good bundles (and their schedule) rather than from
//! the operator's first ones, even while the foreign endpoint is down.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshca_clock::{SharedClock, from_unix, unix};
use meshca_pki::Cert;
use meshca_policy::{Federation, FederationProfile};
use meshca_proto::AlertKind;
use meshca_proto::mgmt::{Alert, FederatedBundle};
use meshca_spiffe_bundle::Bundle;
use meshca_store::{Store, StoreError, typed};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::fetch::{EndpointAuth, FETCH_TIMEOUT, Federated, Source, fetch};
use crate::authority::Authority;
use crate::records::Keyspace;
use crate::replica::{self, Leader};

/// What the leader knows of each federated trust domain, as stored (any replica reads it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FederationRecord {
    /// By trust domain.
    pub domains: BTreeMap<String, DomainRecord>,
}

/// One foreign trust domain's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainRecord {
    /// The endpoint polled, and how it is authenticated ([`config_digest`]): a policy that
    /// changes either starts over from its first bundle.
    pub config: String,
    /// The last good bundle's authorities (PEM); empty while none is held.
    pub roots: String,
    /// Its `spiffe_sequence`.
    pub sequence: u64,
    /// When it was fetched (unix seconds); `None`: the operator's first bundle, never fetched.
    pub fetched_at: Option<i64>,
    /// While fetches fail: why.
    pub failure: Option<String>,
    /// Since when (unix seconds).
    pub failing_since: Option<i64>,
    /// The next fetch (unix seconds).
    pub next_fetch: i64,
}

impl DomainRecord {
    fn from_state(f: &Federation, s: &Federated) -> DomainRecord {
        DomainRecord {
            config: config_digest(f),
            roots: s.last_good.as_ref().map(Bundle::to_pem).unwrap_or_default(),
            sequence: s.last_good.as_ref().map_or(0, |b| b.sequence),
            fetched_at: s.fetched_at.map(unix),
            failure: s.failure.as_ref().map(|(why, _)| why.clone()),
            failing_since: s.failure.as_ref().map(|(_, since)| unix(*since)),
            next_fetch: unix(s.next_fetch),
        }
    }

    /// Back to the step function's state. The roots were checked when they were fetched, so they
    /// are not checked again (an expiry in between shows in the handshakes, not here).
    fn to_state(&self, f: &Federation) -> Federated {
        let authorities = Cert::parse_pem_bundle(self.roots.as_bytes()).unwrap_or_default();
        Federated {
            last_good: (!authorities.is_empty()).then(|| Bundle {
                trust_domain: f.trust_domain.clone(),
                sequence: self.sequence,
                refresh_hint: None,
                authorities,
            }),
            fetched_at: self.fetched_at.map(from_unix),
            failure: self.failure.clone().map(|why| (why, from_unix(self.failing_since.unwrap_or(self.next_fetch)))),
            next_fetch: from_unix(self.next_fetch),
        }
    }
}

/// What a stored state was polled under: the URL and the profile with its trust material
/// (hashed: a first bundle may be large).
pub fn config_digest(f: &Federation) -> String {
    let profile = match &f.profile {
        FederationProfile::Web { ca } => format!("https_web {}", ca.fingerprint()),
        FederationProfile::Spiffe { endpoint_id, first_bundle } => format!("https_spiffe {endpoint_id} {first_bundle}"),
    };
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, format!("{} {profile}", f.url).as_bytes());
    format!("sha256:{}", hex::encode(digest.as_ref()))
}

/// The stored record of the mesh whose records are `keys` (any replica); empty when nothing was
/// ever polled.
pub async fn read(store: &dyn Store, keys: &Keyspace) -> Result<FederationRecord, StoreError> {
    Ok(typed::get::<FederationRecord>(store, &keys.federation()).await?.map(|v| v.value).unwrap_or_default())
}

/// The bundles a cluster is given: the last good one of each trust domain the policy federates
/// with now (a trust domain dropped from the policy is dropped at once, whatever the record says).
pub fn bundles(record: &FederationRecord, federation: &[Federation]) -> Vec<FederatedBundle> {
    federation
        .iter()
        .filter_map(|f| {
            let d = record
                .domains
                .get(f.trust_domain.as_str())
                .filter(|d| d.config == config_digest(f) && !d.roots.is_empty())?;
            Some(FederatedBundle {
                trust_domain: f.trust_domain.to_string(),
                roots: d.roots.clone(),
                sequence: d.sequence,
            })
        })
        .collect()
}

/// Where polling starts for `f` at `now`: the stored state when it is for the same endpoint,
/// else the operator's first bundle (`https_spiffe`), checked in full now — one that is refused
/// is recorded as the failure, so the alert says why.
pub fn initial(f: &Federation, stored: Option<&DomainRecord>, now: SystemTime) -> Federated {
    if let Some(d) = stored.filter(|d| d.config == config_digest(f)) {
        return d.to_state(f);
    }
    match &f.profile {
        FederationProfile::Web { .. } => Federated::new(None, now),
        FederationProfile::Spiffe { first_bundle, .. } => {
            match Bundle::parse(first_bundle.as_bytes(), &f.trust_domain, now) {
                Ok(b) => Federated::new(Some(b), now),
                // Without it the endpoint cannot be authenticated: no fetch until the policy changes.
                Err(e) => Federated {
                    last_good: None,
                    fetched_at: None,
                    failure: Some((
                        format!("the first bundle of {} in the policy was refused: {e}", f.trust_domain),
                        now,
                    )),
                    next_fetch: now + super::fetch::REFRESH_BOUNDS.1,
                },
            }
        }
    }
}

/// The fetch source of `f`.
pub fn source(f: &Federation, timeout: Duration) -> Source {
    Source {
        trust_domain: f.trust_domain.clone(),
        url: f.url.clone(),
        auth: match &f.profile {
            FederationProfile::Web { ca } => EndpointAuth::Web(ca.clone()),
            FederationProfile::Spiffe { endpoint_id, .. } => EndpointAuth::Spiffe(endpoint_id.clone()),
        },
        timeout,
    }
}

/// Polls the federated trust domains' bundle endpoints, on the leader.
pub struct Poller {
    /// The store (the record).
    pub store: Arc<dyn Store>,
    /// The mesh's records.
    pub keys: Keyspace,
    /// The mesh's authority in force (its policy names the trust domains).
    pub authority: watch::Receiver<Arc<Authority>>,
    /// Bumped when a cluster's bundles change, so trust streams send them.
    pub nudge: watch::Sender<u64>,
    /// The time.
    pub clock: SharedClock,
    /// With replicas: whether this one leads.
    pub leader: Option<watch::Receiver<Leader>>,
    /// How long one fetch may take ([`FETCH_TIMEOUT`] in service).
    pub timeout: Duration,
}

/// How often a follower looks whether it leads now.
const FOLLOWER_RECHECK: Duration = Duration::from_secs(5);

impl Poller {
    /// A poller with the service's fetch timeout.
    pub fn new(
        store: Arc<dyn Store>,
        keys: Keyspace,
        authority: watch::Receiver<Arc<Authority>>,
        nudge: watch::Sender<u64>,
        clock: SharedClock,
        leader: Option<watch::Receiver<Leader>>,
    ) -> Self {
        Poller { store, keys, authority, nudge, clock, leader, timeout: FETCH_TIMEOUT }
    }

    /// Runs until cancelled: fetches every trust domain that is due (all at once), stores what
    /// changed, and sleeps until the next one is due or the policy changes.
    pub async fn run(mut self, cancel: CancellationToken) {
        loop {
            let wake = if replica::is_leader(self.leader.as_ref()) {
                match self.round().await {
                    Ok(Some(next)) => next,
                    Ok(None) => self.clock.now() + Duration::from_secs(24 * 3600),
                    Err(e) => {
                        tracing::warn!(error = %e, "storing the federated bundles failed; will retry");
                        self.clock.now() + FOLLOWER_RECHECK
                    }
                }
            } else {
                self.clock.now() + FOLLOWER_RECHECK
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = self.authority.changed() => if r.is_err() { return },
                _ = self.clock.sleep_until(wake) => {}
            }
        }
    }

    /// One round; the time of the next fetch due (`None`: nothing federated).
    async fn round(&mut self) -> Result<Option<SystemTime>, StoreError> {
        let federation = self.authority.borrow_and_update().policy.federation.clone();
        let stored = read(self.store.as_ref(), &self.keys).await?;
        let now = self.clock.now();
        let states: Vec<Federated> =
            federation.iter().map(|f| initial(f, stored.domains.get(f.trust_domain.as_str()), now)).collect();
        let (timeout, clock) = (self.timeout, &self.clock);
        let steps = federation.iter().zip(&states).map(|(f, s)| async move {
            if s.next_fetch > now {
                return s.clone();
            }
            let result = fetch(&source(f, timeout), s.last_good.as_ref(), now).await;
            if let Err(e) = &result {
                tracing::warn!(trust_domain = %f.trust_domain, error = %e, "federated bundle not updated; the last good one is kept");
            }
            s.observe(result, clock.now())
        });
        let states = futures::future::join_all(steps).await;
        let record = FederationRecord {
            domains: federation
                .iter()
                .zip(&states)
                .map(|(f, s)| (f.trust_domain.to_string(), DomainRecord::from_state(f, s)))
                .collect(),
        };
        if record != stored {
            typed::put(self.store.as_ref(), &self.keys.federation(), &record, meshca_store::Precondition::Any).await?;
            if bundles(&record, &federation) != bundles(&stored, &federation) {
                self.nudge.send_modify(|n| *n = n.wrapping_add(1));
            }
        }
        Ok(states.iter().map(|s| s.next_fetch).min())
    }
}

/// The `FederationFailing` alerts: one per federated trust domain whose last fetch
/// failed (or whose first bundle was refused), saying why, since when, and what is kept.
pub fn alerts(record: &FederationRecord, federation: &[Federation]) -> Vec<Alert> {
    federation
        .iter()
        .filter_map(|f| {
            let d = record.domains.get(f.trust_domain.as_str()).filter(|d| d.config == config_digest(f))?;
            let why = d.failure.as_ref()?;
            let since = d.failing_since.map(crate::rotation::rfc3339).unwrap_or_default();
            let kept = if d.roots.is_empty() {
                format!("no bundle of {} is held, so its SVIDs are refused", f.trust_domain)
            } else {
                format!("the last good bundle (sequence {}) is kept", d.sequence)
            };
            Some(Alert {
                kind: AlertKind::FederationFailing as i32,
                cluster: String::new(),
                message: format!(
                    "federation with {}: {why} (failing since {since}; {kept}; next try {})",
                    f.trust_domain,
                    crate::rotation::rfc3339(d.next_fetch)
                ),
                policy: String::new(),
            })
        })
        .collect()
}
