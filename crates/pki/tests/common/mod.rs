//! Helpers shared by the PKI integration tests: a small CA hierarchy and the OpenSSL CLI.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, SystemTime};

use meshca_pki::{
    CaSigner, Cert, CsrPolicy, IntermediateParams, KeyAlgorithm, LeafParams, PrivateKey, RootParams, SpiffeId,
    TrustDomain, build_csr, verify_csr,
};
#[allow(unused_imports)] // not every test binary runs OpenSSL
pub use meshca_testsupport::openssl;

pub fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").unwrap()
}

pub fn root(alg: KeyAlgorithm, now: SystemTime) -> CaSigner {
    CaSigner::new_root(PrivateKey::generate(alg).unwrap(), &RootParams::new("meshca"), now).unwrap()
}

/// Issues a cluster intermediate under `parent` for a freshly generated key, via a real CSR.
pub fn intermediate(parent: &CaSigner, alg: KeyAlgorithm, cluster: &str, now: SystemTime) -> CaSigner {
    intermediate_with(parent, alg, IntermediateParams::cluster("meshca", cluster, td()), now)
}

pub fn intermediate_with(
    parent: &CaSigner,
    alg: KeyAlgorithm,
    params: IntermediateParams,
    now: SystemTime,
) -> CaSigner {
    let key = PrivateKey::generate(alg).unwrap();
    let csr = verify_csr(build_csr(&key, &[]).unwrap().as_bytes(), &CsrPolicy::default()).unwrap();
    let issued = parent.sign_intermediate(csr.public_key_spki(), &params, now).unwrap();
    let mut chain = vec![issued.parse().unwrap()];
    chain.extend(parent.chain().iter().cloned());
    CaSigner::new(key, chain).unwrap()
}

pub fn leaf(signer: &CaSigner, ns: &str, sa: &str, now: SystemTime) -> (PrivateKey, Cert) {
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let id = SpiffeId::workload(&td(), ns, sa).unwrap();
    let issued =
        signer.sign_leaf(key.public_key_spki(), &LeafParams::workload(id, Duration::from_secs(3600)), now).unwrap();
    (key, issued.parse().unwrap())
}

pub fn write(dir: &Path, name: &str, data: impl AsRef<[u8]>) {
    std::fs::write(dir.join(name), data).unwrap();
}

pub fn read(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).unwrap()
}
