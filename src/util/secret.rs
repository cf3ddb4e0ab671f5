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

/// Reads a secret file after [`check_private`].
///
/// # Errors
/// A key error for a missing, unreadable or too-open file.
pub fn read_private(path: &Path) -> Result<Vec<u8>, LabError> {
    let meta = fs::metadata(path)
        .map_err(|e| LabError::key(format!("cannot read {}: {e}", path.display())))?;
    check_private(path, &meta)?;
    fs::read(path).map_err(|e| LabError::key(format!("cannot read {}: {e}", path.display())))
}
