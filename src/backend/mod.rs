//! Where repository objects live.
//!
//! # Rules every backend follows
//! - **Objects are immutable.** A name, once written, always holds the same
//!   bytes. [`Backend::put`] never overwrites: if the name exists it fails with
//!   [`BackendError::AlreadyExists`] and leaves the existing object untouched.
//! - **Written once, visible atomically.** A reader sees either no object or
//!   the whole object, never a prefix (the local backend writes a temporary
//!   file, fsyncs it, then links it into place).
//! - **Durable on return.** When `put` returns `Ok`, the object survives a
//!   crash of this process and of the machine (fsync of file and directory).
//! - **Deleting is the only mutation**, and only prune does it.
//! - Names are `/`-separated relative paths made of `[0-9a-z._-]`.
//!
//! Errors say which object failed and whether retrying can help.

pub mod fs;
pub mod s3;

use std::sync::Arc;

/// One object in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub name: String,
    pub size: u64,
}

/// An unfinished multipart upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    /// The object key it would create.
    pub key: String,
    pub id: String,
    /// When the store says it started (some stores report nonsense here).
    pub initiated: Option<std::time::SystemTime>,
}

pub use crate::error::BackendError;

pub type BackendResult<T> = std::result::Result<T, BackendError>;

/// Storage for repository objects. See the module docs for the rules.
pub trait Backend: Send + Sync {
    /// A human description (URL) of where the objects live; no secrets.
    fn location(&self) -> String;
    /// Writes a new object. Fails with `AlreadyExists` if `name` exists.
    fn put(&self, name: &str, data: &[u8]) -> BackendResult<()>;
    /// Like [`Backend::put`], taking the buffer (lets a network backend send
    /// it without a copy).
    fn put_owned(&self, name: &str, data: Vec<u8>) -> BackendResult<()> {
        self.put(name, &data)
    }
    /// Reads a whole object.
    fn get(&self, name: &str) -> BackendResult<Vec<u8>>;
    /// Reads `len` bytes at `offset`; a short object is `ShortRead`.
    fn get_range(&self, name: &str, offset: u64, len: u64) -> BackendResult<Vec<u8>>;
    /// Delivers bytes `offset..offset + len` of an object to `sink`, in
    /// order, in pieces, so a reader need not hold the whole range. A
    /// network backend resumes an interrupted body where it stopped, so the
    /// sink sees every byte exactly once. The sink returns `false` to stop
    /// early (the call then returns `Ok`). A short object ends with
    /// `ShortRead` (some of the bytes it does hold may have been delivered).
    fn get_range_stream(
        &self,
        name: &str,
        offset: u64,
        len: u64,
        sink: &mut dyn FnMut(&[u8]) -> bool,
    ) -> BackendResult<()> {
        const PIECE: u64 = 4 << 20;
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let n = PIECE.min(end - at);
            if !sink(&self.get_range(name, at, n)?) {
                return Ok(());
            }
            at += n;
        }
        Ok(())
    }
    /// Delivers a whole object to `sink` like [`Backend::get_range_stream`]
    /// (which it uses for resuming). An object store is asked without a
    /// `Range` header, which some servers serve more cheaply and for which
    /// the SDK can check the whole object's checksum.
    fn get_stream(&self, name: &str, sink: &mut dyn FnMut(&[u8]) -> bool) -> BackendResult<()> {
        let size = self.stat(name)?.ok_or_else(|| BackendError::NotFound {
            name: name.to_string(),
        })?;
        self.get_range_stream(name, 0, size, sink)
    }
    /// Calls `f` for each object whose name starts with `prefix`.
    fn list(&self, prefix: &str, f: &mut dyn FnMut(ObjectInfo)) -> BackendResult<()>;
    /// The size of an object, or `None` when it does not exist.
    fn stat(&self, name: &str) -> BackendResult<Option<u64>>;
    /// Removes an object (prune only). Removing a missing object is not an error.
    fn delete(&self, name: &str) -> BackendResult<()>;
    /// Unfinished multipart uploads under the repository (a crash leaves
    /// them: invisible to readers, but stored).
    fn unfinished_uploads(&self) -> BackendResult<Vec<Upload>> {
        Ok(vec![])
    }
    /// Aborts an unfinished upload.
    fn abort_upload(&self, upload: &Upload) -> BackendResult<()> {
        let _ = upload;
        Ok(())
    }
    /// Whether requests are expensive (an object store over the network):
    /// readers then prefer few large reads.
    fn is_remote(&self) -> bool {
        false
    }
    /// How many requests to keep in flight for good throughput.
    fn parallelism(&self) -> usize {
        4
    }
    /// Sets Object Lock retention for objects written from now on.
    ///
    /// # Errors
    /// A usage error where the backend has no Object Lock.
    fn set_object_lock(&self, lock: s3::ObjectLock) -> crate::error::Result<()> {
        let _ = lock;
        Err(crate::error::LabError::usage(format!(
            "{} does not support Object Lock; use an S3 bucket created with Object Lock enabled",
            self.location()
        ))
        .into())
    }
    /// Until when an object is locked against deletion, if at all.
    fn locked_until(&self, name: &str) -> BackendResult<Option<time::OffsetDateTime>> {
        let _ = name;
        Ok(None)
    }
    /// Renews an object's lock (objects still referenced stay protected).
    fn extend_lock(&self, name: &str) -> BackendResult<()> {
        let _ = name;
        Ok(())
    }
}

