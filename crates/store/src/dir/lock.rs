//! The per-object lock file: an `flock(2)` that makes a writer's read-check-write a
//! compare-and-swap, and that keeps the version high-water mark of a deleted object.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use super::io_err;
use super::layout::FILE_MODE;
use crate::StoreError;

/// The high-water mark is written in place at offset 0 with a fixed width, so it is never
/// truncated (a lock file must never be replaced: a writer waiting on the old inode would then
/// hold a lock nobody else sees).
const HIGH_WATER_WIDTH: usize = 20;

#[derive(Clone, Copy)]
pub(crate) enum LockKind {
    Exclusive,
    Shared,
}

/// Opens (creating it 0600 if needed) and locks a lock file; `who` names the object in errors.
pub(crate) fn lock_file(who: &str, path: &Path, kind: LockKind) -> Result<File, StoreError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(FILE_MODE)
        .open(path)
        .map_err(io_err(who, path))?;
    match kind {
        LockKind::Exclusive => file.lock(),
        LockKind::Shared => file.lock_shared(),
    }
    .map_err(io_err(who, path))?;
    // Released when the file is closed, also when the process dies.
    Ok(file)
}

/// The last version of a deleted object; 0 if none (or unreadable, which can only happen after
/// outside tampering).
pub(crate) fn read_high_water(lock: &File) -> u64 {
    let mut buf = [0u8; HIGH_WATER_WIDTH + 1];
    let n = lock.read_at(&mut buf, 0).unwrap_or(0);
    std::str::from_utf8(&buf[..n]).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

pub(crate) fn write_high_water(lock: &File, version: u64) -> io::Result<()> {
    lock.write_all_at(format!("{version:0width$}\n", width = HIGH_WATER_WIDTH).as_bytes(), 0)?;
    lock.sync_data()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::fs;

    use super::*;

    #[test]
    fn high_water_mark_survives_and_never_truncates() {
        let dir = tempfile::tempdir().unwrap();
        let f =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(dir.path().join("l")).unwrap();
        assert_eq!(read_high_water(&f), 0);
        write_high_water(&f, 12_345).unwrap();
        assert_eq!(read_high_water(&f), 12_345);
        write_high_water(&f, 7).unwrap();
        assert_eq!(read_high_water(&f), 7);
        assert_eq!(fs::metadata(dir.path().join("l")).unwrap().len(), HIGH_WATER_WIDTH as u64 + 1);
    }
}
