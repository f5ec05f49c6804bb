//! What a root rotation persists: the journal (`meshca/root-rotation`), kept in the management
//! plane's store and rewritten at every transition, so that a restart or a new leader resumes a
//! rotation where it was — like SPIRE's journal of prepared / active / old CA slots.
//!
//! The journal records the root every covered cluster is known to trust outside a rotation
//! ([`Journal::established`]), the rotation in progress with each phase change and its time
//! ([`Rotation::transitions`]), and the last rotations' outcomes. Signers are not in the journal:
//! an [`Anchor`] names where its signer is (a CA object in the store, or Vault).

use std::collections::BTreeMap;

use meshca_policy::VaultDoc;
use meshca_proto::RotationPhase;
use serde::{Deserialize, Serialize};

/// The journal.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Journal {
    /// The root every covered cluster trusts and signs under when no rotation is in progress.
    /// `None` until the management plane first adopts the policy's root.
    #[serde(default)]
    pub established: Option<Anchor>,
    /// The rotation in progress.
    #[serde(default)]
    pub rotation: Option<Rotation>,
    /// The fingerprint of a root whose rotation an operator aborted: the policy still names it,
    /// but the mesh stays on the established root until the policy names another.
    #[serde(default)]
    pub declined: Option<String>,
    /// The last rotations, newest first (at most [`HISTORY_KEEP`]).
    #[serde(default)]
    pub history: Vec<Finished>,
}

/// How many finished rotations the journal keeps.
pub const HISTORY_KEEP: usize = 8;

/// A root and where the CA signing cluster intermediates under it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Anchor {
    /// The root (PEM).
    pub root_pem: String,
    /// Its SHA-256 fingerprint (lowercase hex).
    pub fingerprint: String,
    /// Where its signer is.
    pub signer: SignerRef,
}

/// Where the CA that signs cluster intermediates under a root is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum SignerRef {
    /// A CA (certificate chain and key) in the management plane's store, `meshca/<object>`.
    Stored {
        /// The object's name in the `meshca` namespace.
        object: String,
    },
    /// Vault's PKI engine, as the policy's `vault` block named it.
    Vault {
        /// The block.
        spec: Box<VaultDoc>,
    },
}

/// What started a rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Trigger {
    /// `meshca rotate root`.
    Operator,
    /// The generated root's remaining lifetime fell below `rootRotation.triggerRatio`.
    RootExpiry,
    /// The policy (or the secret it references, or its Vault mount) names another root.
    Policy,
}

impl Trigger {
    /// The name status shows.
    pub fn name(self) -> &'static str {
        match self {
            Trigger::Operator => "operator",
            Trigger::RootExpiry => "root-expiry",
            Trigger::Policy => "policy",
        }
    }
}

/// A rotation in progress: from the established root (`from`, A) to a new one (`to`, B), or
/// back to `from` once aborted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rotation {
    /// Identifies the rotation in logs and status.
    pub id: String,
    /// What started it.
    pub trigger: Trigger,
    /// The root being retired (the root everyone returns to if aborted).
    pub from: Anchor,
    /// The root taking over (the root being retired if aborted).
    pub to: Anchor,
    /// The current phase (never `Idle`: a finished rotation leaves the journal).
    pub phase: RotationPhase,
    /// Rolled back by an operator.
    #[serde(default)]
    pub aborted: bool,
    /// Unix seconds: when it started.
    pub started_at: i64,
    /// Unix seconds: when the current phase began.
    pub phase_since: i64,
    /// Each covered cluster that has converged in the current phase, and since when (unix
    /// seconds) — see [`crate::convergence`].
    #[serde(default)]
    pub converged: BTreeMap<String, i64>,
    /// Unix seconds: when the last cluster switched to the signing root (set on entering
    /// `Draining`; the drain is measured from it).
    #[serde(default)]
    pub switched_at: Option<i64>,
    /// Every phase change, oldest first.
    pub transitions: Vec<Transition>,
}

/// One phase change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    /// The phase entered.
    pub phase: RotationPhase,
    /// Unix seconds.
    pub at: i64,
    /// Why, in words.
    pub note: String,
}

