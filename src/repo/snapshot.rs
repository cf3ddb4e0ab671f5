//! Snapshot manifests (`snapshots/<id>`), readable with the META identity.
//!
//! Header `"LCSNAP" u16le(1)`, then an age message (META) whose plaintext is
//! `u32le(json length) | JSON | u64le(n) | n × chunk id [32]`. The JSON holds
//! what the design lists (source kind and name, host, time, tags, restore
//! point, source facts, root tree, summary); the trailing list names every
//! chunk the snapshot references, sorted and unique, so prune and check need
//! only META.

use crate::error::LabError;
use crate::repo::format::{self, MAGIC_SNAPSHOT};
use crate::repo::Id;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What was backed up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Source {
    /// `path`, `stream`, later `etcd`, `pvc`, `kube`, `mlflow`, `kubeflow`, `proxmox-vm`.
    pub kind: String,
    pub name: String,
}

/// Counters of one backup run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct BackupSummary {
    pub files_new: u64,
    pub files_changed: u64,
    pub files_unchanged: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Further names of files already recorded (hard links).
    #[serde(skip_serializing_if = "is_zero")]
    pub hardlinks: u64,
    /// FIFOs and device nodes recorded.
    #[serde(skip_serializing_if = "is_zero")]
    pub specials: u64,
    pub bytes_read: u64,
    pub bytes_total: u64,
    pub chunks_new: u64,
    pub bytes_new_raw: u64,
    /// Bytes added to the repository (compressed, encrypted, in packs).
    pub bytes_added: u64,
    pub packs_written: u64,
    /// Files that could not be read (the backup is incomplete: exit code 3).
    pub errors: Vec<String>,
    /// Files that changed while they were read, twice in a row: recorded as
    /// read (size and content agree), but not a consistent copy (exit code 3).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub changed: Vec<String>,
    /// Sockets, deliberately not backed up.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
    pub duration_ms: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl BackupSummary {
    /// Every file was read whole and unchanged: nothing is missing or torn.
    pub fn is_complete(&self) -> bool {
        self.errors.is_empty() && self.changed.is_empty()
    }
}

/// The snapshot JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Snapshot {
    pub version: u32,
    pub time: String,
    pub source: Source,
    pub host: String,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_point: Option<String>,
    #[serde(default)]
    pub facts: BTreeMap<String, serde_json::Value>,
    /// Chunks of the root tree.
    pub root: Vec<Id>,
    pub summary: BackupSummary,
    pub labctl_version: String,
}

/// Encrypts a snapshot; returns (id, bytes).
///
/// Takes the list so it is freed before encryption: a million-file
/// snapshot's list is 32 MiB, and the list, its plaintext and its
/// ciphertext need not all be held at once.
pub fn encode(snap: &Snapshot, chunks: Vec<Id>, meta: &age::x25519::Recipient) -> (Id, Vec<u8>) {
    let json = serde_json::to_vec(snap).expect("serializable");
    let mut plain = Vec::with_capacity(json.len() + 12 + chunks.len() * 32);
    plain.extend_from_slice(&(json.len() as u32).to_le_bytes());
    plain.extend_from_slice(&json);
    plain.extend_from_slice(&(chunks.len() as u64).to_le_bytes());
    for c in &chunks {
        plain.extend_from_slice(&c.0);
    }
    drop(chunks);
    format::seal_meta(MAGIC_SNAPSHOT, &plain, meta)
}

/// Decrypts a snapshot; returns the JSON part and the referenced chunks.
///
/// # Errors
/// Integrity or key errors naming `what`.
pub fn decode(
    bytes: &[u8],
    meta: &age::x25519::Identity,
    what: &str,
) -> Result<(Snapshot, Vec<Id>), LabError> {
    let plain = format::open_meta(bytes, MAGIC_SNAPSHOT, meta, what)?;
    let bad = || LabError::integrity(format!("{what}: malformed snapshot"));
    if plain.len() < 4 {
        return Err(bad());
    }
    let jl = u32::from_le_bytes(plain[..4].try_into().unwrap()) as usize;
    let json = plain.get(4..4 + jl).ok_or_else(bad)?;
    let snap: Snapshot = serde_json::from_slice(json)
        .map_err(|e| LabError::integrity(format!("{what}: malformed snapshot ({e})")))?;
    let rest = &plain[4 + jl..];
    if rest.len() < 8 {
        return Err(bad());
    }
    let n = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
    let ids = &rest[8..];
    if ids.len() != n.checked_mul(32).ok_or_else(bad)? {
        return Err(bad());
    }
    Ok((
        snap,
        ids.chunks_exact(32)
            .map(|c| Id::from_slice(c).unwrap())
            .collect(),
    ))
}
