//! Restores snapshots into a directory or to a stream.
//!
//! # Pipeline
//! The calling thread walks the snapshot's trees and emits ordered
//! operations. Chunk fetches (range read, decrypt, decompress, re-hash) run on
//! worker threads; a writer thread takes operations strictly in order from a
//! bounded reorder window, so memory is bounded by the window × chunk size,
//! and (for a directory) hands each file to one of [`WRITER_LANES`] writer
//! threads, which write a file's operations in order.
//!
//! # Safety of the target
//! Without `overwrite`, a non-empty target is refused before anything is
//! written. A file whose path is free is created under its own name with
//! `O_EXCL` (nothing that appears there meanwhile is overwritten); where
//! something exists, the file is written to a temporary name beside it and
//! renamed over it only when complete and verified, so an existing file is
//! either left as it was or replaced whole — never half-overwritten. (Into
//! an empty target this saves a rename and a second directory entry per
//! file: 10% of a restore of many small files.) A file whose data cannot be
//! read (corrupted or missing pack) is removed again, reported and skipped;
//! the others are restored. While a restore runs, the target holds
//! [`INCOMPLETE_MARKER`]; it is removed when the restore ends, with or
//! without an error (a storage error also removes the file being written),
//! so only a restore that was killed leaves it, and the files it was
//! writing, behind.

mod by_pack;

use crate::error::LabError;
use crate::repo::catalog::BlobLocation;
use crate::repo::tree::{ContentRef, Node, NodeType};
use crate::repo::{read_blob_at, read_tree_blob_at, Id, Repository};
use crate::util::directio::DirectWriter;
use crate::util::progress::Progress;
use crossbeam_channel::{bounded, Receiver, Sender};
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Options for a restore into a directory.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Restore only these paths (relative, `/`-separated) and what is below them.
    pub include: Vec<String>,
    /// Allow a non-empty target; existing files are replaced whole.
    pub overwrite: bool,
    /// Fetch threads; 0 = the backend's request parallelism (at least 4).
    pub threads: usize,
    /// In which order to read the repository.
    pub read_order: ReadOrder,
    /// Pack order: stored bytes planned before reading starts (0 = the
    /// default, 64 MiB). Tests make it small to split packs across batches.
    pub batch_bytes: u64,
    /// Clear the setuid and setgid bits of restored files.
    pub no_setuid: bool,
}

/// In which order a directory restore reads the repository.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ReadOrder {
    /// Pack order on object stores, file order on local storage.
    #[default]
    Auto,
    /// Each pack once, blobs written to their files out of order: few large
    /// requests, the fastest on object stores.
    Pack,
    /// Files one after another, written sequentially (with `O_DIRECT` for
    /// large files): the fastest on local disks.
    File,
}

/// Where the directory walk sends regular files: each with the location
/// of every chunk of its content, in order (`None` for a zero run, or for
/// a chunk no index lists).
trait FileSink {
    fn file(
        &mut self,
        path: PathBuf,
        node: Node,
        locs: Vec<Option<BlobLocation>>,
    ) -> crate::error::Result<()>;
}

impl FileSink for Pipeline {
    fn file(
        &mut self,
        path: PathBuf,
        node: Node,
        locs: Vec<Option<BlobLocation>>,
    ) -> crate::error::Result<()> {
        let content = node.content.clone();
        self.op(Op::FileStart {
            path,
            node: Box::new(node),
        })?;
        self.content(&content, &locs)?;
        self.op(Op::FileEnd)
    }
}

/// Chunk locations the walk looked up for a run of a directory's entries.
type Located = std::collections::HashMap<Id, Option<BlobLocation>>;

/// Directory entries whose chunks are looked up together, in one read
/// transaction of the catalog (per-query locking was 6 `fcntl` calls per
/// small file).
const LOCATE_BATCH: usize = 1024;

/// Looks up every chunk of the regular files among `nodes`.
fn locate(repo: &Repository, nodes: &[Node]) -> crate::error::Result<Located> {
    let ids: Vec<Id> = nodes
        .iter()
        .filter(|n| n.node_type == NodeType::File)
        .flat_map(|n| &n.content)
        .filter_map(|c| match c {
            ContentRef::Chunk(id) => Some(*id),
            ContentRef::Zero { .. } => None,
        })
        .collect();
    repo.catalog.blob_many(ids)
}

/// The locations of `content`'s chunks, from `located` where it has them.
fn locations(
    repo: &Repository,
    content: &[ContentRef],
    located: &Located,
) -> crate::error::Result<Vec<Option<BlobLocation>>> {
    content
        .iter()
        .map(|c| match c {
            ContentRef::Zero { .. } => Ok(None),
            ContentRef::Chunk(id) => match located.get(id) {
                Some(loc) => Ok(*loc),
                None => repo.catalog.blob(id),
            },
        })
        .collect()
}

/// What a restore did.
#[derive(Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RestoreSummary {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// FIFOs and device nodes recreated.
    pub specials: u64,
    /// Hard links made to files restored under another name.
    pub hardlinks: u64,
    pub bytes: u64,
    /// Files that could not be restored, with the reason.
    pub failed: Vec<String>,
}

enum Op {
    FileStart { path: PathBuf, node: Box<Node> },
    Data(crate::error::Result<Vec<u8>>),
    Zero(u64),
    FileEnd,
}

/// Blobs fetched with one ranged read: neighbours in one pack.
type FetchGroup = Vec<(u64, Id, BlobLocation)>;

/// Most blobs and bytes one ranged read covers (with the 64 MiB window, about
/// 16 ranged reads are in flight).
const GROUP_BLOBS: usize = 512;
const GROUP_BYTES: u64 = 4 << 20;

/// The restore window, in two budgets: decoded chunk bytes in flight (in
/// units of 64 KiB; this bounds memory) and cheap control operations.
const UNIT: u64 = 64 << 10;
const DATA_UNITS: usize = 1024; // 64 MiB
const CTL_UNITS: usize = 8192;

/// What an operation holds of the window until the writer has applied it.
#[derive(Debug, Clone, Copy)]
enum Tok {
    Ctl,
    Data(u32),
}

fn units(loc: &BlobLocation) -> u32 {
    (loc.raw_len as u64).div_ceil(UNIT).max(1) as u32
}

/// The writer's side of the window: gives tokens back.
#[derive(Clone)]
struct Giver {
    data: Sender<()>,
    ctl: Sender<()>,
}

