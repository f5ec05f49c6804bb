use std::path::Path;
use std::time::{Duration, SystemTime};

use meshca_pki::{CaSigner, KeyAlgorithm, LeafParams, PrivateKey, RootParams, SpiffeId};
use meshca_testsupport::openssl::{self, KeyType, openssl_ok};
use serde_json::{Value, json};

use super::*;

fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).expect("trust domain")
}

fn root(alg: KeyAlgorithm, name: &str, now: SystemTime) -> CaSigner {
    CaSigner::new_root(PrivateKey::generate(alg).expect("key"), &RootParams::new(name), now).expect("root")
}

fn bundle_of(certs: Vec<Cert>, sequence: u64) -> Bundle {
    Bundle {
        trust_domain: td("mesh.example"),
        sequence,
        refresh_hint: Some(Duration::from_secs(300)),
        authorities: certs,
    }
}

fn document(b: &Bundle) -> Value {
    serde_json::from_str(&b.to_document().expect("encode")).expect("json")
}

fn parse_value(doc: &Value, now: SystemTime) -> Result<Bundle, BundleError> {
    Bundle::parse(doc.to_string().as_bytes(), &td("mesh.example"), now)
}

fn key_error(r: Result<Bundle, BundleError>) -> KeyError {
    match r {
        Err(BundleError::Key { source, .. }) => source,
        other => panic!("expected a refused key, got {other:?}"),
    }
}

#[test]
fn every_key_algorithm_round_trips_with_sequence_and_hint() {
    let now = SystemTime::now();
    let roots: Vec<Cert> = KeyAlgorithm::ALL.iter().map(|a| root(*a, &format!("{a:?}"), now).cert().clone()).collect();
    let published = bundle_of(roots.clone(), 7);
    let doc = published.to_document().expect("encode");
    let read = Bundle::parse(doc.as_bytes(), &td("mesh.example"), now).expect("parse");
    assert_eq!(read, published);
    assert_eq!(read.authorities, roots);
    assert_eq!(read.sequence, 7);
    assert_eq!(read.refresh_hint, Some(Duration::from_secs(300)));
}

#[test]
fn document_has_the_members_the_specification_names() {
    let now = SystemTime::now();
    let ec = root(KeyAlgorithm::EcdsaP384, "ec", now);
    let rsa = root(KeyAlgorithm::Rsa2048, "rsa", now);
    let doc = document(&bundle_of(vec![ec.cert().clone(), rsa.cert().clone()], 3));
    assert_eq!(doc["spiffe_sequence"], json!(3));
    assert_eq!(doc["spiffe_refresh_hint"], json!(300));
    let keys = doc["keys"].as_array().expect("keys");
    assert_eq!(keys.len(), 2);
    for k in keys {
        assert_eq!(k["use"], json!("x509-svid"));
        assert_eq!(k["x5c"].as_array().map(Vec::len), Some(1));
    }
    assert_eq!(keys[0]["kty"], json!("EC"));
    assert_eq!(keys[0]["crv"], json!("P-384"));
    assert_eq!(URL_SAFE_NO_PAD.decode(keys[0]["x"].as_str().expect("x")).expect("b64").len(), 48);
    assert_eq!(keys[1]["kty"], json!("RSA"));
    assert_eq!(keys[1]["e"], json!("AQAB"));
    assert!(keys[1].get("d").is_none() && keys[0].get("d").is_none(), "no private member");
}

/// OpenSSL reads each `x5c` entry as the very root that was published, and its public key
/// numbers are the JWK's (`x`/`y` for EC, `n` for RSA).
#[test]
fn openssl_reads_x5c_as_the_root_and_agrees_on_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let now = SystemTime::now();
    let ec = root(KeyAlgorithm::EcdsaP256, "ec", now);
    let rsa = root(KeyAlgorithm::Rsa3072, "rsa", now);
    let doc = document(&bundle_of(vec![ec.cert().clone(), rsa.cert().clone()], 1));
    for (i, (key, signer)) in doc["keys"].as_array().expect("keys").iter().zip([&ec, &rsa]).enumerate() {
        let der = STANDARD.decode(key["x5c"][0].as_str().expect("x5c")).expect("base64");
        let file = format!("root{i}.der");
        std::fs::write(dir.path().join(&file), der).expect("write");
        let pem = openssl_ok(dir.path(), &["x509", "-inform", "DER", "-in", &file]);
        assert_eq!(pem, signer.cert().to_pem(), "x5c is the published root");
        let openssl_key = openssl_public_numbers(dir.path(), &file);
        let jwk_key = match key["kty"].as_str() {
            Some("EC") => {
                let mut point = vec![0x04];
                point.extend(URL_SAFE_NO_PAD.decode(key["x"].as_str().expect("x")).expect("x"));
                point.extend(URL_SAFE_NO_PAD.decode(key["y"].as_str().expect("y")).expect("y"));
                point
            }
            _ => URL_SAFE_NO_PAD.decode(key["n"].as_str().expect("n")).expect("n"),
        };
        assert_eq!(openssl_key, jwk_key, "key {i}: OpenSSL's public key numbers are the JWK's");
    }
}

