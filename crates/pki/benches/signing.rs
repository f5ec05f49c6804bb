//! The hot path, "verify a CSR and sign a leaf from it", next to the raw signature rates of the
//! crypto library (aws-lc-rs) for the same key type, measured in the same run.
//!
//! `cargo bench -p meshca-pki --bench signing`; docs/benchmarks.md records the results and the
//! ratio to the crypto bound `1 / (1/sign + 1/verify)`.
#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;
use std::time::{Duration, SystemTime};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair, UnparsedPublicKey};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use meshca_pki::{
    CaSigner, CsrPolicy, KeyAlgorithm, LeafParams, PrivateKey, RootParams, SpiffeId, TrustDomain, build_csr, verify_csr,
};

/// About the size of a leaf's TBSCertificate.
const MSG: [u8; 400] = [0x5a; 400];

fn raw_p256(c: &mut Criterion) {
    let rng = SystemRandom::new();
    let doc = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
    let kp = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, doc.as_ref()).unwrap();
    let sig = kp.sign(&rng, &MSG).unwrap();
    let pk = UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, kp.public_key().as_ref().to_vec());
    let mut g = c.benchmark_group("raw-p256");
    g.throughput(Throughput::Elements(1));
    g.bench_function("sign", |b| b.iter(|| kp.sign(&rng, black_box(&MSG)).unwrap()));
    g.bench_function("verify", |b| b.iter(|| pk.verify(black_box(&MSG), sig.as_ref()).unwrap()));
    g.finish();
}

fn raw_rsa2048(c: &mut Criterion) {
    let rng = SystemRandom::new();
    let kp = RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let mut sig = vec![0; kp.public_modulus_len()];
    kp.sign(&signature::RSA_PKCS1_SHA256, &rng, &MSG, &mut sig).unwrap();
    let pk = UnparsedPublicKey::new(&signature::RSA_PKCS1_2048_8192_SHA256, kp.public_key().as_ref().to_vec());
    let mut g = c.benchmark_group("raw-rsa2048");
    g.throughput(Throughput::Elements(1));
    g.bench_function("sign", |b| {
        b.iter(|| kp.sign(&signature::RSA_PKCS1_SHA256, &rng, black_box(&MSG), &mut sig).unwrap())
    });
    g.bench_function("verify", |b| b.iter(|| pk.verify(black_box(&MSG), &sig).unwrap()));
    g.finish();
}

fn csr_to_leaf(c: &mut Criterion) {
    let now = SystemTime::now();
    let td = TrustDomain::new("cluster.local").unwrap();
    let params = LeafParams::workload(SpiffeId::workload(&td, "default", "sleep").unwrap(), Duration::from_secs(86400));
    let policy = CsrPolicy::default();
    let mut g = c.benchmark_group("csr-to-leaf");
    g.throughput(Throughput::Elements(1));
    for (name, alg) in [("p256", KeyAlgorithm::EcdsaP256), ("rsa2048", KeyAlgorithm::Rsa2048)] {
        let signer = CaSigner::new_root(PrivateKey::generate(alg).unwrap(), &RootParams::new("bench"), now).unwrap();
        let csr = build_csr(&PrivateKey::generate(alg).unwrap(), &[]).unwrap();
        g.bench_function(name, |b| {
            b.iter(|| {
                let v = verify_csr(black_box(csr.as_bytes()), &policy).unwrap();
                signer.sign_leaf(v.public_key_spki(), &params, now).unwrap()
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    targets = raw_p256, raw_rsa2048, csr_to_leaf
}
criterion_main!(benches);
