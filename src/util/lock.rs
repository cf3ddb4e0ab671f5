//! Advisory file locks (`flock`): the one way labctl keeps two processes
//! out of the same work on a host (daemon jobs, provision apply).
//!
//! Must not decide what a held lock means: callers word the refusal.

use std::os::unix::io::AsRawFd;
use std::path::Path;

/// An exclusive, non-blocking `flock` on `path` (created, with its parent
/// directory, when missing). `Ok(None)` when another process holds it; the
/// lock lasts as long as the returned file.
///
/// # Errors
/// When the file cannot be created or locked for another reason.
pub fn try_exclusive(path: &Path) -> crate::error::Result<Option<std::fs::File>> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    // SAFETY: flock on a valid, owned file descriptor.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(Some(f));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Ok(None);
    }
    Err(anyhow::anyhow!("locking {}: {e}", path.display()).into())
}
