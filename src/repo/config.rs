//! The repository config object (`config`): public parameters, no secrets.
//!
//! Header `"LCCONF" u16le(1)` then JSON. It names the repository ID, the
//! chunker parameters, compression levels, the pack size and the public
//! recipients. Key files carry their own copy of the recipients, so a
//! tampered config cannot redirect encryption to a stranger's key: on open,
//! labctl refuses a config whose ID or recipients disagree with the key file.

use crate::error::LabError;
use crate::repo::chunker::ChunkerParams;
use crate::repo::format::{self, MAGIC_CONFIG};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RepoConfig {
    pub repo_id: String,
    pub created: String,
    pub chunker: ChunkerParams,
    /// zstd level for file and stream data and trees (0 = store raw).
    pub compression_level: i32,
    /// zstd level for fixed-size chunks of disk images (0 = store raw).
    pub image_compression_level: i32,
    /// Target pack size in bytes.
    pub pack_size: u32,
    pub meta_recipient: String,
    pub data_recipients: Vec<String>,
    /// S3 Object Lock retention for new objects (absent: no lock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_lock: Option<ObjectLockConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ObjectLockConfig {
    pub days: u32,
    /// `compliance` (nobody can shorten it) or `governance`.
    pub mode: String,
}

impl ObjectLockConfig {
    pub fn to_lock(&self) -> crate::backend::s3::ObjectLock {
        crate::backend::s3::ObjectLock {
            days: self.days,
            compliance: self.mode != "governance",
        }
    }
}

impl RepoConfig {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = format::header(MAGIC_CONFIG).to_vec();
        out.extend_from_slice(
            serde_json::to_string_pretty(self)
                .expect("serializable")
                .as_bytes(),
        );
        out.push(b'\n');
        out
    }

    /// Checks every parameter is one labctl can work with (a config read
    /// from storage is validated on every open: a zero fixed chunk size or
    /// impossible CDC sizes would make backups record nothing or hang).
    ///
    /// # Errors
    /// An integrity error naming the field.
    pub fn validate(&self) -> Result<(), LabError> {
        let bad = |field: &str, why: String| {
            LabError::integrity(format!(
                "repository config: field '{field}' is invalid ({why}); the config was damaged or tampered with"
            ))
        };
        self.chunker.validate().map_err(|why| bad("chunker", why))?;
        for (field, level) in [
            ("compression-level", self.compression_level),
            ("image-compression-level", self.image_compression_level),
        ] {
            if !(0..=19).contains(&level) {
                return Err(bad(field, format!("{level} is not 0 to 19")));
            }
        }
        if !(4 << 10..=1 << 30).contains(&self.pack_size) {
            return Err(bad(
                "pack-size",
                format!("{} is not between 4 KiB and 1 GiB", self.pack_size),
            ));
        }
        if self.repo_id.len() != 32 || !self.repo_id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad("repo-id", "not 32 hex digits".into()));
        }
        if let Some(lock) = &self.object_lock {
            if lock.days == 0 || !(lock.mode == "compliance" || lock.mode == "governance") {
                return Err(bad(
                    "object-lock",
                    "needs days > 0 and mode compliance or governance".into(),
                ));
            }
        }
        Ok(())
    }

    /// # Errors
    /// An integrity error when the object is not a labctl config.
    pub fn decode(bytes: &[u8]) -> Result<RepoConfig, LabError> {
        let body = format::strip_header(bytes, MAGIC_CONFIG, "config")?;
        serde_json::from_slice(body)
            .map_err(|e| LabError::integrity(format!("config: malformed ({e})")))
    }
}
