//! A full disk, end to end: a real `meshca server` and `meshca agent` whose data live on small
//! tmpfs file systems the test mounts itself (`mount -t tmpfs -o size=4m`) and then fills. The
//! processes' logs stay outside, where the test reads them.
//!
//! Mounting needs root (CI runs as root, `.ci/run`); anywhere else the test says it was skipped
//! and why, and passes without asserting anything.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it) at `path`; `None` when not root.
    fn mount(path: &Path, size: &str) -> Option<Tmpfs> {
        let uid = Command::new("id").arg("-u").output().ok()?;
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            return None;
        }
        std::fs::create_dir_all(path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs", path.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "mount: {}", String::from_utf8_lossy(&out.stderr));
        Some(Tmpfs { path: path.to_path_buf() })
    }

    /// Fills the file system until a write fails with "no space left", and returns the filler.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let filler = self.path.join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0xa5u8; 4096];
        loop {
            match f.write_all(&chunk) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("filling {}: {e}", self.path.display()),
            }
        }
        let _ = f.sync_all();
        assert!(std::fs::write(self.path.join("probe"), vec![0u8; 8192]).is_err(), "the file system is full");
        let _ = std::fs::remove_file(self.path.join("probe"));
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").args(["-l", self.path.to_str().unwrap()]).status();
    }
}

/// Every entry under `dir` whose name marks an unfinished write of the directory store or of
/// `write_atomic`: a `.<name>_tmp`/`.<name>_del` directory, a `..data_tmp` link, a `.x.tmp-<pid>`
/// file, or a data directory (`..v…`) that `..data` does not point to.
fn leftovers(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return out };
    let current = std::fs::read_link(dir.join("..data")).ok();
    for e in entries {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        let stale_data = name.starts_with("..v") && current.as_deref() != Some(Path::new(&name));
        if name.ends_with("_tmp") || name.ends_with("_del") || name.contains(".tmp-") || stale_data {
            out.push(path.display().to_string());
        }
        if e.file_type().unwrap().is_dir() && !name.starts_with("..") {
            out.extend(leftovers(&path));
        }
    }
    out
}