impl Giver {
    fn give(&self, tok: Tok) {
        match tok {
            Tok::Ctl => {
                let _ = self.ctl.send(());
            }
            Tok::Data(n) => {
                for _ in 0..n {
                    let _ = self.data.send(());
                }
            }
        }
    }
}

fn window() -> (Giver, Receiver<()>, Receiver<()>) {
    let (dtx, drx) = bounded(DATA_UNITS);
    let (ctx, crx) = bounded(CTL_UNITS);
    for _ in 0..DATA_UNITS {
        dtx.send(()).unwrap();
    }
    for _ in 0..CTL_UNITS {
        ctx.send(()).unwrap();
    }
    (
        Giver {
            data: dtx,
            ctl: ctx,
        },
        drx,
        crx,
    )
}

type OpMsg = (u64, Op, Tok);
/// Most bytes a group's read carries that none of its blobs needs (holes
/// between them, summed).
const GROUP_GAP: u64 = 64 << 10;

/// The fetch pool and ordered writer shared by both restore kinds.
///
/// Chunks that sit next to each other in a pack (as a backup wrote them)
/// are fetched with one ranged read — for object stores that is far fewer
/// requests than one per blob — and split and decoded by the worker.
struct Pipeline {
    seq: u64,
    data_credits: Receiver<()>,
    ctl_credits: Receiver<()>,
    fetch_tx: Option<Sender<FetchGroup>>,
    ops_tx: Option<Sender<OpMsg>>,
    workers: Vec<std::thread::JoinHandle<()>>,
    group: FetchGroup,
    /// Stored bytes of the blobs in `group`, and the part of the pack
    /// they span (see [`span`]).
    group_bytes: u64,
    group_span: (u64, u64),
}

/// The part of a pack a group's read covers: from its lowest blob's start
/// to its highest blob's end.
fn span(group: &FetchGroup) -> (u64, u64) {
    group.iter().fold((u64::MAX, 0), |(s, e), (_, _, loc)| {
        (
            s.min(loc.offset as u64),
            e.max(loc.offset as u64 + loc.length as u64),
        )
    })
}

fn fetch_group(
    backend: &dyn crate::backend::Backend,
    keys: &crate::repo::keys::Keys,
    group: &FetchGroup,
) -> Vec<(u64, crate::error::Result<Vec<u8>>)> {
    let first = group[0].2;
    if group.len() == 1 {
        return vec![(group[0].0, read_blob_at(backend, keys, &group[0].1, &first))];
    }
    let (start, end) = span(group);
    let name = crate::repo::format::pack_name(&first.pack);
    match backend.get_range(&name, start, end - start) {
        Ok(bytes) => group
            .iter()
            .map(|(seq, id, loc)| {
                let from = (loc.offset as u64 - start) as usize;
                let cipher = &bytes[from..from + loc.length as usize];
                let r = crate::repo::decode_blob(keys, "restore", id, loc, cipher);
                (*seq, r)
            })
            .collect(),
        // Fall back to blob-by-blob so one bad range names exactly the bad blobs.
        Err(_) => group
            .iter()
            .map(|(seq, id, loc)| (*seq, read_blob_at(backend, keys, id, loc)))
            .collect(),
    }
}

impl Pipeline {
    fn start(
        repo: &Repository,
        threads: usize,
        ops_tx: Sender<OpMsg>,
        data_credits: Receiver<()>,
        ctl_credits: Receiver<()>,
    ) -> Pipeline {
        let threads = if threads == 0 {
            repo.backend.parallelism().max(4)
        } else {
            threads
        };
        let (fetch_tx, fetch_rx) = bounded::<FetchGroup>(threads);
        let mut workers = vec![];
        for _ in 0..threads {
            let rx = fetch_rx.clone();
            let tx = ops_tx.clone();
            let backend = repo.backend.clone();
            let keys = repo.keys.clone();
            workers.push(std::thread::spawn(move || {
                for group in rx {
                    let toks: Vec<u32> = group.iter().map(|(_, _, loc)| units(loc)).collect();
                    for ((seq, r), n) in fetch_group(&*backend, &keys, &group).into_iter().zip(toks)
                    {
                        if tx.send((seq, Op::Data(r), Tok::Data(n))).is_err() {
                            return;
                        }
                    }
                }
            }));
        }
        Pipeline {
            seq: 0,
            data_credits,
            ctl_credits,
            fetch_tx: Some(fetch_tx),
            ops_tx: Some(ops_tx),
            workers,
            group: vec![],
            group_bytes: 0,
            group_span: (0, 0),
        }
    }

    fn flush_group(&mut self) -> crate::error::Result<()> {
        if self.group.is_empty() {
            return Ok(());
        }
        let group = std::mem::take(&mut self.group);
        self.group_bytes = 0;
        self.fetch_tx
            .as_ref()
            .unwrap()
            .send(group)
            .map_err(|_| anyhow::anyhow!("restore workers stopped").into())
    }

    /// Takes `tok` from the window. When the window is full, the pending
    /// group goes out first: the writer may be waiting for it.
    fn take(&mut self, tok: Tok) -> crate::error::Result<u64> {
        let (rx, n) = match tok {
            Tok::Ctl => (self.ctl_credits.clone(), 1),
            Tok::Data(n) => (self.data_credits.clone(), n),
        };
        for _ in 0..n {
            if rx.try_recv().is_err() {
                self.flush_group()?;
                rx.recv()
                    .map_err(|_| anyhow::anyhow!("restore writer stopped"))?;
            }
        }
        self.seq += 1;
        Ok(self.seq - 1)
    }

    fn op(&mut self, op: Op) -> crate::error::Result<()> {
        let s = self.take(Tok::Ctl)?;
        self.ops_tx
            .as_ref()
            .unwrap()
            .send((s, op, Tok::Ctl))
            .map_err(|_| anyhow::anyhow!("restore writer stopped"))?;
        Ok(())
    }

