//! One module per subcommand.
pub mod demo;
pub mod inspect;
pub mod verify;

use std::path::Path;

use anyhow::Context;
use meshca_pki::bundle::BundleFiles;

/// Reads the four `cacerts` files from a directory; missing files read as empty, which bundle
/// validation reports by name.
pub fn read_bundle_dir(dir: &Path) -> anyhow::Result<BundleFiles> {
    anyhow::ensure!(dir.is_dir(), "{} is not a directory", dir.display());
    let mut err = None;
    let files = BundleFiles::from_lookup(|name| match std::fs::read(dir.join(name)) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            err.get_or_insert(anyhow::Error::new(e).context(format!("reading {}", dir.join(name).display())));
            None
        }
    });
    match err {
        Some(e) => Err(e),
        None => Ok(files),
    }
    .with_context(|| format!("reading cacerts from {}", dir.display()))
}
