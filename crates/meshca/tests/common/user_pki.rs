//! A user's PKI made with the OpenSSL CLI, for the bring-your-own-root and -intermediate tests:
//! a root whose key stays in `pki/`, and intermediate folders for meshca.

use std::path::{Path, PathBuf};

use super::openssl;

/// Key generation arguments for `openssl genpkey`.
pub fn genkey(kind: &str, out: &str) -> Vec<String> {
    let mut v: Vec<String> = vec!["genpkey".into(), "-algorithm".into()];
    match kind {
        "rsa4096" => v.extend(["RSA".into(), "-pkeyopt".into(), "rsa_keygen_bits:4096".into()]),
        _ => v.extend(["EC".into(), "-pkeyopt".into(), "ec_paramgen_curve:P-256".into()]),
    }
    v.extend(["-out".into(), out.into()]);
    v
}

pub fn ossl(dir: &Path, args: &[String]) {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out) = openssl(dir, &a);
    assert!(ok, "openssl {}: {out}", a.join(" "));
}

/// The user's PKI: a root (its key stays in `pki/`), and an intermediate folder for meshca with
/// `ca-cert.pem`, `ca-key.pem`, `cert-chain.pem` (intermediate + root).
pub fn user_pki(base: &Path, kind: &str, ext: &str, days: u32) -> PathBuf {
    let pki = base.join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    if !pki.join("root.pem").exists() {
        ossl(&pki, &genkey(kind, "root.key"));
        ossl(
            &pki,
            &[
                "req",
                "-x509",
                "-new",
                "-key",
                "root.key",
                "-days",
                "3650",
                "-subj",
                "/O=Corp/CN=Corp Root CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                "-out",
                "root.pem",
            ]
            .map(String::from),
        );
    }
    let n = std::fs::read_dir(&pki).unwrap().count();
    let (key, csr, cert, cnf) =
        (format!("int{n}.key"), format!("int{n}.csr"), format!("int{n}.pem"), format!("int{n}.cnf"));
    ossl(&pki, &genkey(kind, &key));
    ossl(
        &pki,
        &["req", "-new", "-key", &key, "-subj", &format!("/O=Corp/CN=Corp Mesh Intermediate {n}"), "-out", &csr]
            .map(String::from),
    );
    std::fs::write(pki.join(&cnf), ext).unwrap();
    ossl(
        &pki,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "root.pem",
            "-CAkey",
            "root.key",
            "-CAcreateserial",
            "-days",
            &days.to_string(),
            "-extfile",
            &cnf,
            "-out",
            &cert,
        ]
        .map(String::from),
    );
    let out = base.join(format!("intermediate{n}"));
    std::fs::create_dir_all(&out).unwrap();
    std::fs::copy(pki.join(&cert), out.join("ca-cert.pem")).unwrap();
    std::fs::copy(pki.join(&key), out.join("ca-key.pem")).unwrap();
    let chain = [std::fs::read(pki.join(&cert)).unwrap(), std::fs::read(pki.join("root.pem")).unwrap()].concat();
    std::fs::write(out.join("cert-chain.pem"), chain).unwrap();
    out
}

pub const GOOD_EXT: &str = "basicConstraints=critical,CA:true,pathlen:1\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n";