    /// Queues a chunk fetch, joining the pending group when it is the next
    /// neighbour in the same pack.
    fn fetch(&mut self, id: Id, loc: BlobLocation) -> crate::error::Result<()> {
        let s = self.take(Tok::Data(units(&loc)))?;
        let (from, to) = (loc.offset as u64, loc.offset as u64 + loc.length as u64);
        if let Some(first) = self.group.first() {
            // Blobs join in any order (a backup's encoder threads store
            // neighbouring files' chunks out of walk order) while the read
            // stays short and carries few bytes nobody asked for.
            let (start, end) = (self.group_span.0.min(from), self.group_span.1.max(to));
            let needed = self.group_bytes + loc.length as u64;
            let fits = loc.pack == first.2.pack
                && end - start <= GROUP_BYTES
                && (end - start).saturating_sub(needed) <= GROUP_GAP
                && self.group.len() < GROUP_BLOBS;
            if !fits {
                self.flush_group()?;
            }
        }
        if self.group.is_empty() {
            self.group_span = (from, to);
        }
        self.group_span = (self.group_span.0.min(from), self.group_span.1.max(to));
        self.group_bytes += loc.length as u64;
        self.group.push((s, id, loc));
        Ok(())
    }

    fn content(
        &mut self,
        content: &[ContentRef],
        locs: &[Option<BlobLocation>],
    ) -> crate::error::Result<()> {
        for (c, loc) in content.iter().zip(locs) {
            match c {
                ContentRef::Zero { zero } => self.op(Op::Zero(*zero))?,
                ContentRef::Chunk(id) => match *loc {
                    Some(loc) => self.fetch(*id, loc)?,
                    None => self.op(Op::Data(Err(LabError::integrity(format!(
                        "chunk {} is in no index fragment and no pack trailer in storage (its pack is missing)",
                        id.short()
                    ))
                    .into())))?,
                },
            }
        }
        Ok(())
    }

