//! File descriptors: telling their exhaustion apart from every other I/O error, and sizing the
//! connection cap from the process's open-file limit so that connections alone can never exhaust
//! them (the workload CA must still be able to open `cacerts` when a flood of sockets arrives).

use std::io;

use rustix::io::Errno;

/// Descriptors kept out of the connection cap for everything else the process opens: the
/// listeners, `cacerts` and store reads, outgoing connections (the API server, Vault), the
/// runtime's own, stdio. At least this many, or an eighth of the limit if that is more.
pub const RESERVED: u64 = 64;

/// Why an operation failed for want of a kernel resource, when it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exhausted {
    /// `EMFILE`: this process is at its open-file limit (`ulimit -n`, `RLIMIT_NOFILE`).
    ProcessDescriptors,
    /// `ENFILE`: the whole system is out of file descriptors (`fs.file-max`).
    SystemDescriptors,
    /// `ENOBUFS` / `ENOMEM`: the kernel is out of socket memory.
    KernelMemory,
}

impl Exhausted {
    /// What ran out, in words an operator can act on.
    pub fn explain(self) -> &'static str {
        match self {
            Exhausted::ProcessDescriptors => {
                "the process is out of file descriptors (EMFILE: its open-file limit, `ulimit -n`, is reached)"
            }
            Exhausted::SystemDescriptors => "the system is out of file descriptors (ENFILE: fs.file-max is reached)",
            Exhausted::KernelMemory => "the kernel is out of socket memory (ENOBUFS/ENOMEM)",
        }
    }
}

/// Whether `e` is a resource exhaustion (as opposed to, say, a missing file or a refused
/// permission), and which.
pub fn exhaustion(e: &io::Error) -> Option<Exhausted> {
    match Errno::from_io_error(e)? {
        Errno::MFILE => Some(Exhausted::ProcessDescriptors),
        Errno::NFILE => Some(Exhausted::SystemDescriptors),
        Errno::NOBUFS | Errno::NOMEM => Some(Exhausted::KernelMemory),
        _ => None,
    }
}

/// The process's soft open-file limit, when it has one.
pub fn open_file_limit() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current
}

/// How many connections fit under an open-file limit of `limit` with room kept for everything
/// else ([`RESERVED`], or an eighth of the limit if more); `None` (no limit) leaves `wanted`.
pub fn connections_within(limit: Option<u64>, wanted: usize) -> usize {
    match limit {
        None => wanted,
        Some(limit) => {
            let room = limit.saturating_sub(RESERVED.max(limit / 8));
            wanted.min(usize::try_from(room).unwrap_or(usize::MAX)).max(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_exhaustion_is_told_apart_from_other_errors() {
        assert_eq!(exhaustion(&io::Error::from_raw_os_error(24)), Some(Exhausted::ProcessDescriptors));
        assert_eq!(exhaustion(&io::Error::from_raw_os_error(23)), Some(Exhausted::SystemDescriptors));
        assert_eq!(exhaustion(&io::Error::from(io::ErrorKind::NotFound)), None);
        assert_eq!(exhaustion(&io::Error::from_raw_os_error(2)), None, "ENOENT is not exhaustion");
        assert!(Exhausted::ProcessDescriptors.explain().contains("EMFILE"));
    }

    #[test]
    fn the_connection_cap_leaves_room_under_the_open_file_limit() {
        assert_eq!(connections_within(Some(256), 10_000), 192);
        assert_eq!(connections_within(Some(1024), 10_000), 896);
        assert_eq!(connections_within(Some(1_048_576), 10_000), 10_000);
        assert_eq!(connections_within(Some(1024), 100), 100);
        assert_eq!(connections_within(None, 100), 100);
        assert_eq!(connections_within(Some(10), 100), 1, "never zero");
    }
}
