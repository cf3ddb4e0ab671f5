//! Repository checks.
//!
//! `check` (backup key is enough): every index fragment decrypts; every
//! indexed pack exists with the recorded size; every chunk referenced by a
//! snapshot is indexed and its pack exists; the catalog agrees with the
//! index; packs no index lists are reported (left by interrupted backups).
//!
//! `check --read-data[-subset]` (restore key): downloads packs, verifies the
//! pack hash, then decrypts, decompresses and re-hashes every blob. Damage is
//! reported by pack and blob, and mapped to the snapshots and files it affects.

use crate::repo::blob::{self, BlobKind};
use crate::repo::pack::PackEntry;
use crate::repo::tree::{ContentRef, NodeType};
use crate::repo::{format, index, Id, Repository};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

/// Which packs to read with `--read-data`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ReadData {
    None,
    All,
    /// A percentage (0–100] of packs (deterministic per day, so repeated runs cover others).
    Subset(f64),
}

/// One damaged pack and what it affects.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Damage {
    pub pack: String,
    pub problem: String,
    pub blobs: Vec<String>,
    /// snapshot id → affected file paths (or directories whose listing is lost).
    pub affected: BTreeMap<String, Vec<String>>,
}

/// The outcome of a check.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CheckReport {
    pub packs: u64,
    pub index_files: u64,
    pub snapshots: u64,
    pub packs_read: u64,
    pub blobs_verified: u64,
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
    pub damage: Vec<Damage>,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty() && self.damage.is_empty()
    }
}

