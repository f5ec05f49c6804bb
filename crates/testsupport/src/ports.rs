//! Loopback ports reserved for a test, without racing anyone for them.
//!
//! Binding port 0, closing the socket and handing the number to a child races: between the close
//! and the child's own bind, any process may take the port — a parallel test doing the same, or
//! the kernel choosing an ephemeral port for somebody's outgoing connection. Where the child can
//! bind port 0 itself and report its address (meshca's servers print it), tests do that. For the
//! rest — etcd, kube-apiserver, Vault, istiod, `openssl s_server`, and a meshca server that must
//! come back on the address its agents know — a [`Ports`] reservation holds a block of ports that
//! - lie below the kernel's ephemeral range (`/proc/sys/net/ipv4/ip_local_port_range`), so no
//!   `bind(0)` or `connect()` anywhere on the machine is handed one of them, and
//! - are each guarded by an exclusive lock on `<tmp>/meshca-test-ports/<port>.lock`, held as long
//!   as the reservation lives, so no other test on the machine (any thread, process or checkout)
//!   reserves them as well.
//!
//! The child binds them itself. A reservation outlives restarts of its child on the same ports,
//! and its locks go with the test process if that dies (the kernel drops them).

use std::fs::{File, OpenOptions};
use std::net::TcpListener;
use std::path::{Path, PathBuf};

/// The lowest port handed out: above the ports services commonly use.
const LOWEST: u16 = 20000;

/// A block of consecutive loopback ports, reserved while this value lives.
#[derive(Debug)]
pub struct Ports {
    base: u16,
    len: u16,
    _locks: Vec<File>,
}

impl Ports {
    /// Reserves `len` consecutive ports that nothing listens on now.
    pub fn reserve(len: u16) -> Ports {
        assert!((1..=64).contains(&len), "reserve 1 to 64 ports, not {len}");
        let high = ephemeral_low().saturating_sub(len);
        assert!(high > LOWEST + 256, "the ephemeral port range starts too low ({high}) to reserve ports below it");
        let span = high - LOWEST;
        let mut r = [0u8; 2];
        aws_lc_rs::rand::fill(&mut r).unwrap();
        let start = u16::from_le_bytes(r) % span;
        Ports::reserve_in(&lock_dir(), len, LOWEST + start, high)
    }

    /// [`Self::reserve`] with its locks in `dir`, trying blocks from `first` below `high`.
    fn reserve_in(dir: &Path, len: u16, first: u16, high: u16) -> Ports {
        let span = high - LOWEST;
        let start = first - LOWEST;
        // Blocks are tried `len` apart so that two reservations rarely probe the same ports.
        for i in 0..span / len {
            let base = LOWEST + (start + i * len) % span;
            if let Some(locks) = try_block(dir, base, len) {
                return Ports { base, len, _locks: locks };
            }
        }
        panic!("no {len} consecutive free ports between {LOWEST} and {high} on 127.0.0.1");
    }

    /// A reservation of one port, [`Self::port`]`(0)`.
    pub fn one() -> Ports {
        Ports::reserve(1)
    }

    /// The first port.
    pub fn base(&self) -> u16 {
        self.base
    }

    /// Port `i` of the block (`0..len`).
    pub fn port(&self, i: u16) -> u16 {
        assert!(i < self.len, "port {i} of a block of {}", self.len);
        self.base + i
    }

    /// `127.0.0.1:<port i>`.
    pub fn addr(&self, i: u16) -> String {
        format!("127.0.0.1:{}", self.port(i))
    }
}

/// The first port of the kernel's ephemeral range (32768 unless the machine changed it).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

fn lock_dir() -> PathBuf {
    let dir = std::env::temp_dir().join("meshca-test-ports");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    dir
}

/// Locks every port of `base..base+len` and checks nothing listens on it, or locks none.
fn try_block(dir: &std::path::Path, base: u16, len: u16) -> Option<Vec<File>> {
    let mut locks = Vec::with_capacity(len.into());
    for port in base..base + len {
        let f =
            OpenOptions::new().create(true).truncate(false).write(true).open(dir.join(format!("{port}.lock"))).ok()?;
        f.try_lock().ok()?;
        // Held by none of the tests; also not by a program outside this scheme (a service, a
        // server started by hand). The probe socket closes at once: the lock keeps the port.
        TcpListener::bind(("127.0.0.1", port)).ok()?;
        locks.push(f);
    }
    Some(locks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_are_disjoint_below_the_ephemeral_range_and_free_for_the_child() {
        // In a lock folder of this test's own: the test processes running beside it (other
        // suites, other checkouts) share the real one and may take a port the moment it is free.
        let dir = std::env::temp_dir().join(format!("meshca-test-ports-selftest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let high = ephemeral_low().saturating_sub(3);
        let blocks: Vec<Ports> = (0..20).map(|i| Ports::reserve_in(&dir, 3, LOWEST + 7 * i, high)).collect();
        let mut all: Vec<u16> = blocks.iter().flat_map(|b| (0..3).map(|i| b.port(i))).collect();
        assert!(all.iter().all(|p| (LOWEST..ephemeral_low()).contains(p)), "{all:?}");
        all.sort();
        let n = all.len();
        all.dedup();
        assert_eq!(all.len(), n, "two reservations share a port");
        // The holder's child can bind its port; another reservation cannot take it meanwhile.
        let held = &blocks[0];
        let _child = TcpListener::bind(("127.0.0.1", held.port(1))).unwrap();
        assert!(try_block(&dir, held.base(), 1).is_none(), "a held port was reserved twice");
        // Released when dropped: the lock can be taken again. (Not a bind probe: the port itself may
        // be taken meanwhile by anything on the machine outside this scheme.)
        let base = held.base();
        drop(blocks);
        let lock = File::open(dir.join(format!("{base}.lock"))).unwrap();
        assert!(lock.try_lock().is_ok(), "the reservation of {base} outlived its value");
        drop(lock);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
