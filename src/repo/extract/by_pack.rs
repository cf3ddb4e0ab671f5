//! Pack-ordered restore into a directory: each pack is read once.
//!
//! The directory walk hands every regular file to [`PackOrder::file`], which
//! creates the file's temporary name at its final size (zero runs stay
//! holes) and records, per blob, where its plaintext goes. Every
//! [`BATCH_BYTES`] of stored blobs or [`BATCH_REFS`] references (and at
//! the end) the batch goes to the reader threads, which run while the walk
//! goes on planning: the needed blobs are grouped by pack, neighbours
//! within [`RANGE_GAP`] joined into one read, and the readers stream those
//! reads (one request per range, resumed by the backend when interrupted),
//! decode each blob as it completes and write it to every file offset that
//! uses it. A file is renamed into place when its last blob is written; a
//! file with a damaged blob is removed and reported, the rest restore.
//!
//! A pack whose needed blobs span most of it is read whole, without a
//! `Range` header (cheaper for some servers; the SDK can then check the
//! object's checksum). This is how object stores want to be read — few
//! large sequential GETs, each byte once — whereas the ordered pipeline in
//! the parent module reads in file order (better on local disks).
//!
//! Files of one blob (most small files) are created when their blob
//! arrives and set up through the open descriptor; the 4 KiB-aligned
//! interior of every write of 64 KiB or more goes through `O_DIRECT`
//! (see [`crate::util::directio::write_at`]), its edges buffered.
//!
//! Memory is bounded by the batch size (a few MiB of plan), the readers'
//! queue (one job per reader) and one blob being assembled and decoded per
//! reader.

use super::{create_target, put_in_place, FileSink, RestoreOptions, RestoreSummary};
use crate::backend::{Backend, BackendError};
use crate::error::LabError;
use crate::repo::catalog::BlobLocation;
use crate::repo::keys::Keys;
use crate::repo::tree::{ContentRef, Node};
use crate::repo::{decode_blob, format, Id, Repository};
use crate::util::progress::Progress;
use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Blob references planned before a batch goes to the readers (bounds the
/// plan's memory).
const BATCH_REFS: usize = 1 << 16;
/// Stored bytes planned before a batch goes to the readers: small enough
/// that reading starts early in the walk, large enough that few packs are
/// split between batches (a split pack is read with two requests).
const BATCH_BYTES: u64 = 64 << 20;
/// Largest hole between needed blobs of a pack still read through (one
/// request instead of two). Small: on a link that bandwidth limits, every
/// byte read through costs its transfer time while a second request runs
/// beside the other readers' (16 in flight), and an object store bills
/// 128 KiB of egress about like a hundred requests. With 4 MiB, a restore
/// of a second snapshot over 200 Mbit/s read 12% more bytes than it
/// needed and took 20.8 s where the link's floor is 17.3 s.
const RANGE_GAP: u64 = 128 << 10;

/// A file being restored.
struct Pending {
    /// The name it was created under (see [`create_target`]): its own
    /// path, or a temporary name beside an existing file until the last
    /// blob lands. Unset until created.
    name: OnceLock<PathBuf>,
    path: PathBuf,
    node: Node,
    /// A file of one blob (most small files) is created when that blob is
    /// delivered, and kept open until it is put in place: one open instead
    /// of two, and its metadata set through the descriptor. Files of more
    /// blobs are created while planning and opened per blob write, so a
    /// batch holds no descriptors.
    deferred: bool,
    file: Mutex<Option<fs::File>>,
    /// Blob writes still to come, plus one while the walk is planning it.
    remaining: AtomicUsize,
    error: Mutex<Option<String>>,
    done: AtomicBool,
}

impl Pending {
    fn fail(&self, why: String) {
        let mut e = self.error.lock().unwrap();
        if e.is_none() {
            *e = Some(why);
        }
    }
    fn failed(&self) -> bool {
        self.error.lock().unwrap().is_some()
    }
}

/// Neighbouring blobs of one pack read with one request.
struct RangeJob {
    needs: Vec<Need>,
    /// Read the whole pack (no range): the blobs cover most of it.
    whole: bool,
}

impl RangeJob {
    fn new(needs: Vec<Need>) -> RangeJob {
        RangeJob {
            needs,
            whole: false,
        }
    }
    fn span(&self) -> u64 {
        let last = &self.needs[self.needs.len() - 1].loc;
        last.offset as u64 + last.length as u64 - self.needs[0].loc.offset as u64
    }
}

/// One blob and every place it goes.
struct Need {
    id: Id,
    loc: BlobLocation,
    targets: Vec<(Arc<Pending>, u64)>,
}

#[derive(Default)]
struct Batch {
    needs: Vec<Need>,
    by_blob: HashMap<Id, usize>,
    refs: usize,
    bytes: u64,
}

/// What workers share.
struct Shared {
    is_root: bool,
    progress: Progress,
    summary: Mutex<RestoreSummary>,
    fatal: Mutex<Option<crate::error::Error>>,
    stop: AtomicBool,
    /// Large writes use `O_DIRECT` until the filesystem refuses it.
    direct: AtomicBool,
}

impl Shared {
    fn set_fatal(&self, e: crate::error::Error) {
        let mut f = self.fatal.lock().unwrap();
        if f.is_none() {
            *f = Some(e);
        }
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Drops one reference; the last one finishes the file.
    fn release(&self, p: &Pending) {
        if p.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Err(e) = self.finish(p) {
                self.set_fatal(e);
            }
        }
    }

    /// Renames a complete file into place (or removes a failed one) and
    /// counts it. The file system work runs outside the summary's lock.
    fn finish(&self, p: &Pending) -> crate::error::Result<()> {
        p.done.store(true, Ordering::Release);
        let error = p.error.lock().unwrap().take();
        let file = p.file.lock().unwrap().take();
        let failed = put_in_place(
            p.name.get().map(|n| n.as_path()),
            &p.path,
            &p.node,
            self.is_root,
            error,
            file,
        )?;
        let mut summary = self.summary.lock().unwrap();
        match failed {
            Some(why) => summary.failed.push(why),
            None => {
                summary.files += 1;
                summary.bytes += p.node.size;
            }
        }
        Ok(())
    }
}

/// The pack-ordered restorer; see the module docs.
pub(super) struct PackOrder<'a> {
    repo: &'a Repository,
    shared: Arc<Shared>,
    batch: Batch,
    /// Files not yet finished (removed again on a fatal error).
    pending: Vec<Arc<Pending>>,
    /// The readers' queue; they run while the walk goes on planning.
    jobs: Option<crossbeam_channel::Sender<RangeJob>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    batch_bytes: u64,
}

