//! Several RootTrustPolicies under one management plane: each one a mesh with its own root,
//! trust domain, CA mode and clusters. A file (or the Kubernetes namespace) may hold one policy,
//! as before, or several; [`PolicySet`] is the validated whole, and [`PolicySet::assign`] says
//! which policy a cluster belongs to.
//!
//! What can be refused up front is refused when the set is validated (two policies of one name
//! or one trust domain, a cluster listed by two policies, a policy selecting every cluster beside
//! another); what depends on the cluster records (two label selectors matching one cluster) is
//! decided per cluster by [`PolicySet::assign`], which names both policies.

use std::collections::BTreeMap;

use crate::validate::{ClusterSelector, Policy, is_cluster_name};
use crate::{PolicyError, RootTrustPolicyDoc, err};

/// The policies in force, sorted by name.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicySet {
    policies: Vec<Policy>,
}

/// Which policy a cluster belongs to.
#[derive(Debug, Clone, PartialEq)]
pub enum Assignment<'a> {
    /// Exactly this one selects it.
    Mesh(&'a Policy),
    /// None does: its `cacerts` is left as it is.
    Uncovered,
    /// Several do (label selectors that overlap on this cluster's labels): it is refused until
    /// the operator resolves it. The names, sorted.
    Conflict(Vec<&'a str>),
}

impl Assignment<'_> {
    /// The assigned policy's name, if it has one.
    pub fn policy_name(&self) -> Option<&str> {
        match self {
            Assignment::Mesh(p) => Some(&p.name),
            _ => None,
        }
    }

    /// What status shows for a cluster that is not in exactly one mesh.
    pub fn explain(&self, cluster: &str) -> Option<String> {
        match self {
            Assignment::Mesh(_) => None,
            Assignment::Uncovered => {
                Some(format!("cluster {cluster} is selected by no RootTrustPolicy; its cacerts is left as it is"))
            }
            Assignment::Conflict(names) => Some(format!(
                "cluster {cluster} is selected by RootTrustPolicies {}; a cluster belongs to one mesh, so it gets \
                 nothing until one of them stops selecting it",
                names.join(" and ")
            )),
        }
    }
}

impl PolicySet {
    /// The set of one policy (the embedded default, a one-document file): exactly today's
    /// single-mesh management plane.
    pub fn single(policy: Policy) -> PolicySet {
        PolicySet { policies: vec![policy] }
    }

    /// Validates `policies` together.
    pub fn new(mut policies: Vec<Policy>) -> Result<PolicySet, PolicyError> {
        if policies.is_empty() {
            return Err(err("policy", "no RootTrustPolicy is defined"));
        }
        policies.sort_by(|a, b| a.name.cmp(&b.name));
        if policies.len() == 1 {
            return Ok(PolicySet { policies });
        }
        for p in &policies {
            // A mesh's own records in the store are named after it.
            if !is_cluster_name(&p.name) {
                return Err(err(
                    "metadata.name",
                    format!(
                        "{:?}: with several policies each needs a name that is a DNS-1123 label (it names the mesh)",
                        p.name
                    ),
                ));
            }
        }
        for pair in policies.windows(2) {
            if pair[0].name == pair[1].name {
                return Err(err("metadata.name", format!("two policies are named {}", pair[0].name)));
            }
        }
        for (i, a) in policies.iter().enumerate() {
            for b in &policies[i + 1..] {
                if a.trust_domain == b.trust_domain {
                    return Err(err(
                        "spec.trustDomain",
                        format!(
                            "policies {} and {} both use trust domain {}; each mesh needs its own (a SPIFFE ID \
                             names its trust domain, not its root)",
                            a.name, b.name, a.trust_domain
                        ),
                    ));
                }
                overlap(a, b)?;
            }
        }
        Ok(PolicySet { policies })
    }

    /// Parses one YAML document or several (separated by `---`) and validates them together.
    /// With one document, errors name its fields as before; with several, each error also names
    /// the policy.
    pub fn from_yaml(text: &str) -> Result<PolicySet, PolicyError> {
        let docs: Vec<RootTrustPolicyDoc> =
            serde_saphyr::from_multiple(text).map_err(|e| err("policy", e.to_string()))?;
        Self::from_docs(&docs)
    }

