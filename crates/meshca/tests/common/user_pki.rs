//! A user's PKI made with the OpenSSL CLI, for the bring-your-own-root and -intermediate tests:
//! a root whose key stays in `pki/`, and intermediate folders for meshca.

use std::path::{Path, PathBuf};

use meshca_testsupport::openssl::{self, ROOT_CA_EXTENSIONS};

use super::OpensslKey;

/// The key type for a `kind` the tests name: `rsa4096`, else P-256.
fn key_type(kind: &str) -> OpensslKey {
    match kind {
        "rsa4096" => OpensslKey::Rsa(4096),
        _ => OpensslKey::P256,
    }
}

/// The user's PKI: a root (its key stays in `pki/`), and an intermediate folder for meshca with
/// `ca-cert.pem`, `ca-key.pem`, `cert-chain.pem` (intermediate + root). `ext` is the
/// intermediate's extensions, one a line.
pub fn user_pki(base: &Path, kind: &str, ext: &str, days: u32) -> PathBuf {
    let pki = base.join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    if !pki.join("root.pem").exists() {
        openssl::self_signed(&pki, "root", key_type(kind), "/O=Corp/CN=Corp Root CA", 3650, ROOT_CA_EXTENSIONS);
    }
    let n = std::fs::read_dir(&pki).unwrap().count();
    let subject = format!("/O=Corp/CN=Corp Mesh Intermediate {n}");
    let extensions: Vec<&str> = ext.lines().collect();
    let (cert, key) = openssl::issue(&pki, &format!("int{n}"), key_type(kind), &subject, "root", days, &extensions);
    let out = base.join(format!("intermediate{n}"));
    std::fs::create_dir_all(&out).unwrap();
    std::fs::copy(&cert, out.join("ca-cert.pem")).unwrap();
    std::fs::copy(&key, out.join("ca-key.pem")).unwrap();
    let chain = [std::fs::read(&cert).unwrap(), std::fs::read(pki.join("root.pem")).unwrap()].concat();
    std::fs::write(out.join("cert-chain.pem"), chain).unwrap();
    out
}

pub const GOOD_EXT: &str = "basicConstraints=critical,CA:true,pathlen:1\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n";