impl<'a> PackOrder<'a> {
    pub(super) fn new(
        repo: &'a Repository,
        opts: &RestoreOptions,
        is_root: bool,
        progress: Progress,
    ) -> PackOrder<'a> {
        let workers = if opts.threads == 0 {
            repo.backend.parallelism().max(4)
        } else {
            opts.threads
        };
        let shared = Arc::new(Shared {
            is_root,
            progress,
            summary: Mutex::new(RestoreSummary::default()),
            fatal: Mutex::new(None),
            stop: AtomicBool::new(false),
            direct: AtomicBool::new(true),
        });
        let (tx, rx) = crossbeam_channel::bounded::<RangeJob>(workers);
        let readers = (0..workers)
            .map(|_| {
                let (rx, shared) = (rx.clone(), shared.clone());
                let (backend, keys) = (repo.backend.clone(), repo.keys.clone());
                std::thread::spawn(move || {
                    for job in rx {
                        read_range(&*backend, &keys, &shared, job);
                    }
                })
            })
            .collect();
        PackOrder {
            repo,
            shared,
            batch: Batch::default(),
            pending: vec![],
            jobs: Some(tx),
            readers,
            batch_bytes: if opts.batch_bytes == 0 {
                BATCH_BYTES
            } else {
                opts.batch_bytes
            },
        }
    }

    fn add(&mut self, id: Id, loc: BlobLocation, p: &Arc<Pending>, offset: u64) {
        p.remaining.fetch_add(1, Ordering::AcqRel);
        self.batch.refs += 1;
        match self.batch.by_blob.get(&id) {
            Some(&i) => self.batch.needs[i].targets.push((p.clone(), offset)),
            None => {
                self.batch.bytes += loc.length as u64;
                self.batch.by_blob.insert(id, self.batch.needs.len());
                self.batch.needs.push(Need {
                    id,
                    loc,
                    targets: vec![(p.clone(), offset)],
                });
            }
        }
    }

    /// Hands the batch to the readers, grouped by pack.
    fn dispatch(&mut self) -> crate::error::Result<()> {
        let batch = std::mem::take(&mut self.batch);
        let mut order: Vec<Id> = vec![];
        let mut by_pack: HashMap<Id, Vec<Need>> = HashMap::new();
        for need in batch.needs {
            by_pack
                .entry(need.loc.pack)
                .or_insert_with(|| {
                    order.push(need.loc.pack);
                    vec![]
                })
                .push(need);
        }
        let mut jobs: Vec<RangeJob> = vec![];
        for pack in order {
            let first_job = jobs.len();
            let mut needs = by_pack.remove(&pack).unwrap_or_default();
            needs.sort_by_key(|n| n.loc.offset);
            let mut range: Vec<Need> = vec![];
            for n in needs {
                if let Some(last) = range.last() {
                    let last_end = last.loc.offset as u64 + last.loc.length as u64;
                    if n.loc.offset as u64 > last_end + RANGE_GAP {
                        jobs.push(RangeJob::new(std::mem::take(&mut range)));
                    }
                }
                range.push(n);
            }
            if !range.is_empty() {
                jobs.push(RangeJob::new(range));
            }
            // One read covering the pack but for its header, trailer and
            // at most a gap's worth: ask for the whole object.
            if jobs.len() == first_job + 1 {
                let job = &mut jobs[first_job];
                let size = self.repo.catalog.pack_size(&pack)?.unwrap_or(u64::MAX);
                job.whole = job.span().saturating_add(RANGE_GAP + (64 << 10)) >= size;
            }
        }
        if let Some(tx) = &self.jobs {
            for job in jobs {
                if self.shared.stop.load(Ordering::SeqCst) || tx.send(job).is_err() {
                    break;
                }
            }
        }
        self.pending.retain(|p| !p.done.load(Ordering::Acquire));
        self.check_fatal()
    }

    fn check_fatal(&self) -> crate::error::Result<()> {
        match self.shared.fatal.lock().unwrap().take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Waits for the readers to finish what was handed to them.
    fn close(&mut self) {
        self.jobs = None;
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }

    /// Reads what is left and returns what the restore did.
    pub(super) fn finish(mut self) -> crate::error::Result<RestoreSummary> {
        let r = self.dispatch();
        self.close();
        if let Err(e) = r.and_then(|_| self.check_fatal()) {
            self.abort();
            return Err(e);
        }
        let summary = std::mem::take(&mut *self.shared.summary.lock().unwrap());
        Ok(summary)
    }

    /// Stops the readers and removes the temporary files of everything not
    /// finished.
    pub(super) fn abort(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.close();
        for p in self.pending.drain(..) {
            if !p.done.load(Ordering::Acquire) {
                if let Some(name) = p.name.get() {
                    let _ = fs::remove_file(name);
                }
            }
        }
    }
}