    fn close(mut self) {
        let _ = self.flush_group();
        self.fetch_tx = None;
        self.ops_tx = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Takes the window's operations in sequence order (workers finish out
/// of order), handing each with its token to `next`; stops at its first
/// error.
fn in_order(
    rx: Receiver<OpMsg>,
    mut next: impl FnMut(Op, Tok) -> crate::error::Result<()>,
) -> crate::error::Result<()> {
    let mut want = 0u64;
    let mut held: BTreeMap<u64, (Op, Tok)> = BTreeMap::new();
    for (seq, op, tok) in rx {
        held.insert(seq, (op, tok));
        while let Some((op, tok)) = held.remove(&want) {
            want += 1;
            next(op, tok)?;
        }
    }
    Ok(())
}

/// Applies the window's operations in order on this thread, giving each
/// token back once its operation is applied.
fn run_writer<F: FnMut(Op) -> crate::error::Result<()>>(
    rx: Receiver<OpMsg>,
    giver: Giver,
    mut apply: F,
) -> crate::error::Result<()> {
    in_order(rx, |op, tok| {
        let r = apply(op);
        giver.give(tok);
        r
    })
}

fn target_is_empty(target: &Path) -> crate::error::Result<bool> {
    match fs::read_dir(target) {
        Ok(mut rd) => Ok(rd.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(LabError::usage(format!("restore target {}: {e}", target.display())).into()),
    }
}

/// Whether the node at `rel` (a `/`-separated path from the snapshot
/// root, as bytes: names need not be UTF-8) is selected by `include`
/// paths (all when empty), and whether to descend into it:
/// `(take, descend)`.
pub fn included<P: AsRef<[u8]>>(rel: impl AsRef<[u8]>, include: &[P]) -> (bool, bool) {
    if include.is_empty() {
        return (true, true);
    }
    let rel = rel.as_ref();
    // `path` is strictly below `dir`.
    let below = |path: &[u8], dir: &[u8]| {
        path.len() > dir.len() && path.starts_with(dir) && path[dir.len()] == b'/'
    };
    let mut take = false;
    let mut descend = false;
    for inc in include {
        let inc = inc.as_ref();
        let start = inc.iter().position(|&b| b != b'/').unwrap_or(inc.len());
        let end = inc
            .iter()
            .rposition(|&b| b != b'/')
            .map_or(start, |i| i + 1);
        let inc = &inc[start..end];
        if rel == inc || below(rel, inc) {
            take = true;
            descend = true;
        } else if below(inc, rel) {
            descend = true;
        }
    }
    (take, descend)
}

/// Restores a snapshot into `target`.
///
/// # Errors
/// Refused for a non-empty target without `overwrite`; key errors without
/// the DATA identity. Files whose data is damaged are listed in
/// `summary.failed` (the CLI exits with code 4) while the rest restore.
pub fn restore_to_dir(
    repo: &Repository,
    snap_id: &Id,
    target: &Path,
    opts: &RestoreOptions,
    progress: Progress,
) -> crate::error::Result<RestoreSummary> {
    repo.keys.data_identity("restore")?;
    if !opts.overwrite && !target_is_empty(target)? {
        if target.join(INCOMPLETE_MARKER).is_file() {
            return Err(LabError::refused(format!(
                "restore target {} holds {INCOMPLETE_MARKER}: a restore into it was killed before it finished; pass --overwrite to restore over it (files are replaced whole)",
                target.display()
            ))
            .into());
        }
        return Err(LabError::refused(format!(
            "restore target {} is not empty; choose an empty directory or pass --overwrite (existing files are then replaced whole, never half-written)",
            target.display()
        ))
        .into());
    }
    let (snap, chunks) = repo.load_snapshot(snap_id)?;
    // Chunks no index fragment lists (one was deleted or damaged) are found
    // through their packs' trailers before anything is read.
    repo.ensure_indexed(&chunks)?;
    fs::create_dir_all(target).map_err(|e| {
        LabError::usage(format!(
            "cannot create restore target {}: {e}",
            target.display()
        ))
    })?;
    let root_tree = repo.read_tree(&snap.root)?;
    let marker = Marker::place(target, snap_id)?;
    let is_root = unsafe { libc::geteuid() } == 0;
    let mut walk = DirWalk {
        repo,
        opts,
        dirs: vec![],
        summary: RestoreSummary::default(),
        links: vec![],
        root: snap.root.clone(),
    };
    let by_pack = match opts.read_order {
        ReadOrder::Auto => repo.backend.is_remote(),
        ReadOrder::Pack => true,
        ReadOrder::File => false,
    };
    let mut summary = if by_pack {
        let mut sink = by_pack::PackOrder::new(repo, opts, is_root, progress.clone());
        match walk.tree(&mut sink, root_tree.nodes, target, "") {
            Ok(()) => sink.finish()?,
            Err(e) => {
                sink.abort();
                return Err(e);
            }
        }
    } else {
        restore_in_file_order(
            repo,
            opts,
            &mut walk,
            root_tree.nodes,
            target,
            is_root,
            &progress,
        )?
    };
    // Hard links once the files they name are in place.
    for (path, first) in &walk.links {
        let src = target.join(OsStr::from_bytes(first));
        let made = match fs::symlink_metadata(&src) {
            Ok(m) if m.is_file() => {
                let tmp = temp_name(path);
                fs::hard_link(&src, &tmp).and_then(|_| {
                    fs::rename(&tmp, path).inspect_err(|_| {
                        let _ = fs::remove_file(&tmp);
                    })
                })
            }
            _ => Err(std::io::Error::other(format!(
                "{} was not restored",
                String::from_utf8_lossy(first)
            ))),
        };
        match made {
            Ok(()) => summary.hardlinks += 1,
            Err(e) => summary.failed.push(format!(
                "{}: hard link to {} not made: {e}",
                path.display(),
                String::from_utf8_lossy(first)
            )),
        }
    }
    drop(marker);
    // Directory metadata last, deepest first, so file writes do not disturb mtimes.
    for (path, node) in walk.dirs.iter().rev() {
        apply_meta(path, node, is_root, false);
    }
    summary.dirs = walk.summary.dirs;
    summary.symlinks = walk.summary.symlinks;
    summary.specials = walk.summary.specials;
    summary.failed.extend(walk.summary.failed);
    progress.finish();
    Ok(summary)
}

/// Name of the file a directory restore keeps in its target while it runs.
pub const INCOMPLETE_MARKER: &str = ".labctl-restore-incomplete";

/// [`INCOMPLETE_MARKER`] in a target, and which file it is.
struct Marker {
    path: PathBuf,
    ino: u64,
}

impl Marker {
    /// Writes the marker (replacing one a killed restore left).
    fn place(target: &Path, snap: &Id) -> crate::error::Result<Marker> {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let path = target.join(INCOMPLETE_MARKER);
        let text = format!(
            "labctl is restoring snapshot {} here. If this file is still here, that restore did not finish: files may be missing or cut short. Restore again with --overwrite.\n",
            snap.hex()
        );
        // Never through a symlink someone left under that name (a restore
        // as root into a directory a user can write): refused instead.
        fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o644)
            .open(&path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .and_then(|_| fs::symlink_metadata(&path))
            .map(|m| Marker {
                ino: m.ino(),
                path: path.clone(),
            })
            .map_err(|e| LabError::storage(format!("writing {}: {e}", path.display())).into())
    }
}

impl Drop for Marker {
    /// Removes the marker, unless the restore replaced it with a file of
    /// the snapshot's own that has its name: when the restore ends, and
    /// when it returns an error (which says itself that it did not finish).
    /// A killed process does not get here.
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        if fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// The ordered pipeline: files one after another, each written sequentially.
fn restore_in_file_order(
    repo: &Repository,
    opts: &RestoreOptions,
    walk: &mut DirWalk,
    nodes: Vec<Node>,
    target: &Path,
    is_root: bool,
    progress: &Progress,
) -> crate::error::Result<RestoreSummary> {
    let (ops_tx, ops_rx) = crossbeam_channel::unbounded::<OpMsg>();
    let (giver, data_credits, ctl_credits) = window();
    let mut pipe = Pipeline::start(repo, opts.threads, ops_tx, data_credits, ctl_credits);
    let writer_progress = progress.clone();
    let writer = std::thread::spawn(move || {
        run_lanes(ops_rx, giver, WRITER_LANES, is_root, writer_progress)
    });
    let walk_result = walk.tree(&mut pipe, nodes, target, "");
    pipe.close();
    let summary = writer
        .join()
        .map_err(|_| anyhow::anyhow!("restore writer panicked"))??;
    walk_result?;
    Ok(summary)
}

/// Writer threads of a file-order restore. Creating a file (under its
/// directory's lock: the inode, the directory entry) and writing it were
/// the critical path of a restore of many small files with one writer;
/// with files handed out in turn, one lane writes and closes a file while
/// the other creates the next.
const WRITER_LANES: usize = 2;

/// Applies the window's operations in order, each file on one of `lanes`
/// writer threads: a file's operations all go, in order, to the lane its
/// start went to. The first error stops every lane (each removes the file
/// it was writing) and is returned; the lanes go on handing back the window
/// tokens of what is still queued, so the walk never waits for a token
/// that will not come.
fn run_lanes(
    rx: Receiver<OpMsg>,
    giver: Giver,
    lanes: usize,
    is_root: bool,
    progress: Progress,
) -> crate::error::Result<RestoreSummary> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let mut txs = vec![];
    let mut handles = vec![];
    for _ in 0..lanes.max(1) {
        let (tx, lane_rx) = crossbeam_channel::unbounded::<(Op, Tok)>();
        let (giver, stop) = (giver.clone(), stop.clone());
        let mut w = DirWriter {
            current: None,
            summary: RestoreSummary::default(),
            is_root,
            progress: progress.clone(),
        };
        handles.push(std::thread::spawn(move || {
            let mut failed = None;
            for (op, tok) in lane_rx {
                if failed.is_none() && !stop.load(Ordering::Relaxed) {
                    if let Err(e) = w.apply(op) {
                        failed = Some(e);
                        stop.store(true, Ordering::Relaxed);
                    }
                }
                giver.give(tok);
            }
            w.abort_current();
            failed.map_or(Ok(w.summary), Err)
        }));
        txs.push(tx);
    }
    drop(giver);
    let (mut lane, mut turn) = (0usize, 0usize);
    // Routing ends early only when a lane failed (`stop`) or is gone (it
    // panicked): the lanes' own results below say which.
    let _ = in_order(rx, |op, tok| {
        if matches!(op, Op::FileStart { .. }) {
            lane = turn % txs.len();
            turn += 1;
        }
        if txs[lane].send((op, tok)).is_err() || stop.load(Ordering::Relaxed) {
            return Err(anyhow::anyhow!("restore writers stopped").into());
        }
        Ok(())
    });
    drop(txs);
    let mut summary = RestoreSummary::default();
    let mut first_err = None;
    for h in handles {
        match h.join() {
            Ok(Ok(s)) => {
                summary.files += s.files;
                summary.bytes += s.bytes;
                summary.failed.extend(s.failed);
            }
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(_) => {
                first_err.get_or_insert(anyhow::anyhow!("restore writer panicked").into());
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    // The lanes' reports in a stable order, whatever lane each file took.
    summary.failed.sort();
    Ok(summary)
}

struct DirWalk<'a> {
    repo: &'a Repository,
    opts: &'a RestoreOptions,
    dirs: Vec<(PathBuf, Node)>,
    summary: RestoreSummary,
    /// Hard links to make once every file is in place: (path, first path
    /// relative to the restore root).
    links: Vec<(PathBuf, Vec<u8>)>,
    /// The snapshot's root tree (a link whose first name is left out of a
    /// partial restore is restored from it as a file).
    root: Vec<Id>,
}

impl DirWalk<'_> {
    /// Sends one regular file to the sink: without setuid/setgid bits when
    /// asked, and with its recorded size checked against its content.
    fn file(
        &mut self,
        pipe: &mut dyn FileSink,
        path: PathBuf,
        child_rel: &str,
        mut node: Node,
        located: &Located,
    ) -> crate::error::Result<()> {
        if self.opts.no_setuid {
            node.mode &= !0o6000;
        }
        let locs = locations(self.repo, &node.content, located)?;
        // Snapshots written before labctl recorded the bytes it read may
        // hold a stale size; the content is what was read. Both read orders
        // restore the content whole and say so, rather than cut or pad it.
        if let Some(len) = located_len(&node.content, &locs) {
            if len != node.size {
                self.summary.failed.push(format!(
                    "{child_rel}: the snapshot records {} bytes but the file's content holds {len}; restored the {len} bytes that were read",
                    node.size
                ));
                node.size = len;
            }
        }
        pipe.file(path, node, locs)
    }

    fn tree(
        &mut self,
        pipe: &mut dyn FileSink,
        nodes: Vec<Node>,
        dir: &Path,
        rel: &str,
    ) -> crate::error::Result<()> {
        let mut subtrees = Prefetch::new(self.repo, &nodes, &self.opts.include, rel);
        let mut nodes = nodes.into_iter();
        loop {
            let batch: Vec<Node> = nodes.by_ref().take(LOCATE_BATCH).collect();
            if batch.is_empty() {
                break;
            }
            let located = locate(self.repo, &batch)?;
            self.entries(pipe, batch, &located, &mut subtrees, dir, rel)?;
        }
        Ok(())
    }

    /// Restores a run of a directory's entries.
    fn entries(
        &mut self,
        pipe: &mut dyn FileSink,
        nodes: Vec<Node>,
        located: &Located,
        subtrees: &mut Prefetch,
        dir: &Path,
        rel: &str,
    ) -> crate::error::Result<()> {
        for node in nodes {
            let name_bytes = node.name_bytes();
            if !safe_name(&name_bytes) {
                self.summary
                    .failed
                    .push(format!("{rel}: unsafe name {:?} skipped", node.name));
                continue;
            }
            let name = OsStr::from_bytes(&name_bytes);
            let path = dir.join(name);
            let child_rel = if rel.is_empty() {
                node.name.clone()
            } else {
                format!("{rel}/{}", node.name)
            };
            let (take, descend) = included(&child_rel, &self.opts.include);
            match node.node_type {
                NodeType::Dir => {
                    if !descend {
                        continue;
                    }
                    match fs::symlink_metadata(&path) {
                        Ok(m) if m.is_dir() => {}
                        Ok(_) => {
                            self.summary.failed.push(format!(
                                "{child_rel}: exists and is not a directory; left as it is"
                            ));
                            continue;
                        }
                        Err(_) => fs::create_dir(&path).map_err(|e| {
                            LabError::storage(format!("creating {}: {e}", path.display()))
                        })?,
                    }
                    // Owner-writable while restoring; the real mode is applied at the end.
                    let _ = fs::set_permissions(&path, fs::Permissions::from_mode(0o700));
                    let sub = match node.subtree.as_deref() {
                        Some(ids) => subtrees
                            .take(self.repo, ids)
                            .map(Ok)
                            .unwrap_or_else(|| self.repo.read_tree(ids)),
                        None => Err(anyhow::anyhow!("directory without a tree").into()),
                    };
                    match sub {
                        Ok(t) => self.tree(pipe, t.nodes, &path, &child_rel)?,
                        Err(e) => self
                            .summary
                            .failed
                            .push(format!("{child_rel}/: directory listing unreadable: {e:#}")),
                    }
                    if take {
                        self.summary.dirs += 1;
                        self.dirs.push((path, node));
                    }
                }
                NodeType::Symlink if take => {
                    let target = node.target_bytes().unwrap_or_default();
                    if let Ok(m) = fs::symlink_metadata(&path) {
                        if m.is_dir() {
                            self.summary.failed.push(format!("{child_rel}: a directory is in the way of a symlink; left as it is"));
                            continue;
                        }
                    }
                    let tmp = temp_name(&path);
                    std::os::unix::fs::symlink(OsStr::from_bytes(&target), &tmp)
                        .and_then(|_| fs::rename(&tmp, &path))
                        .map_err(|e| {
                            LabError::storage(format!("creating symlink {}: {e}", path.display()))
                        })?;
                    apply_meta(&path, &node, unsafe { libc::geteuid() } == 0, true);
                    self.summary.symlinks += 1;
                }
                NodeType::Fifo | NodeType::Chardev | NodeType::Blockdev if take => {
                    match make_special(&path, &node) {
                        Ok(()) => {
                            apply_meta(&path, &node, unsafe { libc::geteuid() } == 0, false);
                            self.summary.specials += 1;
                        }
                        Err(why) => self.summary.failed.push(format!("{child_rel}: {why}")),
                    }
                }
                NodeType::File if take && node.hardlink.is_some() => {
                    let first = node.hardlink_bytes().unwrap_or_default();
                    if !first.split(|&b| b == b'/').all(safe_name) {
                        self.summary
                            .failed
                            .push(format!("{child_rel}: unsafe hard link target skipped"));
                    } else if included(
                        String::from_utf8_lossy(&first).as_bytes(),
                        &self.opts.include,
                    )
                    .0
                    {
                        self.links.push((path, first));
                    } else {
                        // Its first name is not part of this restore: the
                        // content goes here, as a file of its own.
                        match find_file(
                            self.repo,
                            &self.root,
                            Some(&String::from_utf8_lossy(&first)),
                        ) {
                            Ok(mut file) => {
                                file.name = node.name.clone();
                                file.name_hex = node.name_hex;
                                self.file(pipe, path, &child_rel, file, located)?
                            }
                            Err(e) => self.summary.failed.push(format!(
                                "{child_rel}: hard link to {} unreadable: {e:#}",
                                String::from_utf8_lossy(&first)
                            )),
                        }
                    }
                }
                NodeType::File if take => self.file(pipe, path, &child_rel, node, located)?,
                _ => {}
            }
        }
        Ok(())
    }
}

/// The trees of a directory's subdirectories, read ahead in parallel
/// batches (one round trip per batch instead of one per directory, which
/// matters on object stores); only the subdirectories the restore
/// descends into. A batch is read when the walk reaches its first
/// directory, so at most one batch per level is held: reading all of a
/// level at once held a thousand listings of a thousand files each
/// (~400 MiB) in a restore of a million files. `ls` reads ahead with it
/// too.
pub(crate) struct Prefetch {
    wanted: Vec<Vec<Id>>,
    next: usize,
    width: usize,
    ready: std::collections::HashMap<Vec<Id>, crate::repo::tree::Tree>,
}

impl Prefetch {
    fn new(repo: &Repository, nodes: &[Node], include: &[String], rel: &str) -> Prefetch {
        let wanted: Vec<Vec<Id>> = nodes
            .iter()
            .filter(|n| n.node_type == NodeType::Dir)
            .filter(|n| {
                let child = if rel.is_empty() {
                    n.name.clone()
                } else {
                    format!("{rel}/{}", n.name)
                };
                included(&child, include).1
            })
            .filter_map(|n| n.subtree.clone())
            .collect();
        Prefetch::of(repo, wanted)
    }

    /// Read-ahead of the trees `wanted`, in the order a walk will ask for them.
    pub(crate) fn of(repo: &Repository, wanted: Vec<Vec<Id>>) -> Prefetch {
        Prefetch {
            // One directory alone is read when the walk gets there.
            next: if wanted.len() < 2 { wanted.len() } else { 0 },
            wanted,
            width: repo.backend.parallelism().clamp(1, 16),
            ready: Default::default(),
        }
    }

    /// The tree `ids`, read with the batch it starts when not read yet
    /// (`None`: not read ahead, or unreadable; the caller reads it and
    /// reports the error).
    pub(crate) fn take(
        &mut self,
        repo: &Repository,
        ids: &[Id],
    ) -> Option<crate::repo::tree::Tree> {
        if !self.ready.contains_key(ids) {
            let start = self.wanted[self.next..]
                .iter()
                .position(|w| w[..] == *ids)?;
            let from = self.next + start;
            let to = (from + self.width).min(self.wanted.len());
            self.ready = prefetch_subtrees(repo, &self.wanted[from..to]);
            self.next = to;
        }
        self.ready.remove(ids)
    }
}

/// Reads the trees `wanted` in parallel.
fn prefetch_subtrees(
    repo: &Repository,
    wanted: &[Vec<Id>],
) -> std::collections::HashMap<Vec<Id>, crate::repo::tree::Tree> {
    let mut out = std::collections::HashMap::new();
    let width = repo.backend.parallelism().clamp(1, 16);
    let (backend, keys, small) = (&*repo.backend, &repo.keys, &repo.small_packs);
    for batch in wanted.chunks(width) {
        // Locations come from the catalog here; the reads run in parallel.
        let mut located = vec![];
        for ids in batch {
            let locs: Option<Vec<(Id, BlobLocation, u64)>> = ids
                .iter()
                .map(|id| {
                    let loc = repo.catalog.blob(id).ok().flatten()?;
                    let size = repo.catalog.pack_size(&loc.pack).ok().flatten()?;
                    Some((*id, loc, size))
                })
                .collect();
            // A missing blob is left to read_tree, which reports it during the walk.
            if let Some(l) = locs {
                located.push(((*ids).clone(), l));
            }
        }
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = located
                .iter()
                .map(|(_, locs)| {
                    s.spawn(move || -> crate::error::Result<crate::repo::tree::Tree> {
                        let mut json = vec![];
                        for (id, loc, size) in locs {
                            json.extend_from_slice(&read_tree_blob_at(
                                backend, keys, small, id, loc, *size,
                            )?);
                        }
                        Ok(serde_json::from_slice(&json)?)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("tree reader panicked").into()))
                })
                .collect()
        });
        for ((ids, _), r) in located.into_iter().zip(results) {
            // Errors are left to read_tree, which names the object.
            if let Ok(tree) = r {
                out.insert(ids, tree);
            }
        }
    }
    out
}

/// Whether a name from a snapshot is safe to create in a directory: not
/// empty, `.` or `..`, and without `/` or NUL.
fn safe_name(name: &[u8]) -> bool {
    !(name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0))
}

/// Recreates a FIFO or device node under a temporary name and renames it
/// into place (device nodes need root: refused otherwise, with the reason).
fn make_special(path: &Path, node: &Node) -> Result<(), String> {
    let (kind, dev) = match node.node_type {
        NodeType::Fifo => (libc::S_IFIFO, 0),
        NodeType::Chardev => (libc::S_IFCHR, node.rdev.unwrap_or(0)),
        NodeType::Blockdev => (libc::S_IFBLK, node.rdev.unwrap_or(0)),
        _ => return Err("not a special file".into()),
    };
    if kind != libc::S_IFIFO && unsafe { libc::geteuid() } != 0 {
        return Err("a device node; not restored (only root can create one)".into());
    }
    if fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
        return Err("a directory is in the way; left as it is".into());
    }
    let tmp = temp_name(path);
    let c = std::ffi::CString::new(tmp.as_os_str().as_bytes())
        .map_err(|_| "unsafe name".to_string())?;
    if unsafe { libc::mknod(c.as_ptr(), kind | 0o600, dev as libc::dev_t) } != 0 {
        return Err(format!(
            "cannot create it: {}",
            std::io::Error::last_os_error()
        ));
    }
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        format!("cannot put it in place: {e}")
    })
}

