//! SQLite helpers shared by every local store (the catalog, job history,
//! provision records, the policy audit index): private files and WAL.
//!
//! Must not know any store's schema.

use anyhow::Context;
use rusqlite::Connection;
use std::path::Path;

/// Makes `path`'s directory (created 0700 with any missing parents, and
/// made 0700 when it exists: it lists every backed-up path) and `path`
/// itself (created empty, 0600, and made 0600 when it exists; both best
/// effort where another user owns them) private
/// before SQLite opens it; SQLite gives its `-wal` and `-shm` files the
/// database file's mode.
///
/// # Errors
/// When the directory or file cannot be created or its mode set.
pub fn private_file(path: &Path) -> crate::error::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating directory {}", dir.display()))?;
        // Best effort on an existing directory someone else owns.
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let _ = f.set_permissions(std::fs::Permissions::from_mode(0o600));
    Ok(())
}

/// Switches to WAL. Switching needs an exclusive lock and SQLite does not
/// wait for it through the busy handler, so concurrent first opens retry.
pub fn set_wal(conn: &Connection) -> crate::error::Result<()> {
    let mut tries = 0;
    loop {
        match conn.pragma_update(None, "journal_mode", "WAL") {
            Ok(()) => return Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy && tries < 300 =>
            {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => return Err(e.into()),
        }
    }
}