/// Settings a configuration file can give instead of the environment.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// AWS shared-credentials file for `s3://` (refused when others can read it).
    pub credentials_file: Option<std::path::PathBuf>,
    /// PEM CA file trusted for the S3 endpoint.
    pub ca_file: Option<std::path::PathBuf>,
    /// The S3 endpoint (instead of `AWS_ENDPOINT_URL`): a store other than
    /// the repository's, such as Kubeflow Pipelines' in-cluster MinIO.
    pub endpoint_url: Option<String>,
}

/// Refuses a repository location that looks like a URL but is not a valid
/// one (`s3:/bucket`, `s3//bucket`, `s3:bucket`: each would otherwise be
/// taken as a local directory and a repository created there), and any URL
/// with credentials in it (`s3://KEY:SECRET@bucket`), without echoing it.
///
/// # Errors
/// A usage error saying what was probably meant.
pub fn check_url_shape(url: &str) -> crate::error::Result<()> {
    use crate::error::LabError;
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) if !s.contains('/') => (Some(s), r),
        _ => (None, url),
    };
    // Userinfo: an '@' before the first '/' of what follows the scheme.
    if scheme.is_some() && rest.split('/').next().unwrap_or("").contains('@') {
        return Err(LabError::usage(
            "the repository URL carries credentials (user:secret@...): labctl refuses them, since a URL ends up in logs, errors and process listings. Give S3 keys through AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE or a credentials file (AWS_SHARED_CREDENTIALS_FILE, or credentials_file in labctl.toml)",
        )
        .into());
    }
    if scheme.is_some() {
        return Ok(());
    }
    // A `word:` or `word//` prefix that is not one of labctl's forms.
    let first = url.split('/').next().unwrap_or("");
    let word: &str = match first.split_once(':') {
        Some((w, _)) => w,
        None if url[first.len()..].starts_with("//") => first,
        None => return Ok(()),
    };
    let looks_like_scheme = word.len() >= 2
        && word.starts_with(|c: char| c.is_ascii_alphabetic())
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !looks_like_scheme || word == "local" {
        return Ok(());
    }
    if url.contains('@') {
        return Err(LabError::usage(
            "the repository location looks like a URL with credentials in it, and is not a valid URL; give S3 keys through the AWS environment and the repository as s3://bucket/prefix",
        )
        .into());
    }
    let after = url[word.len()..]
        .trim_start_matches(':')
        .trim_start_matches('/');
    // file URLs name an absolute path: file:///srv/repo.
    let meant = if word == "file" {
        format!("file:///{after}")
    } else {
        format!("{word}://{after}")
    };
    Err(LabError::usage(format!(
        "repository location '{url}' looks like a URL but is not one (a URL is scheme://...); did you mean {meant}? For a local directory with ':' in its name, write ./{url}"
    ))
    .into())
}

/// Opens the backend for a repository URL: `/path`, `file:///path` or `local:path`.
///
/// # Errors
/// A usage error for an unsupported scheme.
pub fn open(url: &str) -> crate::error::Result<Arc<dyn Backend>> {
    open_with(url, &OpenOptions::default())
}

/// [`open`] with settings from a configuration file.
///
/// # Errors
/// As [`open`]; a key error for a credentials file other users can read.
pub fn open_with(url: &str, opts: &OpenOptions) -> crate::error::Result<Arc<dyn Backend>> {
    check_url_shape(url)?;
    if let Some(path) = url.strip_prefix("file://") {
        return Ok(Arc::new(fs::FsBackend::new(path)));
    }
    if let Some(path) = url.strip_prefix("local:") {
        return Ok(Arc::new(fs::FsBackend::new(path)));
    }
    if url.starts_with("s3://") {
        return Ok(Arc::new(s3::S3Backend::open_with(url, opts)?));
    }
    if url.contains("://") {
        let scheme = url.split("://").next().unwrap_or_default();
        return Err(crate::error::LabError::usage(format!(
            "repository URL scheme '{scheme}://' is not supported by this build; use a local path or file:///path"
        ))
        .into());
    }
    if url.is_empty() {
        return Err(crate::error::LabError::usage(
            "no repository given: pass --repo <url> or set LABCTL_REPO",
        )
        .into());
    }
    Ok(Arc::new(fs::FsBackend::new(url)))
}
