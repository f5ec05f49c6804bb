//! The OpenSSL CLI, the independent oracle meshca's certificates, chains and handshakes are
//! checked against.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs `openssl ARGS` in `dir`; returns whether it succeeded and its stdout followed by stderr.
pub fn openssl(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("the openssl CLI must be installed");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Like [`openssl`], for steps that must work (making keys and certificates): panics with the
/// output when it fails, else returns it.
pub fn openssl_ok(dir: &Path, args: &[&str]) -> String {
    let (ok, out) = openssl(dir, args);
    assert!(ok, "openssl {args:?}: {out}");
    out
}

/// The key OpenSSL generates for a test certificate or CSR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    /// RSA with this many bits.
    Rsa(u32),
    /// ECDSA on the named curve P-256.
    P256,
}

/// The `-addext` extensions of a root CA as users and Istio's documentation make one: a critical
/// `CA:TRUE` and a critical key usage for signing certificates and CRLs.
pub const ROOT_CA_EXTENSIONS: &[&str] = &["basicConstraints=critical,CA:TRUE", "keyUsage=critical,keyCertSign,cRLSign"];

/// Makes a new private key `dir/<file>` of `key_type` with `openssl genpkey` (PKCS#8 PEM, no
/// passphrase) and returns its path.
pub fn genkey(dir: &Path, key_type: KeyType, file: &str) -> PathBuf {
    let bits;
    let (algorithm, opt) = match key_type {
        KeyType::Rsa(b) => {
            bits = format!("rsa_keygen_bits:{b}");
            ("RSA", bits.as_str())
        }
        KeyType::P256 => ("EC", "ec_paramgen_curve:P-256"),
    };
    openssl_ok(dir, &["genpkey", "-algorithm", algorithm, "-pkeyopt", opt, "-out", file]);
    dir.join(file)
}

/// Makes a self-signed certificate `dir/<name>.pem` for a new key `dir/<name>.key` of `key_type`
/// with `openssl req -x509`: `subject` (an OpenSSL `-subj` string), valid from now for `days`,
/// with each of `extensions` added by `-addext` over what the default `openssl.cnf` sets.
/// Returns `(certificate, key)`.
///
/// Tests use it for the roots a user brings (and for certificates that must be refused as one,
/// such as `CA:FALSE`): made by the OpenSSL CLI, an implementation independent of meshca, so
/// that meshca is shown to accept what real tooling makes rather than only what it makes itself.
pub fn self_signed(
    dir: &Path,
    name: &str,
    key_type: KeyType,
    subject: &str,
    days: u32,
    extensions: &[&str],
) -> (PathBuf, PathBuf) {
    let (key, cert) = (format!("{name}.key"), format!("{name}.pem"));
    genkey(dir, key_type, &key);
    let days = days.to_string();
    let mut args = vec!["req", "-x509", "-new", "-key", &key, "-days", &days, "-subj", subject, "-out", &cert];
    for e in extensions {
        args.extend(["-addext", e]);
    }
    openssl_ok(dir, &args);
    (dir.join(cert), dir.join(key))
}

/// Makes a certificate `dir/<name>.pem` for a new key `dir/<name>.key` of `key_type`, signed by
/// the CA `dir/<ca>.pem` with key `dir/<ca>.key`: a CSR `dir/<name>.csr` for `subject` by
/// `openssl req -new`, then `openssl x509 -req -CA ... -CAcreateserial` valid for `days`, with
/// exactly `extensions` (written one a line to `dir/<name>.ext`, the `-extfile`). Returns
/// `(certificate, key)`.
///
/// Tests use it for the intermediates and leaves of a user's own PKI (an intermediate CA handed
/// to meshca, a serving certificate, chains meshca must refuse): the OpenSSL CLI is the
/// independent peer whose certificates meshca must take as they come.
pub fn issue(
    dir: &Path,
    name: &str,
    key_type: KeyType,
    subject: &str,
    ca: &str,
    days: u32,
    extensions: &[&str],
) -> (PathBuf, PathBuf) {
    let (key, csr, ext, cert) =
        (format!("{name}.key"), format!("{name}.csr"), format!("{name}.ext"), format!("{name}.pem"));
    let (ca_cert, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
    genkey(dir, key_type, &key);
    openssl_ok(dir, &["req", "-new", "-key", &key, "-subj", subject, "-out", &csr]);
    let text: String = extensions.iter().map(|e| format!("{e}\n")).collect();
    std::fs::write(dir.join(&ext), text).expect("write the extensions file");
    let days = days.to_string();
    openssl_ok(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_cert,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            &days,
            "-extfile",
            &ext,
            "-out",
            &cert,
        ],
    );
    (dir.join(cert), dir.join(key))
}
