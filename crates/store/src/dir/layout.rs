//! The on-disk layout of one object (the kubelet's secret-volume layout, see the
//! [directory backend](super)): the names of its bookkeeping entries, what its `..data` link says,
//! and the lock-free read of a complete version.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::io_err;
use crate::{ObjectKey, Secret, StoreError, is_valid_data_key};

/// The link naming the current data directory (the kubelet's name).
pub(crate) const DATA_LINK: &str = "..data";
/// The link built next to `..data` and renamed over it (the kubelet's name).
pub(super) const DATA_TMP_LINK: &str = "..data_tmp";
/// Data directories are `..v<version, 10 digits>_<random>`; the `..` keeps them out of the key space.
pub(super) const DATA_DIR_PREFIX: &str = "..v";
/// Labels and annotations, inside each data directory. Not a valid data key, so never listed as one.
pub(super) const META_FILE: &str = "..meta.json";
pub(super) const DIR_MODE: u32 = 0o700;
pub(super) const FILE_MODE: u32 = 0o600;

/// What `..data` says about an object.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum LinkState {
    /// No object directory.
    Absent,
    /// A complete object at this version.
    Present { target: String, version: u64 },
    /// An object directory that is not one of ours (only outside tampering gets here).
    Broken(String),
}

impl LinkState {
    /// The version of a complete object, `None` when absent; an object nobody can read is
    /// [`StoreError::Corrupt`].
    pub(crate) fn version(self, key: &ObjectKey) -> Result<Option<u64>, StoreError> {
        match self {
            LinkState::Absent => Ok(None),
            LinkState::Present { version, .. } => Ok(Some(version)),
            LinkState::Broken(reason) => Err(StoreError::Corrupt { key: key.clone(), reason }),
        }
    }
}

#[derive(Serialize)]
pub(crate) struct MetaOut<'a> {
    pub(crate) labels: &'a BTreeMap<String, String>,
    pub(crate) annotations: &'a BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct MetaIn {
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

/// One lock-free read of an object.
pub(crate) enum Attempt {
    Done(Option<(u64, Secret)>),
    /// `..data` moved while reading: what was read may be a mix or incomplete, read again.
    Retry,
}

pub(super) fn key_link_target(data_key: &str) -> String {
    format!("{DATA_LINK}/{data_key}")
}

pub(super) fn data_dir_name(version: u64) -> String {
    format!("{DATA_DIR_PREFIX}{version:010}_{}", random_suffix())
}

/// The version in a data directory name, or `None` if `name` is not one.
pub(super) fn parse_data_dir_name(name: &str) -> Option<u64> {
    let (digits, suffix) = name.strip_prefix(DATA_DIR_PREFIX)?.split_once('_')?;
    let well_formed = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !suffix.is_empty()
        && suffix.bytes().all(|b| b.is_ascii_alphanumeric());
    if well_formed { digits.parse().ok() } else { None }
}

/// The highest version among the data directories in `obj` (linked or not), to keep versions
/// growing when an unreadable object is replaced.
pub(super) fn highest_data_dir_version(obj: &Path) -> Option<u64> {
    fs::read_dir(obj)
        .ok()?
        .filter_map(|e| e.ok().and_then(|e| e.file_name().to_str().and_then(parse_data_dir_name)))
        .max()
}

/// Uniqueness, not secrecy: data directory names must never repeat, so that a reader's "did
/// `..data` move?" check cannot be fooled by a reused name. `RandomState` is seeded randomly per
/// process (and stepped per call); the pid and a counter separate what it might not.
fn random_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    format!("{:016x}", h.finish())
}