/// Runs the check.
///
/// # Errors
/// Storage errors that stop the check itself, or a key error for
/// `--read-data` without the restore key. Problems found are in the report.
pub fn check(repo: &Repository, read: ReadData) -> crate::error::Result<CheckReport> {
    if read != ReadData::None {
        repo.keys.data_identity("check --read-data")?;
    }
    let mut rep = CheckReport::default();
    if repo.keys.config_hash.is_none() {
        rep.warnings.push(
            "the key file does not pin the repository config (it was made before labctl did): the config was validated, but a change to it in storage cannot be detected".into(),
        );
    }
    // Per-pack facts only; per-blob lookups go to the on-disk catalog, so
    // memory does not grow with the number of blobs.
    let listed: HashMap<Id, u64> = repo.list_packs()?;
    rep.packs = listed.len() as u64;

    // Index fragments against the listing: (pack size, blob count) per pack.
    let mut index_ids = vec![];
    repo.backend.list("index/", &mut |o| {
        if let Some(id) = o.name.strip_prefix("index/").and_then(Id::from_hex) {
            index_ids.push(id);
        }
    })?;
    rep.index_files = index_ids.len() as u64;
    let mut indexed: HashMap<Id, (u64, usize)> = HashMap::new();
    for id in &index_ids {
        let name = format::index_name(id);
        let bytes = match repo.backend.get(&name) {
            Ok(b) => b,
            Err(e) => {
                rep.errors.push(format!("{name}: {e}"));
                continue;
            }
        };
        match index::decode_named(&bytes, id, &repo.keys.meta_identity, &name) {
            Ok(packs) => {
                for p in packs {
                    match listed.get(&p.id) {
                        None => rep.errors.push(format!("pack {} is listed in {name} but missing from storage (`labctl repair index` drops it from the index and restores the second copy of its directory listings; a snapshot that lost data with it is named below)", p.id.hex())),
                        Some(&s) if s != p.size => rep.errors.push(format!(
                            "pack {} has {s} bytes in storage but {} in the index (truncated or damaged)",
                            p.id.hex(),
                            p.size
                        )),
                        _ => {}
                    }
                    indexed.insert(p.id, (p.size, p.entries.len()));
                }
            }
            Err(e) => rep.errors.push(e.to_string()),
        }
    }
    for id in listed.keys() {
        if indexed.contains_key(id) {
            continue;
        }
        if repo.catalog.is_marked(id)? {
            rep.warnings.push(format!(
                "pack {} is not in any index: prune marked it and is deleting it",
                id.hex()
            ));
        } else {
            rep.warnings.push(format!(
                "pack {} is not in any index (left by an interrupted backup; the next backup indexes and re-uses it, else prune marks it once it has been unindexed for an hour and the grace period, and deletes it after the grace period)",
                id.hex()
            ));
        }
    }
    // Catalog against index, pack by pack.
    let mut in_catalog = std::collections::HashSet::new();
    let mut stale = vec![];
    for (id, size, is_indexed) in repo.catalog.packs()? {
        in_catalog.insert(id);
        match indexed.get(&id) {
            Some(&(_, count)) if repo.catalog.pack_blob_count(&id)? != count => {
                rep.errors.push(format!(
                "catalog and index disagree on the blobs of pack {}; run `labctl catalog rebuild`",
                id.hex()
            ))
            }
            Some(_) => {}
            None if is_indexed => rep.errors.push(format!(
                "catalog lists pack {} that no index fragment holds; run `labctl catalog rebuild`",
                id.hex()
            )),
            // Unindexed and gone: a prune deleted it (perhaps killed before
            // it told the catalog). No fragment lists it, so nothing points
            // at it; a snapshot that needed it is reported below.
            None if !listed.contains_key(&id) => {
                stale.push(id);
                rep.warnings.push(format!(
                    "pack {} ({size} bytes), which no index lists, is gone from storage (deleted by a prune); dropped from the catalog",
                    id.hex()
                ))
            }
            None => {}
        }
    }
    repo.catalog.remove_packs(&stale)?;
    for id in indexed.keys().filter(|id| !in_catalog.contains(id)) {
        rep.errors.push(format!(
            "the catalog lacks indexed pack {}; run `labctl catalog rebuild`",
            id.hex()
        ));
    }

    for (id, json, noticed) in repo.catalog.vanished()? {
        let what = serde_json::from_str::<crate::repo::snapshot::Snapshot>(&json)
            .map(|s| format!("{} {} of {}", s.source.kind, s.source.name, s.time))
            .unwrap_or_default();
        rep.errors.push(format!(
            "snapshot {} ({what}) was in storage and is gone (noticed {noticed}), though no forget through this catalog removed it: deleted by a forget on another machine, or by someone with write access to storage. If a forget elsewhere explains it, acknowledge with `labctl catalog rebuild`",
            id.hex()
        ));
    }
    // Snapshots reference only indexed chunks whose pack is present.
    let snaps = repo.catalog.snapshots()?;
    rep.snapshots = snaps.len() as u64;
    let mut single_trees: HashSet<Id> = HashSet::new();
    for row in &snaps {
        let (_, chunks) = match repo.load_snapshot(&row.id) {
            Ok(x) => x,
            Err(e) => {
                rep.errors.push(format!("snapshot {}: {e:#}", row.id.hex()));
                continue;
            }
        };
        let mut missing = 0;
        for c in &chunks {
            let locs = repo.catalog.blob_locations(c)?;
            let stored = locs.iter().filter(|l| listed.contains_key(&l.pack)).count();
            if stored == 0 {
                missing += 1;
            } else if stored < crate::repo::TREE_COPIES
                && locs.first().is_some_and(|l| l.kind == BlobKind::Tree)
            {
                single_trees.insert(*c);
            }
        }
        if missing > 0 {
            rep.errors.push(format!(
                "snapshot {} references {missing} chunk(s) whose data is missing from the repository",
                row.id.hex()
            ));
        }
    }

    if !single_trees.is_empty() {
        rep.warnings.push(format!(
            "{} directory listing(s) have a single copy in storage (written before listings were stored twice, or a pack was lost); `labctl repair index` or the next prune writes the second",
            single_trees.len()
        ));
    }
    if read != ReadData::None {
        read_packs(repo, read, &indexed, &listed, &mut rep)?;
        check_file_sizes(repo, &snaps, &mut rep)?;
    }
    Ok(rep)
}

