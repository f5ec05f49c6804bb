//! The kubelet-style atomic writer: a complete, durable data directory first, then one
//! `rename(2)` of the `..data` link, then tidying. Shared by the directory tree and by
//! [`crate::single::SingleObjectDir`].

use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt, symlink};
use std::path::Path;

use super::io_err;
use super::layout::{
    DATA_LINK, DATA_TMP_LINK, DIR_MODE, FILE_MODE, META_FILE, data_dir_name, key_link_target, parse_data_dir_name,
};
use crate::{ObjectKey, Secret, StoreError};

/// Updates an existing object the kubelet's way: write a complete new data directory, swap
/// `..data` to it with one rename, then fix the key links and remove the old data directory.
/// Readers see the old version until the rename and the new one after it.
///
/// `old_target` is `None` when `obj` exists but holds no version yet (an object kept at the root
/// of a directory that is never renamed, see [`crate::single`]): then `..data` appears with the
/// same single rename.
pub(crate) fn update_object(
    key: &ObjectKey,
    obj: &Path,
    old_target: Option<&str>,
    version: u64,
    secret: &Secret,
    meta: &[u8],
) -> Result<(), StoreError> {
    let who = key.to_string();
    remove_leftovers_in_object(key, obj, old_target.unwrap_or_default())?;
    let target = data_dir_name(version);
    let data_dir = obj.join(&target);
    let tmp_link = obj.join(DATA_TMP_LINK);
    let link = obj.join(DATA_LINK);
    let swapped = write_data_dir(key, &data_dir, secret, meta).and_then(|()| {
        symlink(&target, &tmp_link).map_err(io_err(&who, &tmp_link))?;
        fs::rename(&tmp_link, &link).map_err(io_err(&who, &link))
    });
    if let Err(e) = swapped {
        // Nothing points at the new data directory: remove it at once rather than leave it to
        // the next writer, so that a full disk gets its space back and no half-written copy of
        // the data (keys included) stays behind. Best effort: the next writer, or the sweep at
        // the next start, removes whatever this cannot.
        let _ = remove_any(&who, &tmp_link);
        let _ = remove_any(&who, &data_dir);
        return Err(e);
    }
    sync_dir(key, obj)?;
    // The new version is now visible and durable; the rest is tidying that any later writer
    // would also do if we crash here.

    sync_key_links(key, obj, secret)?;
    if let Some(old_target) = old_target {
        remove_any(&who, &obj.join(old_target))?;
    }
    sync_dir(key, obj)
}

/// Gives every data key a `<key> -> ..data/<key>` link and removes links of keys that are gone.
pub(crate) fn sync_key_links(key: &ObjectKey, obj: &Path, secret: &Secret) -> Result<(), StoreError> {
    let who = key.to_string();
    for data_key in secret.data.keys() {
        let link = obj.join(data_key);
        let want = key_link_target(data_key);
        match fs::read_link(&link) {
            Ok(have) if have == Path::new(&want) => continue,
            Ok(_) => _ = remove_any(&who, &link)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            // Not a link (a foreign file): replace it.
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => _ = remove_any(&who, &link)?,
            Err(e) => return Err(io_err(&who, &link)(e)),
        }
        symlink(&want, &link).map_err(io_err(&who, &link))?;
    }
    for entry in fs::read_dir(obj).map_err(io_err(&who, obj))? {
        let entry = entry.map_err(io_err(&who, obj))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with("..") || secret.data.contains_key(name) {
            continue;
        }
        // Only remove what we made: a key link of a key that is no longer there.
        if entry.file_type().map_err(io_err(&who, &entry.path()))?.is_symlink() {
            remove_any(&who, &entry.path())?;
        }
    }
    Ok(())
}

/// Removes what a crashed update left inside the object directory: `..data_tmp` and data
/// directories other than the current one (all of them when `current_target` is empty).
pub(super) fn remove_leftovers_in_object(key: &ObjectKey, obj: &Path, current_target: &str) -> Result<(), StoreError> {
    let who = key.to_string();
    for entry in fs::read_dir(obj).map_err(io_err(&who, obj))? {
        let entry = entry.map_err(io_err(&who, obj))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name == DATA_TMP_LINK || (parse_data_dir_name(name).is_some() && name != current_target) {
            remove_leftover(&who, &entry.path())?;
        }
    }
    Ok(())
}

/// Writes a complete data directory and makes it durable before anything links to it.
pub(super) fn write_data_dir(key: &ObjectKey, dir: &Path, secret: &Secret, meta: &[u8]) -> Result<(), StoreError> {
    let who = key.to_string();
    DirBuilder::new().mode(DIR_MODE).create(dir).map_err(io_err(&who, dir))?;
    for (data_key, value) in &secret.data {
        write_file(&who, &dir.join(data_key), value)?;
    }
    write_file(&who, &dir.join(META_FILE), meta)?;
    sync_dir(key, dir)
}

fn write_file(who: &str, path: &Path, contents: &[u8]) -> Result<(), StoreError> {
    let mut file =
        OpenOptions::new().write(true).create_new(true).mode(FILE_MODE).open(path).map_err(io_err(who, path))?;
    // The umask can only narrow the mode; set it anyway in case the umask is unusual (e.g. strips
    // the owner's bits), so the file is exactly 0600.
    file.set_permissions(fs::Permissions::from_mode(FILE_MODE)).map_err(io_err(who, path))?;
    file.write_all(contents).map_err(io_err(who, path))?;
    file.sync_all().map_err(io_err(who, path))
}

/// Makes a directory's entries (new files, links, renames) durable.
pub(crate) fn sync_dir(key: &impl fmt::Display, dir: &Path) -> Result<(), StoreError> {
    let who = key.to_string();
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(&who, dir))
}

/// Removes a file, link or directory tree if it exists; says whether there was one.
pub(crate) fn remove_any(who: &str, path: &Path) -> Result<bool, StoreError> {
    let result = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err(who, path)(e)),
    }
}

/// Removes what a crashed writer left; worth a log line, since it means a writer died mid-write.
pub(super) fn remove_leftover(who: &str, path: &Path) -> Result<(), StoreError> {
    if remove_any(who, path)? {
        tracing::info!(object = who, path = %path.display(), "removed the leftover of an interrupted write");
    }
    Ok(())
}