    /// Validates parsed documents together.
    pub fn from_docs(docs: &[RootTrustPolicyDoc]) -> Result<PolicySet, PolicyError> {
        if docs.len() == 1 {
            return PolicySet::new(vec![Policy::from_doc(&docs[0])?]);
        }
        let policies = docs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                Policy::from_doc(d).map_err(|e| {
                    let which =
                        if d.metadata.name.is_empty() { format!("#{}", i + 1) } else { d.metadata.name.clone() };
                    PolicyError { field: format!("policy {which}: {}", e.field), message: e.message }
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        PolicySet::new(policies)
    }

    /// The policies, sorted by name.
    pub fn policies(&self) -> &[Policy] {
        &self.policies
    }

    /// The policy named `name`.
    pub fn get(&self, name: &str) -> Option<&Policy> {
        self.policies.iter().find(|p| p.name == name)
    }

    /// Which policy the cluster `name`, labelled `labels`, belongs to.
    pub fn assign(&self, name: &str, labels: &BTreeMap<String, String>) -> Assignment<'_> {
        assign(self.policies.iter(), name, labels)
    }
}

/// [`PolicySet::assign`] over any policies (the management plane keeps each mesh's policy in
/// force apart from the others).
pub fn assign<'a>(
    policies: impl IntoIterator<Item = &'a Policy>,
    name: &str,
    labels: &BTreeMap<String, String>,
) -> Assignment<'a> {
    let mut hits: Vec<&Policy> = policies.into_iter().filter(|p| p.clusters.covers(name, labels)).collect();
    match hits.len() {
        0 => Assignment::Uncovered,
        1 => Assignment::Mesh(hits.remove(0)),
        _ => {
            let mut names: Vec<&str> = hits.iter().map(|p| p.name.as_str()).collect();
            names.sort();
            Assignment::Conflict(names)
        }
    }
}