/// Every file's recorded size against the bytes its chunks hold (from the
/// index), over every snapshot's trees (a tree shared by snapshots is walked
/// once). Needs the DATA identity: trees are blobs.
fn check_file_sizes(
    repo: &Repository,
    snaps: &[crate::repo::catalog::SnapshotRow],
    rep: &mut CheckReport,
) -> crate::error::Result<()> {
    let mut seen: HashSet<Vec<Id>> = HashSet::new();
    for row in snaps {
        let Ok((s, _)) = repo.load_snapshot(&row.id) else {
            continue; // reported above
        };
        let mut failed = Ok(());
        walk_files(repo, s.root, &mut |visit| match visit {
            Visit::Dir(_, ids) => seen.insert(ids.to_vec()),
            Visit::Unreadable(dir, e) => {
                rep.errors.push(format!(
                    "snapshot {}: directory {dir}/ unreadable: {e:#}",
                    row.id.short()
                ));
                true
            }
            Visit::File(path, n) => {
                match crate::repo::extract::content_len(repo, &n.content) {
                    Ok(Some(len)) if len != n.size => rep.errors.push(format!(
                        "snapshot {}: {path} records {} bytes but its chunks hold {len}",
                        row.id.short(),
                        n.size
                    )),
                    Ok(_) => {}
                    Err(e) => failed = Err(e),
                }
                true
            }
        });
        failed?;
    }
    Ok(())
}

fn selected(id: &Id, read: ReadData) -> bool {
    match read {
        ReadData::None => false,
        ReadData::All => true,
        ReadData::Subset(pct) => {
            let day = (time::OffsetDateTime::now_utc().unix_timestamp() / 86400) as u64;
            let mut h = blake3::Hasher::new();
            h.update(&day.to_le_bytes());
            h.update(&id.0);
            let v = u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().unwrap());
            (v as f64 / u64::MAX as f64) * 100.0 < pct
        }
    }
}

fn read_packs(
    repo: &Repository,
    read: ReadData,
    indexed: &HashMap<Id, (u64, usize)>,
    listed: &HashMap<Id, u64>,
    rep: &mut CheckReport,
) -> crate::error::Result<()> {
    let identity = repo.keys.data_identity("check --read-data")?;
    let mut ids: Vec<Id> = indexed
        .keys()
        .filter(|id| listed.contains_key(id))
        .copied()
        .collect();
    ids.sort();
    // (pack, problems, damaged blobs)
    let mut damaged: Vec<(Id, Vec<String>, Vec<PackEntry>)> = vec![];
    for pack in ids.into_iter().filter(|id| selected(id, read)) {
        let name = format::pack_name(&pack);
        let bytes = match repo.backend.get(&name) {
            Ok(b) => b,
            Err(e) => {
                rep.errors.push(format!("{name}: {e}"));
                continue;
            }
        };
        rep.packs_read += 1;
        let mut problems = vec![];
        if Id::of_object(&bytes) != pack {
            problems.push("content does not match its name (pack hash mismatch)".to_string());
        }
        let mut bad_blobs = vec![];
        for e in repo.catalog.pack_entries(&pack)? {
            let end = e.offset as usize + e.length as usize;
            let what = format!("blob {} in pack {}", e.id.short(), pack.short());
            let ok = bytes.get(e.offset as usize..end).map(|c| {
                blob::decode(
                    c,
                    identity,
                    &repo.keys.dedup_key,
                    &e.id,
                    e.raw_len as usize,
                    &what,
                )
            });
            match ok {
                Some(Ok(_)) => rep.blobs_verified += 1,
                Some(Err(err @ crate::error::LabError::Key(_))) => return Err(err.into()),
                _ => bad_blobs.push(e),
            }
        }
        if !bad_blobs.is_empty() {
            problems.push(format!(
                "{} blob(s) fail to decrypt or verify",
                bad_blobs.len()
            ));
        }
        if !problems.is_empty() {
            damaged.push((pack, problems, bad_blobs));
        }
    }
    if damaged.is_empty() {
        return Ok(());
    }
    // What the damage touches, one snapshot's chunk list at a time.
    let bad_sets: Vec<HashSet<Id>> = damaged
        .iter()
        .map(|(_, _, b)| b.iter().map(|e| e.id).collect())
        .collect();
    let mut affected: Vec<BTreeMap<String, Vec<String>>> = vec![BTreeMap::new(); damaged.len()];
    for row in repo.catalog.snapshots()? {
        let Ok((_, chunks)) = repo.load_snapshot(&row.id) else {
            continue;
        };
        for (i, bad) in bad_sets.iter().enumerate() {
            if chunks.iter().any(|c| bad.contains(c)) {
                affected[i].insert(row.id.hex(), affected_files(repo, &row.id, bad));
            }
        }
    }
    for ((pack, problems, bad_blobs), affected) in damaged.into_iter().zip(affected) {
        rep.damage.push(Damage {
            pack: pack.hex(),
            problem: problems.join("; "),
            blobs: bad_blobs
                .iter()
                .map(|e| {
                    format!(
                        "{} ({})",
                        e.id.hex(),
                        if e.kind == BlobKind::Tree {
                            "tree"
                        } else {
                            "data"
                        }
                    )
                })
                .collect(),
            affected,
        });
    }
    Ok(())
}

