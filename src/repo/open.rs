//! The one way to open a repository, for the CLI (flags and environment)
//! and the daemon (`[repository]` of labctl.toml): which key file, which
//! backend options, which cache directory.
//!
//! Must not know where the settings came from beyond the wording of its
//! hints ([`KeyHints`]).

use crate::backend::{self, OpenOptions};
use crate::error::LabError;
use crate::repo::keys::{KeyRole, Keys};
use crate::repo::Repository;
use std::path::PathBuf;

/// How to tell the user to supply a key, in the words of where the settings
/// come from (flags or a config file).
#[derive(Debug, Clone, Copy)]
pub struct KeyHints {
    /// How to give the backup key, e.g. "--key <file> or LABCTL_KEY".
    pub backup: &'static str,
    /// How to give the restore key.
    pub restore: &'static str,
}

impl KeyHints {
    /// For command-line use.
    pub const FLAGS: KeyHints = KeyHints {
        backup: "pass --key <backup key file> or set LABCTL_KEY",
        restore: "pass --restore-key <file> or set LABCTL_RESTORE_KEY",
    };
    /// For labctl.toml's `[repository]`.
    pub const CONFIG: KeyHints = KeyHints {
        backup: "set repository.backup_key in the config",
        restore: "set repository.restore_key in the config",
    };
}

/// Everything needed to open a repository.
#[derive(Debug, Clone)]
pub struct RepoSpec {
    /// A local path, `file:///path` or `s3://bucket/prefix`.
    pub url: Option<String>,
    pub backend: OpenOptions,
    pub backup_key: Option<PathBuf>,
    pub restore_key: Option<PathBuf>,
    /// Where catalogs live (default: [`crate::repo::default_cache_dir`]).
    pub cache_dir: Option<PathBuf>,
    pub hints: KeyHints,
}

impl RepoSpec {
    /// The cache directory in use.
    pub fn cache_dir(&self) -> PathBuf {
        self.cache_dir
            .clone()
            .unwrap_or_else(crate::repo::default_cache_dir)
    }

    /// Loads the key for the work: the restore key when `need_data`
    /// (a backup key cannot decrypt data), otherwise the backup key, or
    /// the restore key when that is all there is.
    ///
    /// # Errors
    /// A key error naming the file, or saying how to give the key.
    pub fn keys(&self, need_data: bool) -> crate::error::Result<Keys> {
        if need_data {
            if let Some(p) = &self.restore_key {
                return Ok(Keys::load(p)?);
            }
            if let Some(p) = &self.backup_key {
                let k = Keys::load(p)?;
                if k.role == KeyRole::Restore {
                    return Ok(k);
                }
                return Err(LabError::key(format!(
                    "{} is a backup key, which cannot decrypt backed-up data; this needs the restore key: {}",
                    p.display(),
                    self.hints.restore
                ))
                .into());
            }
            return Err(LabError::key(format!(
                "this needs the restore key: {}",
                self.hints.restore
            ))
            .into());
        }
        match (&self.backup_key, &self.restore_key) {
            (Some(p), _) | (None, Some(p)) => Ok(Keys::load(p)?),
            (None, None) => {
                Err(LabError::key(format!("no key given: {}", self.hints.backup)).into())
            }
        }
    }

    /// Opens only the storage (for `repo init` and `key recover`, which
    /// have no key yet).
    ///
    /// # Errors
    /// Usage (no or malformed URL) or storage errors.
    pub fn open_backend(&self) -> crate::error::Result<std::sync::Arc<dyn backend::Backend>> {
        let url = self.url.as_deref().ok_or_else(|| {
            LabError::usage("no repository given: pass --repo <url> or set LABCTL_REPO")
        })?;
        backend::open_with(url, &self.backend)
    }

    /// Opens the repository: key first (no storage access without one),
    /// then the backend, then the catalog.
    ///
    /// # Errors
    /// Usage (no URL), key, storage or integrity errors.
    pub fn open(&self, need_data: bool) -> crate::error::Result<Repository> {
        let keys = self.keys(need_data)?;
        Repository::open(self.open_backend()?, keys, &self.cache_dir())
    }

    /// [`RepoSpec::open`] without syncing the catalog (see
    /// [`Repository::open_unsynced`]).
    ///
    /// # Errors
    /// As [`RepoSpec::open`].
    pub fn open_unsynced(&self) -> crate::error::Result<Repository> {
        let keys = self.keys(false)?;
        Repository::open_unsynced(self.open_backend()?, keys, &self.cache_dir())
    }
}
