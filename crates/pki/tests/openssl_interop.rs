//! Interop with the real OpenSSL CLI: everything meshca issues must be accepted by
//! `openssl verify -x509_strict`, and everything OpenSSL makes (keys in three encodings, CSRs,
//! CAs with unusual names) must be usable by meshca.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use meshca_pki::bundle::{BundleFiles, CaBundle};
use meshca_pki::{
    CaSigner, Cert, CsrError, CsrPolicy, IntermediateParams, KeyAlgorithm, LeafParams, PrivateKey, PublicKeyError,
    RootSet, SpiffeId, Usage, verify_chain, verify_csr,
};
use meshca_testsupport::openssl::{KeyType, ROOT_CA_EXTENSIONS};

fn now() -> SystemTime {
    SystemTime::now()
}

#[test]
fn openssl_verifies_root_intermediate_leaf_for_every_signer_key_type() {
    for alg in [KeyAlgorithm::EcdsaP256, KeyAlgorithm::EcdsaP384, KeyAlgorithm::Rsa2048] {
        let dir = tempfile::tempdir().unwrap();
        let root = root(alg, now());
        let int = intermediate(&root, alg, "cluster-1", now());
        let (_k, leaf) = leaf(&int, "default", "sleep", now());
        write(dir.path(), "root.pem", root.cert().to_pem());
        write(dir.path(), "int.pem", int.cert().to_pem());
        write(dir.path(), "leaf.pem", leaf.to_pem());
        for purpose in ["sslclient", "sslserver"] {
            let (ok, out) = openssl(
                dir.path(),
                &[
                    "verify",
                    "-x509_strict",
                    "-purpose",
                    purpose,
                    "-CAfile",
                    "root.pem",
                    "-untrusted",
                    "int.pem",
                    "leaf.pem",
                ],
            );
            assert!(ok && out.contains("leaf.pem: OK"), "{alg}: {out}");
        }
        // The intermediate itself verifies as a CA against the root.
        let (ok, out) = openssl(dir.path(), &["verify", "-x509_strict", "-CAfile", "root.pem", "int.pem"]);
        assert!(ok, "{alg}: {out}");
    }
}

#[test]
fn openssl_verifies_a_four_level_chain_with_two_intermediates() {
    let dir = tempfile::tempdir().unwrap();
    let root = root(KeyAlgorithm::EcdsaP256, now());
    let mut mgmt = IntermediateParams::cluster("meshca", "management", td());
    mgmt.path_len = 1;
    mgmt.common_name = "meshca management intermediate".into();
    let mgmt = intermediate_with(&root, KeyAlgorithm::EcdsaP256, mgmt, now());
    let cluster = intermediate(&mgmt, KeyAlgorithm::EcdsaP256, "cluster-1", now());
    let (_k, leaf) = leaf(&cluster, "ns1", "sa1", now());
    write(dir.path(), "root.pem", root.cert().to_pem());
    write(dir.path(), "ints.pem", format!("{}{}", cluster.cert().to_pem(), mgmt.cert().to_pem()));
    write(dir.path(), "leaf.pem", leaf.to_pem());
    let (ok, out) =
        openssl(dir.path(), &["verify", "-x509_strict", "-CAfile", "root.pem", "-untrusted", "ints.pem", "leaf.pem"]);
    assert!(ok, "{out}");
    // meshca's own verifier agrees, and returns the full path.
    let roots = RootSet::from_certs(vec![root.cert().clone()]).unwrap();
    let inters = vec![cluster.cert().clone(), mgmt.cert().clone()];
    let path = verify_chain(&leaf, &inters, &roots, now(), Usage::ClientAuth).unwrap();
    assert_eq!(path.len(), 4);
    // And a cluster intermediate's cert-chain.pem as the agent would write it verifies too.
    assert_eq!(cluster.chain().len(), 3);
}

