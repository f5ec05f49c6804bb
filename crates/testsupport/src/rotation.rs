//! The root rotation's barrier, checked on what the tests saw each cluster's `cacerts` hold, in
//! the order the writes happened: no cluster signs under the new root before every cluster
//! trusts it, no cluster drops the old root before every cluster signs under the new one, and
//! every cluster's root set changes only to a subset or a superset of itself (Istio's rule).
//!
//! Certificates are known here by their fingerprints only (this crate depends on no meshca
//! crate), so in-process tests and end-to-end tests check the same rules.

/// One `cacerts` version a cluster held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// The cluster.
    pub cluster: String,
    /// The fingerprints of the roots in `root-cert.pem`, in file order.
    pub roots: Vec<String>,
    /// The fingerprint of the root its intermediate chains to.
    pub chain_root: String,
}

/// Checks a rotation from root `from` to root `to` (for an aborted rotation, `from` and `to`
/// swapped: the root the clusters end on is `to`) on `seen`, every version the clusters held in
/// the order they were written, for the clusters named in `clusters`. Panics with the versions
/// up to the first violation.
pub fn check_barrier(seen: &[Held], clusters: &[String], from: &str, to: &str) {
    for (i, s) in seen.iter().enumerate() {
        let latest = |c: &str, upto: usize| seen[..upto].iter().rev().find(|x| x.cluster == c);
        // Nobody signs under `to` while trusting both, unless every cluster already trusts `to`
        // (a cluster with no cacerts yet has nothing to break).
        if s.chain_root == to && s.roots.contains(&from.to_string()) {
            for c in clusters {
                assert!(
                    latest(c, i + 1).is_none_or(|x| x.roots.contains(&to.to_string())),
                    "{} signs under the new root while {c} does not trust it: {:#?}",
                    s.cluster,
                    &seen[..=i]
                );
            }
        }
        // Nobody drops `from` unless every cluster signs under `to`.
        if s.roots == [to.to_string()] {
            for c in clusters {
                assert!(
                    latest(c, i).is_none_or(|x| x.chain_root == to || x.cluster == s.cluster),
                    "{} dropped the old root while {c} does not sign under the new one: {:#?}",
                    s.cluster,
                    &seen[..=i]
                );
            }
        }
    }
    for c in clusters {
        let mine: Vec<&Held> = seen.iter().filter(|s| &s.cluster == c).collect();
        for w in mine.windows(2) {
            let (x, y) = (&w[0].roots, &w[1].roots);
            assert!(
                x.iter().all(|r| y.contains(r)) || y.iter().all(|r| x.contains(r)),
                "{c}: root set {x:?} -> {y:?} breaks Istio's subset rule"
            );
        }
    }
}

/// The distinct root sets each cluster went through, as letters (`A` for `a`, `B` for `b`, `?`
/// for another root), e.g. `["A", "AB", "B"]`.
pub fn root_set_history(seen: &[Held], a: &str, b: &str) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut out: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for s in seen {
        let name: String = s
            .roots
            .iter()
            .map(|r| {
                if r == a {
                    'A'
                } else if r == b {
                    'B'
                } else {
                    '?'
                }
            })
            .collect();
        let h = out.entry(s.cluster.clone()).or_default();
        if h.last() != Some(&name) {
            h.push(name);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(c: &str, roots: &[&str], chain: &str) -> Held {
        Held { cluster: c.into(), roots: roots.iter().map(|r| r.to_string()).collect(), chain_root: chain.into() }
    }

    fn names() -> Vec<String> {
        vec!["c1".into(), "c2".into()]
    }

    #[test]
    fn a_correct_rotation_passes_and_its_history_reads_a_ab_b() {
        let seen = [
            held("c1", &["a"], "a"),
            held("c2", &["a"], "a"),
            held("c1", &["a", "b"], "a"),
            held("c2", &["a", "b"], "a"),
            held("c1", &["a", "b"], "b"),
            held("c2", &["a", "b"], "b"),
            held("c1", &["b"], "b"),
            held("c2", &["b"], "b"),
        ];
        check_barrier(&seen, &names(), "a", "b");
        assert_eq!(root_set_history(&seen, "a", "b")["c1"], ["A", "AB", "B"]);
    }

    #[test]
    fn each_violation_is_caught() {
        let early_switch = [held("c2", &["a"], "a"), held("c1", &["a", "b"], "b")];
        assert!(std::panic::catch_unwind(|| check_barrier(&early_switch, &names(), "a", "b")).is_err());
        let early_drop = [held("c2", &["a", "b"], "a"), held("c1", &["b"], "b")];
        assert!(std::panic::catch_unwind(|| check_barrier(&early_drop, &names(), "a", "b")).is_err());
        let jump = [held("c1", &["a"], "a"), held("c1", &["b"], "b")];
        assert!(std::panic::catch_unwind(|| check_barrier(&jump, &["c1".to_string()], "a", "b")).is_err());
    }
}
