//! Garbage collection: two-phase, lock-free, with a grace period.
//!
//! # Phases
//! 1. **Mark.** Packs whose blobs no snapshot references are marked for
//!    deletion. Packs with a large unused share are first **repacked**: their
//!    used blobs are copied as ciphertext into new packs (only the META key is
//!    needed: trailers and index are META, blobs are copied unread). Marks
//!    are stored in `prune/<id>` objects (META-sealed JSON: pack and time).
//!    Packs no index lists (a killed backup's) are marked the same way, and
//!    so are, in effect, its temporary files: `.tmp-*` files of a local
//!    repository and unfinished multipart uploads go once they are older
//!    than the grace period.
//! 2. **Sweep**, on a later run: a pack marked at least `grace` ago is deleted
//!    if it still holds no blob a snapshot needs; otherwise it is unmarked.
//!
//! # Why this is safe next to running backups
//! Backups never deduplicate against marked packs (the catalog loads marks
//! at open). A backup that deduplicated against a pack *before* it was marked
//! writes its snapshot before the grace period ends (backups must be shorter
//! than the grace period, 24 h by default), and the sweep recomputes the used
//! set from all snapshots, so that pack is unmarked instead of deleted.
//! Index fragments written by backups during a prune are never deleted: only
//! fragments listed when the prune started are consolidated.
//!
//! # Crash safety (kill -9 at any point)
//! Order: new packs → their index fragment → consolidated index → delete old
//! fragments → delete packs → write new marks → delete old marks. Each prefix
//! leaves a repository that passes `check` (at worst with unindexed packs,
//! which are warnings, or marks for packs already gone, which are dropped).

use crate::error::LabError;
use crate::repo::blob::BlobKind;
use crate::repo::catalog::BlobLocation;
use crate::repo::check::Spill;
use crate::repo::format::{self, MAGIC_PRUNE};
use crate::repo::index::IndexedPack;
use crate::repo::pack::{PackBuilder, PackEntry};
use crate::repo::{index, Id, Repository, TREE_COPIES};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use time::OffsetDateTime;

/// How long a pack must have been seen without an index before prune marks
/// it (at least; the grace period when longer). Backups index their packs at
/// least every [`crate::repo::backup::INDEX_FLUSH_INTERVAL`], well within it.
pub const ORPHAN_MIN_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Options for `labctl prune`.
#[derive(Debug, Clone)]
pub struct PruneOptions {
    /// How long a mark must stand before the pack is deleted.
    pub grace: time::Duration,
    /// Repack a pack when at least this share of its bytes is unused (0..=1).
    pub repack_threshold: f64,
    pub dry_run: bool,
    pub now: OffsetDateTime,
}

impl Default for PruneOptions {
    fn default() -> Self {
        PruneOptions {
            grace: time::Duration::hours(24),
            repack_threshold: 0.25,
            dry_run: false,
            now: OffsetDateTime::now_utc(),
        }
    }
}