#[test]
fn openssl_text_shows_the_profile_fields() {
    let dir = tempfile::tempdir().unwrap();
    let root = root(KeyAlgorithm::EcdsaP256, now());
    let int = intermediate(&root, KeyAlgorithm::EcdsaP256, "cluster-1", now());
    let (_k, leaf) = leaf(&int, "default", "sleep", now());
    write(dir.path(), "root.pem", root.cert().to_pem());
    write(dir.path(), "int.pem", int.cert().to_pem());
    write(dir.path(), "leaf.pem", leaf.to_pem());

    let (_, root_text) = openssl(dir.path(), &["x509", "-in", "root.pem", "-noout", "-text"]);
    assert!(root_text.contains("X509v3 Basic Constraints: critical\n                CA:TRUE\n"), "{root_text}");
    assert!(root_text.contains("Subject: O = meshca, CN = meshca Root CA"), "{root_text}");

    let (_, int_text) = openssl(dir.path(), &["x509", "-in", "int.pem", "-noout", "-text"]);
    assert!(int_text.contains("CA:TRUE, pathlen:0"), "{int_text}");
    assert!(int_text.contains("X509v3 Key Usage: critical"), "{int_text}");
    assert!(int_text.contains("Digital Signature, Certificate Sign, CRL Sign"), "{int_text}");
    assert!(int_text.contains("X509v3 Authority Key Identifier"), "{int_text}");
    assert!(int_text.contains("X509v3 Subject Key Identifier"), "{int_text}");
    assert!(int_text.contains("URI:spiffe://cluster.local"), "{int_text}");
    assert!(int_text.contains("Subject: O = meshca, CN = meshca intermediate, L = cluster-1"), "{int_text}");

    let (_, leaf_text) = openssl(dir.path(), &["x509", "-in", "leaf.pem", "-noout", "-text"]);
    assert!(leaf_text.contains("X509v3 Subject Alternative Name: critical\n                URI:spiffe://cluster.local/ns/default/sa/sleep\n"), "{leaf_text}");
    assert!(leaf_text.contains("Subject: \n") || leaf_text.contains("Subject:\n"), "{leaf_text}");
    assert!(leaf_text.contains("TLS Web Server Authentication, TLS Web Client Authentication"), "{leaf_text}");
    assert!(leaf_text.contains("CA:FALSE"), "{leaf_text}");
    assert!(leaf_text.contains("Digital Signature, Key Encipherment"), "{leaf_text}");

    // NotBefore is backdated by two minutes (to the second), and the serial has >= 128 bits.
    let (_, serial) = openssl(dir.path(), &["x509", "-in", "leaf.pem", "-noout", "-serial"]);
    let hex = serial.trim().trim_start_matches("serial=");
    assert!(hex.len() >= 32, "serial {hex} is shorter than 128 bits");
    assert_eq!(hex, leaf.serial_hex());
    let backdate = now().duration_since(leaf.not_before()).unwrap();
    assert!(backdate >= Duration::from_secs(119) && backdate <= Duration::from_secs(200), "{backdate:?}");
}

