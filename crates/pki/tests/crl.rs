//! CRLs meshca signs, cross-checked with the real OpenSSL CLI: `openssl crl -verify` against
//! their issuer, the RFC 5280 fields as OpenSSL prints them, and `openssl verify -crl_check_all`
//! refusing a leaf under a revoked intermediate while accepting one under a healthy one. Also
//! istiod's `ca-crl.pem` rule (a CRL from every certificate of the chain).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use meshca_pki::crl::{self, Crl, CrlError, CrlParams, Reason, Revoked};
use meshca_pki::{IssueError, KeyAlgorithm};
use meshca_testsupport::openssl_ok;

fn params(number: u64, now: SystemTime, revoked: Vec<Revoked>) -> CrlParams {
    CrlParams { number, this_update: now, next_update: now + Duration::from_secs(3600), revoked }
}

#[test]
fn openssl_verifies_meshca_crls_and_reads_their_rfc5280_fields() {
    let now = SystemTime::now();
    for alg in [KeyAlgorithm::EcdsaP256, KeyAlgorithm::EcdsaP384, KeyAlgorithm::Rsa2048] {
        let dir = tempfile::tempdir().unwrap();
        let root = root(alg, now);
        let c2 = intermediate(&root, alg, "cluster-2", now);
        let revoked =
            vec![Revoked { serial_hex: c2.cert().serial_hex(), revoked_at: now, reason: Reason::KeyCompromise }];
        let crl = root.sign_crl(&params(7, now, revoked)).unwrap();
        write(dir.path(), "root.pem", root.cert().to_pem());
        write(dir.path(), "root.crl", crl.to_pem());
        let out =
            openssl_ok(dir.path(), &["crl", "-in", "root.crl", "-CAfile", "root.pem", "-verify", "-noout", "-text"]);
        assert!(out.contains("verify OK"), "{alg}: {out}");
        assert!(out.contains("Version 2"), "{alg}: {out}");
        assert!(out.contains("X509v3 CRL Number") && out.contains("\n                7\n"), "{alg}: {out}");
        assert!(out.contains("X509v3 Authority Key Identifier"), "{alg}: {out}");
        assert!(out.contains("Next Update:"), "{alg}: {out}");
        assert!(out.contains(&format!("Serial Number: {}", c2.cert().serial_hex())), "{alg}: {out}");
        assert!(out.contains("Key Compromise"), "{alg}: {out}");
        // Read back by meshca: the same facts.
        let back = Crl::parse_pem_bundle(crl.to_pem().as_bytes()).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].number(), 7);
        assert_eq!(back[0].authority_key_id(), root.cert().subject_key_id());
        assert_eq!(back[0].revoked()[0].reason, Reason::KeyCompromise);
        assert!(back[0].lists(&c2.cert().serial_hex()));
        back[0].verify_signed_by(root.cert()).unwrap();
        assert!(back[0].revokes(c2.cert(), root.cert()));
    }
}

/// A CRL another CA (same name, other key) signed is refused by OpenSSL and by meshca.
#[test]
fn a_crl_from_another_key_is_refused_by_openssl_and_meshca() {
    let now = SystemTime::now();
    let dir = tempfile::tempdir().unwrap();
    let root = root(KeyAlgorithm::EcdsaP256, now);
    let impostor = common::root(KeyAlgorithm::EcdsaP256, now);
    let crl = impostor.sign_crl(&params(1, now, Vec::new())).unwrap();
    write(dir.path(), "root.pem", root.cert().to_pem());
    write(dir.path(), "bad.crl", crl.to_pem());
    let (ok, out) = openssl(dir.path(), &["crl", "-in", "bad.crl", "-CAfile", "root.pem", "-verify", "-noout"]);
    assert!(!ok || !out.contains("verify OK"), "{out}");
    assert!(matches!(crl.verify_signed_by(root.cert()), Err(CrlError::Signature { .. })));
}