/// A finished rotation, as history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finished {
    /// The rotation's id.
    pub id: String,
    /// The old root's fingerprint.
    pub from: String,
    /// The new root's fingerprint.
    pub to: String,
    /// Whether it was aborted (the mesh stayed on `from`).
    pub aborted: bool,
    /// Unix seconds.
    pub started_at: i64,
    /// Unix seconds.
    pub finished_at: i64,
    /// Its phase changes.
    pub transitions: Vec<Transition>,
}

impl Rotation {
    /// The root clusters sign under once switched: `to`, or `from` after an abort.
    pub fn target(&self) -> &Anchor {
        if self.aborted { &self.from } else { &self.to }
    }

    /// Enters `phase` at `now`. The convergence map is kept only when the requirement does not
    /// change (`Switching` → `Draining`).
    pub fn enter(&mut self, phase: RotationPhase, now: i64, note: impl Into<String>) {
        let keep = self.phase == RotationPhase::Switching && phase == RotationPhase::Draining;
        if !keep {
            self.converged.clear();
        }
        self.phase = phase;
        self.phase_since = now;
        self.transitions.push(Transition { phase, at: now, note: note.into() });
    }

    /// The history entry for this rotation, finished at `now`.
    pub fn finished(&self, now: i64) -> Finished {
        Finished {
            id: self.id.clone(),
            from: self.from.fingerprint.clone(),
            to: self.to.fingerprint.clone(),
            aborted: self.aborted,
            started_at: self.started_at,
            finished_at: now,
            transitions: self.transitions.clone(),
        }
    }
}

/// Base names of a mesh's rotation objects in the `meshca` namespace (each mesh's
/// [`crate::records::Keyspace`] prefixes them; the journal stores base names).
pub mod objects {
    /// The journal.
    pub const JOURNAL: &str = "root-rotation";
    /// Generated mode: the new root, prepared before it joins the root set (SPIRE's "prepared"
    /// slot); promoted to `root-ca` when the rotation completes, destroyed if it is aborted.
    pub const GENERATED_NEXT: &str = "root-ca-next";
    /// Your root / your intermediate: the management plane's copy of the CA the mesh trusts, so
    /// that it can keep signing under it while the mesh moves to the one the policy now names.
    pub const ESTABLISHED_COPY: &str = "root-rotation-established";
    /// Your root / your intermediate: the management plane's copy of the CA being rotated to,
    /// fixed for the whole rotation whatever happens to the secret meanwhile.
    pub const NEXT_COPY: &str = "root-rotation-next";
    /// All of them.
    pub const ALL: [&str; 4] = [JOURNAL, GENERATED_NEXT, ESTABLISHED_COPY, NEXT_COPY];
}

#[cfg(test)]
mod tests {
    use super::*;

    fn anchor(fp: &str) -> Anchor {
        Anchor {
            root_pem: String::new(),
            fingerprint: fp.into(),
            signer: SignerRef::Stored { object: "root-ca".into() },
        }
    }

    #[test]
    fn the_journal_round_trips_through_json_with_phase_names() {
        let mut r = Rotation {
            id: "r1".into(),
            trigger: Trigger::RootExpiry,
            from: anchor("a"),
            to: anchor("b"),
            phase: RotationPhase::Distributing,
            aborted: false,
            started_at: 10,
            phase_since: 10,
            converged: BTreeMap::from([("c1".to_string(), 12)]),
            switched_at: None,
            transitions: vec![Transition { phase: RotationPhase::Distributing, at: 10, note: "start".into() }],
        };
        r.enter(RotationPhase::Switching, 20, "barrier");
        assert!(r.converged.is_empty(), "a new requirement starts afresh");
        r.converged.insert("c1".into(), 21);
        r.enter(RotationPhase::Draining, 30, "all switched");
        assert_eq!(r.converged["c1"], 21, "Draining keeps Switching's requirement");
        let j = Journal { established: Some(anchor("a")), rotation: Some(r), declined: None, history: vec![] };
        let json = serde_json::to_string(&j).expect("json");
        assert!(json.contains(r#""phase":"Draining""#) && json.contains(r#""trigger":"root-expiry""#), "{json}");
        assert!(json.contains(r#""kind":"stored""#), "{json}");
        assert_eq!(serde_json::from_str::<Journal>(&json).expect("back"), j);
        assert_eq!(serde_json::from_str::<Journal>("{}").expect("empty"), Journal::default());
    }
}
