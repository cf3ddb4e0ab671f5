//! Secret files (keys, passphrases, credentials, tokens): refused when
//! other users can read them. Never prints a secret, only paths and modes.

use crate::error::LabError;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Refuses a secret file (key, passphrase, credentials) other users can read.
///
/// # Errors
/// A key error naming the file and the fix.
pub fn check_private(path: &Path, meta: &fs::Metadata) -> Result<(), LabError> {
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(LabError::key(format!(
            "{} is readable by other users (mode {:o}); refusing to use it. Run: chmod 600 {}",
            path.display(),
            mode & 0o777,
            path.display()
        )));
    }
    Ok(())
}