/// Reads `..data`.
pub(crate) fn link_state(key: &ObjectKey, obj: &Path) -> Result<LinkState, StoreError> {
    let link = obj.join(DATA_LINK);
    match fs::read_link(&link) {
        Ok(target) => {
            let Some(target) = target.to_str() else {
                return Ok(LinkState::Broken(format!("{DATA_LINK} points at a non-UTF-8 name")));
            };
            match parse_data_dir_name(target) {
                Some(version) => Ok(LinkState::Present { target: target.to_string(), version }),
                None => Ok(LinkState::Broken(format!("{DATA_LINK} points at {target:?}, not a data directory"))),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => match fs::symlink_metadata(obj) {
            Ok(_) => Ok(LinkState::Broken(format!("{} has no {DATA_LINK} link", obj.display()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(LinkState::Absent),
            Err(e) => Err(io_err(&key.to_string(), obj)(e)),
        },
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
            Ok(LinkState::Broken(format!("{} is not a symlink", link.display())))
        }
        Err(e) if e.kind() == io::ErrorKind::NotADirectory => {
            Ok(LinkState::Broken(format!("{} is not a directory", obj.display())))
        }
        Err(e) => Err(io_err(&key.to_string(), &link)(e)),
    }
}

/// One lock-free read. Sound because a linked data directory is never modified, and is removed
/// only after `..data` has moved away from it: if `..data` names the same directory after the
/// read as before, everything read belongs to that one version.
pub(crate) fn read_attempt(key: &ObjectKey, obj: &Path) -> Result<Attempt, StoreError> {
    let target = match link_state(key, obj)? {
        LinkState::Absent => return Ok(Attempt::Done(None)),
        LinkState::Present { target, .. } => target,
        // A delete and a re-create racing our two looks can mimic a broken object; look again.
        LinkState::Broken(reason) => {
            return match link_state(key, obj)? {
                LinkState::Broken(_) => Err(StoreError::Corrupt { key: key.clone(), reason }),
                _ => Ok(Attempt::Retry),
            };
        }
    };
    let read = read_data_dir(key, &obj.join(&target));
    match link_state(key, obj)? {
        LinkState::Present { target: now, version } if now == target => match read? {
            Some(secret) => Ok(Attempt::Done(Some((version, secret)))),
            None => Err(StoreError::Corrupt {
                key: key.clone(),
                reason: format!("{DATA_LINK} points at {target}, which does not exist"),
            }),
        },
        _ => Ok(Attempt::Retry),
    }
}

/// Reads a data directory: every data key plus the meta file. `Ok(None)` if (part of) it is gone.
fn read_data_dir(key: &ObjectKey, dir: &Path) -> Result<Option<Secret>, StoreError> {
    let who = key.to_string();
    let corrupt = |reason: String| StoreError::Corrupt { key: key.clone(), reason };
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&who, dir)(e)),
    };
    let mut secret = Secret::default();
    let mut seen_meta = false;
    let mut names = BTreeSet::new();
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&who, dir)(e)),
        };
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            return Err(corrupt(format!("{} has a non-UTF-8 file name", dir.display())));
        };
        if name != META_FILE && !is_valid_data_key(&name) {
            return Err(corrupt(format!("{} is not a valid data key", path.display())));
        }
        match fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() => {}
            Ok(_) => return Err(corrupt(format!("{} is not a regular file", path.display()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&who, &path)(e)),
        }
        let contents = match fs::read(&path) {
            Ok(contents) => contents,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&who, &path)(e)),
        };
        if name == META_FILE {
            let meta: MetaIn =
                serde_json::from_slice(&contents).map_err(|e| corrupt(format!("{}: {e}", path.display())))?;
            secret.labels = meta.labels;
            secret.annotations = meta.annotations;
            seen_meta = true;
        } else {
            names.insert(name.clone());
            secret.data.insert(name, contents);
        }
    }
    if !seen_meta {
        // Also what a half-removed directory looks like; the caller only trusts this if `..data`
        // did not move.
        return Err(corrupt(format!("{} has no {META_FILE}", dir.display())));
    }
    Ok(Some(secret))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn data_dir_names_round_trip_and_never_repeat() {
        let a = data_dir_name(42);
        let b = data_dir_name(42);
        assert!(a.starts_with("..v0000000042_"), "{a}");
        assert_ne!(a, b);
        assert_eq!(parse_data_dir_name(&a), Some(42));
        assert_eq!(parse_data_dir_name(&data_dir_name(12_345_678_901)), Some(12_345_678_901));
        for bad in ["..data", "..v_abc", "..v12_", "..v12", "..vx1_ab", "..v1_a/b", "v1_ab", "..v1_../x"] {
            assert_eq!(parse_data_dir_name(bad), None, "{bad}");
        }
    }
}
