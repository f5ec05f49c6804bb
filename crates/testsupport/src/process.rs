//! Child processes a test starts: their output in a log file the test can read, killed when the
//! test drops them (also when it panics), so no server outlives its test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A running child process; SIGKILLed and reaped when dropped.
pub struct Proc {
    child: Child,
    /// Where its stdout and stderr go (appended, so a restarted process keeps one log).
    pub log: PathBuf,
    /// The name it was started with (its log is `<name>.log`).
    pub name: String,
}

impl Proc {
    /// Starts `cmd` with stdin closed and stdout and stderr appended to `dir/<name>.log`.
    pub fn spawn(mut cmd: Command, name: &str, dir: &Path) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(f.try_clone().unwrap()))
            .stderr(Stdio::from(f))
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name} ({:?}): {e}", cmd.get_program()));
        Proc { child, log, name: name.to_string() }
    }

    /// Everything it has written so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How it exited, or `None` while it runs.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Panics, with its log, if it has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.exit_status() {
            panic!("{} exited ({status}):\n{}", self.name, self.log_text());
        }
    }

    /// Waits up to `timeout` for it to exit on its own; panics (with its log) if it is still
    /// running then.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exit_status() {
                return status;
            }
            assert!(Instant::now() < deadline, "{} still running after {timeout:?}:\n{}", self.name, self.log_text());
            std::thread::sleep(crate::wait::POLL);
        }
    }

    /// The rest of the first log line containing `needle` (after it), once the process has
    /// written it — how a server that bound port 0 tells its address. Panics with the log if the
    /// process exits first or `timeout` passes.
    pub fn wait_for_log(&mut self, timeout: Duration, needle: &str) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(rest) = self.log_text().lines().find_map(|l| l.split_once(needle).map(|(_, r)| r.to_string())) {
                return rest;
            }
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "{} logged no {needle:?} within {timeout:?}:\n{}",
                self.name,
                self.log_text()
            );
            std::thread::sleep(crate::wait::POLL);
        }
    }

    /// Sends `sig` (`TERM`, `INT`, `STOP`, `CONT`); see [`signal`].
    pub fn signal(&self, sig: &str) {
        signal(self.pid(), sig);
    }

    /// SIGKILL and reap (a stopped process dies of SIGKILL too).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends `sig` (`TERM`, `INT`, `STOP`, `CONT`) to `pid` with bash's builtin `kill`: a bare Debian
/// has no kill(1) binary without procps.
pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("bash").arg("-c").arg(format!("kill -{sig} {pid}")).status().unwrap().success();
    assert!(ok, "kill -{sig} {pid}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_logs_to_its_file_reports_a_line_and_dies_when_dropped() {
        let dir = std::env::temp_dir().join(format!("meshca-testsupport-{}", crate::random_hex(6)));
        std::fs::create_dir_all(&dir).unwrap();
        let mut cmd = Command::new("bash");
        cmd.args(["-c", "echo 'listening on 127.0.0.1:4242; ready' >&2; exec sleep 60"]);
        let mut p = Proc::spawn(cmd, "sleeper", &dir);
        assert_eq!(p.wait_for_log(Duration::from_secs(10), "listening on "), "127.0.0.1:4242; ready");
        let pid = p.pid();
        drop(p);
        // Killed and reaped: not even a zombie is left.
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "pid {pid} outlived its Proc");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
