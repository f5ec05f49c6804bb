//! What the bundle endpoint serves: the effective root set as a SPIFFE bundle, with a sequence
//! number that grows with every change of that root set.
//!
//! The sequence is persisted (the store object `meshca/spiffe-bundle`, one entry per trust
//! domain) and only the leader advances it, by compare-and-swap: a restart, a failover or a
//! second replica never serves a smaller number for a newer root set. A root rotation changes the
//! root set three times (A → A+B at Distributing, → B at Retiring; an abort back to A), and each
//! change is a new sequence, so a consumer polling the endpoint learns of root B before any
//! workload presents a certificate under it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use meshca_clock::{SharedClock, unix};
use meshca_pki::{RootSet, TrustDomain};
use meshca_spiffe_bundle::Bundle;
use meshca_store::{ObjectKey, Store, StoreError, typed};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::authority::Authority;
use crate::meshes::MeshView;
use crate::records;
use crate::replica::{self, Leader};

/// The store object holding each trust domain's published sequence ([`Sequences`]).
pub fn sequences_key() -> ObjectKey {
    records::spiffe_bundle()
}

/// The sequence of one trust domain's bundle, and the root set it numbers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sequence {
    /// `spiffe_sequence` of the bundle of `roots`.
    pub sequence: u64,
    /// [`RootSet::fingerprint`] of the root set this sequence was given to.
    pub roots: String,
    /// When (unix seconds) the root set changed to it.
    pub since: i64,
}

/// Every trust domain's [`Sequence`], by trust domain name: one per mesh (each policy has its
/// own trust domain).
pub type Sequences = BTreeMap<String, Sequence>;

/// The pure step: the sequence to record for `roots` given the one recorded, or `None` when the
/// recorded one already numbers this root set. A first root set is 1; every change adds 1.
pub fn next(recorded: Option<&Sequence>, roots: &str, now: i64) -> Option<Sequence> {
    match recorded {
        Some(r) if r.roots == roots => None,
        Some(r) => Some(Sequence { sequence: r.sequence + 1, roots: roots.to_string(), since: now }),
        None => Some(Sequence { sequence: 1, roots: roots.to_string(), since: now }),
    }
}

/// One trust domain's bundle, ready to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The bundle (trust domain, sequence, refresh hint, roots).
    pub bundle: Bundle,
    /// Its JSON document.
    pub document: String,
}

/// The documents served, by trust domain.
pub type Served = BTreeMap<String, Arc<Published>>;

/// Records the sequence of each mesh's root set in force (leader only) and publishes the
/// document every replica serves once the stored sequence numbers that root set.
pub struct Publisher {
    /// The store.
    pub store: Arc<dyn Store>,
    /// The meshes (each one's effective root set follows its root rotation).
    pub meshes: watch::Receiver<Arc<MeshView>>,
    /// The time.
    pub clock: SharedClock,
    /// `spiffe_refresh_hint` of the documents.
    pub refresh_hint: Duration,
    /// With replicas: whether this one leads (only the leader advances the sequence).
    pub leader: Option<watch::Receiver<Leader>>,
    /// Where the documents go (a trust domain is absent while its root set is not known: Vault
    /// mode before the mount's root was read).
    pub out: watch::Sender<Served>,
}

/// How soon a replica looks again when the stored sequence does not yet number the root set in
/// force (a follower before the leader wrote it, or a store error).
const RETRY: Duration = Duration::from_secs(5);

impl Publisher {
    /// Runs until cancelled: at start, whenever the authority changes, and every five seconds
    /// while the document lags the root set.
    pub async fn run(mut self, cancel: CancellationToken) {
        loop {
            let view = self.meshes.borrow_and_update().clone();
            let mut served = self.out.borrow().clone();
            // A trust domain no mesh has any more is served no more.
            served.retain(|td, _| view.meshes().iter().any(|m| m.authority().policy.trust_domain.as_str() == td));
            let mut retry = false;
            for mesh in view.meshes() {
                match self.refresh(&mesh.authority(), &mut served).await {
                    Ok(current) => retry |= !current,
                    Err(e) => {
                        tracing::warn!(error = %e, policy = %mesh.name, "recording the SPIFFE bundle's sequence failed; will retry");
                        retry = true;
                    }
                }
            }
            self.out.send_if_modified(|cur| {
                if *cur == served {
                    return false;
                }
                *cur = served;
                true
            });
            let wait = async { if retry { self.clock.sleep(RETRY).await } else { std::future::pending().await } };
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = self.meshes.changed() => if r.is_err() { return },
                _ = wait => {}
            }
        }
    }

    /// Puts the document for `auth`'s root set in `served`; `Ok(false)` when the stored sequence
    /// does not number it yet (the last document stays).
    async fn refresh(&self, auth: &Authority, served: &mut Served) -> Result<bool, PublishError> {
        let td = &auth.policy.trust_domain;
        let Some(roots) = auth.roots() else {
            served.remove(td.as_str());
            return Ok(true);
        };
        let fp = roots.fingerprint();
        let now = unix(self.clock.now());
        let store = self.store.as_ref();
        let recorded = if replica::is_leader(self.leader.as_ref()) {
            let all = typed::update::<Sequences, _>(store, &sequences_key(), |cur| {
                let step = next(cur.and_then(|c| c.get(td.as_str())), &fp, now)?;
                let mut all = cur.cloned().unwrap_or_default();
                all.insert(td.as_str().to_string(), step);
                Some(all)
            })
            .await?;
            all.and_then(|mut a| a.remove(td.as_str()))
        } else {
            typed::get::<Sequences>(store, &sequences_key()).await?.and_then(|mut v| v.value.remove(td.as_str()))
        };
        let Some(seq) = recorded.filter(|s| s.roots == fp) else { return Ok(false) };
        let published = document(td, roots, seq.sequence, self.refresh_hint)?;
        if served.get(td.as_str()).map(|p| p.as_ref()) != Some(&published) {
            tracing::info!(trust_domain = %td, sequence = seq.sequence, roots = roots.len(), "SPIFFE bundle published");
            served.insert(td.as_str().to_string(), Arc::new(published));
        }
        Ok(true)
    }
}

/// The bundle of `roots` for `td` with `sequence`.
pub fn document(
    td: &TrustDomain,
    roots: &RootSet,
    sequence: u64,
    refresh_hint: Duration,
) -> Result<Published, PublishError> {
    let bundle = Bundle {
        trust_domain: td.clone(),
        sequence,
        refresh_hint: Some(refresh_hint),
        authorities: roots.iter().cloned().collect(),
    };
    let document = bundle.to_document()?;
    Ok(Published { bundle, document })
}

/// Why the bundle could not be published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// A root cannot be written as a JWK.
    #[error(transparent)]
    Encode(#[from] meshca_spiffe_bundle::BundleError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sequence_starts_at_one_and_grows_with_each_change_only() {
        let first = next(None, "sha256:a", 10).expect("first root set");
        assert_eq!((first.sequence, first.since), (1, 10));
        assert_eq!(next(Some(&first), "sha256:a", 20), None, "the same root set keeps its number");
        let both = next(Some(&first), "sha256:ab", 30).expect("A+B");
        assert_eq!((both.sequence, both.roots.as_str(), both.since), (2, "sha256:ab", 30));
        let b = next(Some(&both), "sha256:b", 40).expect("B");
        assert_eq!(b.sequence, 3);
        // Back to an earlier root set (an aborted rotation) is a change too: never a smaller number.
        assert_eq!(next(Some(&b), "sha256:a", 50).map(|s| s.sequence), Some(4));
    }
}
