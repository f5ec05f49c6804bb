//! The cluster intermediate's subject, in one place: the issuer writes it, the agent's CSR and
//! Vault's signing request carry it, and the issuer checks a CSR's `L=` against the caller.
//!
//! The subject is informative (istiod and the verifiers look only at the chain and the URI SAN),
//! but operators read it in `openssl x509 -text` and in Vault's issued list, so every path that
//! makes a cluster intermediate must spell it the same way: `O=<organization>, CN=meshca
//! intermediate, L=<cluster>` — Istio's own per-cluster recipe also names the cluster in `L=`.

use crate::name::NameAttr;

/// `CN=` of every cluster intermediate.
pub const INTERMEDIATE_COMMON_NAME: &str = "meshca intermediate";

/// The subject attributes of `cluster`'s intermediate, in the order they are encoded.
pub fn cluster_intermediate_subject<'a>(organization: &'a str, cluster: &'a str) -> [(NameAttr, &'a str); 3] {
    [
        (NameAttr::Organization, organization),
        (NameAttr::CommonName, INTERMEDIATE_COMMON_NAME),
        (NameAttr::Locality, cluster),
    ]
}