/// What a prune did (or would do, with `dry_run`).
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PruneReport {
    pub snapshots: u64,
    pub packs: u64,
    pub packs_marked: Vec<String>,
    pub packs_repacked: Vec<String>,
    pub packs_written: Vec<String>,
    pub packs_deleted: Vec<String>,
    pub packs_unmarked: Vec<String>,
    /// Packs marked earlier whose grace period has not ended: (pack, deletable after).
    pub packs_waiting: Vec<(String, String)>,
    /// Packs no index lists (a killed backup's), not yet unindexed long
    /// enough to be marked: (pack, markable after).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub orphans_waiting: Vec<(String, String)>,
    pub bytes_deleted: u64,
    pub bytes_repacked: u64,
    pub index_files_replaced: u64,
    /// Marked packs kept because Object Lock still protects them (or an index fragment listing them).
    pub packs_locked: Vec<(String, String)>,
    /// Object Lock retention renewed on objects still referenced.
    pub locks_extended: u64,
    /// Unfinished multipart uploads older than the grace period, aborted.
    pub uploads_aborted: u64,
    /// Copies of directory listings written so that each has two (see
    /// [`crate::repo::TREE_COPIES`]): after repacks, and for repositories
    /// written before listings were stored twice or that lost a pack.
    pub tree_copies_written: u64,
    pub dry_run: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Mark {
    pack: Id,
    marked_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct MarkFile {
    version: u32,
    marks: Vec<Mark>,
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Reads every `prune/` object: (object names, pack → earliest mark time).
///
/// # Errors
/// Storage, key or integrity errors naming the object.
pub fn load_marks(
    repo: &Repository,
) -> crate::error::Result<(Vec<String>, BTreeMap<Id, OffsetDateTime>)> {
    let mut names = vec![];
    repo.backend.list("prune/", &mut |o| names.push(o.name))?;
    let mut marks: BTreeMap<Id, OffsetDateTime> = BTreeMap::new();
    for name in &names {
        let bytes = match repo.backend.get(name) {
            Ok(b) => b,
            // Deleted by a concurrent prune after we listed it.
            Err(crate::backend::BackendError::NotFound { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        let plain = format::open_meta(&bytes, MAGIC_PRUNE, &repo.keys.meta_identity, name)?;
        let file: MarkFile = serde_json::from_slice(&plain)
            .map_err(|e| LabError::integrity(format!("{name}: malformed ({e})")))?;
        for m in file.marks {
            let t =
                OffsetDateTime::parse(&m.marked_at, &time::format_description::well_known::Rfc3339)
                    .map_err(|_| {
                        LabError::integrity(format!("{name}: bad time {}", m.marked_at))
                    })?;
            let e = marks.entry(m.pack).or_insert(t);
            if t < *e {
                *e = t;
            }
        }
    }
    Ok((names, marks))
}

/// Runs prune.
///
/// # Errors
/// Storage, key or integrity errors. A failure leaves the repository
/// consistent (see the module docs); running prune again continues.
pub fn prune(repo: &Repository, opts: &PruneOptions) -> crate::error::Result<PruneReport> {
    if !(0.0..=1.0).contains(&opts.repack_threshold) {
        return Err(LabError::usage("the repack threshold must be between 0% and 100%").into());
    }
    let mut report = PruneReport {
        dry_run: opts.dry_run,
        ..Default::default()
    };
    let cat = &repo.catalog;
    let (old_mark_names, mut marks) = load_marks(repo)?;
    let mut start_index = vec![];
    repo.backend.list("index/", &mut |o| {
        if let Some(id) = o.name.strip_prefix("index/").and_then(Id::from_hex) {
            start_index.push(id);
        }
    })?;
    let listed = repo.list_packs()?;

    let snap_ids = load_used(repo)?;
    report.snapshots = snap_ids.len() as u64;
    let packs: Vec<(Id, u64)> = cat
        .packs()?
        .into_iter()
        .filter(|(_, _, indexed)| *indexed)
        .map(|(id, size, _)| (id, size))
        .collect();
    report.packs = packs.len() as u64;
    let absent: Vec<Id> = packs
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| !listed.contains_key(p))
        .collect();
    cat.set_absent(&absent)?;

    // Object Lock: locked objects are never deleted, and a pack stays while
    // a locked index fragment still lists it.
    let locked_index = locked_fragments(repo, &start_index, opts.now)?;
    let mut pinned: HashSet<Id> = HashSet::new();
    for id in &locked_index {
        let name = format::index_name(id);
        for p in index::decode(&repo.backend.get(&name)?, &repo.keys.meta_identity, &name)? {
            pinned.insert(p.id);
        }
    }

    // Sweep: marks past the grace period.
    let mut delete: Vec<(Id, u64)> = vec![];
    let sizes: BTreeMap<Id, u64> = packs.iter().copied().collect();
    for (pack, at) in marks.clone() {
        if !listed.contains_key(&pack) {
            marks.remove(&pack); // already gone
            continue;
        }
        if at + opts.grace > opts.now {
            report
                .packs_waiting
                .push((pack.hex(), rfc3339(at + opts.grace)));
            continue;
        }
        if cat.pack_holds_needed_blob(&pack)? {
            marks.remove(&pack);
            report.packs_unmarked.push(pack.hex());
        } else if let Some(until) = locked_until(repo, &format::pack_name(&pack), opts.now)? {
            report.packs_locked.push((pack.hex(), rfc3339(until)));
        } else if pinned.contains(&pack) {
            report
                .packs_locked
                .push((pack.hex(), "listed in a locked index fragment".into()));
        } else {
            delete.push((pack, sizes.get(&pack).copied().unwrap_or(0)));
        }
    }

    // Mark: unused packs, and repack mostly-unused ones. What each pack
    // holds is tallied in one pass over the catalog in ID order, where the
    // copies of a blob are adjacent.
    let mut tallies: HashMap<Id, Tally> = packs
        .iter()
        .filter(|(p, _)| !marks.contains_key(p) && listed.contains_key(p))
        .map(|(p, _)| (*p, Tally::default()))
        .collect();
    let mut group: Vec<(BlobLocation, bool)> = vec![];
    let mut group_id = None;
    // The used directory listings and their copies, for restore_tree_copies.
    let mut used_trees: Vec<(Id, BlobLocation)> = vec![];
    cat.blobs_with_use(&mut |id, loc, used| {
        if used && loc.kind == BlobKind::Tree {
            used_trees.push((id, loc));
        }
        if group_id != Some(id) {
            if let Some(g) = group_id {
                tally(repo, &g, &group, &listed, &mut tallies)?;
            }
            group.clear();
            group_id = Some(id);
        }
        group.push((loc, used));
        Ok(())
    })?;
    if let Some(g) = group_id {
        tally(repo, &g, &group, &listed, &mut tallies)?;
    }
    let mut repack_out: Vec<IndexedPack> = vec![];
    let mut builder = PackBuilder::new();
    for (pack, _) in &packs {
        let Some(t) = tallies.get(pack) else {
            continue; // marked already, or not in storage
        };
        if t.used == 0 {
            marks.insert(*pack, opts.now);
            report.packs_marked.push(pack.hex());
            continue;
        }
        let (total, unused) = (t.total, t.total - t.used_bytes);
        if total == 0 || (unused as f64 / total as f64) < opts.repack_threshold || unused == 0 {
            continue;
        }
        report.packs_repacked.push(pack.hex());
        report.bytes_repacked += t.used_bytes;
        if !opts.dry_run {
            let used = used_entries(repo, pack, &listed)?;
            if used.len() as u64 != t.used {
                return Err(anyhow::anyhow!(
                    "the catalog changed while prune was planning (pack {} holds {} blobs to keep, planned {}); nothing was deleted, run prune again",
                    pack.hex(),
                    used.len(),
                    t.used
                )
                .into());
            }
            let name = format::pack_name(pack);
            // Directory listings are copied by `restore_tree_copies` below,
            // which writes each copy a listing lacks into a different pack.
            for e in used.iter().filter(|e| e.kind != BlobKind::Tree) {
                let cipher = repo
                    .backend
                    .get_range(&name, e.offset as u64, e.length as u64)?;
                builder.add(e.kind, e.id, &cipher, e.raw_len);
                if builder.len() >= repo.config.pack_size as usize {
                    repack_out.push(write_pack(repo, std::mem::take(&mut builder))?);
                }
            }
        }
        marks.insert(*pack, opts.now);
        report.packs_marked.push(pack.hex());
    }
    // Packs no index lists (left by a killed backup): known to the catalog
    // through their trailers, as a backup adopts them, then marked like any
    // unused pack. A backup still running writes its index and snapshot
    // within the grace period, and the sweep then unmarks its packs.
    // A running backup indexes what it wrote at least every
    // INDEX_FLUSH_INTERVAL, so a pack this catalog has seen unindexed for
    // ORPHAN_MIN_AGE (and the grace period) belongs to no running backup,
    // whatever grace was asked for.
    // The adopted packs' copies of used listings count as the scan's do.
    for pack in crate::repo::backup::adopt_listed_packs(repo, &listed)? {
        used_trees.extend(cat.used_tree_locations_in(&pack)?);
    }
    used_trees.sort_by_key(|(id, _)| *id);
    let orphans: Vec<Id> = cat
        .unindexed_packs()?
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| listed.contains_key(p) && !marks.contains_key(p))
        .collect();
    let now = opts.now.unix_timestamp();
    let first_seen = cat.note_orphans(&orphans, now)?;
    let wait = opts
        .grace
        .whole_seconds()
        .max(ORPHAN_MIN_AGE.as_secs() as i64);
    for pack in orphans {
        let seen = first_seen.get(&pack).copied().unwrap_or(now);
        if seen + wait > now {
            report.orphans_waiting.push((
                pack.hex(),
                rfc3339(OffsetDateTime::from_unix_timestamp(seen + wait)?),
            ));
        } else if !cat.pack_holds_needed_blob(&pack)? {
            marks.insert(pack, opts.now);
            report.packs_marked.push(pack.hex());
        }
    }
    if !builder.is_empty() && !opts.dry_run {
        repack_out.push(write_pack(repo, builder)?);
    }
    let alive: HashSet<Id> = listed
        .keys()
        .filter(|p| !marks.contains_key(p))
        .copied()
        .collect();
    let (copies, written) = write_tree_copies(repo, &used_trees, &alive, opts.dry_run)?;
    report.tree_copies_written = copies;
    repack_out.extend(written);
    report.packs_written = repack_out.iter().map(|p| p.id.hex()).collect();
    report.packs_deleted = delete.iter().map(|(p, _)| p.hex()).collect();
    report.bytes_deleted = delete.iter().map(|(_, s)| s).sum();
    if opts.dry_run {
        cat.used_reset()?;
        return Ok(report);
    }

    // The repacked copies become visible before anything is marked or deleted.
    repo.publish_packs(&repack_out)?;
    if let Some(lock) = &repo.config.object_lock {
        report.locks_extended = extend_locks(repo, &packs, &marks, &snap_ids, lock.days, opts.now)?;
    }
    if !delete.is_empty() {
        report.index_files_replaced =
            consolidate_index(repo, &start_index, &delete, &locked_index)?;
        for (pack, _) in &delete {
            repo.backend.delete(&format::pack_name(pack))?;
            marks.remove(pack);
        }
        cat.remove_packs(&delete.iter().map(|(p, _)| *p).collect::<Vec<_>>())?;
    }
    // New marks first, then drop the old mark objects.
    let file = MarkFile {
        version: 1,
        marks: marks
            .iter()
            .map(|(p, t)| Mark {
                pack: *p,
                marked_at: rfc3339(*t),
            })
            .collect(),
    };
    let mut new_name = None;
    if !file.marks.is_empty() {
        let (id, bytes) = format::seal_meta(
            MAGIC_PRUNE,
            &serde_json::to_vec(&file)?,
            &repo.keys.meta_recipient(),
        );
        let name = format!("prune/{}", id.hex());
        if !old_mark_names.contains(&name) {
            repo.backend.put(&name, &bytes)?;
        }
        new_name = Some(name);
    }
    for name in &old_mark_names {
        if Some(name) != new_name.as_ref() {
            repo.backend.delete(name)?;
        }
    }
    cat.set_marks(&marks.keys().copied().collect::<Vec<_>>())?;
    cat.used_reset()?;
    report.uploads_aborted = abort_stale_uploads(repo, opts)?;
    Ok(report)
}

/// What prune keeps of a pack: its blobs' bytes, and how many of its blobs
/// (and their bytes) it keeps here.
#[derive(Default)]
struct Tally {
    total: u64,
    used: u64,
    used_bytes: u64,
}

/// Whether the copy of a used blob in `pack` is kept there: a blob stored in
/// this pack alone is kept when used (the pack is in storage); one with
/// other copies is kept in the packs [`keepers`] names.
fn kept_here(
    repo: &Repository,
    id: &Id,
    loc: &BlobLocation,
    stored_in: usize,
    listed: &HashMap<Id, u64>,
) -> crate::error::Result<bool> {
    Ok(stored_in == 1 || keepers(repo, id, loc.kind, listed)?.contains(&loc.pack))
}

/// Adds one blob's copies (`group`: every catalog row of `id`, with whether
/// it is used) to the tallies of the packs holding them. The rule is
/// [`kept_here`]'s, with [`keepers`] asked once per blob.
fn tally(
    repo: &Repository,
    id: &Id,
    group: &[(BlobLocation, bool)],
    listed: &HashMap<Id, u64>,
    tallies: &mut HashMap<Id, Tally>,
) -> crate::error::Result<()> {
    // (kind, keepers): the same ID as two kinds is possible (a file holding
    // a listing's exact bytes), each kind with its own number of copies.
    let mut kept: Option<(BlobKind, Vec<Id>)> = None;
    for (loc, used) in group {
        let Some(t) = tallies.get_mut(&loc.pack) else {
            continue;
        };
        t.total += loc.length as u64;
        if !*used {
            continue;
        }
        let here = group.len() == 1
            || match &kept {
                Some((kind, k)) if *kind == loc.kind => k.contains(&loc.pack),
                _ => kept
                    .insert((loc.kind, keepers(repo, id, loc.kind, listed)?))
                    .1
                    .contains(&loc.pack),
            };
        if here {
            t.used += 1;
            t.used_bytes += loc.length as u64;
        }
    }
    Ok(())
}

/// The blobs of `pack` that prune keeps, read pack by pack: what a repack
/// copies (the same rule as [`tally`], which planned it).
fn used_entries(
    repo: &Repository,
    pack: &Id,
    listed: &HashMap<Id, u64>,
) -> crate::error::Result<Vec<PackEntry>> {
    let mut used = vec![];
    for (e, is_used, stored_in) in repo.catalog.pack_entries_with_use(pack)? {
        let loc = BlobLocation {
            pack: *pack,
            kind: e.kind,
            offset: e.offset,
            length: e.length,
            raw_len: e.raw_len,
        };
        if is_used && kept_here(repo, &e.id, &loc, stored_in as usize, listed)? {
            used.push(e);
        }
    }
    Ok(used)
}

/// How many copies of a blob of `kind` a repository keeps.
fn copies(kind: BlobKind) -> usize {
    match kind {
        BlobKind::Tree => TREE_COPIES,
        _ => 1,
    }
}

/// The packs whose copies of a blob prune keeps: the first
/// [`copies`]`(kind)` packs in storage holding it, unmarked ones first.
fn keepers(
    repo: &Repository,
    id: &Id,
    kind: BlobKind,
    listed: &HashMap<Id, u64>,
) -> crate::error::Result<Vec<Id>> {
    Ok(repo
        .catalog
        .blob_locations(id)?
        .into_iter()
        .map(|l| l.pack)
        .filter(|p| listed.contains_key(p))
        .take(copies(kind))
        .collect())
}

/// Fills the catalog's used set from every snapshot's chunk list (META
/// only; on disk, not in memory). Returns the snapshots read.
///
/// Each snapshot's list is sorted; they are spilled to a temporary file and
/// merged into one ascending stream of distinct IDs, inserted in that
/// order. (Inserting every snapshot's references as they came, three per
/// blob into a B-tree in random order, was 5.4 of the 14 s of a
/// million-blob prune's planning.)
///
/// # Errors
/// Storage, key or integrity errors naming the snapshot.
pub fn load_used(repo: &Repository) -> crate::error::Result<Vec<Id>> {
    let cat = &repo.catalog;
    cat.used_reset()?;
    let mut snap_ids = vec![];
    repo.backend.list("snapshots/", &mut |o| {
        if let Some(id) = o.name.strip_prefix("snapshots/").and_then(Id::from_hex) {
            snap_ids.push(id);
        }
    })?;
    let mut spill = Spill::new(cat.path())?;
    let mut lists = vec![];
    for id in &snap_ids {
        let (_, mut chunks) = repo.load_snapshot(id)?;
        // Written sorted; an unsorted list is not trusted to be.
        if !chunks.is_sorted() {
            chunks.sort_unstable();
        }
        lists.push((spill.write(&chunks)?, chunks.len()));
    }
    cat.begin_temp()?;
    let mut batch = Vec::with_capacity(USED_BATCH);
    merge_sorted(&spill, &lists, merge_block(lists.len()), &mut |id| {
        batch.push(id);
        if batch.len() == USED_BATCH {
            cat.used_add(&batch)?;
            batch.clear();
        }
        Ok(())
    })?;
    cat.used_add(&batch)?;
    cat.commit()?;
    Ok(snap_ids)
}

const USED_BATCH: usize = 1 << 14;

/// IDs per list read at a time by [`merge_sorted`]: ~16 MiB of blocks in all.
fn merge_block(lists: usize) -> usize {
    ((16 << 20) / 32 / lists.max(1)).clamp(64, 1 << 15)
}

/// Calls `each` with every ID of the sorted `lists` (where each starts in
/// `spill`, and its length) once, in ascending order: a k-way merge reading
/// each list `block` IDs at a time.
fn merge_sorted(
    spill: &Spill,
    lists: &[(u64, usize)],
    block: usize,
    each: &mut dyn FnMut(Id) -> crate::error::Result<()>,
) -> crate::error::Result<()> {
    use std::cmp::Reverse;
    // Per list: its block, the position in it, and where the block starts.
    let mut cursors: Vec<(Vec<Id>, usize, usize)> = lists
        .iter()
        .map(|&(at, len)| Ok((spill.read(at, 0, len.min(block))?, 0, 0)))
        .collect::<crate::error::Result<_>>()?;
    // Ordered by the IDs' first 8 bytes as a number first: a `memcmp` of
    // whole IDs per comparison was a tenth of the planning.
    let key = |id: &Id| u64::from_be_bytes(id.0[..8].try_into().unwrap());
    let mut heap = std::collections::BinaryHeap::new();
    for (k, c) in cursors.iter().enumerate() {
        if let Some(id) = c.0.first() {
            heap.push(Reverse((key(id), *id, k)));
        }
    }
    let mut last = None;
    while let Some(Reverse((_, id, k))) = heap.pop() {
        if last != Some(id) {
            each(id)?;
            last = Some(id);
        }
        let (at, len) = lists[k];
        let c = &mut cursors[k];
        c.1 += 1;
        if c.1 == c.0.len() {
            c.2 += c.0.len();
            c.0 = if c.2 < len {
                spill.read(at, c.2, len.min(c.2 + block))?
            } else {
                vec![]
            };
            c.1 = 0;
        }
        if let Some(next) = c.0.get(c.1) {
            heap.push(Reverse((key(next), *next, k)));
        }
    }
    Ok(())
}

/// Writes, for every used directory listing (the used set must be loaded,
/// see [`load_used`]) held by fewer than [`TREE_COPIES`] of the packs in
/// `alive`, the copies it lacks, each into a different new pack. The
/// ciphertext is copied unread from any stored copy (META key only).
/// Returns how many copies were (or, with `dry_run`, would be) written, and
/// the packs written, not yet indexed: the caller indexes them.
///
/// # Errors
/// Storage errors; a listing no stored pack holds is left for `check`.
pub fn restore_tree_copies(
    repo: &Repository,
    alive: &HashSet<Id>,
    dry_run: bool,
) -> crate::error::Result<(u64, Vec<IndexedPack>)> {
    write_tree_copies(repo, &repo.catalog.used_tree_locations()?, alive, dry_run)
}

/// [`restore_tree_copies`] given the used listings' copies (`rows`, grouped
/// by listing).
fn write_tree_copies(
    repo: &Repository,
    rows: &[(Id, BlobLocation)],
    alive: &HashSet<Id>,
    dry_run: bool,
) -> crate::error::Result<(u64, Vec<IndexedPack>)> {
    let mut builders: Vec<PackBuilder> = (0..TREE_COPIES).map(|_| PackBuilder::new()).collect();
    let (mut out, mut count) = (vec![], 0u64);
    for group in rows.chunk_by(|a, b| a.0 == b.0) {
        let blob = group[0].0;
        let have = group
            .iter()
            .filter(|(_, l)| alive.contains(&l.pack))
            .count();
        if have >= TREE_COPIES {
            continue;
        }
        let want = TREE_COPIES - have;
        count += want as u64;
        if dry_run {
            continue;
        }
        let mut cipher = None;
        for (_, loc) in group {
            if let Ok(bytes) = repo.backend.get_range(
                &format::pack_name(&loc.pack),
                loc.offset as u64,
                loc.length as u64,
            ) {
                cipher = Some((bytes, loc.raw_len));
                break;
            }
        }
        let Some((bytes, raw_len)) = cipher else {
            count -= want as u64;
            continue; // every copy is gone: `check` names the snapshots
        };
        for b in builders.iter_mut().take(want) {
            b.add(BlobKind::Tree, blob, &bytes, raw_len);
        }
        if builders[0].len() >= repo.config.pack_size as usize {
            for b in builders.iter_mut() {
                if !b.is_empty() {
                    out.push(write_pack(repo, std::mem::take(b))?);
                }
            }
        }
    }
    for b in builders {
        if !b.is_empty() {
            out.push(write_pack(repo, b)?);
        }
    }
    Ok((count, out))
}

/// Aborts multipart uploads a crashed backup left unfinished (invisible to
/// readers, but stored and billed). A running backup's upload must survive,
/// so an upload goes only when the store says it started more than the grace
/// period ago *and* this catalog first saw it at least that long ago: some
/// stores report a fixed or wrong start time (moto says 2010 for all).
fn abort_stale_uploads(repo: &Repository, opts: &PruneOptions) -> crate::error::Result<u64> {
    let uploads = repo.backend.unfinished_uploads()?;
    let now = opts.now.unix_timestamp();
    let ids: Vec<String> = uploads.iter().map(|u| u.id.clone()).collect();
    let first_seen = repo.catalog.note_uploads(&ids, now)?;
    let mut grace = opts.grace.whole_seconds();
    if !repo.backend.is_remote() {
        // A local repository's `.tmp-*` files: one being written right now
        // is seconds old; an hour-old one is a killed process's.
        grace = grace.max(ORPHAN_MIN_AGE.as_secs() as i64);
    }
    let mut aborted = 0;
    for u in &uploads {
        let started = u
            .initiated
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs() as i64);
        let seen = first_seen.get(&u.id).copied().unwrap_or(now);
        if seen + grace <= now && started.is_none_or(|t| t + grace <= now) {
            repo.backend.abort_upload(u)?;
            aborted += 1;
        }
    }
    Ok(aborted)
}

fn write_pack(repo: &Repository, builder: PackBuilder) -> crate::error::Result<IndexedPack> {
    let (id, bytes, entries) = builder.finish(&repo.keys.meta_recipient());
    match repo.backend.put(&format::pack_name(&id), &bytes) {
        Ok(()) | Err(crate::backend::BackendError::AlreadyExists { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(IndexedPack {
        id,
        size: bytes.len() as u64,
        entries,
    })
}

/// Replaces the index fragments listed at the start with one fragment that
/// lists their packs minus the deleted ones. Returns how many were replaced.
pub(crate) fn consolidate_index(
    repo: &Repository,
    start: &[Id],
    delete: &[(Id, u64)],
    locked: &HashSet<Id>,
) -> crate::error::Result<u64> {
    let cat = &repo.catalog;
    let gone: HashSet<Id> = delete.iter().map(|(p, _)| *p).collect();
    // Written in fragments of at most MAX_FRAGMENT_BLOBS entries, each
    // built from the catalog as it goes: one fragment of a whole large
    // repository would have to be held in memory by every later reader.
    let mut written = HashSet::new();
    let mut keep: Vec<IndexedPack> = vec![];
    let mut blobs = 0;
    let mut flush = |keep: &mut Vec<IndexedPack>| -> crate::error::Result<()> {
        let id = repo.write_fragment(keep)?;
        cat.atomically(|| {
            cat.add_index_file(&id)?;
            cat.mark_indexed(&keep.iter().map(|p| p.id).collect::<Vec<_>>(), &id)
        })?;
        written.insert(id);
        keep.clear();
        Ok(())
    };
    for (pack, size) in cat.packs_in_index_files(start)? {
        if gone.contains(&pack) {
            continue;
        }
        let entries = cat.pack_entries(&pack)?;
        if index::overflows(keep.len(), blobs, entries.len()) {
            flush(&mut keep)?;
            blobs = 0;
        }
        blobs += entries.len();
        keep.push(IndexedPack {
            id: pack,
            size,
            entries,
        });
    }
    if !keep.is_empty() {
        flush(&mut keep)?;
    }
    // The deleted packs are in no fragment from here on: a kill before they
    // go leaves them unindexed (and marked), which check reports as a
    // warning and the next prune finishes.
    cat.mark_unindexed(&gone.iter().copied().collect::<Vec<_>>())?;
    let mut replaced = 0;
    for id in start {
        if written.contains(id) || locked.contains(id) {
            continue;
        }
        repo.backend.delete(&format::index_name(id))?;
        cat.remove_index_file(id)?;
        replaced += 1;
    }
    Ok(replaced)
}

/// The lock end of an object when it is still in the future.
fn locked_until(
    repo: &Repository,
    name: &str,
    now: OffsetDateTime,
) -> crate::error::Result<Option<OffsetDateTime>> {
    Ok(repo.backend.locked_until(name)?.filter(|t| *t > now))
}

pub(crate) fn locked_fragments(
    repo: &Repository,
    start: &[Id],
    now: OffsetDateTime,
) -> crate::error::Result<HashSet<Id>> {
    let mut out = HashSet::new();
    if repo.config.object_lock.is_none() {
        return Ok(out);
    }
    for id in start {
        if locked_until(repo, &format::index_name(id), now)?.is_some() {
            out.insert(*id);
        }
    }
    Ok(out)
}

/// Renews the lock of packs still in use and of snapshots when less than
/// half of the retention is left, so what is referenced stays protected.
fn extend_locks(
    repo: &Repository,
    packs: &[(Id, u64)],
    marks: &BTreeMap<Id, OffsetDateTime>,
    snaps: &[Id],
    days: u32,
    now: OffsetDateTime,
) -> crate::error::Result<u64> {
    let threshold = now + time::Duration::days(days as i64) / 2;
    let mut names: Vec<String> = packs
        .iter()
        .filter(|(p, _)| !marks.contains_key(p))
        .map(|(p, _)| format::pack_name(p))
        .collect();
    names.extend(snaps.iter().map(format::snapshot_name));
    let mut extended = 0;
    for name in names {
        let until = repo.backend.locked_until(&name)?;
        if until.is_none_or(|t| t < threshold) {
            repo.backend.extend_lock(&name)?;
            extended += 1;
        }
    }
    Ok(extended)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::testkit::{blob, put_snapshot, repo_of};

    #[test]
    fn merge_yields_each_id_once_in_order_across_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let mut spill = Spill::new(&dir.path().join("catalog")).unwrap();
        let mut want = std::collections::BTreeSet::new();
        let mut lists = vec![];
        for (from, to, step) in [(0, 50, 1), (25, 90, 3), (0, 0, 1), (40, 41, 1), (0, 90, 7)] {
            let mut ids: Vec<Id> = (from..to).step_by(step).map(blob).collect();
            ids.sort();
            want.extend(ids.iter().copied());
            lists.push((spill.write(&ids).unwrap(), ids.len()));
        }
        let want: Vec<Id> = want.into_iter().collect();
        for block in [1, 2, 3, 64] {
            let mut got = vec![];
            merge_sorted(&spill, &lists, block, &mut |i| {
                got.push(i);
                Ok(())
            })
            .unwrap();
            assert_eq!(got, want, "blocks of {block}");
        }
    }

    /// A used blob stored in two packs is kept in one (the first by pack
    /// ID: neither is marked), a listing in three packs in two; the packs
    /// left holding only such extra copies, or nothing used, are marked;
    /// a pack mostly unused is repacked; a listing stored once gets its
    /// second copy.
    #[test]
    fn extra_copies_are_kept_once_and_their_packs_marked() {
        let dir = tempfile::tempdir().unwrap();
        let entry = |kind, id, i: u32| PackEntry {
            kind,
            id,
            offset: 8 + 10 * i,
            length: 10,
            raw_len: 10,
        };
        let (dup, tree, single) = (blob(1000), blob(2000), blob(3000));
        let pack = |p: u8, entries: Vec<PackEntry>| IndexedPack {
            id: Id([p; 32]),
            size: 8 + 10 * entries.len() as u64,
            entries,
        };
        let data = |p: u8, ids: &[Id]| {
            pack(
                p,
                ids.iter()
                    .enumerate()
                    .map(|(i, id)| entry(BlobKind::Data, *id, i as u32))
                    .collect(),
            )
        };
        let tree_pack = |p: u8, t| pack(p, vec![entry(BlobKind::Tree, t, 0)]);
        let mut one: Vec<Id> = (0..10).map(blob).collect();
        one.push(dup);
        let packs = vec![
            data(1, &one),             // blobs 0..10 (0..5 used) and dup: kept
            data(2, &[dup, blob(20)]), // dup's second copy, 20 unused: marked
            tree_pack(3, tree),
            tree_pack(4, tree),
            tree_pack(5, tree), // the listing's third copy: marked
            data(6, &(30..40).map(blob).collect::<Vec<_>>()), // 30..32 used: repacked
            data(7, &[blob(50)]), // unused: marked
            tree_pack(8, single), // one copy: kept, and a second written
        ];
        let (repo, keys, backend) = repo_of(dir.path(), &packs);
        let mut chunks: Vec<Id> = (0..5).chain(30..32).map(blob).collect();
        chunks.extend([dup, tree, single]);
        put_snapshot(
            backend.as_ref(),
            &keys,
            "2026-12-06T00:00:00Z",
            tree,
            chunks,
        );
        repo.sync_catalog().unwrap();
        let hex = |p: u8| Id([p; 32]).hex();
        let sorted = |mut v: Vec<String>| {
            v.sort();
            v
        };
        let opts = PruneOptions {
            repack_threshold: 0.5,
            dry_run: true,
            ..Default::default()
        };
        let r = prune(&repo, &opts).unwrap();
        assert_eq!(
            sorted(r.packs_marked.clone()),
            vec![hex(2), hex(5), hex(6), hex(7)]
        );
        assert_eq!(r.packs_repacked, vec![hex(6)]);
        assert_eq!(r.bytes_repacked, 20);
        assert_eq!(r.tree_copies_written, 1);
        // For real: the repack copies the two used blobs of pack 6.
        let r = prune(
            &repo,
            &PruneOptions {
                dry_run: false,
                ..opts
            },
        )
        .unwrap();
        assert_eq!(sorted(r.packs_marked), vec![hex(2), hex(5), hex(6), hex(7)]);
        assert_eq!(r.tree_copies_written, 1);
        // The repacked blobs' pack first, then the listing's copy.
        assert_eq!(r.packs_written.len(), 2);
        let written = Id::from_hex(&r.packs_written[0]).unwrap();
        let mut copied: Vec<Id> = repo
            .catalog
            .pack_entries(&written)
            .unwrap()
            .iter()
            .map(|e| e.id)
            .collect();
        copied.sort();
        let mut want = vec![blob(30), blob(31)];
        want.sort();
        assert_eq!(copied, want);
    }
}
