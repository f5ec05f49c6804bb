//! Writing a single file safely: to a temporary file in the same directory, fsync, rename over
//! the target, fsync the directory. Readers see the old file or the new one, never a partial
//! one, and a key file is never readable by anyone else, not even for an instant.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

/// Creates `dir` (and parents) with mode 0700 if missing.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Atomically replaces `path` with `data`, created with `mode` (0600 for keys).
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = parent_dir(path);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Removes the temporary files [`write_atomic`] left in `dir` when its process died mid-write
/// (`.<name>.tmp-<pid>`). Call it at start-up, when no other writer of `dir` runs. Returns how
/// many it removed; a folder that does not exist has none.
pub fn remove_temp_files(dir: &Path) -> std::io::Result<usize> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let ours = name.starts_with('.')
            && name
                .rsplit_once(".tmp-")
                .is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()));
        if ours && entry.file_type()?.is_file() {
            std::fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// The folder `path` is in. A bare file name (`relay.pem`) has the parent `""`, which cannot be
/// opened for the directory fsync, so it is the working directory.
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_atomically_with_the_requested_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("sub/key.pem");
        create_private_dir(p.parent().expect("parent")).expect("mkdir");
        write_atomic(&p, b"one", 0o600).expect("write");
        write_atomic(&p, b"two", 0o600).expect("rewrite");
        assert_eq!(std::fs::read(&p).expect("read"), b"two");
        assert_eq!(std::fs::metadata(&p).expect("meta").permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(p.parent().expect("p")).expect("meta").permissions().mode() & 0o777, 0o700);
        assert_eq!(std::fs::read_dir(p.parent().expect("p")).expect("ls").count(), 1, "no temp file left");
    }

    #[test]
    fn temp_files_of_an_interrupted_write_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in [".key.pem.tmp-4242", ".server.tmp-1", "key.pem", ".hidden", "x.tmp-12", ".y.tmp-abc"] {
            std::fs::write(dir.path().join(name), b"x").expect("write");
        }
        assert_eq!(remove_temp_files(dir.path()).expect("sweep"), 2);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("e").file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, [".hidden", ".y.tmp-abc", "key.pem", "x.tmp-12"]);
        assert_eq!(remove_temp_files(&dir.path().join("missing")).expect("none"), 0);
    }

    #[test]
    fn a_bare_file_name_is_written_in_the_working_directory() {
        assert_eq!(parent_dir(Path::new("relay.pem")), Path::new("."));
        assert_eq!(parent_dir(Path::new("a/relay.pem")), Path::new("a"));
        assert_eq!(parent_dir(Path::new("/relay.pem")), Path::new("/"));
    }
}