/// Creates a file to restore into: under `path` itself when nothing is
/// there (`O_EXCL`), else under a temporary name beside it (renamed over
/// `path` by [`put_in_place`]). Returns what `create` made and the name it
/// has.
///
/// # Errors
/// `create`'s error.
fn create_target<T>(
    path: &Path,
    create: impl Fn(&Path) -> std::io::Result<T>,
) -> std::io::Result<(T, PathBuf)> {
    match create(path) {
        Ok(made) => Ok((made, path.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let tmp = temp_name(path);
            create(&tmp).map(|made| (made, tmp))
        }
        Err(e) => Err(e),
    }
}

fn temp_name(path: &Path) -> PathBuf {
    let mut name = b".labctl-restore-".to_vec();
    name.extend_from_slice(format!("{:08x}-", rand::random::<u32>()).as_bytes());
    name.extend_from_slice(path.file_name().map(|n| n.as_bytes()).unwrap_or(b"x"));
    name.truncate(240);
    path.with_file_name(OsStr::from_bytes(&name))
}

struct OpenFile {
    tmp: PathBuf,
    path: PathBuf,
    node: Box<Node>,
    file: DirectWriter,
    error: Option<String>,
}

struct DirWriter {
    current: Option<OpenFile>,
    summary: RestoreSummary,
    is_root: bool,
    progress: Progress,
}

impl DirWriter {
    fn apply(&mut self, op: Op) -> crate::error::Result<()> {
        match op {
            Op::FileStart { path, node } => {
                let (file, tmp) = create_target(&path, |p| DirectWriter::create_new(p, node.size))
                    .map_err(|e| LabError::storage(format!("creating {}: {e}", path.display())))?;
                self.current = Some(OpenFile {
                    tmp,
                    path,
                    node,
                    file,
                    error: None,
                });
            }
            Op::Data(r) => {
                let cur = self.current.as_mut().expect("data inside a file");
                if cur.error.is_some() {
                    return Ok(());
                }
                match r {
                    Ok(d) => {
                        let n = d.len() as u64;
                        // All-zero data becomes a hole, whatever chunker stored it.
                        if d.len() >= crate::util::directio::HOLE_MIN
                            && crate::util::directio::is_zero(&d)
                        {
                            cur.file.zeros(n)
                        } else {
                            cur.file.write_vec(d)
                        }
                        .map_err(|e| {
                            LabError::storage(format!("writing {}: {e}", cur.tmp.display()))
                        })?;
                        self.progress.add(n);
                        self.summary.bytes += n;
                    }
                    Err(e) => cur.error = Some(format!("{e:#}")),
                }
            }
            Op::Zero(n) => {
                let cur = self.current.as_mut().expect("zero run inside a file");
                cur.file.zeros(n).map_err(|e| {
                    LabError::storage(format!("writing {}: {e}", cur.tmp.display()))
                })?;
                self.summary.bytes += n;
            }
            Op::FileEnd => {
                let cur = self.current.take().expect("file end after start");
                self.finish_file(cur)?;
            }
        }
        Ok(())
    }

    fn finish_file(&mut self, cur: OpenFile) -> crate::error::Result<()> {
        let (error, file) = match cur.error {
            Some(err) => (Some(err), None),
            None => {
                let file = cur.file.finish(cur.node.size).map_err(|e| {
                    let _ = fs::remove_file(&cur.tmp);
                    LabError::storage(format!("writing {}: {e}", cur.tmp.display()))
                })?;
                (None, Some(file))
            }
        };
        match put_in_place(
            Some(&cur.tmp),
            &cur.path,
            &cur.node,
            self.is_root,
            error,
            file,
        )? {
            Some(why) => self.summary.failed.push(why),
            None => self.summary.files += 1,
        }
        Ok(())
    }

    fn abort_current(&mut self) {
        if let Some(cur) = self.current.take() {
            let _ = fs::remove_file(&cur.tmp);
        }
    }
}

/// Finishes a restored file, for both read orders. `written` is the name
/// [`create_target`] gave it (`None`: never created). With `error` set, or
/// a directory in the way, the file is removed (it is this restore's own:
/// a new file or a temporary name) and the reason returned for the
/// summary; otherwise metadata is applied (through `file` when the caller
/// still holds it open, which saves three path lookups per file) and a
/// temporary name renamed over `path` (a failed rename removes the
/// temporary file and is a storage error).
fn put_in_place(
    written: Option<&Path>,
    path: &Path,
    node: &Node,
    is_root: bool,
    error: Option<String>,
    file: Option<fs::File>,
) -> crate::error::Result<Option<String>> {
    let (Some(tmp), None) = (written, &error) else {
        drop(file);
        if let Some(made) = written {
            let _ = fs::remove_file(made);
        }
        let err = error.unwrap_or_else(|| "the file was never created".into());
        return Ok(Some(format!("{}: not restored: {err}", path.display())));
    };
    match file {
        Some(f) => apply_meta_fd(&f, node, is_root),
        None => apply_meta(tmp, node, is_root, false),
    }
    if tmp == path {
        return Ok(None);
    }
    if let Err(e) = fs::rename(tmp, path) {
        let _ = fs::remove_file(tmp);
        // rename(2) will not replace a directory with a file.
        if e.kind() == std::io::ErrorKind::IsADirectory
            || fs::symlink_metadata(path).is_ok_and(|m| m.is_dir())
        {
            return Ok(Some(format!(
                "{}: a directory is in the way; left as it is",
                path.display()
            )));
        }
        return Err(LabError::storage(format!("renaming into {}: {e}", path.display())).into());
    }
    Ok(None)
}

/// Sets owner (as root), mode and mtime. Failures are ignored: a restore
/// by a normal user cannot chown.
fn apply_meta(path: &Path, node: &Node, is_root: bool, symlink: bool) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("no NUL in paths");
    if is_root {
        unsafe { libc::lchown(c.as_ptr(), node.uid, node.gid) };
    }
    if !symlink {
        let _ = fs::set_permissions(path, fs::Permissions::from_mode(node.mode & 0o7777));
    }
    let t = mtime(node);
    let _ = filetime::set_symlink_file_times(path, t, t);
}

