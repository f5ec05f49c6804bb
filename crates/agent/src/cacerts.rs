//! The `cacerts` object as the agent sees it: what it holds ([`Held`], validated once when it
//! changes, not on every pass), and the object it writes.
//!
//! `ca-crl.pem` ([`crl_file`]) holds every CRL istiod needs to accept the bundle: one signed by
//! the cluster's own intermediate (signed here: its key never leaves the cluster; it revokes
//! nothing, and is re-signed at half its lifetime) followed by those the management plane
//! publishes (the root's, listing revoked cluster intermediates). It is written only when it
//! satisfies istiod's rule — a CRL from every certificate of `cert-chain.pem` — and left out
//! otherwise: istiod refuses the whole bundle over a `ca-crl.pem` it rejects.

use std::time::{Duration, SystemTime};

use meshca_clock::{from_unix, unix};
use meshca_pki::RootSet;
use meshca_pki::bundle::{BundleFiles, CA_CRL, CaBundle};
use meshca_pki::crl::{self, Crl, CrlParams};
use meshca_store::labels::{
    ANN_CLUSTER, ANN_CRL_UPSTREAM, ANN_GENERATION, ANN_ISSUED_AT, ANN_ROTATE, ANN_SERIAL, MANAGED_BY,
};
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
        /// Its `ca-crl.pem`.
        crl: CrlHeld,
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
                let crl = crl_held(&bundle, s);
                Held::Ours { current, bundle: Box::new(bundle), version: v.version, crl }
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

/// What the agent knows of the `ca-crl.pem` in place.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CrlHeld {
    /// Digest of the published CRLs it was written with ([`crl_digest`]; empty: none).
    pub upstream_digest: String,
    /// When its own CRL is due for re-signing; `None` when there is no `ca-crl.pem`.
    pub refresh_at: Option<SystemTime>,
    /// It is there but istiod would refuse it (unparsable, or a certificate without a CRL): to
    /// be written again at once.
    pub broken: bool,
    /// A CRL in it, from the intermediate's issuer, revokes the intermediate (or one from above
    /// revokes a CA of its chain): a new intermediate is needed.
    pub revoked: bool,
}

/// The `ca-crl.pem` to write, and what the agent will know of it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CrlFile {
    /// The file (`None`: no `ca-crl.pem`).
    pub pem: Option<String>,
    /// What planning knows of it once written.
    pub held: CrlHeld,
    /// Why there is no file although the management plane published CRLs.
    pub problem: Option<String>,
}

/// The digest that names a set of published CRLs (empty for none).
pub fn crl_digest(published: &str) -> String {
    if published.trim().is_empty() {
        return String::new();
    }
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, published.as_bytes()))
}

/// The CRL lifetime the management plane asked for, or an hour when it did not say (older
/// management planes publish no CRL, so it is not used then).
pub fn crl_ttl(seconds: i64) -> Duration {
    if seconds >= 2 { Duration::from_secs(seconds.unsigned_abs()) } else { Duration::from_secs(3600) }
}

/// When a CRL made at `this_update` for `ttl` is re-signed: at half of it.
fn refresh_at(this_update: SystemTime, next_update: SystemTime) -> SystemTime {
    this_update + next_update.duration_since(this_update).unwrap_or_default() / 2
}

/// Builds `ca-crl.pem` for `bundle` at `now`: the CRL its intermediate signs (valid for `ttl`)
/// followed by `published` (the management plane's, or Vault's). Nothing when nothing is published (a
/// `ca-crl.pem` with only the cluster's own CRL would lack the root's, and istiod would refuse
/// the bundle), or when the result would still not satisfy istiod (the reason is returned).
pub fn crl_file(bundle: &CaBundle, published: &str, ttl: Duration, now: SystemTime) -> CrlFile {
    let upstream_digest = crl_digest(published);
    let none = |problem: Option<String>| CrlFile {
        pem: None,
        held: CrlHeld { upstream_digest: upstream_digest.clone(), ..CrlHeld::default() },
        problem,
    };
    if upstream_digest.is_empty() {
        return none(None);
    }
    let upstream = match Crl::parse_pem_bundle(published.as_bytes()) {
        Ok(c) => c,
        Err(e) => return none(Some(format!("the management plane's CRLs do not parse: {e}"))),
    };
    // The CRL number grows with time, so it keeps growing across restarts without any state.
    let number = u64::try_from(unix(now)).unwrap_or_default();
    let params = CrlParams { number, this_update: now, next_update: now + ttl, revoked: Vec::new() };
    let own = match bundle.signer().sign_crl(&params) {
        Ok(c) => c,
        Err(e) => return none(Some(format!("signing the cluster's CRL: {e}"))),
    };
    let mut all = vec![own];
    all.extend(upstream);
    if let Err(e) = crl::check_chain_coverage(&all, bundle.signer().chain()) {
        return none(Some(e.to_string()));
    }
    let revoked = crl::revoked_in_chain(&all, bundle.signer().chain()).is_some();
    CrlFile {
        pem: Some(crl::to_pem_bundle(&all)),
        held: CrlHeld { upstream_digest, refresh_at: Some(refresh_at(now, now + ttl)), broken: false, revoked },
        problem: None,
    }
}