/// The EC point or RSA modulus of a DER certificate, as OpenSSL extracts them: for EC the
/// uncompressed point that ends OpenSSL's DER `SubjectPublicKeyInfo`, for RSA `-modulus`.
fn openssl_public_numbers(dir: &Path, der_file: &str) -> Vec<u8> {
    let text = openssl_ok(dir, &["x509", "-inform", "DER", "-in", der_file, "-noout", "-text"]);
    if text.contains("rsaEncryption") {
        let m = openssl_ok(dir, &["x509", "-inform", "DER", "-in", der_file, "-noout", "-modulus"]);
        return hex::decode(m.trim().trim_start_matches("Modulus=")).expect("modulus hex");
    }
    assert!(text.contains("P-256"), "{text}");
    openssl_ok(dir, &["x509", "-inform", "DER", "-in", der_file, "-noout", "-pubkey", "-out", "pub.pem"]);
    openssl_ok(dir, &["pkey", "-pubin", "-in", "pub.pem", "-outform", "DER", "-out", "pub.der"]);
    let spki = std::fs::read(dir.join("pub.der")).expect("spki");
    spki[spki.len() - 65..].to_vec()
}

#[test]
fn keys_of_other_uses_are_ignored_but_none_for_x509_is_refused() {
    let now = SystemTime::now();
    let r = root(KeyAlgorithm::EcdsaP256, "r", now);
    let mut doc = document(&bundle_of(vec![r.cert().clone()], 1));
    let mut jwt = doc["keys"][0].clone();
    jwt["use"] = json!("jwt-svid");
    jwt["kid"] = json!("k1");
    jwt.as_object_mut().expect("object").remove("x5c");
    let okp = json!({"kty": "OKP", "crv": "Ed25519", "x": "AAAA", "use": "jwt-svid"});
    doc["keys"].as_array_mut().expect("keys").extend([jwt.clone(), okp]);
    let read = parse_value(&doc, now).expect("jwt-svid keys are skipped");
    assert_eq!(read.authorities, vec![r.cert().clone()]);

    let only_jwt = json!({"keys": [jwt], "spiffe_sequence": 2});
    assert!(matches!(parse_value(&only_jwt, now), Err(BundleError::NoX509Authorities { .. })));
    assert!(matches!(parse_value(&json!({"keys": []}), now), Err(BundleError::NoX509Authorities { .. })));
}

#[test]
fn a_key_whose_certificate_is_not_a_ca_is_refused() {
    let now = SystemTime::now();
    let r = root(KeyAlgorithm::EcdsaP256, "r", now);
    let leaf_key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).expect("key");
    let id = SpiffeId::workload(&td("mesh.example"), "ns", "sa").expect("id");
    let leaf = r.sign_leaf(leaf_key.public_key_spki(), &LeafParams::workload(id, Duration::from_secs(3600)), now);
    let leaf = Cert::from_der(leaf.expect("leaf").der).expect("cert");
    let doc = document(&bundle_of(vec![leaf], 1));
    let e = key_error(parse_value(&doc, now));
    assert!(matches!(e, KeyError::NotACa { .. }), "{e}");
    assert!(e.to_string().contains("is not a CA"), "{e}");
}

#[test]
fn an_expired_root_is_refused_with_its_expiry() {
    let now = SystemTime::now();
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).expect("key");
    let params = RootParams { ttl: Duration::from_secs(3600), ..RootParams::new("short") };
    let r = CaSigner::new_root(key, &params, now).expect("root");
    let doc = document(&bundle_of(vec![r.cert().clone()], 1));
    assert!(parse_value(&doc, now).is_ok());
    let e = key_error(parse_value(&doc, now + Duration::from_secs(7200)));
    assert!(matches!(e, KeyError::Expired { .. }), "{e}");
    assert!(e.to_string().contains("expired at"), "{e}");
}

