//! The OpenSSL CLI, the independent oracle meshca's certificates, chains and handshakes are
//! checked against.

use std::path::Path;
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