/// [`apply_meta`] for a regular file still open: the same, through its
/// descriptor. A new file mostly has the owner and mode it should already
/// (a restore as root of root's files, mode 0644 under umask 022), so it
/// is looked at first (one `fstat`) and only what differs is changed:
/// `fchown` and `fchmod` each rewrite the inode, 2 of a small file's 6
/// system calls. A mode equal to the wanted one needs no `fchmod` even
/// under a default ACL (the mode bits are then derived from the ACL, and
/// `chmod` to the same bits leaves it as it is); after a `chown`, which
/// clears set-user-ID and set-group-ID, the mode is always set again.
fn apply_meta_fd(f: &fs::File, node: &Node, is_root: bool) {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    let have = f.metadata().ok();
    let mut chowned = false;
    if is_root
        && !have
            .as_ref()
            .is_some_and(|m| m.uid() == node.uid && m.gid() == node.gid)
    {
        unsafe { libc::fchown(f.as_raw_fd(), node.uid, node.gid) };
        chowned = true;
    }
    let want = node.mode & 0o7777;
    if chowned || have.is_none_or(|m| m.mode() & 0o7777 != want) {
        let _ = f.set_permissions(fs::Permissions::from_mode(want));
    }
    let t = mtime(node);
    let _ = filetime::set_file_handle_times(f, Some(t), Some(t));
}

