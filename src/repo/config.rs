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

    /// # Errors
    /// An integrity error when the object is not a labctl config.
    pub fn decode(bytes: &[u8]) -> Result<RepoConfig, LabError> {
        let body = format::strip_header(bytes, MAGIC_CONFIG, "config")?;
        serde_json::from_slice(body)
            .map_err(|e| LabError::integrity(format!("config: malformed ({e})")))
    }
}
