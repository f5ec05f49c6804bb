//! Helpers shared by meshca's tests — the unit and integration tests of every crate, and the
//! harnesses of `meshca_kube::testing` — so that each exists once: polling ([`wait`]), loopback
//! ports that do not race ([`ports`]), the OpenSSL CLI ([`openssl`](mod@openssl)), child
//! processes that log to a file and die with the test ([`process`]), the external peers the
//! tests run against ([`peers`]), and the root rotation's barrier ([`rotation`]). Not part of
//! meshca (`publish = false`); no meshca crate is a dependency, so every crate's tests can use it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod openssl;
pub mod peers;
pub mod ports;
pub mod process;
pub mod rotation;
pub mod wait;

use std::path::{Path, PathBuf};

pub use openssl::{openssl, openssl_ok};
pub use ports::Ports;
pub use process::Proc;
pub use wait::{eventually, wait_for, wait_until};

/// The repository root (this crate is `crates/testsupport`).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// `bytes` random bytes as lower-case hex (names, tokens and directories unique to one test).
pub fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    aws_lc_rs::rand::fill(&mut b).unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Writes a credential file with mode 0600 (as meshca expects token files to be).
pub fn write_secret(path: &Path, value: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path).unwrap();
    f.write_all(value.as_bytes()).unwrap();
}