#[test]
fn csrs_made_by_openssl_req_are_accepted_and_signed() {
    let dir = tempfile::tempdir().unwrap();
    let root = root(KeyAlgorithm::EcdsaP256, now());
    write(dir.path(), "root.pem", root.cert().to_pem());
    let cases: &[(&str, &[&str])] = &[
        ("rsa2048", &["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "rsa2048.key"]),
        ("p256", &["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "p256.key"]),
        // P-384 with OpenSSL's default SHA-256 signature: the case rcgen gets wrong.
        ("p384", &["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384", "-out", "p384.key"]),
    ];
    for (name, genkey) in cases {
        let (ok, out) = openssl(dir.path(), genkey);
        assert!(ok, "{out}");
        let key = format!("{name}.key");
        let csr = format!("{name}.csr");
        let (ok, out) = openssl(dir.path(), &["req", "-new", "-key", &key, "-subj", "/CN=workload", "-out", &csr]);
        assert!(ok, "{out}");
        let v = verify_csr(&read(dir.path(), &csr), &CsrPolicy::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let id = SpiffeId::workload(&td(), "default", name).unwrap();
        let issued =
            root.sign_leaf(v.public_key_spki(), &LeafParams::workload(id, Duration::from_secs(600)), now()).unwrap();
        write(dir.path(), "leaf.pem", issued.to_pem());
        let (ok, out) = openssl(dir.path(), &["verify", "-x509_strict", "-CAfile", "root.pem", "leaf.pem"]);
        assert!(ok, "{name}: {out}");
        // The private key OpenSSL holds matches the certificate's public key.
        let (_, a) = openssl(dir.path(), &["pkey", "-in", &key, "-pubout"]);
        let (_, b) = openssl(dir.path(), &["x509", "-in", "leaf.pem", "-noout", "-pubkey"]);
        assert_eq!(a, b, "{name}");
    }
}

#[test]
fn keys_from_genpkey_genrsa_and_ecparam_load_and_sign_chains_openssl_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &[&str], &str)] = &[
        (
            "pkcs8-ec",
            &["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "k.pem"],
            "BEGIN PRIVATE KEY",
        ),
        ("pkcs1-rsa", &["genrsa", "-traditional", "-out", "k.pem", "2048"], "BEGIN RSA PRIVATE KEY"),
        ("sec1-ec", &["ecparam", "-genkey", "-name", "prime256v1", "-out", "k.pem"], "BEGIN EC PRIVATE KEY"),
        ("sec1-p384", &["ecparam", "-genkey", "-name", "secp384r1", "-noout", "-out", "k.pem"], "BEGIN EC PRIVATE KEY"),
        (
            "pkcs8-rsa",
            &["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:3072", "-out", "k.pem"],
            "BEGIN PRIVATE KEY",
        ),
    ];
    for (name, args, label) in cases {
        let (ok, out) = openssl(dir.path(), args);
        assert!(ok, "{out}");
        let pem = read(dir.path(), "k.pem");
        assert!(String::from_utf8_lossy(&pem).contains(label), "{name}");
        let key = PrivateKey::from_pem(&pem).unwrap_or_else(|e| panic!("{name}: {e}"));
        // The public key meshca derives is the one OpenSSL derives.
        write(dir.path(), "pub.der", key.public_key_spki());
        let (ok, ours) = openssl(dir.path(), &["pkey", "-pubin", "-inform", "DER", "-in", "pub.der"]);
        assert!(ok, "{ours}");
        let (_, theirs) = openssl(dir.path(), &["pkey", "-in", "k.pem", "-pubout"]);
        assert_eq!(ours, theirs, "{name}");
        // It can sign a root and a chain that OpenSSL verifies.
        let root = CaSigner::new_root(key, &meshca_pki::RootParams::new("users"), now()).unwrap();
        let int = intermediate(&root, KeyAlgorithm::EcdsaP256, "c1", now());
        write(dir.path(), "root.pem", root.cert().to_pem());
        write(dir.path(), "int.pem", int.cert().to_pem());
        let (ok, out) = openssl(dir.path(), &["verify", "-x509_strict", "-CAfile", "root.pem", "int.pem"]);
        assert!(ok, "{name}: {out}");
        // PKCS#8 out: OpenSSL reads the re-encoded key and it still matches.
        write(dir.path(), "out.pem", root.key().to_pkcs8_pem().as_bytes());
        let (_, again) = openssl(dir.path(), &["pkey", "-in", "out.pem", "-pubout"]);
        assert_eq!(again, theirs, "{name}");
    }
}

/// Builds a CSR with OpenSSL for the given key-generation arguments.
fn openssl_csr(dir: &std::path::Path, genkey: &[&str], extra: &[&str]) -> Vec<u8> {
    let (ok, out) = openssl(dir, genkey);
    assert!(ok, "{out}");
    let mut args = vec!["req", "-new", "-key", "h.key", "-subj", "/CN=admin/O=system:masters", "-out", "h.csr"];
    args.extend_from_slice(extra);
    let (ok, out) = openssl(dir, &args);
    assert!(ok, "{out}");
    read(dir, "h.csr")
}

#[test]
fn hostile_csrs_from_openssl_are_refused_with_specific_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = CsrPolicy::default();

    let rsa1024 = openssl_csr(dir.path(), &["genrsa", "-out", "h.key", "1024"], &[]);
    assert_eq!(verify_csr(&rsa1024, &p), Err(CsrError::RsaTooSmall { bits: 1024, min: 2048 }));

    let ed = openssl_csr(dir.path(), &["genpkey", "-algorithm", "ed25519", "-out", "h.key"], &[]);
    assert_eq!(verify_csr(&ed, &p), Err(CsrError::PublicKey(PublicKeyError::UnsupportedKeyType("Ed25519".into()))));

    let k1 = openssl_csr(dir.path(), &["ecparam", "-genkey", "-name", "secp256k1", "-out", "h.key"], &[]);
    assert_eq!(verify_csr(&k1, &p), Err(CsrError::PublicKey(PublicKeyError::UnsupportedCurve("secp256k1".into()))));

    // A small public exponent (e = 3), and one above 2^32: only 65537 is accepted for a leaf.
    for (e, shown) in [("3", "3"), ("4294967297", "4294967297")] {
        let pubexp = format!("rsa_keygen_pubexp:{e}");
        let csr = openssl_csr(
            dir.path(),
            &["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-pkeyopt", &pubexp, "-out", "h.key"],
            &[],
        );
        let (_, text) = openssl(dir.path(), &["req", "-in", "h.csr", "-noout", "-text"]);
        assert!(text.contains(&format!("Exponent: {e}")), "OpenSSL made the key asked for: {text}");
        assert_eq!(verify_csr(&csr, &p), Err(CsrError::RsaExponent { exponent: shown.into() }), "e = {e}");
    }
    let f4 = openssl_csr(dir.path(), &["genrsa", "-out", "h.key", "2048"], &[]);
    assert!(verify_csr(&f4, &p).is_ok(), "65537, OpenSSL's default");

    // A CSR whose base64 is wrapped at 76 columns (MIME's width; RFC 7468 lets generators
    // choose) is read like OpenSSL's own 64-column one.
    let der = openssl_csr(dir.path(), &["genrsa", "-out", "h.key", "2048"], &["-outform", "DER"]);
    let (ok, b64) = openssl(dir.path(), &["base64", "-A", "-in", "h.csr"]);
    assert!(ok, "{b64}");
    let body: Vec<&str> = b64.trim().as_bytes().chunks(76).map(|c| std::str::from_utf8(c).unwrap()).collect();
    let pem76 =
        format!("-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n", body.join("\n"));
    assert!(body[0].len() == 76 && body.len() > 2, "{pem76}");
    write(dir.path(), "h76.csr", pem76.clone());
    let (ok, out) = openssl(dir.path(), &["req", "-in", "h76.csr", "-noout", "-verify"]);
    assert!(ok, "OpenSSL reads the 76-column CSR too: {out}");
    let v = verify_csr(pem76.as_bytes(), &p).expect("a 76-column PEM CSR is accepted");
    assert_eq!(v.public_key_spki(), verify_csr(&der, &p).unwrap().public_key_spki());

    let p521 = openssl_csr(dir.path(), &["ecparam", "-genkey", "-name", "secp521r1", "-out", "h.key"], &[]);
    assert!(matches!(verify_csr(&p521, &p), Err(CsrError::PublicKey(PublicKeyError::UnsupportedCurve(_)))));

    // A good CSR with its signature corrupted: the base64 body decoded, a byte near the end flipped.
    let good = openssl_csr(
        dir.path(),
        &["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "h.key"],
        &["-outform", "DER"],
    );
    let mut bad = good.clone();
    let n = bad.len();
    bad[n - 3] ^= 0x40;
    assert!(
        matches!(verify_csr(&bad, &p), Err(CsrError::Signature(_)) | Err(CsrError::Der(_))),
        "{:?}",
        verify_csr(&bad, &p)
    );
    assert!(verify_csr(&good, &p).is_ok());

    // Truncated DER.
    assert!(matches!(verify_csr(&good[..good.len() / 2], &p), Err(CsrError::Der(_))));

    // 1 MB of garbage, DER-looking and not.
    let mut garbage = vec![0x30u8, 0x83, 0x0f, 0xff, 0xff];
    garbage.resize(1024 * 1024, 0xa5);
    assert!(matches!(verify_csr(&garbage, &p), Err(CsrError::TooLarge { .. })));
    let big_policy = CsrPolicy { max_bytes: 2 * 1024 * 1024, ..CsrPolicy::default() };
    assert!(matches!(verify_csr(&garbage, &big_policy), Err(CsrError::Der(_))));
}

#[test]
fn a_csr_asking_for_ca_true_extra_sans_and_a_subject_gets_none_of_them() {
    let dir = tempfile::tempdir().unwrap();
    let csr = openssl_csr(
        dir.path(),
        &["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "h.key"],
        &[
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-addext",
            "subjectAltName=URI:spiffe://cluster.local/ns/kube-system/sa/admin,DNS:evil.example.com",
        ],
    );
    let v = verify_csr(&csr, &CsrPolicy::default()).unwrap();
    let root = root(KeyAlgorithm::EcdsaP256, now());
    let int = intermediate(&root, KeyAlgorithm::EcdsaP256, "c1", now());
    let me = SpiffeId::workload(&td(), "default", "sleep").unwrap();
    let issued =
        int.sign_leaf(v.public_key_spki(), &LeafParams::workload(me.clone(), Duration::from_secs(60)), now()).unwrap();
    let cert = issued.parse().unwrap();
    assert_eq!(cert.uri_sans(), [me.to_string()]);
    assert!(cert.dns_sans().is_empty());
    assert!(!cert.is_ca());
    assert_eq!(cert.subject(), "");
    write(dir.path(), "leaf.pem", issued.to_pem());
    let (_, text) = openssl(dir.path(), &["x509", "-in", "leaf.pem", "-noout", "-text"]);
    assert!(!text.contains("evil") && !text.contains("kube-system") && !text.contains("admin"), "{text}");
    assert!(text.contains("CA:FALSE") && !text.contains("Certificate Sign"), "{text}");
}

#[test]
fn a_user_root_with_repeated_and_multi_valued_name_parts_issues_chains_openssl_accepts() {
    // Enterprise roots often carry DC=, repeated OU= and multi-valued RDNs. The issuer name in
    // everything meshca signs must be the root's subject byte for byte.
    let dir = tempfile::tempdir().unwrap();
    openssl::genkey(dir.path(), KeyType::P256, "root.key");
    let (ok, out) = openssl(
        dir.path(),
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "root.key",
            "-days",
            "30",
            "-multivalue-rdn",
            "-subj",
            "/DC=com/DC=example/OU=Platform/OU=Security/CN=Corp Root+serialNumber=7",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-out",
            "root.pem",
        ],
    );
    assert!(ok, "{out}");
    let root_cert = Cert::from_pem(&read(dir.path(), "root.pem")).unwrap();
    let key = PrivateKey::from_pem(&read(dir.path(), "root.key")).unwrap();
    let signer = CaSigner::new(key, vec![root_cert.clone()]).unwrap();
    let int = intermediate(&signer, KeyAlgorithm::EcdsaP256, "c1", now());
    assert_eq!(int.cert().issuer_der(), root_cert.subject_der());
    let (_k, leaf) = leaf(&int, "default", "sleep", now());
    write(dir.path(), "int.pem", int.cert().to_pem());
    write(dir.path(), "leaf.pem", leaf.to_pem());
    let (ok, out) =
        openssl(dir.path(), &["verify", "-x509_strict", "-CAfile", "root.pem", "-untrusted", "int.pem", "leaf.pem"]);
    assert!(ok, "{out}");
}

#[test]
fn an_istio_style_cacerts_bundle_made_by_openssl_validates_and_broken_ones_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    openssl::self_signed(d, "root", KeyType::P256, "/O=Istio/CN=Root CA", 3650, ROOT_CA_EXTENSIONS);
    let extensions = [
        "basicConstraints=critical,CA:true,pathlen:0",
        "keyUsage=critical,digitalSignature,keyCertSign,cRLSign",
        "subjectKeyIdentifier=hash",
        "authorityKeyIdentifier=keyid",
    ];
    openssl::issue(d, "ca", KeyType::P256, "/O=Istio/CN=Intermediate CA/L=cluster1", "root", 30, &extensions);
    let chain = [read(d, "ca.pem"), read(d, "root.pem")].concat();
    let good = BundleFiles {
        ca_cert: read(d, "ca.pem"),
        ca_key: read(d, "ca.key").into(),
        cert_chain: chain.clone(),
        root_cert: read(d, "root.pem"),
    };
    let bundle = CaBundle::validate(&good, now()).unwrap();
    assert_eq!(bundle.roots().len(), 1);

    // The validated bundle signs leaves that OpenSSL verifies through the bundle's own files.
    let (_k, leaf) = leaf(bundle.signer(), "default", "sleep", now());
    write(d, "leaf.pem", leaf.to_pem());
    write(d, "cert-chain.pem", &chain);
    let (ok, out) =
        openssl(d, &["verify", "-x509_strict", "-CAfile", "root.pem", "-untrusted", "cert-chain.pem", "leaf.pem"]);
    assert!(ok, "{out}");

    // A key that does not match.
    let (ok, out) =
        openssl(d, &["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "other.key"]);
    assert!(ok, "{out}");
    let mut wrong_key = good.clone();
    wrong_key.ca_key = read(d, "other.key").into();
    let err = CaBundle::validate(&wrong_key, now()).unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");

    // A chain that omits the root.
    let mut no_root = good.clone();
    no_root.cert_chain = read(d, "ca.pem");
    let err = CaBundle::validate(&no_root, now()).unwrap_err();
    assert!(err.to_string().contains("must end with a root"), "{err}");

    // Expired: validated as of a time after the intermediate's NotAfter.
    let err = CaBundle::validate(&good, now() + Duration::from_secs(31 * 86400)).unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");
}

#[test]
fn a_chain_that_violates_pathlen_is_refused_by_meshca_as_by_openssl() {
    // root -> A (pathlen:0) -> B (CA) -> leaf, built with OpenSSL, which meshca would never issue.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let root = ["basicConstraints=critical,CA:TRUE", "keyUsage=critical,keyCertSign"];
    openssl::self_signed(d, "r", KeyType::P256, "/CN=R", 2, &root);
    let ca0 = ["basicConstraints=critical,CA:true,pathlen:0", "keyUsage=critical,keyCertSign,cRLSign"];
    openssl::issue(d, "a", KeyType::P256, "/CN=A", "r", 1, &ca0);
    let ca = ["basicConstraints=critical,CA:true", "keyUsage=critical,keyCertSign,cRLSign"];
    openssl::issue(d, "b", KeyType::P256, "/CN=B", "a", 1, &ca);
    let b_key = PrivateKey::from_pem(&read(d, "b.key")).unwrap();
    let a = Cert::from_pem(&read(d, "a.pem")).unwrap();
    let b = Cert::from_pem(&read(d, "b.pem")).unwrap();
    let r = Cert::from_pem(&read(d, "r.pem")).unwrap();
    let signer = CaSigner::new(b_key, vec![b.clone(), a.clone(), r.clone()]).unwrap();
    let (_k, leaf) = leaf(&signer, "default", "sleep", now());
    write(d, "leaf.pem", leaf.to_pem());
    write(d, "ints.pem", format!("{}{}", b.to_pem(), a.to_pem()));
    let (ok, out) = openssl(d, &["verify", "-CAfile", "r.pem", "-untrusted", "ints.pem", "leaf.pem"]);
    assert!(!ok && out.contains("path length"), "openssl should refuse: {out}");
    let roots = RootSet::from_certs(vec![r]).unwrap();
    let err = verify_chain(&leaf, &[b, a], &roots, now(), Usage::ClientAuth).unwrap_err();
    assert!(matches!(err, meshca_pki::ChainError::PathLenExceeded { path_len: 0, below: 1, .. }), "{err}");
}
