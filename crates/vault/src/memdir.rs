//! The memory-backed `cacerts` folder.
//!
//! In Vault mode the cluster intermediate's private key may exist only in memory: the process's,
//! and a folder on tmpfs/ramfs shared with the workload CA (in Kubernetes an `emptyDir` with
//! `medium: Memory` mounted at `/etc/cacerts`, which real istiod reads as well). This module
//! checks the folder with `statfs(2)` before anything is written, and refuses any other
//! filesystem unless explicitly allowed for development.

use std::fmt;
use std::path::Path;

use crate::VaultError;

/// `TMPFS_MAGIC` from `linux/magic.h` (also what `/dev/shm` and `emptyDir: {medium: Memory}` are).
pub const TMPFS_MAGIC: i64 = 0x0102_1994;
/// `RAMFS_MAGIC` from `linux/magic.h`.
pub const RAMFS_MAGIC: i64 = 0x8584_58f6;

/// What a folder is stored on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// tmpfs: memory (and swap, if the machine has any).
    Tmpfs,
    /// ramfs: memory only.
    Ramfs,
    /// Anything else; the `statfs` filesystem type.
    Other(i64),
}

impl Backing {
    /// Whether the folder is memory-backed.
    pub fn is_memory(self) -> bool {
        matches!(self, Backing::Tmpfs | Backing::Ramfs)
    }
}

impl fmt::Display for Backing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Backing::Tmpfs => f.write_str("tmpfs"),
            Backing::Ramfs => f.write_str("ramfs"),
            Backing::Other(t) => {
                let name = match *t {
                    0xEF53 => "ext2/3/4",
                    0x5846_5342 => "xfs",
                    0x9123_683E => "btrfs",
                    0x794C_7630 => "overlayfs",
                    0x6969 => "nfs",
                    0x2FC1_2FC1 => "zfs",
                    _ => "disk-backed",
                };
                write!(f, "{name} (filesystem type {t:#x})")
            }
        }
    }
}

/// The filesystem `path` is on.
pub fn backing(path: &Path) -> std::io::Result<Backing> {
    let st = rustix::fs::statfs(path)?;
    // `f_type`'s integer type differs between architectures; on x86_64 it already is i64.
    #[allow(clippy::useless_conversion)]
    let t = i64::from(st.f_type);
    Ok(match t {
        TMPFS_MAGIC => Backing::Tmpfs,
        RAMFS_MAGIC => Backing::Ramfs,
        other => Backing::Other(other),
    })
}

/// Creates `dir` (0700) if missing and checks it is memory-backed. A folder on any other
/// filesystem is refused unless `allow_disk`, which only logs a warning (development).
pub fn prepare(dir: &Path, allow_disk: bool) -> Result<Backing, VaultError> {
    create_private_dir(dir)?;
    let b = backing(dir).map_err(|e| VaultError::MemoryDir(format!("statfs {}: {e}", dir.display())))?;
    if b.is_memory() {
        return Ok(b);
    }
    if allow_disk {
        tracing::warn!(
            dir = %dir.display(), filesystem = %b,
            "--allow-disk-key: the cluster intermediate's private key will be written to a disk-backed folder; \
             for development only"
        );
        return Ok(b);
    }
    Err(VaultError::MemoryDir(format!(
        "{} is on {b}, not tmpfs or ramfs: the cluster intermediate's private key would reach persistent storage. \
         Use a memory-backed folder (in Kubernetes an emptyDir with medium: Memory; on a host e.g. /dev/shm/...), \
         or pass --allow-disk-key for development",
        dir.display()
    )))
}

fn create_private_dir(dir: &Path) -> Result<(), VaultError> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(e) => Err(VaultError::MemoryDir(format!("creating {}: {e}", dir.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_shm_is_memory_and_a_tempdir_on_disk_is_refused() {
        if let Ok(b) = backing(Path::new("/dev/shm")) {
            assert!(b.is_memory(), "/dev/shm: {b}");
        }
        let Ok(tmp) = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")) else { return };
        let dir = tmp.path().join("cacerts");
        match backing(tmp.path()) {
            Ok(b) if !b.is_memory() => {
                let e = prepare(&dir, false).err().map(|e| e.to_string()).unwrap_or_default();
                assert!(e.contains("not tmpfs or ramfs") && e.contains("--allow-disk-key"), "{e}");
                assert_eq!(prepare(&dir, true).ok(), Some(b));
            }
            _ => {}
        }
    }
}