fn mtime(node: &Node) -> filetime::FileTime {
    let secs = node.mtime_ns.div_euclid(1_000_000_000) as i64;
    let nanos = node.mtime_ns.rem_euclid(1_000_000_000) as u32;
    filetime::FileTime::from_unix_time(secs, nanos)
}

/// Restores one file of a snapshot (a stream snapshot's only file when
/// `path` is `None`) to `out`.
///
/// # Errors
/// Usage errors for a missing path; key, storage and integrity errors.
pub fn restore_to_writer(
    repo: &Repository,
    snap_id: &Id,
    path: Option<&str>,
    out: &mut (dyn Write + Send),
    threads: usize,
) -> crate::error::Result<u64> {
    repo.keys.data_identity("restore")?;
    let (snap, chunks) = repo.load_snapshot(snap_id)?;
    repo.ensure_indexed(&chunks)?;
    let mut node = find_file(repo, &snap.root, path)?;
    if let Some(first) = node.hardlink.clone() {
        // Another name of a file recorded earlier in the snapshot.
        node = find_file(repo, &snap.root, Some(&first))?;
    }
    let (ops_tx, ops_rx) = crossbeam_channel::unbounded::<OpMsg>();
    let (giver, data_credits, ctl_credits) = window();
    let mut pipe = Pipeline::start(repo, threads, ops_tx, data_credits, ctl_credits);
    let mut written = 0u64;
    let result = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            run_writer(ops_rx, giver, |op| {
                match op {
                    Op::Data(r) => {
                        let d = r?;
                        out.write_all(&d)?;
                        written += d.len() as u64;
                    }
                    Op::Zero(n) => {
                        let zeros = vec![0u8; 1 << 16];
                        let mut left = n;
                        while left > 0 {
                            let k = left.min(zeros.len() as u64) as usize;
                            out.write_all(&zeros[..k])?;
                            left -= k as u64;
                        }
                        written += n;
                    }
                    _ => {}
                }
                Ok(())
            })
        });
        let r = node.content.chunks(LOCATE_BATCH).try_for_each(|part| {
            let locs = repo
                .catalog
                .reading(|| locations(repo, part, &Located::new()))?;
            pipe.content(part, &locs)
        });
        pipe.close();
        let w = writer
            .join()
            .map_err(|_| anyhow::anyhow!("restore writer panicked"))?;
        w.and(r)
    });
    result?;
    out.flush()?;
    if written != node.size {
        return Err(LabError::integrity(format!(
            "restored {written} bytes but the snapshot records {}",
            node.size
        ))
        .into());
    }
    Ok(written)
}

