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
    check_in_ranges(repo, read, RANGE_BLOBS)
}

/// [`check`], holding at most `range_blobs` catalog blobs at once.
fn check_in_ranges(
    repo: &Repository,
    read: ReadData,
    range_blobs: usize,
) -> crate::error::Result<CheckReport> {
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
    // Snapshots reference only indexed chunks whose pack is present. The
    // catalog's blobs are read in ranges of the ID space, each with one
    // ordered scan into a sorted list, and every snapshot's sorted chunk
    // list is merged against it: a lookup per reference was 3 µs of SQLite
    // (90 s for the 30 million references of a ten-million-blob
    // repository), and memory stays bounded by the range, not the repository.
    let snaps = repo.catalog.snapshots()?;
    rep.snapshots = snaps.len() as u64;
    let total: usize = indexed.values().map(|&(_, n)| n).sum();
    let ranges = id_ranges(total, range_blobs);
    let mut missing: HashMap<Id, u64> = HashMap::new();
    let mut single_trees = 0u64;
    // Whether each pack is in storage, and its blobs counted on the way
    // for the catalog check below.
    let catalog_packs = repo.catalog.packs()?;
    let mut facts = PackFacts::new(&listed, &catalog_packs);
    let mut snapshot_errors = vec![];
    // With several ranges, the first pass decrypts each snapshot once and
    // spills its sorted list to an unlinked temporary file beside the
    // catalog, noting where each range's part starts; later passes read
    // only their part (decrypting every snapshot on every pass was two
    // thirds of the time).
    let mut spill = (ranges.len() > 1)
        .then(|| Spill::new(repo.catalog.path()))
        .transpose()?;
    let mut parts: HashMap<Id, (u64, Vec<usize>)> = HashMap::new();
    for (pass, lo) in ranges.iter().enumerate() {
        let hi = ranges.get(pass + 1);
        let copies = repo
            .catalog
            .blob_copies_in_range(lo, hi, &mut |packs, stored| facts.rows_of(packs, stored))?;
        let keys: Vec<u64> = copies.iter().map(|x| id_key(&x.id)).collect();
        // A used directory listing with one copy left, counted once.
        let mut single = vec![false; copies.len()];
        for row in &snaps {
            let part: Vec<Id> = if pass == 0 {
                let mut chunks = match repo.load_snapshot(&row.id) {
                    Ok((_, chunks)) => chunks,
                    Err(e) => {
                        snapshot_errors.push(format!("snapshot {}: {e:#}", row.id.hex()));
                        continue;
                    }
                };
                // Written sorted; an unsorted list is not trusted to be.
                if !chunks.is_sorted() {
                    chunks.sort_unstable();
                }
                let mut bounds: Vec<usize> = ranges
                    .iter()
                    .map(|lo| chunks.partition_point(|c| c < lo))
                    .collect();
                bounds.push(chunks.len());
                if let Some(spill) = &mut spill {
                    parts.insert(row.id, (spill.write(&chunks)?, bounds.clone()));
                }
                chunks.truncate(bounds[1]);
                chunks
            } else {
                let Some((at, bounds)) = parts.get(&row.id) else {
                    continue; // unreadable: reported in the first pass
                };
                let spill = spill.as_ref().expect("several ranges spill");
                spill.read(*at, bounds[pass], bounds[pass + 1])?
            };
            let mut at = 0;
            let mut absent = 0;
            // Positions found a batch at a time from the keys, and the
            // entries there fetched ahead before their whole IDs are
            // compared: one entry per reference, each on its own cache
            // line, was a quarter of a ten-million-blob check.
            let mut found = Vec::with_capacity(64);
            for batch in part.chunks(64) {
                found.clear();
                for c in batch {
                    at = gallop(&keys, at, c);
                    found.push(at);
                    if let Some(x) = copies.get(at) {
                        prefetch(x);
                    }
                }
                for (c, &at) in batch.iter().zip(&found) {
                    let at = settle(&keys, &copies, at, c);
                    match copies.get(at) {
                        Some(x) if x.id == *c && x.stored > 0 => {
                            if x.tree
                                && (x.stored as usize) < crate::repo::TREE_COPIES
                                && !single[at]
                            {
                                single[at] = true;
                                single_trees += 1;
                            }
                        }
                        _ => absent += 1,
                    }
                }
            }
            if absent > 0 {
                *missing.entry(row.id).or_default() += absent;
            }
        }
    }
    // Catalog against index, pack by pack.
    let mut in_catalog = std::collections::HashSet::new();
    let mut stale = vec![];
    for (id, size, is_indexed) in catalog_packs {
        in_catalog.insert(id);
        match indexed.get(&id) {
            Some(&(_, count)) if facts.rows(&id) != count => rep.errors.push(format!(
                "catalog and index disagree on the blobs of pack {}; run `labctl catalog rebuild`",
                id.hex()
            )),
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
    for e in snapshot_errors {
        rep.errors.push(e);
    }
    for row in &snaps {
        if let Some(n) = missing.get(&row.id) {
            rep.errors.push(format!(
                "snapshot {} references {n} chunk(s) whose data is missing from the repository",
                row.id.hex()
            ));
        }
    }

    if single_trees > 0 {
        rep.warnings.push(format!(
            "{single_trees} directory listing(s) have a single copy in storage (written before listings were stored twice, or a pack was lost); `labctl repair index` or the next prune writes the second"
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

/// The first position at or after `from` whose key is not below `c`'s,
/// for IDs sorted ascending and `keys` their first 8 bytes as numbers
/// ([`id_key`]): an exponential then a binary search from `from`, so a
/// sorted run of lookups reads the keys nearly in order (a binary search
/// over the whole list per lookup missed the CPU cache each time). The
/// keys are a fifth of the entries' size and stay in the core's own cache;
/// searching the 40-byte entries themselves (a cache line per step, a
/// dozen steps per reference, and a `memcmp` call each) was over a third
/// of a ten-million-blob check. [`settle`] finishes the search where keys
/// tie.
fn gallop(keys: &[u64], from: usize, c: &Id) -> usize {
    let key = id_key(c);
    let (mut lo, mut step) = (from, 1);
    while lo + step < keys.len() && keys[lo + step] < key {
        lo += step;
        step *= 2;
    }
    let end = (lo + step + 1).min(keys.len());
    if lo >= end {
        return lo;
    }
    lo + keys[lo..end].partition_point(|&k| k < key)
}

/// From [`gallop`]'s position, the first whose whole ID is not below `c`.
fn settle(
    keys: &[u64],
    copies: &[crate::repo::catalog::BlobCopies],
    mut at: usize,
    c: &Id,
) -> usize {
    let key = id_key(c);
    while at < keys.len() && keys[at] == key && copies[at].id < *c {
        at += 1;
    }
    at
}

/// An ID's first 8 bytes as a number: ordered as the IDs are, up to ties.
fn id_key(id: &Id) -> u64 {
    u64::from_be_bytes(id.0[..8].try_into().unwrap())
}

/// What `check` learns of each pack from the catalog's blob rows: whether
/// storage holds it, and how many rows name it. It is asked once per row,
/// in blob ID order, so the packs come at random: at ten million blobs,
/// two hash maps keyed by the 32-byte ID (SipHash, and an entry out of
/// the CPU cache in each) were a third of `check`. This is one
/// open-addressing table of 128-bit ID prefixes with both facts in the
/// slot, 24 bytes a slot (12 MiB for 312,504 packs, within the last-level
/// cache), asked for a batch of rows at a time so the slots' loads
/// overlap. Pack IDs are BLAKE3 hashes, so no two known packs share a
/// prefix by chance; should two do, a map keyed by the whole ID serves
/// instead. A row naming a pack neither the listing nor the catalog's
/// pack table knows counts as not stored (unless its first 16 bytes are a
/// known pack's: a second preimage of a BLAKE3 prefix, 2^128 work).
struct PackFacts {
    slots: Vec<PackSlot>,
    shift: u32,
    seed: u64,
    exact: Option<HashMap<Id, PackSlot>>,
}

#[derive(Clone, Copy, Default)]
struct PackSlot {
    key: [u64; 2],
    rows: u32,
    /// 0: an empty slot; 1: a known pack storage lacks; 2: a stored pack.
    state: u32,
}

impl PackFacts {
    /// The packs in `listed` (in storage) and in `catalog` (as
    /// [`crate::repo::catalog::Catalog::packs`] returns them).
    fn new(listed: &HashMap<Id, u64>, catalog: &[(Id, u64, bool)]) -> PackFacts {
        let known: Vec<(Id, u32)> = listed
            .keys()
            .map(|id| (*id, 2))
            .chain(
                catalog
                    .iter()
                    .filter(|(id, _, _)| !listed.contains_key(id))
                    .map(|(id, _, _)| (*id, 1)),
            )
            .collect();
        let bits = (known.len() * 3 / 2)
            .max(16)
            .next_power_of_two()
            .trailing_zeros();
        let mut facts = PackFacts {
            slots: vec![PackSlot::default(); 1 << bits],
            shift: 64 - bits,
            seed: rand::random(),
            exact: None,
        };
        for (id, state) in &known {
            let key = Self::prefix(id);
            let at = facts.probe(facts.home(&key), &key);
            if facts.slots[at].state != 0 {
                // Two known packs share a prefix.
                let slot = |state| PackSlot {
                    state,
                    ..Default::default()
                };
                facts.exact = Some(known.iter().map(|(id, s)| (*id, slot(*s))).collect());
                facts.slots = vec![];
                break;
            }
            facts.slots[at] = PackSlot {
                key,
                rows: 0,
                state: *state,
            };
        }
        facts
    }

    fn prefix(id: &Id) -> [u64; 2] {
        let (a, b) = id.0[..16].split_at(8);
        [
            u64::from_le_bytes(a.try_into().unwrap()),
            u64::from_le_bytes(b.try_into().unwrap()),
        ]
    }

    /// The slot a probe for `key` starts at (seeded: crafted pack IDs
    /// cannot pile onto one run of slots).
    fn home(&self, key: &[u64; 2]) -> usize {
        ((key[0] ^ self.seed).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> self.shift) as usize
    }

    /// The slot holding `key`, or the empty one where it would go.
    fn probe(&self, mut at: usize, key: &[u64; 2]) -> usize {
        while self.slots[at].state != 0 && self.slots[at].key != *key {
            at = (at + 1) & (self.slots.len() - 1);
        }
        at
    }

    fn slot(&mut self, id: &Id, home: usize) -> Option<&mut PackSlot> {
        if self.exact.is_some() {
            return self.exact.as_mut().and_then(|e| e.get_mut(id));
        }
        let at = self.probe(home, &Self::prefix(id));
        Some(&mut self.slots[at]).filter(|s| s.state != 0)
    }

    /// Counts catalog rows naming `packs`; sets `stored` to whether storage
    /// holds each.
    fn rows_of(&mut self, packs: &[Id], stored: &mut Vec<bool>) {
        stored.clear();
        // The table's slots are fetched ahead (the whole-ID map has none).
        let homes: Vec<usize> = if self.exact.is_some() {
            vec![0; packs.len()]
        } else {
            let homes: Vec<usize> = packs.iter().map(|p| self.home(&Self::prefix(p))).collect();
            for &h in &homes {
                prefetch(&self.slots[h]);
            }
            homes
        };
        for (p, h) in packs.iter().zip(homes) {
            stored.push(self.slot(p, h).is_some_and(|s| {
                s.rows += 1;
                s.state == 2
            }));
        }
    }

    /// How many rows named `pack`.
    fn rows(&mut self, pack: &Id) -> usize {
        let home = self.home(&Self::prefix(pack));
        self.slot(pack, home).map_or(0, |s| s.rows as usize)
    }
}

/// Asks the CPU to bring `t`'s cache line in (a hint; nothing elsewhere).
fn prefetch<T>(t: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint: it reads nothing architecturally and
    // cannot fault; the pointer comes from a reference.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>((t as *const T).cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = t;
}

/// Snapshot chunk lists written once and read back by range: an unlinked
/// file beside the catalog (chunk IDs, which the catalog holds in the
/// clear anyway), gone when `check` (or prune's [`load_used`](crate::repo::prune::load_used))
/// ends however it ends.
pub(crate) struct Spill {
    file: std::fs::File,
    len: u64,
}

impl Spill {
    pub(crate) fn new(catalog: &std::path::Path) -> crate::error::Result<Spill> {
        let path = catalog.with_file_name(format!(
            "spill-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| anyhow::anyhow!("creating {}: {e}", path.display()))?;
        let _ = std::fs::remove_file(&path);
        Ok(Spill { file, len: 0 })
    }

    /// Appends `ids`; returns where they start.
    pub(crate) fn write(&mut self, ids: &[Id]) -> crate::error::Result<u64> {
        use std::io::Write;
        let at = self.len;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, &self.file);
        for id in ids {
            w.write_all(&id.0)?;
        }
        w.flush()?;
        self.len += 32 * ids.len() as u64;
        Ok(at)
    }

    /// The IDs `from..to` of the list written at `at`.
    pub(crate) fn read(&self, at: u64, from: usize, to: usize) -> crate::error::Result<Vec<Id>> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; 32 * (to - from)];
        self.file.read_exact_at(&mut buf, at + 32 * from as u64)?;
        Ok(buf
            .chunks_exact(32)
            .map(|c| Id::from_slice(c).unwrap())
            .collect())
    }
}

/// At most this many catalog blobs are held in memory at once by `check`
/// (about 2.5 MiB, and their keys 512 KiB, within a core's own cache while
/// every snapshot's part is merged against them; with 2,000,000, memory
/// bandwidth made the merge half of a ten-million-blob check, and with
/// 262,144 the keys' binary searches missed that cache).
const RANGE_BLOBS: usize = 1 << 16;

/// Splits the ID space into ranges holding about `per` of `total` blobs
/// each (IDs are hashes, so evenly spread); returns each range's lowest
/// ID. A range ends where the next begins, the last at the top.
fn id_ranges(total: usize, per: usize) -> Vec<Id> {
    let n = total.div_ceil(per).max(1) as u64;
    (0..n)
        .map(|i| {
            let mut id = [0u8; 32];
            id[..8].copy_from_slice(&((u64::MAX / n) * i).to_be_bytes());
            Id(id)
        })
        .collect()
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
            let what = || format!("blob {} in pack {}", e.id.short(), pack.short());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::catalog::BlobCopies;

    #[test]
    fn gallop_finds_the_first_id_not_below() {
        // IDs whose first 8 bytes are b, and the rest b, b+1 or b+3 (keys tie).
        let id = |head: u8, tail: u8| {
            let mut id = [tail; 32];
            id[..8].fill(head);
            Id(id)
        };
        let ids: Vec<BlobCopies> = (0..200u8)
            .step_by(3)
            .flat_map(|b| [id(b, b), id(b, b + 1), id(b, b + 3)])
            .map(|id| BlobCopies {
                id,
                stored: 1,
                tree: false,
            })
            .collect();
        let keys: Vec<u64> = ids.iter().map(|x| id_key(&x.id)).collect();
        for from in 0..ids.len() {
            for b in 0..=255u8 {
                for t in [
                    b.wrapping_sub(1),
                    b,
                    b.saturating_add(1),
                    b.saturating_add(2),
                ] {
                    let c = id(b, t);
                    let want = from + ids[from..].partition_point(|x| x.id < c);
                    let at = settle(&keys, &ids, gallop(&keys, from, &c), &c);
                    assert_eq!(at, want, "from {from}, id {b}/{t}");
                }
            }
        }
        assert_eq!(gallop(&[], 0, &Id([1; 32])), 0);
    }

    /// The same findings whether the catalog is read in one range or in
    /// many (the snapshot lists then come back from the spill file).
    #[test]
    fn many_ranges_find_what_one_range_finds() {
        use crate::repo::index::IndexedPack;
        use crate::repo::pack::PackEntry;
        use crate::repo::testkit::{blob, put_snapshot, repo_of};
        let dir = tempfile::tempdir().unwrap();
        // Ten packs of 20 blobs; pack 9 holds tree blobs, and only one
        // copy of each. The packs exist with their recorded sizes.
        let packs: Vec<IndexedPack> = (0..10u32)
            .map(|p| IndexedPack {
                id: Id([p as u8 + 1; 32]),
                size: 8 + 20 * 10,
                entries: (0..20)
                    .map(|i| PackEntry {
                        kind: if p == 9 {
                            BlobKind::Tree
                        } else {
                            BlobKind::Data
                        },
                        id: blob(p * 20 + i),
                        offset: 8 + 10 * i,
                        length: 10,
                        raw_len: 10,
                    })
                    .collect(),
            })
            .collect();
        let (repo, keys, backend) = repo_of(dir.path(), &packs);
        // Three snapshots: two whole, one referencing five chunks nobody stored.
        let snap = |n: usize, chunks: Vec<Id>| {
            put_snapshot(
                backend.as_ref(),
                &keys,
                &format!("2026-12-0{n}T00:00:00Z"),
                blob(180),
                chunks,
            )
        };
        snap(1, (0..200).map(blob).collect());
        snap(2, (50..190).map(blob).collect());
        let broken = snap(3, (150..205).map(blob).collect());
        repo.sync_catalog().unwrap();
        let one = check_in_ranges(&repo, ReadData::None, usize::MAX).unwrap();
        for per in [7, 23, 64] {
            let many = check_in_ranges(&repo, ReadData::None, per).unwrap();
            assert_eq!(many.errors, one.errors, "{per} per range");
            assert_eq!(many.warnings, one.warnings, "{per} per range");
        }
        assert_eq!(
            one.errors,
            vec![format!(
                "snapshot {} references 5 chunk(s) whose data is missing from the repository",
                broken.hex()
            )]
        );
        assert!(
            one.warnings
                .iter()
                .any(|w| w.starts_with("20 directory listing(s) have a single copy")),
            "{:?}",
            one.warnings
        );
    }

    /// The pack table answers as maps keyed by the whole ID would, with
    /// and without two known packs sharing a prefix (then the whole-ID
    /// map serves); unknown packs are not stored and count nowhere.
    #[test]
    fn pack_facts_answer_as_maps_of_whole_ids() {
        let id = |i: u32| Id(*blake3::hash(&i.to_le_bytes()).as_bytes());
        let mut twin = id(7);
        twin.0[31] ^= 1; // the same 128-bit prefix as pack 7
        for with_twin in [false, true] {
            let mut listed: HashMap<Id, u64> = (0..300).map(|i| (id(i), 1)).collect();
            // The catalog knows 200..400: 300..400 are not in storage.
            let catalog: Vec<(Id, u64, bool)> = (200..400).map(|i| (id(i), 1, true)).collect();
            if with_twin {
                listed.insert(twin, 1);
            }
            let mut facts = PackFacts::new(&listed, &catalog);
            assert_eq!(facts.exact.is_some(), with_twin);
            let mut want: HashMap<Id, usize> = HashMap::new();
            let rows: Vec<u32> = (0..500).chain(0..40).chain(250..350).collect();
            let mut stored = vec![];
            for batch in rows.chunks(37) {
                let packs: Vec<Id> = batch
                    .iter()
                    .map(|&i| {
                        if with_twin && i % 50 == 0 {
                            twin
                        } else {
                            id(i)
                        }
                    })
                    .collect();
                facts.rows_of(&packs, &mut stored);
                assert_eq!(stored.len(), packs.len());
                for (i, (p, s)) in batch.iter().zip(packs.iter().zip(&stored)) {
                    assert_eq!(*s, listed.contains_key(p), "pack {i}");
                    if listed.contains_key(p) || *i < 400 {
                        *want.entry(*p).or_default() += 1;
                    }
                }
            }
            for i in 0..500 {
                assert_eq!(
                    facts.rows(&id(i)),
                    want.get(&id(i)).copied().unwrap_or(0),
                    "{i}"
                );
            }
            if with_twin {
                assert_eq!(facts.rows(&twin), want[&twin]);
            }
        }
    }

    #[test]
    fn id_ranges_cover_the_id_space_in_order() {
        assert_eq!(id_ranges(0, RANGE_BLOBS), vec![Id([0; 32])]);
        let r = id_ranges(5 * RANGE_BLOBS + 1, RANGE_BLOBS);
        assert_eq!(r.len(), 6);
        assert_eq!(r[0], Id([0; 32]));
        for w in r.windows(2) {
            assert!(w[0] < w[1]);
        }
    }
}
