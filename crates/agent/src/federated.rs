//! The bundles of the trust domains the mesh federates with, as the agent writes them: one
//! object next to `cacerts` ([`OBJECT`], in `cacerts`' namespace) with one PEM file per foreign
//! trust domain, `<trust domain>.pem`. With `meshca up` (a directory store) that is
//! `<cluster dir>/istio-system/meshca-federated-bundles/<trust domain>.pem`; in Kubernetes, the
//! Secret `istio-system/meshca-federated-bundles`.
//!
//! They are kept apart from `root-cert.pem` on purpose: a root there vouches for the mesh's own
//! trust domain, and a foreign root must vouch for its own trust domain only.

use meshca_pki::Cert;
use meshca_proto::mgmt::FederatedBundle;
use meshca_store::Secret;
use meshca_store::labels::MANAGED_BY;

/// The object's name.
pub const OBJECT: &str = "meshca-federated-bundles";

/// The data key of a trust domain's bundle.
pub fn file_name(trust_domain: &str) -> String {
    format!("{trust_domain}.pem")
}

/// The object for `bundles`, each checked (a trust domain that is not a valid file name, or
/// roots that do not parse, is refused with why); `None` when there are none (the object is then
/// removed).
pub fn secret(bundles: &[FederatedBundle]) -> Result<Option<Secret>, String> {
    if bundles.is_empty() {
        return Ok(None);
    }
    let mut entries = Vec::with_capacity(bundles.len());
    for b in bundles {
        let name = file_name(&b.trust_domain);
        if !meshca_store::is_valid_data_key(&name) || b.trust_domain.starts_with('.') {
            return Err(format!("the federated trust domain {:?} is not a valid file name", b.trust_domain));
        }
        match Cert::parse_pem_bundle(b.roots.as_bytes()) {
            Ok(certs) if !certs.is_empty() => {}
            Ok(_) => return Err(format!("the bundle of {} holds no certificate", b.trust_domain)),
            Err(e) => return Err(format!("the bundle of {} does not parse: {e}", b.trust_domain)),
        }
        entries.push((name, b.roots.clone().into_bytes()));
    }
    Ok(Some(Secret::with_data(entries).label(MANAGED_BY.0, MANAGED_BY.1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_bundles_no_object_and_a_bad_name_is_refused() {
        assert_eq!(secret(&[]), Ok(None));
        let bad = FederatedBundle { trust_domain: "../x".into(), roots: String::new(), sequence: 1 };
        assert!(secret(&[bad]).expect_err("bad name").contains("not a valid file name"));
        let empty = FederatedBundle { trust_domain: "other.example".into(), roots: String::new(), sequence: 1 };
        assert!(secret(&[empty]).expect_err("no roots").contains("the bundle of other.example"));
    }
}
