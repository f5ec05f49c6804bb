//! Profile, chain, root-set and bundle behaviour, checked through the public API.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use meshca_pki::bundle::{self, BundleFiles, CaBundle};
use meshca_pki::{
    BundleError, CaSigner, ChainError, IntermediateParams, IssueError, KeyAlgorithm, LeafParams, PrivateKey, RootSet,
    RootSetError, SpiffeId, Usage, verify_chain,
};
use proptest::prelude::*;

fn t0() -> SystemTime {
    // A fixed instant keeps these tests independent of the wall clock.
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn set(certs: &[&CaSigner]) -> RootSet {
    RootSet::from_certs(certs.iter().map(|s| s.cert().clone()).collect()).unwrap()
}

#[test]
fn root_sets_fingerprint_independently_of_order_and_support_merge_and_subset() {
    let a = root(KeyAlgorithm::EcdsaP256, t0());
    let b = root(KeyAlgorithm::EcdsaP256, t0());
    let ab = set(&[&a, &b]);
    let ba = set(&[&b, &a]);
    assert_eq!(ab.fingerprint(), ba.fingerprint());
    assert!(ab.fingerprint().starts_with("sha256:"));
    let only_a = set(&[&a]);
    assert_ne!(only_a.fingerprint(), ab.fingerprint());
    assert!(only_a.is_subset_of(&ab));
    assert!(!ab.is_subset_of(&only_a));
    let merged = only_a.merge(&set(&[&b]));
    assert_eq!(merged.fingerprint(), ab.fingerprint());
    assert_eq!(merged.merge(&ab).len(), 2, "merge deduplicates");
    let reparsed = RootSet::from_pem(ab.to_pem().as_bytes()).unwrap();
    assert_eq!(reparsed.fingerprint(), ab.fingerprint());
}

#[test]
fn an_intermediate_is_not_accepted_as_a_root() {
    let r = root(KeyAlgorithm::EcdsaP256, t0());
    let i = intermediate(&r, KeyAlgorithm::EcdsaP256, "c1", t0());
    let err = RootSet::from_pem(i.cert().to_pem().as_bytes()).unwrap_err();
    assert!(matches!(err, RootSetError::NotSelfSigned { .. }), "{err}");
}

#[test]
fn root_transitions_follow_istios_subset_rule() {
    let a = set(&[&root(KeyAlgorithm::EcdsaP256, t0())]);
    let b = set(&[&root(KeyAlgorithm::EcdsaP256, t0())]);
    let ab = a.merge(&b);
    assert!(bundle::check_root_transition(&a, &ab).is_ok());
    assert!(bundle::check_root_transition(&ab, &b).is_ok());
    assert!(bundle::check_root_transition(&a, &a).is_ok());
    let err = bundle::check_root_transition(&a, &b).unwrap_err();
    assert!(matches!(err, BundleError::RootSetChange { .. }));
    assert!(err.to_string().contains("neither a subset nor a superset"), "{err}");
}

#[test]
fn chain_errors_name_the_certificate_at_fault() {
    let r = root(KeyAlgorithm::EcdsaP256, t0());
    let other = root(KeyAlgorithm::EcdsaP256, t0());
    let i = intermediate(&r, KeyAlgorithm::EcdsaP256, "c1", t0());
    let (_k, leaf) = leaf(&i, "default", "sleep", t0());
    let roots = set(&[&r]);
    let inter = [i.cert().clone()];

    assert!(verify_chain(&leaf, &inter, &roots, t0(), Usage::ServerAuth).is_ok());
    assert!(verify_chain(i.cert(), &[], &roots, t0(), Usage::Ca).is_ok());

    // Another root: the issuer is not found.
    let err = verify_chain(&leaf, &inter, &set(&[&other]), t0(), Usage::ClientAuth).unwrap_err();
    assert!(matches!(err, ChainError::UnknownIssuer { .. }), "{err}");

    // The intermediate is missing.
    let err = verify_chain(&leaf, &[], &roots, t0(), Usage::ClientAuth).unwrap_err();
    assert!(matches!(err, ChainError::UnknownIssuer { .. }), "{err}");

    // After the leaf's NotAfter.
    let later = t0() + Duration::from_secs(7200);
    let err = verify_chain(&leaf, &inter, &roots, later, Usage::ClientAuth).unwrap_err();
    assert!(matches!(err, ChainError::Expired { .. }), "{err}");

    // A leaf is not a CA, a CA is not a leaf.
    let err = verify_chain(&leaf, &inter, &roots, t0(), Usage::Ca).unwrap_err();
    assert!(matches!(err, ChainError::WrongUsage { .. }), "{err}");
    let err = verify_chain(i.cert(), &[], &roots, t0(), Usage::ServerAuth).unwrap_err();
    assert!(matches!(err, ChainError::WrongUsage { .. }), "{err}");
}

#[test]
fn a_same_named_intermediate_with_another_key_does_not_break_path_building() {
    // During a rotation, a bundle may briefly hold the old and the new intermediate side by side.
    let r = root(KeyAlgorithm::EcdsaP256, t0());
    let old = intermediate(&r, KeyAlgorithm::EcdsaP256, "c1", t0());
    let new = intermediate(&r, KeyAlgorithm::EcdsaP256, "c1", t0());
    assert_eq!(old.cert().subject_der(), new.cert().subject_der());
    let (_k, leaf) = leaf(&new, "default", "sleep", t0());
    let inter = [old.cert().clone(), new.cert().clone()];
    let roots = set(&[&r]);
    let path = verify_chain(&leaf, &inter, &roots, t0(), Usage::ServerAuth).unwrap();
    assert_eq!(path[1], new.cert());
}

#[test]
fn cluster_intermediates_cannot_sign_cas_and_expired_signers_sign_nothing() {
    let r = root(KeyAlgorithm::EcdsaP256, t0());
    let i = intermediate(&r, KeyAlgorithm::EcdsaP256, "c1", t0());
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let err =
        i.sign_intermediate(key.public_key_spki(), &IntermediateParams::cluster("o", "c2", td()), t0()).unwrap_err();
    assert!(matches!(err, IssueError::PathLen { path_len: 0, .. }), "{err}");

    let after = i.cert().not_after() + Duration::from_secs(1);
    let id = SpiffeId::workload(&td(), "a", "b").unwrap();
    let err =
        i.sign_leaf(key.public_key_spki(), &LeafParams::workload(id, Duration::from_secs(60)), after).unwrap_err();
    assert!(matches!(err, IssueError::SignerExpired { .. }), "{err}");
}

#[test]
fn a_signer_refuses_a_key_that_is_not_its_certificates() {
    let r = root(KeyAlgorithm::EcdsaP256, t0());
    let wrong = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let err = CaSigner::new(wrong, vec![r.cert().clone()]).unwrap_err();
    assert!(matches!(err, IssueError::KeyMismatch { .. }), "{err}");
    // A leaf cannot become a signer either.
    let (k, leaf) = leaf(&r, "a", "b", t0());
    let err = CaSigner::new(k, vec![leaf]).unwrap_err();
    assert!(matches!(err, IssueError::NotACa { .. }), "{err}");
}

#[test]
fn dns_name_constraints_allow_spiffe_leaves_and_istiod_names_but_refuse_others() {
    let r = root(KeyAlgorithm::EcdsaP256, t0());
    let mut p = IntermediateParams::cluster("meshca", "c1", td());
    p.permitted_dns_domains = vec!["cluster.local".into(), "istiod.istio-system.svc".into(), "localhost".into()];
    let i = intermediate_with(&r, KeyAlgorithm::EcdsaP256, p, t0());
    assert_eq!(i.cert().permitted_dns_domains().len(), 3);
    let roots = set(&[&r]);
    let inter = [i.cert().clone()];
    let (_k, wl) = leaf(&i, "default", "sleep", t0());
    verify_chain(&wl, &inter, &roots, t0(), Usage::ClientAuth).unwrap();

    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let serving = LeafParams {
        identity: None,
        dns_names: vec!["istiod.istio-system.svc".into(), "localhost".into()],
        ttl: Duration::from_secs(600),
    };
    let ok = i.sign_leaf(key.public_key_spki(), &serving, t0()).unwrap().parse().unwrap();
    verify_chain(&ok, &inter, &roots, t0(), Usage::ServerAuth).unwrap();

    let evil = LeafParams { dns_names: vec!["evil.example.com".into()], ..serving };
    let bad = i.sign_leaf(key.public_key_spki(), &evil, t0()).unwrap().parse().unwrap();
    let err = verify_chain(&bad, &inter, &roots, t0(), Usage::ServerAuth).unwrap_err();
    assert!(matches!(err, ChainError::Webpki(ref m) if m.contains("NameConstraint")), "{err}");
}

#[test]
fn bundles_round_trip_and_out_of_order_or_partial_ones_are_refused() {
    let r = root(KeyAlgorithm::EcdsaP256, t0());
    let mut mp = IntermediateParams::cluster("meshca", "mgmt", td());
    mp.path_len = 1;
    let m = intermediate_with(&r, KeyAlgorithm::EcdsaP256, mp, t0());
    let c = intermediate(&m, KeyAlgorithm::EcdsaP256, "c1", t0());
    let roots = set(&[&r]);
    let files = CaBundle::assemble(c.key(), c.cert(), &c.chain()[1..], &roots);
    let b = CaBundle::validate(&files, t0()).unwrap();
    assert_eq!(b.signer().chain().len(), 3);
    assert_eq!(b.ca_cert(), c.cert());

    // The chain file with the two upper certificates swapped.
    let swapped = [c.cert().to_pem(), r.cert().to_pem(), m.cert().to_pem()].concat();
    let err = CaBundle::validate(&BundleFiles { cert_chain: swapped.into_bytes(), ..files.clone() }, t0()).unwrap_err();
    assert!(matches!(err, BundleError::ChainEnd { .. } | BundleError::ChainOrder(_)), "{err}");

    // The chain file without the middle certificate.
    let gap = [c.cert().to_pem(), r.cert().to_pem()].concat();
    let err = CaBundle::validate(&BundleFiles { cert_chain: gap.into_bytes(), ..files.clone() }, t0()).unwrap_err();
    assert!(matches!(err, BundleError::Chain(_)), "{err}");

    // Each file missing in turn.
    for name in bundle::FILES {
        let partial = BundleFiles::from_lookup(|n| {
            if n == name { None } else { files.entries().iter().find(|(k, _)| *k == n).map(|(_, v)| v.to_vec()) }
        });
        let err = CaBundle::validate(&partial, t0()).unwrap_err();
        assert!(matches!(err, BundleError::Missing(n) if n == name), "{err}");
    }

    // Corrupt PEM in the root file.
    let err = CaBundle::validate(
        &BundleFiles { root_cert: b"-----BEGIN CERTIFICATE-----\nAAAA".to_vec(), ..files.clone() },
        t0(),
    )
    .unwrap_err();
    assert!(err.to_string().starts_with("root-cert.pem:"), "{err}");

    // Debug output never carries the key.
    let dbg = format!("{files:?}");
    assert!(dbg.contains("elided") && !dbg.contains("PRIVATE"), "{dbg}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    /// Whatever lifetime is asked, a leaf never outlives its signer, starts two minutes before
    /// `now`, carries exactly the identity given and a serial of at least 128 bits.
    #[test]
    fn leaves_are_clamped_backdated_and_carry_only_their_identity(
        ttl_secs in 1u64..(400 * 86400),
        offset in 0u64..(29 * 86400),
        ns in "[a-z][a-z0-9-]{0,15}",
        sa in "[a-z][a-z0-9-]{0,15}",
    ) {
        let r = root(KeyAlgorithm::EcdsaP256, t0());
        let i = intermediate(&r, KeyAlgorithm::EcdsaP256, "c1", t0());
        let now = t0() + Duration::from_secs(offset);
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let id = SpiffeId::workload(&td(), &ns, &sa).unwrap();
        let issued = i.sign_leaf(key.public_key_spki(), &LeafParams::workload(id.clone(), Duration::from_secs(ttl_secs)), now).unwrap();
        let cert = issued.parse().unwrap();
        prop_assert!(cert.not_after() <= i.cert().not_after());
        prop_assert!(cert.not_after() <= now + Duration::from_secs(ttl_secs));
        prop_assert_eq!(cert.not_before(), now - Duration::from_secs(120));
        prop_assert_eq!(cert.uri_sans(), [id.to_string()]);
        prop_assert!(cert.san_is_critical());
        prop_assert!(!cert.is_ca());
        prop_assert!(cert.serial_hex().len() >= 32);
        prop_assert_eq!(cert.authority_key_id(), i.cert().subject_key_id());
        prop_assert!(verify_chain(&cert, &[i.cert().clone()], &set(&[&r]), now, Usage::ServerAuth).is_ok());
    }

    /// Intermediates of every key algorithm keep the CA profile.
    #[test]
    fn intermediates_keep_the_ca_profile(alg_idx in 0usize..2, ttl_h in 1u64..2000) {
        let alg = [KeyAlgorithm::EcdsaP256, KeyAlgorithm::EcdsaP384][alg_idx];
        let r = root(KeyAlgorithm::EcdsaP256, t0());
        let mut p = IntermediateParams::cluster("meshca", "c1", td());
        p.ttl = Duration::from_secs(ttl_h * 3600);
        let i = intermediate_with(&r, alg, p, t0());
        let c = i.cert();
        prop_assert!(c.is_ca());
        prop_assert_eq!(c.path_len(), Some(0));
        prop_assert!(c.has_key_usage_extension());
        prop_assert_eq!(c.uri_sans(), ["spiffe://cluster.local".to_string()]);
        prop_assert_eq!(c.key_kind(), alg.kind());
        prop_assert!(c.subject().contains("L=c1"));
        prop_assert!(verify_chain(c, &[], &set(&[&r]), t0(), Usage::Ca).is_ok());
    }
}