/// What the `ca-crl.pem` beside a valid bundle is, as far as planning goes.
fn crl_held(bundle: &CaBundle, s: &Secret) -> CrlHeld {
    let upstream_digest = s.annotations.get(ANN_CRL_UPSTREAM).cloned().unwrap_or_default();
    let Some(pem) = s.get(CA_CRL).filter(|p| !p.iter().all(u8::is_ascii_whitespace)) else {
        return CrlHeld { upstream_digest, ..CrlHeld::default() };
    };
    let chain = bundle.signer().chain();
    let parsed = Crl::parse_pem_bundle(pem).ok().filter(|c| crl::check_chain_coverage(c, chain).is_ok());
    let own = parsed.as_ref().and_then(|c| crl::signed_by(c, bundle.ca_cert()).first().map(|o| (*o).clone()));
    match (own, parsed) {
        (Some(o), Some(all)) => CrlHeld {
            upstream_digest,
            refresh_at: Some(refresh_at(o.this_update(), o.next_update())),
            broken: false,
            revoked: crl::revoked_in_chain(&all, chain).is_some(),
        },
        _ => CrlHeld { upstream_digest, broken: true, ..CrlHeld::default() },
    }
}

/// Whether `ca-crl.pem` must be written now: the published CRLs changed, the file is broken, or
/// the cluster's own CRL is at half its life. Otherwise, when to look again.
pub fn crl_due(held: &CrlHeld, wanted_digest: &str, now: SystemTime) -> Result<(), Option<SystemTime>> {
    if held.upstream_digest != wanted_digest || held.broken {
        return Ok(());
    }
    match held.refresh_at {
        Some(at) if now >= at => Ok(()),
        Some(at) => Err(Some(at)),
        None => Err(None),
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

/// The `cacerts` object for `files` and `ca-crl.pem`, labelled and annotated.
pub fn secret(files: &BundleFiles, crl: &CrlFile, stamp: &Stamp) -> Secret {
    let crl_entry = crl.pem.as_ref().map(|p| (CA_CRL.to_string(), p.as_bytes().to_vec()));
    Secret::with_data(files.entries().map(|(k, v)| (k.to_string(), v.to_vec())).into_iter().chain(crl_entry))
        .label(MANAGED_BY.0, MANAGED_BY.1)
        .annotation(ANN_GENERATION, &stamp.generation)
        .annotation(ANN_ROTATE, &stamp.rotate_requests.to_string())
        .annotation(ANN_SERIAL, &stamp.serial)
        .annotation(ANN_ISSUED_AT, &unix(stamp.issued_at).to_string())
        .annotation(ANN_CLUSTER, &stamp.cluster)
        .annotation(ANN_CRL_UPSTREAM, &crl.held.upstream_digest)
}

/// The files and stamp of the bundle held, to write it again with a new `ca-crl.pem`.
pub fn rewrite(bundle: &CaBundle, current: &Current, cluster: &str) -> (BundleFiles, Stamp) {
    let signer = bundle.signer();
    let files = CaBundle::assemble(signer.key(), bundle.ca_cert(), &signer.chain()[1..], bundle.roots());
    let stamp = Stamp {
        cluster: cluster.to_string(),
        generation: current.generation.clone(),
        rotate_requests: current.rotate_handled,
        serial: bundle.ca_cert().serial_hex(),
        issued_at: current.not_before,
    };
    (files, stamp)
}

/// The [`Held::Ours`] state of a bundle this agent has just written at `version`.
pub fn written(bundle: CaBundle, stamp: &Stamp, crl: &CrlFile, version: ResourceVersion) -> Held {
    let current = planned(&bundle, stamp);
    Held::Ours { current, bundle: Box::new(bundle), version, crl: crl.held.clone() }
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
        match Held::classify(read(secret(&files, &CrlFile::default(), &stamp)), later) {
            Held::OursInvalid { lapsed: Some(l), reason, .. } => {
                assert_eq!(l.serial, serial);
                assert_eq!(l.current.generation, "g1");
                assert!(l.current.not_after < later, "{reason}");
            }
            other => panic!("expected an expired bundle kept as lapsed, got {other:?}"),
        }
        let mut broken = secret(&files, &CrlFile::default(), &stamp);
        broken.data.insert("ca-key.pem".into(), b"not a key".to_vec());
        assert!(matches!(Held::classify(read(broken), later), Held::OursInvalid { lapsed: None, .. }));
    }
}