/// Refuses two policies whose selections overlap whatever the clusters' labels are.
fn overlap(a: &Policy, b: &Policy) -> Result<(), PolicyError> {
    for (p, other) in [(a, b), (b, a)] {
        if p.clusters == ClusterSelector::All {
            return Err(err(
                "spec.clusters",
                format!(
                    "policy {} selects every cluster (it sets neither spec.clusters nor spec.clusterSelector), so \
                     it overlaps policy {}; with several policies each one names its clusters",
                    p.name, other.name
                ),
            ));
        }
    }
    if let Some(c) = a.clusters.named().iter().find(|c| b.clusters.named().contains(c)) {
        return Err(err(
            "spec.clusters",
            format!(
                "cluster {c} is listed by both policy {} and policy {}; a cluster belongs to one mesh",
                a.name, b.name
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(name: &str, td: &str, clusters: &str) -> String {
        format!(
            "apiVersion: meshca.io/v1alpha1\nkind: RootTrustPolicy\nmetadata: {{ name: {name} }}\nspec:\n  trustDomain: {td}\n{clusters}  config: {{ generated: {{}} }}\n"
        )
    }

    /// `prod` (clusters east and west by name) and `staging` (clusters labelled env=staging).
    fn prod_and_staging() -> String {
        [
            doc("prod", "prod.example", "  clusters: [east, west]\n"),
            doc("staging", "staging.example", "  clusterSelector: { matchLabels: { env: staging } }\n"),
        ]
        .join("---\n")
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn one_document_is_a_set_of_one_and_keeps_its_field_names() {
        let set = PolicySet::from_yaml(&doc("mesh", "cluster.local", "")).expect("valid");
        assert_eq!(set.policies().len(), 1);
        assert!(matches!(set.assign("anything", &BTreeMap::new()), Assignment::Mesh(p) if p.name == "mesh"));
        let e = PolicySet::from_yaml(&doc("mesh", "Not A Domain", "")).expect_err("bad td");
        assert_eq!(e.field, "spec.trustDomain");
    }

    #[test]
    fn documents_written_as_yaml_read_back_as_the_same_set() {
        let text = prod_and_staging();
        let docs: Vec<RootTrustPolicyDoc> = serde_saphyr::from_multiple(&text).expect("parse");
        let written = RootTrustPolicyDoc::to_yaml(&docs).expect("write");
        assert!(!written.contains("null"), "an absent field is left out: {written}");
        assert_eq!(PolicySet::from_yaml(&written).expect("reads back"), PolicySet::from_yaml(&text).expect("valid"));
    }

    #[test]
    fn clusters_go_to_the_policy_that_selects_them_by_name_or_label() {
        let text = prod_and_staging();
        let set = PolicySet::from_yaml(&text).expect("valid");
        assert_eq!(set.assign("east", &BTreeMap::new()).policy_name(), Some("prod"));
        assert_eq!(set.assign("s1", &labels(&[("env", "staging"), ("team", "a")])).policy_name(), Some("staging"));
        assert_eq!(set.assign("s2", &labels(&[("env", "prod")])), Assignment::Uncovered);
        assert!(set.assign("s2", &BTreeMap::new()).explain("s2").expect("why").contains("no RootTrustPolicy"));
        // A listed cluster that also carries the other policy's label is in both.
        let a = set.assign("east", &labels(&[("env", "staging")]));
        assert_eq!(a, Assignment::Conflict(vec!["prod", "staging"]));
        let why = a.explain("east").expect("why");
        assert!(why.contains("prod and staging"), "{why}");
    }

    #[test]
    fn overlaps_known_up_front_are_refused_naming_both_policies() {
        let cases = [
            (
                [doc("a", "a.example", "  clusters: [c1, c2]\n"), doc("b", "b.example", "  clusters: [c2]\n")],
                "spec.clusters",
                "cluster c2 is listed by both policy a and policy b",
            ),
            (
                [doc("a", "a.example", ""), doc("b", "b.example", "  clusters: [c2]\n")],
                "spec.clusters",
                "policy a selects every cluster",
            ),
            (
                [doc("a", "same.example", "  clusters: [c1]\n"), doc("b", "same.example", "  clusters: [c2]\n")],
                "spec.trustDomain",
                "policies a and b both use trust domain same.example",
            ),
            (
                [doc("a", "a.example", "  clusters: [c1]\n"), doc("a", "b.example", "  clusters: [c2]\n")],
                "metadata.name",
                "two policies are named a",
            ),
            (
                [doc("a", "a.example", "  clusters: [c1]\n"), doc("B_1", "b.example", "  clusters: [c2]\n")],
                "metadata.name",
                "DNS-1123",
            ),
        ];
        for (docs, field, needle) in cases {
            let e = PolicySet::from_yaml(&docs.join("---\n")).expect_err(needle);
            assert_eq!(e.field, field, "{e}");
            assert!(e.to_string().contains(needle), "{e}");
        }
    }

    #[test]
    fn a_mistake_in_one_of_several_documents_names_the_policy_and_the_field() {
        let text = [
            doc("a", "a.example", "  clusters: [c1]\n"),
            doc("b", "b.example", "  clusters: [c2]\n").replace("generated: {}", "generated: { ttl: soon }"),
        ]
        .join("---\n");
        let e = PolicySet::from_yaml(&text).expect_err("bad ttl");
        assert_eq!(e.field, "policy b: spec.config.generated.ttl", "{e}");
    }

    #[test]
    fn label_selectors_are_checked() {
        for (sel, field) in [
            ("{ matchLabels: {} }", "spec.clusterSelector.matchLabels"),
            ("{ matchLabels: { 'bad key!': x } }", "spec.clusterSelector.matchLabels"),
            ("{ matchLabels: { env: 'no spaces' } }", "spec.clusterSelector.matchLabels.env"),
            ("{ matchNames: [x] }", "policy"),
        ] {
            let e =
                PolicySet::from_yaml(&doc("a", "a.example", &format!("  clusterSelector: {sel}\n"))).expect_err(sel);
            assert_eq!(e.field, field, "{sel}: {e}");
        }
        let both = doc("a", "a.example", "  clusters: [c1]\n  clusterSelector: { matchLabels: { env: x } }\n");
        assert_eq!(PolicySet::from_yaml(&both).expect_err("both").field, "spec.clusterSelector");
        let ok = doc("a", "a.example", "  clusterSelector: { matchLabels: { meshca.io/mesh: prod-1 } }\n");
        let set = PolicySet::from_yaml(&ok).expect("a prefixed key");
        assert_eq!(set.assign("c", &labels(&[("meshca.io/mesh", "prod-1")])).policy_name(), Some("a"));
    }
}
