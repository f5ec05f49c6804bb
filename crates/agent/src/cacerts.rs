//! The `cacerts` object as the agent sees it: what it holds ([`Held`], validated once when it
//! changes, not on every pass), and the object it writes.

use std::time::SystemTime;

use meshca_clock::{from_unix, unix};
use meshca_pki::RootSet;
use meshca_pki::bundle::{BundleFiles, CaBundle};
use meshca_store::labels::{ANN_CLUSTER, ANN_GENERATION, ANN_ISSUED_AT, ANN_ROTATE, ANN_SERIAL, MANAGED_BY};
use meshca_store::{ResourceVersion, Secret, StoreError, Versioned};

use crate::plan::Current;

/// The `cacerts` found in the store.
#[derive(Debug)]
pub enum Held {
    /// None yet.
    Absent,
    /// Written by meshca and valid when it was read.
    Ours {
        /// What renewal planning needs.
        current: Current,
        /// The validated bundle.
        bundle: Box<CaBundle>,
        /// Its version, for the next compare-and-swap.
        version: ResourceVersion,
    },
    /// Written by meshca but not valid (expired, corrupt): to be replaced.
    OursInvalid {
        /// What is wrong with it.
        reason: String,
        /// Its version.
        version: ResourceVersion,
        /// When all that is wrong is that it expired: what it was, still reported (the management
        /// plane alerts on an expired intermediate) until a new one replaces it.
        lapsed: Option<Box<Lapsed>>,
    },
    /// Written by someone else.
    Foreign {
        /// Its version.
        version: ResourceVersion,
        /// Its root set, if it has a readable one (a replacement must keep the subset rule).
        roots: Option<RootSet>,
    },
    /// The store could not be read; retried with backoff like a failed write.
    Unreadable {
        /// The store's error.
        error: String,
    },
}

/// An expired intermediate still in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lapsed {
    /// Its serial.
    pub serial: String,
    /// What planning knew about it.
    pub current: Current,
}

impl Held {
    /// Classifies what the store returned, validating the bundle exactly as istiod would, at `now`.
    pub fn classify(read: Result<Option<Versioned<Secret>>, StoreError>, now: SystemTime) -> Held {
        let v = match read {
            Ok(Some(v)) => v,
            Ok(None) => return Held::Absent,
            Err(e) => return Held::Unreadable { error: e.to_string() },
        };
        let s = &v.value;
        let files = BundleFiles::from_lookup(|name| s.get(name).map(<[u8]>::to_vec));
        if s.labels.get(MANAGED_BY.0).map(String::as_str) != Some(MANAGED_BY.1) {
            let roots = RootSet::from_pem(&files.root_cert).ok();
            return Held::Foreign { version: v.version, roots };
        }
        match CaBundle::validate(&files, now) {
            Ok(bundle) => {
                let current = current_of(&bundle, s);
                Held::Ours { current, bundle: Box::new(bundle), version: v.version }
            }
            Err(e) => {
                // Valid at the moment it expired: then all that is wrong is the time.
                let lapsed = meshca_pki::Cert::from_pem(&files.ca_cert)
                    .ok()
                    .filter(|c| c.not_after() < now)
                    .and_then(|c| CaBundle::validate(&files, c.not_after()).ok())
                    .map(|b| Box::new(Lapsed { serial: b.ca_cert().serial_hex(), current: current_of(&b, s) }));
                Held::OursInvalid { reason: e.to_string(), version: v.version, lapsed }
            }
        }
    }

    /// The version to compare-and-swap against when replacing it (`None`: create).
    pub fn version(&self) -> Option<&ResourceVersion> {
        match self {
            Held::Ours { version, .. } | Held::OursInvalid { version, .. } | Held::Foreign { version, .. } => {
                Some(version)
            }
            Held::Absent | Held::Unreadable { .. } => None,
        }
    }

    /// The intermediate in service, when it is meshca's and valid.
    pub fn current(&self) -> Option<&Current> {
        match self {
            Held::Ours { current, .. } => Some(current),
            _ => None,
        }
    }

    /// The root set a replacement must be a subset or superset of.
    pub fn roots(&self) -> Option<&RootSet> {
        match self {
            Held::Ours { bundle, .. } => Some(bundle.roots()),
            Held::Foreign { roots, .. } => roots.as_ref(),
            _ => None,
        }
    }
}