/// What [`walk_files`] shows its visitor.
enum Visit<'a> {
    /// A directory about to be read (`.` for the root); `false` skips it.
    Dir(&'a str, &'a [Id]),
    /// A directory whose listing could not be read.
    Unreadable(&'a str, crate::error::Error),
    /// A regular file, by its path from the root.
    File(&'a str, &'a crate::repo::tree::Node),
}

/// Walks a snapshot's trees depth-first, showing `visit` each directory
/// before it is read, each listing that cannot be read, and each file.
fn walk_files(repo: &Repository, root: Vec<Id>, visit: &mut dyn FnMut(Visit) -> bool) {
    let mut stack = vec![(String::new(), root)];
    while let Some((prefix, ids)) = stack.pop() {
        let dir = if prefix.is_empty() {
            "."
        } else {
            prefix.as_str()
        };
        if !visit(Visit::Dir(dir, &ids)) {
            continue;
        }
        let tree = match repo.read_tree(&ids) {
            Ok(t) => t,
            Err(e) => {
                visit(Visit::Unreadable(dir, e));
                continue;
            }
        };
        for n in tree.nodes {
            let path = if prefix.is_empty() {
                n.name.clone()
            } else {
                format!("{prefix}/{}", n.name)
            };
            match n.node_type {
                NodeType::Dir => {
                    if let Some(sub) = n.subtree {
                        stack.push((path, sub));
                    }
                }
                NodeType::File => {
                    visit(Visit::File(&path, &n));
                }
                _ => {}
            }
        }
    }
}

/// Paths in a snapshot whose data or listing uses one of `bad`.
fn affected_files(repo: &Repository, snap: &Id, bad: &HashSet<Id>) -> Vec<String> {
    let mut out = BTreeSet::new();
    let Ok((s, _)) = repo.load_snapshot(snap) else {
        return vec!["(snapshot unreadable)".into()];
    };
    walk_files(repo, s.root, &mut |visit| match visit {
        Visit::Dir(dir, ids) => {
            // A damaged listing is reported as such, not walked.
            let damaged = ids.iter().any(|i| bad.contains(i));
            if damaged {
                out.insert(format!("{dir}/ (directory listing)"));
            }
            !damaged
        }
        Visit::Unreadable(dir, _) => {
            out.insert(format!("{dir}/ (directory listing unreadable)"));
            true
        }
        Visit::File(path, n) => {
            if n.content
                .iter()
                .any(|c| matches!(c, ContentRef::Chunk(id) if bad.contains(id)))
            {
                out.insert(path.to_string());
            }
            true
        }
    });
    out.into_iter().collect()
}

/// Deletes the catalog and reloads it from the repository.
///
/// # Errors
/// Storage, key or integrity errors.
pub fn rebuild_catalog(repo: &Repository) -> crate::error::Result<()> {
    repo.sync_index(true)?;
    for id in repo.catalog.snapshot_ids()? {
        repo.catalog.remove_snapshot(&id)?;
    }
    repo.catalog.clear_vanished()?;
    repo.sync_catalog()?;
    crate::repo::backup::adopt_orphan_packs(repo)?;
    Ok(())
}