impl FileSink for PackOrder<'_> {
    fn file(
        &mut self,
        path: PathBuf,
        mut node: Node,
        locs: Vec<Option<BlobLocation>>,
    ) -> crate::error::Result<()> {
        let content = std::mem::take(&mut node.content);
        let deferred = content
            .iter()
            .filter(|c| matches!(c, ContentRef::Chunk(_)))
            .count()
            == 1;
        let p = Arc::new(Pending {
            name: OnceLock::new(),
            path,
            node,
            deferred,
            file: Mutex::new(None),
            remaining: AtomicUsize::new(1),
            error: Mutex::new(None),
            done: AtomicBool::new(false),
        });
        self.pending.push(p.clone());
        if !deferred {
            let size = p.node.size;
            let (_, name) = create_target(&p.path, |q| {
                let f = OpenOptions::new().write(true).create_new(true).open(q)?;
                f.set_len(size).inspect_err(|_| {
                    let _ = fs::remove_file(q);
                })
            })
            .map_err(|e| LabError::storage(format!("creating {}: {e}", p.path.display())))?;
            let _ = p.name.set(name);
        }
        let mut offset = 0u64;
        for (c, loc) in content.into_iter().zip(locs) {
            match c {
                ContentRef::Zero { zero } => offset += zero,
                ContentRef::Chunk(id) => match loc {
                    Some(loc) => {
                        self.add(id, loc, &p, offset);
                        offset += loc.raw_len as u64;
                        if self.batch.refs >= BATCH_REFS || self.batch.bytes >= self.batch_bytes {
                            self.dispatch()?;
                        }
                    }
                    None => {
                        p.fail(format!(
                            "chunk {} is in no index fragment and no pack trailer in storage (its pack is missing)",
                            id.short()
                        ));
                        break;
                    }
                },
            }
        }
        self.shared.release(&p);
        self.check_fatal()
    }
}