/// What renewal planning needs from a valid bundle and the annotations beside it.
fn current_of(bundle: &CaBundle, s: &Secret) -> Current {
    let ca = bundle.ca_cert();
    let issued_at = s
        .annotations
        .get(ANN_ISSUED_AT)
        .and_then(|t| t.parse::<i64>().ok())
        .map(from_unix)
        .filter(|t| *t >= ca.not_before() && *t < ca.not_after());
    Current {
        not_before: issued_at.unwrap_or(ca.not_before()),
        not_after: ca.not_after(),
        generation: s.annotations.get(ANN_GENERATION).cloned().unwrap_or_default(),
        rotate_handled: s.annotations.get(ANN_ROTATE).and_then(|r| r.parse().ok()).unwrap_or(0),
        roots_fingerprint: bundle.roots().fingerprint(),
    }
}

/// What the agent records beside the four files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    /// The cluster.
    pub cluster: String,
    /// The policy generation it was issued under.
    pub generation: String,
    /// The operator rotation counter it answers.
    pub rotate_requests: u64,
    /// The intermediate's serial.
    pub serial: String,
    /// When it was issued.
    pub issued_at: SystemTime,
}

/// The `cacerts` object for `files`, labelled and annotated.
pub fn secret(files: &BundleFiles, stamp: &Stamp) -> Secret {
    Secret::with_data(files.entries().map(|(k, v)| (k.to_string(), v.to_vec())))
        .label(MANAGED_BY.0, MANAGED_BY.1)
        .annotation(ANN_GENERATION, &stamp.generation)
        .annotation(ANN_ROTATE, &stamp.rotate_requests.to_string())
        .annotation(ANN_SERIAL, &stamp.serial)
        .annotation(ANN_ISSUED_AT, &unix(stamp.issued_at).to_string())
        .annotation(ANN_CLUSTER, &stamp.cluster)
}

/// The [`Held::Ours`] state of a bundle this agent has just written at `version`.
pub fn written(bundle: CaBundle, stamp: &Stamp, version: ResourceVersion) -> Held {
    let current = planned(&bundle, stamp);
    Held::Ours { current, bundle: Box::new(bundle), version }
}

/// What renewal planning will know about `bundle` once it is written with `stamp`.
pub fn planned(bundle: &CaBundle, stamp: &Stamp) -> Current {
    let ca = bundle.ca_cert();
    Current {
        not_before: if stamp.issued_at >= ca.not_before() && stamp.issued_at < ca.not_after() {
            stamp.issued_at
        } else {
            ca.not_before()
        },
        not_after: ca.not_after(),
        generation: stamp.generation.clone(),
        rotate_handled: stamp.rotate_requests,
        roots_fingerprint: bundle.roots().fingerprint(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// An expired intermediate read back (at a restart) is still known for what it was, so the
    /// agent keeps reporting it and the management plane keeps alerting on it.
    #[test]
    fn an_expired_intermediate_in_place_is_kept_as_lapsed_and_a_corrupt_one_is_not() {
        let issued_at = SystemTime::now();
        let (bundle, _) = crate::testing::bundle_at(issued_at, Duration::from_secs(600));
        let serial = bundle.ca_cert().serial_hex();
        let stamp = Stamp {
            cluster: "cluster-1".into(),
            generation: "g1".into(),
            rotate_requests: 0,
            serial: serial.clone(),
            issued_at,
        };
        let signer = bundle.signer();
        let files = CaBundle::assemble(signer.key(), bundle.ca_cert(), &signer.chain()[1..], bundle.roots());
        let read = |s: Secret| Ok(Some(Versioned { value: s, version: ResourceVersion("3".into()) }));
        let later = issued_at + Duration::from_secs(601);
        match Held::classify(read(secret(&files, &stamp)), later) {
            Held::OursInvalid { lapsed: Some(l), reason, .. } => {
                assert_eq!(l.serial, serial);
                assert_eq!(l.current.generation, "g1");
                assert!(l.current.not_after < later, "{reason}");
            }
            other => panic!("expected an expired bundle kept as lapsed, got {other:?}"),
        }
        let mut broken = secret(&files, &stamp);
        broken.data.insert("ca-key.pem".into(), b"not a key".to_vec());
        assert!(matches!(Held::classify(read(broken), later), Held::OursInvalid { lapsed: None, .. }));
    }
}