fn issued_serials(m: &Mgmt, cluster: &str) -> Vec<String> {
    status_cluster(&m.status_json(), cluster)
        .map(|c| c["issued"].as_array().unwrap().iter().map(|r| r["serial"].as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

fn serial_in(dir: &Path) -> Option<String> {
    Some(meshca_pki::Cert::from_pem(&std::fs::read(dir.join("ca-cert.pem")).ok()?).ok()?.serial_hex())
}

/// The attack: with the disk full, the server could not start (it rewrote its operator
/// credentials at every start), callers' errors carried the server's file-system paths, an agent
/// that could not write `cacerts` kept asking for new intermediates (20 in 30 s), and temporary
/// folders stayed behind. Now:
/// - the agent asks for one intermediate, keeps it in memory, retries the write with backoff
///   (saying so once), and writes that same intermediate once there is space;
/// - the server restarts on a full disk (it writes nothing at start it does not need to), and a
///   call that needs to write is answered with an error id — the path is only in its log;
/// - no temporary directory or file of an interrupted write remains, and one left by a crash is
///   removed when the server starts;
/// - the management plane's store (SQLite, the default) reports a full disk as such: the caller
///   gets "out of storage space" with an error id.
#[test]
fn a_full_disk_keeps_the_intermediate_obtained_hides_paths_and_does_not_stop_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (Some(mgmt_fs), Some(agent_fs)) =
        (Tmpfs::mount(&d.join("mgmt-fs"), "4m"), Tmpfs::mount(&d.join("agent-fs"), "4m"))
    else {
        eprintln!("SKIPPED disk_full: mounting a tmpfs needs root (CI runs this test as root)");
        return;
    };
    let port = Ports::one();
    let data = mgmt_fs.path.join("data");
    let mut m = Mgmt::start_in(d, &data, &port.addr(0), &[]);
    let (token, relay) = m.add_cluster(d, "cluster-1");
    let store = agent_fs.path.join("store");
    let agent = agent_at(d, "agent-cluster-1", &store, &m, "cluster-1", Some(&token), Some(&relay), &[]);
    let cacerts = store.join("istio-system").join("cacerts");
    let first = wait_for(Duration::from_secs(30), "the first cacerts", || {
        valid_bundle(&cacerts).ok().map(|b| b.ca_cert().serial_hex())
    });

    // ---- the agent's disk is full when a rotation comes ----
    let filler = agent_fs.fill();
    let (ok, out, err) = run(&["rotate", "cluster-1", "--credentials", &m.creds()]);
    assert!(ok, "{out}{err}");
    wait_for(Duration::from_secs(30), "the agent to fail writing cacerts", || {
        agent.log_text().contains("writing cacerts failed").then_some(())
    });
    // Backoff is capped at 2 s here (`agent_at`): ten seconds is several write attempts.
    std::thread::sleep(Duration::from_secs(10));
    let issued = issued_serials(&m, "cluster-1");
    assert_eq!(issued.len(), 2, "the initial one and ONE for the rotation, however often the write fails: {issued:?}");
    let log = agent.log_text();
    assert_eq!(log.matches("writing cacerts failed").count(), 1, "said once, not at every retry:\n{log}");
    assert!(log.contains("kept in memory"), "{log}");
    assert_eq!(serial_in(&cacerts).as_deref(), Some(first.as_str()), "the old cacerts stays whole meanwhile");
    assert_eq!(leftovers(&store), Vec::<String>::new(), "a failed write leaves nothing behind");

    std::fs::remove_file(&filler).unwrap();
    let written = wait_for(Duration::from_secs(30), "the kept intermediate to be written", || {
        serial_in(&cacerts).filter(|s| *s != first)
    });
    assert_eq!(written, issued[0], "the intermediate written is the one obtained while the disk was full");
    assert_eq!(issued_serials(&m, "cluster-1").len(), 2);
    openssl_verify_cacerts(&cacerts);

    // ---- the management plane's disk is full, and it restarts ----
    let creds_before = std::fs::read(data.join("operator").join("operator.pem")).unwrap();
    m.proc.kill();
    // What a crash in the middle of a credentials write leaves, for the start-up sweep. (The
    // server's records are in its SQLite store, whose journal makes an interrupted write vanish;
    // the directory store's own sweep is tested in crates/store and by the agent's store above.)
    std::fs::write(data.join("operator").join(".operator.pem.tmp-99999"), "half").unwrap();
    let filler = mgmt_fs.fill();
    let mut m = Mgmt::start_in(d, &data, &port.addr(0), &[]);
    assert_eq!(
        std::fs::read(data.join("operator").join("operator.pem")).unwrap(),
        creds_before,
        "reused, not rewritten"
    );
    assert!(!data.join("operator").join(".operator.pem.tmp-99999").exists());

    let (ok, out, err) = run(&["cluster", "add", "cluster-2", "--credentials", &m.creds()]);
    assert!(!ok, "{out}");
    assert!(err.contains("Unavailable") && err.contains("out of storage space") && err.contains("error id"), "{err}");
    let root = mgmt_fs.path.to_str().unwrap();
    assert!(!err.contains(root) && !err.contains("/meshca/") && !err.contains("..v"), "no path for the caller: {err}");
    let id = err.split("error id ").nth(1).unwrap().split(|c: char| !c.is_ascii_hexdigit()).next().unwrap().to_string();
    assert!(id.len() >= 8, "{err}");
    let log = wait_for(Duration::from_secs(10), "the server's log line for that id", || {
        let log = m.proc.log_text();
        log.lines().find(|l| l.contains(&id)).map(str::to_string)
    });
    assert!(log.contains(root), "the server's log has the detail: {log}");
    let (ok, out, err) = run(&["status", "--credentials", &m.creds()]);
    assert!(ok && out.contains("cluster-1"), "reading still works: {out}{err}");

    std::fs::remove_file(&filler).unwrap();
    assert_eq!(leftovers(&data), Vec::<String>::new(), "nothing half-written in the server's data either");
    let (ok, out, err) = run(&["cluster", "add", "cluster-2", "--credentials", &m.creds()]);
    assert!(ok, "with space again: {out}{err}");
    m.proc.kill();
    drop(agent);
}
