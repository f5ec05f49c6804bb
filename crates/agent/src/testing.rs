//! Test support for the agent's own tests and for in-process tests elsewhere: a valid `cacerts`
//! bundle made on the spot (a generated root and a cluster intermediate under it).

use std::time::{Duration, SystemTime};

use meshca_pki::{CaBundle, CaSigner, IntermediateParams, KeyAlgorithm, PrivateKey, RootParams, RootSet, TrustDomain};

/// A valid bundle for `cluster-1` (root → intermediate, P-256), issued now, and its root's signer.
pub fn bundle() -> (CaBundle, CaSigner) {
    bundle_at(SystemTime::now(), Duration::from_secs(3600))
}

/// A valid bundle issued at `now` for `ttl`, and its root's signer.
pub fn bundle_at(now: SystemTime, ttl: Duration) -> (CaBundle, CaSigner) {
    let root_key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).expect("root key");
    let root = CaSigner::new_root(root_key, &RootParams::new("meshca-test"), now).expect("root");
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).expect("key");
    let td = TrustDomain::new("cluster.local").expect("td");
    let params = IntermediateParams { ttl, ..IntermediateParams::cluster("meshca-test", "cluster-1", td) };
    let issued = root.sign_intermediate(key.public_key_spki(), &params, now).expect("intermediate");
    let cert = issued.parse().expect("parse");
    let roots = RootSet::from_certs(vec![root.cert().clone()]).expect("roots");
    let files = CaBundle::assemble(&key, &cert, &[root.cert().clone()], &roots);
    (CaBundle::validate(&files, now).expect("valid"), root)
}