/// The compromise scenario end to end in OpenSSL: cluster-2's intermediate is revoked by the
/// root's CRL; with every CA's CRL loaded (`-crl_check_all`), a leaf under it fails and a leaf of
/// a healthy cluster passes.
#[test]
fn openssl_crl_check_all_rejects_a_leaf_under_a_revoked_intermediate_only() {
    let now = SystemTime::now();
    let dir = tempfile::tempdir().unwrap();
    let root = root(KeyAlgorithm::EcdsaP256, now);
    let c1 = intermediate(&root, KeyAlgorithm::EcdsaP256, "cluster-1", now);
    let c2 = intermediate(&root, KeyAlgorithm::EcdsaP256, "cluster-2", now);
    let (_k1, leaf1) = leaf(&c1, "default", "a", now);
    let (_k2, leaf2) = leaf(&c2, "default", "b", now);
    let revoked = vec![Revoked { serial_hex: c2.cert().serial_hex(), revoked_at: now, reason: Reason::KeyCompromise }];
    let crls = [
        root.sign_crl(&params(2, now, revoked)).unwrap(),
        c1.sign_crl(&params(1, now, Vec::new())).unwrap(),
        c2.sign_crl(&params(1, now, Vec::new())).unwrap(),
    ];
    write(dir.path(), "root.pem", root.cert().to_pem());
    write(dir.path(), "ints.pem", c1.cert().to_pem() + &c2.cert().to_pem());
    write(dir.path(), "crls.pem", crl::to_pem_bundle(&crls));
    write(dir.path(), "leaf1.pem", leaf1.to_pem());
    write(dir.path(), "leaf2.pem", leaf2.to_pem());
    let verify = |leaf: &str| {
        openssl(
            dir.path(),
            &[
                "verify",
                "-crl_check_all",
                "-CAfile",
                "root.pem",
                "-untrusted",
                "ints.pem",
                "-CRLfile",
                "crls.pem",
                leaf,
            ],
        )
    };
    let (ok, out) = verify("leaf1.pem");
    assert!(ok && out.contains("leaf1.pem: OK"), "{out}");
    let (ok, out) = verify("leaf2.pem");
    assert!(!ok && out.contains("certificate revoked"), "{out}");
    // meshca's own reading agrees.
    let chain2 = [leaf2.clone(), c2.cert().clone(), root.cert().clone()];
    assert_eq!(crl::revoked_in_chain(&crls, &chain2).map(|(s, _)| s), Some(c2.cert().serial_hex()));
    let chain1 = [leaf1, c1.cert().clone(), root.cert().clone()];
    assert_eq!(crl::revoked_in_chain(&crls, &chain1), None);
}

/// istiod's rule: a CRL from every certificate of cert-chain.pem, or the bundle is refused.
#[test]
fn chain_coverage_needs_a_crl_signed_by_every_certificate_of_the_chain() {
    let now = SystemTime::now();
    let root = root(KeyAlgorithm::EcdsaP256, now);
    let c1 = intermediate(&root, KeyAlgorithm::EcdsaP256, "cluster-1", now);
    let chain = c1.chain().to_vec();
    let root_crl = root.sign_crl(&params(1, now, Vec::new())).unwrap();
    let own_crl = c1.sign_crl(&params(1, now, Vec::new())).unwrap();
    match crl::check_chain_coverage(std::slice::from_ref(&root_crl), &chain) {
        Err(CrlError::MissingFor(missing)) => assert_eq!(missing, vec![c1.cert().subject()]),
        other => panic!("expected the cluster intermediate to be missing, got {other:?}"),
    }
    assert!(crl::check_chain_coverage(std::slice::from_ref(&own_crl), &chain).is_err());
    crl::check_chain_coverage(&[own_crl, root_crl], &chain).unwrap();
}

/// The profile keeps cRLSign on roots and intermediates; a CA without it cannot sign a CRL.
#[test]
fn every_meshca_ca_may_sign_crls_and_reasons_parse_by_their_rfc_names() {
    let now = SystemTime::now();
    let root = root(KeyAlgorithm::EcdsaP256, now);
    let c1 = intermediate(&root, KeyAlgorithm::EcdsaP256, "cluster-1", now);
    for ca in [root.cert(), c1.cert()] {
        assert!(ca.allows_key_usage(x509_cert::ext::pkix::KeyUsages::CRLSign), "{}", ca.subject());
    }
    assert_eq!("keyCompromise".parse::<Reason>().unwrap(), Reason::KeyCompromise);
    assert_eq!("key-compromise".parse::<Reason>().unwrap(), Reason::KeyCompromise);
    assert_eq!("SUPERSEDED".parse::<Reason>().unwrap(), Reason::Superseded);
    assert!(matches!("certificateHold".parse::<Reason>(), Err(CrlError::UnknownReason(_))));
    // A leaf is not a CA: its signer refuses (no keyCertSign, so CaSigner::new already fails).
    let (k, leaf) = leaf(&c1, "default", "a", now);
    assert!(matches!(meshca_pki::CaSigner::new(k, vec![leaf]), Err(IssueError::NotACa { .. })));
}
