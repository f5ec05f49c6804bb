//! The external peers the tests run against (docs/peers.md), built by the scripts in
//! `scripts/peers/` and cached outside the checkout.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The binary of a peer: the file `$env` names (set by `scripts/test.sh`), else what
/// `bash <script> path` prints (the cache), else what `bash <script> build` prints (a build, as
/// root with Go; the script's lock makes concurrent callers wait for one build). `script` is
/// relative to the repository root, e.g. `scripts/peers/vault.sh`.
pub fn peer_bin(env: &str, script: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env).map(PathBuf::from).filter(|p| p.is_file()) {
        return p;
    }
    let script = crate::repo().join(script);
    for action in ["path", "build"] {
        let out = Command::new("bash").arg(&script).arg(action).stderr(Stdio::inherit()).output().unwrap();
        let path = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().trim().to_string();
        if out.status.success() && Path::new(&path).is_file() {
            return PathBuf::from(path);
        }
    }
    panic!("no peer binary: set {env} or run `bash {} build` (root, Go)", script.display());
}