#[test]
fn x5c_must_hold_exactly_one_certificate() {
    let now = SystemTime::now();
    let r = root(KeyAlgorithm::EcdsaP256, "r", now);
    let mut doc = document(&bundle_of(vec![r.cert().clone()], 1));
    let one = doc["keys"][0]["x5c"][0].clone();
    doc["keys"][0]["x5c"] = json!([one.clone(), one]);
    assert!(matches!(key_error(parse_value(&doc, now)), KeyError::X5cCount { count: 2 }));
    doc["keys"][0]["x5c"] = json!([]);
    assert!(matches!(key_error(parse_value(&doc, now)), KeyError::X5cCount { count: 0 }));
    doc["keys"][0].as_object_mut().expect("object").remove("x5c");
    assert!(matches!(key_error(parse_value(&doc, now)), KeyError::X5cCount { count: 0 }));
    doc["keys"][0]["x5c"] = json!(["not base64!"]);
    assert!(matches!(key_error(parse_value(&doc, now)), KeyError::X5cBase64(_)));
    doc["keys"][0]["x5c"] = json!([STANDARD.encode(b"not a certificate")]);
    assert!(matches!(key_error(parse_value(&doc, now)), KeyError::Cert(_)));
}

#[test]
fn a_jwk_that_is_not_its_certificates_key_is_refused() {
    let now = SystemTime::now();
    let a = root(KeyAlgorithm::EcdsaP256, "a", now);
    let b = root(KeyAlgorithm::EcdsaP256, "b", now);
    let rsa = root(KeyAlgorithm::Rsa2048, "rsa", now);
    let doc_a = document(&bundle_of(vec![a.cert().clone()], 1));
    let doc_b = document(&bundle_of(vec![b.cert().clone()], 1));
    let doc_rsa = document(&bundle_of(vec![rsa.cert().clone()], 1));
    // a's certificate with b's key numbers.
    let mut swapped = doc_a.clone();
    swapped["keys"][0]["x"] = doc_b["keys"][0]["x"].clone();
    assert!(matches!(key_error(parse_value(&swapped, now)), KeyError::KeyMismatch { .. }));
    // a's certificate described as an RSA key.
    let mut kind = doc_rsa.clone();
    kind["keys"][0]["x5c"] = doc_a["keys"][0]["x5c"].clone();
    assert!(matches!(key_error(parse_value(&kind, now)), KeyError::KeyMismatch { .. }));
    // a symmetric key is unsupported, and its secret is not in the message.
    let oct =
        json!({"keys": [{"kty": "oct", "k": "c2VjcmV0LXZhbHVl", "use": "x509-svid", "x5c": doc_a["keys"][0]["x5c"]}]});
    let e = key_error(parse_value(&oct, now));
    assert!(matches!(e, KeyError::Unsupported(_)), "{e}");
    assert!(!e.to_string().contains("c2VjcmV0"), "{e}");
}

/// A CA whose URI SAN names another trust domain (as SPIRE's CAs carry `spiffe://<td>`) is
/// refused; one naming the bundle's trust domain is accepted. Made with OpenSSL.
#[test]
fn a_root_of_another_trust_domain_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let now = SystemTime::now();
    let make = |name: &str, td: &str| {
        let san = format!("subjectAltName=URI:spiffe://{td}");
        let extensions = ["basicConstraints=critical,CA:TRUE", "keyUsage=critical,keyCertSign,cRLSign", san.as_str()];
        let (cert, _) = openssl::self_signed(dir.path(), name, KeyType::P256, &format!("/O={name}"), 30, &extensions);
        Cert::from_pem(&std::fs::read(cert).expect("pem")).expect("cert")
    };
    let own = make("own", "mesh.example");
    let other = make("other", "other.example");
    assert!(parse_value(&document(&bundle_of(vec![own.clone()], 1)), now).is_ok());
    let e = key_error(parse_value(&document(&bundle_of(vec![own, other], 1)), now));
    assert!(matches!(e, KeyError::WrongTrustDomain { .. }), "{e}");
    assert!(e.to_string().contains("other.example"), "{e}");
}

#[test]
fn oversized_and_malformed_documents_are_refused() {
    let now = SystemTime::now();
    let big = format!("{{\"keys\": [], \"pad\": \"{}\"}}", "x".repeat(MAX_DOCUMENT_BYTES));
    let e = Bundle::parse(big.as_bytes(), &td("mesh.example"), now).expect_err("too large");
    assert!(matches!(e, BundleError::TooLarge { .. }), "{e}");
    for bad in ["", "[]", "{\"keys\": 3}", "not json", "{\"keys\": [], \"spiffe_sequence\": -1}"] {
        let e = Bundle::parse(bad.as_bytes(), &td("mesh.example"), now).expect_err(bad);
        assert!(matches!(e, BundleError::Json(_)), "{bad}: {e}");
    }
}

mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Whatever bytes arrive, parsing answers (never panics).
        #[test]
        fn parsing_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Bundle::parse(&bytes, &td("mesh.example"), SystemTime::now());
        }
    }
}