/// Streams one range of a pack and delivers each needed blob in it.
fn read_range(backend: &dyn Backend, keys: &Keys, shared: &Shared, range: RangeJob) {
    if shared.stop.load(Ordering::SeqCst) {
        return;
    }
    let job = range.needs;
    let pack = job[0].loc.pack;
    let name = format::pack_name(&pack);
    let start = job[0].loc.offset as u64;
    let last = &job[job.len() - 1].loc;
    let end = last.offset as u64 + last.length as u64;
    let mut next = 0usize;
    let mut pos = if range.whole { 0 } else { start };
    let mut buf: Vec<u8> = vec![];
    let mut sink = |mut piece: &[u8]| {
        while !piece.is_empty() && next < job.len() {
            let need = &job[next];
            let b_start = need.loc.offset as u64;
            if pos < b_start {
                let skip = ((b_start - pos) as usize).min(piece.len());
                piece = &piece[skip..];
                pos += skip as u64;
                continue;
            }
            let len = need.loc.length as usize;
            let take = (len - buf.len()).min(piece.len());
            if buf.is_empty() && take == len {
                deliver(keys, shared, need, &piece[..take]);
            } else {
                buf.extend_from_slice(&piece[..take]);
                if buf.len() == len {
                    deliver(keys, shared, need, &buf);
                    buf.clear();
                }
            }
            if buf.is_empty() {
                next += 1;
            }
            piece = &piece[take..];
            pos += take as u64;
            if shared.stop.load(Ordering::SeqCst) {
                return false;
            }
        }
        true
    };
    let r = if range.whole {
        backend.get_stream(&name, &mut sink)
    } else {
        backend.get_range_stream(&name, start, end - start, &mut sink)
    };
    if shared.stop.load(Ordering::SeqCst) {
        return;
    }
    let why = match r {
        Ok(()) if next == job.len() => return,
        Ok(()) => format!("pack {} ended early", pack.hex()),
        Err(e @ (BackendError::NotFound { .. } | BackendError::ShortRead { .. })) => e.to_string(),
        Err(e) => {
            // BackendError::Io: exit code 7 (storage); the next run resumes.
            shared.set_fatal(crate::error::Error::from(e).context(format!(
                "restore stopped reading pack {}; temporary files were removed",
                pack.short()
            )));
            return;
        }
    };
    for need in &job[next..] {
        for (p, _) in &need.targets {
            p.fail(format!("blob {}: {why}", need.id.short()));
            shared.release(p);
        }
    }
}

/// Writes a blob's plaintext at `offset` of a file's temporary name,
/// creating it first when the file was deferred to its one blob. Large
/// writes go through `O_DIRECT` ([`crate::util::directio::write_at`]): restoring
/// through the page cache cost more system time than everything else the
/// restore does when the VM had to back fresh pages (0.4-1.6 s of system
/// time for 512 MiB, against a steady ~0.4 s with `O_DIRECT`), and a large
/// restore would otherwise evict the host's working set.
fn write_target(shared: &Shared, p: &Pending, data: &[u8], offset: u64) -> std::io::Result<()> {
    // All-zero data stays a hole: the file was created at its full size,
    // so a sparse file comes back sparse whatever chunker stored it.
    let hole =
        data.len() >= crate::util::directio::HOLE_MIN && crate::util::directio::is_zero(data);
    if p.deferred {
        let (f, name) = create_target(&p.path, |q| {
            OpenOptions::new().write(true).create_new(true).open(q)
        })?;
        let _ = p.name.set(name);
        if !hole {
            f.write_all_at(data, offset)?;
        }
        if offset + data.len() as u64 != p.node.size {
            f.set_len(p.node.size)?;
        }
        *p.file.lock().unwrap() = Some(f);
        Ok(())
    } else if hole {
        Ok(())
    } else {
        let direct = shared.direct.load(Ordering::Relaxed);
        let name = p.name.get().expect("created while planning");
        if !crate::util::directio::write_at(name, data, offset, direct)? && direct {
            shared.direct.store(false, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// Decodes one blob (decrypt, decompress, re-hash) and writes it wherever
/// it goes. A write error (a full disk) ends the restore.
fn deliver(keys: &Keys, shared: &Shared, need: &Need, cipher: &[u8]) {
    let decoded = decode_blob(keys, "restore", &need.id, &need.loc, cipher);
    match decoded {
        Ok(data) => {
            for (p, offset) in &need.targets {
                if !p.failed() {
                    if let Err(e) = write_target(shared, p, &data, *offset) {
                        shared.set_fatal(
                            LabError::storage(format!("writing {}: {e}", p.path.display())).into(),
                        );
                        return;
                    }
                    shared.progress.add(data.len() as u64);
                }
                shared.release(p);
            }
        }
        Err(e) => {
            for (p, _) in &need.targets {
                p.fail(format!("{e:#}"));
                shared.release(p);
            }
        }
    }
}