/// The bytes a file's content holds, from the index (`None` when a chunk
/// is not indexed: the restore reports that chunk itself).
///
/// # Errors
/// Catalog errors.
pub fn content_len(repo: &Repository, content: &[ContentRef]) -> crate::error::Result<Option<u64>> {
    Ok(located_len(
        content,
        &locations(repo, content, &Located::new())?,
    ))
}

/// The length of `content` given its chunks' locations (see
/// [`locations`]); `None` when a chunk has none.
fn located_len(content: &[ContentRef], locs: &[Option<BlobLocation>]) -> Option<u64> {
    content
        .iter()
        .zip(locs)
        .try_fold(0u64, |len, (c, loc)| match (c, loc) {
            (ContentRef::Zero { zero }, _) => Some(len + zero),
            (ContentRef::Chunk(_), Some(loc)) => Some(len + loc.raw_len as u64),
            (ContentRef::Chunk(_), None) => None,
        })
}

fn find_file(repo: &Repository, root: &[Id], path: Option<&str>) -> crate::error::Result<Node> {
    let mut tree = repo.read_tree(root)?;
    let Some(path) = path else {
        let files: Vec<_> = tree
            .nodes
            .into_iter()
            .filter(|n| n.node_type == NodeType::File)
            .collect();
        if files.len() == 1 {
            return Ok(files.into_iter().next().unwrap());
        }
        return Err(LabError::usage(
            "this snapshot holds a directory tree; name the file to write with --path",
        )
        .into());
    };
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    for (i, part) in parts.iter().enumerate() {
        let node = tree
            .nodes
            .into_iter()
            .find(|n| n.name == *part)
            .ok_or_else(|| LabError::usage(format!("path {path} is not in the snapshot")))?;
        if i + 1 == parts.len() {
            if node.node_type != NodeType::File {
                return Err(LabError::usage(format!("{path} is not a regular file")).into());
            }
            return Ok(node);
        }
        let sub = node
            .subtree
            .ok_or_else(|| LabError::usage(format!("{part} in {path} is not a directory")))?;
        tree = repo.read_tree(&sub)?;
    }
    Err(LabError::usage("empty path").into())
}

#[cfg(test)]
mod tests {
    use super::included;

    #[test]
    fn included_takes_paths_at_or_below_an_include_and_descends_on_the_way() {
        let none: [&str; 0] = [];
        assert_eq!(included("any/thing", &none), (true, true));
        let inc = ["/a/b/", "c"];
        for (rel, want) in [
            ("a/b", (true, true)),
            ("a/b/x/y", (true, true)),
            ("a", (false, true)),
            ("a/bc", (false, false)),
            ("ab", (false, false)),
            ("c", (true, true)),
            ("c.txt", (false, false)),
            ("d", (false, false)),
        ] {
            assert_eq!(included(rel, &inc), want, "{rel}");
        }
        // Names need not be UTF-8; a slash-only include selects nothing.
        let raw: &[u8] = b"a/b/\xff";
        assert_eq!(included(raw, &inc), (true, true));
        assert_eq!(included("a", &["/"]), (false, false));
    }
}
