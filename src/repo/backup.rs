//! Backups of directory trees and streams.
//!
//! # Pipeline
//! The calling thread reads the source, cuts chunks, computes chunk IDs and
//! decides deduplication (catalog lookup plus the set of chunks pending in
//! this run): being the only thread that decides, no chunk is stored twice by
//! one run, except directory listings, which go into two tree packs on
//! purpose ([`crate::repo::TREE_COPIES`]). New chunks go to encoder threads (zstd + age, one per core) and
//! then to the packer thread, which fills ~32 MiB packs and writes them.
//! Written packs come back to the calling thread, which records them in the
//! catalog. Queues are bounded, so memory is bounded by the configuration
//! (queue depth × max chunk size + two packs), not by the data.
//!
//! # Crash safety
//! Write order: packs, then an index fragment, then the snapshot. A killed
//! backup leaves packs that no index lists; the next backup lists packs,
//! reads the trailers of unknown ones (META key only), indexes them and
//! re-uses their chunks.

use crate::error::LabError;
use crate::repo::blob::{self, BlobKind};
use crate::repo::catalog::{CacheRun, Catalog, FileFacts};
use crate::repo::chunker::{Chunker, ChunkerKind, Piece};
use crate::repo::index::IndexedPack;
use crate::repo::pack::{self, PackBuilder, PackEntry};
use crate::repo::snapshot::{BackupSummary, Snapshot, Source};
use crate::repo::tree::{ContentRef, Tree};
use crate::repo::{crypto, format, index, snapshot, Id, Repository};
use crate::util::progress::Progress;
use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use std::collections::HashSet;
use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

/// How files are chunked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ChunkerChoice {
    /// Fixed chunks for disk images (by extension), FastCDC for the rest.
    #[default]
    Auto,
    Cdc,
    Fixed,
}

/// Extensions treated as raw disk images by [`ChunkerChoice::Auto`].
pub const IMAGE_EXTENSIONS: &[&str] = &["img", "raw", "qcow2", "vmdk", "vdi", "vhd", "vhdx"];

impl ChunkerChoice {
    /// The chunker for a file at `path`.
    pub fn for_path(self, path: &Path) -> ChunkerKind {
        match self {
            ChunkerChoice::Cdc => ChunkerKind::Cdc,
            ChunkerChoice::Fixed => ChunkerKind::Fixed,
            ChunkerChoice::Auto => {
                let ext = path
                    .extension()
                    .and_then(|e| e.to_str())
                    .unwrap_or("")
                    .to_ascii_lowercase();
                if IMAGE_EXTENSIONS.contains(&ext.as_str()) {
                    ChunkerKind::Fixed
                } else {
                    ChunkerKind::Cdc
                }
            }
        }
    }
}

/// Options common to every backup.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    pub tags: Vec<String>,
    pub host: String,
    pub restore_point: Option<String>,
    pub facts: std::collections::BTreeMap<String, serde_json::Value>,
    /// Encoder threads; 0 = one per core.
    pub threads: usize,
    /// Stops the backup at the next file or chunk (no snapshot is written).
    pub cancel: Option<crate::error::CancelFlag>,
}

impl Default for BackupOptions {
    fn default() -> Self {
        BackupOptions {
            tags: vec![],
            host: gethostname::gethostname().to_string_lossy().to_string(),
            restore_point: None,
            facts: Default::default(),
            threads: 0,
            cancel: None,
        }
    }
}

/// The result of a backup.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BackupOutcome {
    pub snapshot_id: Id,
    pub summary: BackupSummary,
}

struct EncodeJob {
    kind: BlobKind,
    id: Id,
    data: Vec<u8>,
    level: i32,
}

struct Encoded {
    kind: BlobKind,
    id: Id,
    cipher: Vec<u8>,
    raw_len: u32,
}

struct PackDone {
    id: Id,
    size: u64,
    entries: Vec<PackEntry>,
}

/// Chunks queued for the encoders go in batches of up to this many bytes
/// (a larger chunk goes alone): a small file's chunk handed through the
/// encoder and packer queues one by one cost more in thread wake-ups than
/// its compression.
const JOB_BATCH_BYTES: usize = 256 << 10;
/// And of at most this many chunks.
const JOB_BATCH_CHUNKS: usize = 64;

/// Lowers the calling thread's CPU priority a little (nice +4; on Linux the
/// nice value is per thread). The encoders use it: the thread that walks,
/// reads and hashes is the backup's critical path, and with as many
/// encoders as cores it got only its share of a core while they ran.
/// Encoders that fall behind fill their queue, and the walking thread then
/// waits for them, so they are never starved.
fn lower_priority() {
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        let now = libc::getpriority(libc::PRIO_PROCESS, tid);
        libc::setpriority(libc::PRIO_PROCESS, tid, (now + 4).min(19));
    }
}

/// The encoder and packer threads of one backup run.
struct Uploader {
    jobs: Option<Sender<Vec<EncodeJob>>>,
    /// Jobs not yet handed to the encoders, and their bytes.
    batch: Vec<EncodeJob>,
    batch_bytes: usize,
    /// Chunk buffers the encoders are done with, for the chunker to re-use.
    spare_chunks: Receiver<Vec<u8>>,
    done: Receiver<PackDone>,
    threads: Vec<JoinHandle<()>>,
    failure: Arc<Mutex<Option<anyhow::Error>>>,
}

impl Uploader {
    fn start(repo: &Repository, threads: usize) -> Uploader {
        let threads = if threads == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
        } else {
            threads
        };
        let (job_tx, job_rx) = bounded::<Vec<EncodeJob>>(threads * 2);
        let (chunk_back_tx, chunk_back_rx) = bounded::<Vec<u8>>(threads * 2);
        let (enc_tx, enc_rx) = bounded::<Vec<Encoded>>(threads * 2);
        let (put_tx, put_rx) = bounded::<(Id, Vec<u8>, Vec<PackEntry>)>(1);
        let (done_tx, done_rx) = unbounded::<PackDone>();
        // Written pack buffers go back to the packer (local disks; an object
        // store's client takes ownership of the bytes it sends).
        let (spare_tx, spare_rx) = bounded::<Vec<u8>>(1);
        let failure = Arc::new(Mutex::new(None));
        let mut handles = vec![];
        for _ in 0..threads {
            let (rx, tx, back) = (job_rx.clone(), enc_tx.clone(), chunk_back_tx.clone());
            let mut encoder = blob::BlobEncoder::new(repo.keys.data_recipients.clone());
            handles.push(std::thread::spawn(move || {
                lower_priority();
                for batch in rx {
                    let mut out = Vec::with_capacity(batch.len());
                    for job in batch {
                        let cipher = encoder.encode(&job.data, job.level);
                        out.push(Encoded {
                            kind: job.kind,
                            id: job.id,
                            cipher,
                            raw_len: job.data.len() as u32,
                        });
                        let _ = back.try_send(job.data);
                    }
                    if tx.send(out).is_err() {
                        return;
                    }
                }
            }));
        }
        drop(enc_tx);
        // Packer: fills packs; the writer thread below stores them, so
        // encoding goes on while a pack is being written and synced.
        let meta = repo.keys.meta_recipient();
        let pack_size = repo.config.pack_size as usize;
        // Directory listings go into packs of their own (as restic does):
        // a restore walks the trees before it reads any data, and reading a
        // small tree pack from an object store is far cheaper than ranges of
        // data packs. Each listing goes into TREE_COPIES such packs (same
        // ciphertext, different packs), so losing one pack never loses a
        // snapshot's directory structure.
        handles.push(std::thread::spawn(move || {
            let capacity = pack_size + (8 << 20);
            let mut data = PackBuilder::with_capacity(capacity);
            let fresh_trees = || -> Vec<PackBuilder> {
                (0..super::TREE_COPIES)
                    .map(|_| PackBuilder::with_capacity(1 << 20))
                    .collect()
            };
            let mut trees = fresh_trees();
            for enc in enc_rx.into_iter().flatten() {
                if enc.kind == BlobKind::Tree {
                    for t in trees.iter_mut() {
                        t.add(enc.kind, enc.id, &enc.cipher, enc.raw_len);
                    }
                    if trees[0].len() >= pack_size {
                        for full in std::mem::replace(&mut trees, fresh_trees()) {
                            if put_tx.send(full.finish(&meta)).is_err() {
                                return;
                            }
                        }
                    }
                    continue;
                }
                data.add(enc.kind, enc.id, &enc.cipher, enc.raw_len);
                if data.len() >= pack_size {
                    let next = spare_rx
                        .try_recv()
                        .map(PackBuilder::with_buffer)
                        .unwrap_or_else(|_| PackBuilder::with_capacity(capacity));
                    let full = std::mem::replace(&mut data, next);
                    if put_tx.send(full.finish(&meta)).is_err() {
                        return; // the writer failed; encoders drain via closed channels
                    }
                }
            }
            for builder in std::iter::once(data).chain(trees) {
                if !builder.is_empty() && put_tx.send(builder.finish(&meta)).is_err() {
                    return;
                }
            }
        }));
        // Pack writers: one for local disks, two in flight for object stores
        // (each holds a ~33 MiB pack, which bounds memory).
        let writers = (repo.backend.parallelism() / 8).clamp(1, 2);
        for _ in 0..writers {
            let (put_rx, done_tx, spare_tx) = (put_rx.clone(), done_tx.clone(), spare_tx.clone());
            let backend = repo.backend.clone();
            let fail = failure.clone();
            handles.push(std::thread::spawn(move || {
                for (id, bytes, entries) in put_rx {
                    let size = bytes.len() as u64;
                    let name = format::pack_name(&id);
                    let result = if backend.is_remote() {
                        backend.put_owned(&name, bytes)
                    } else {
                        let r = backend.put(&name, &bytes);
                        if bytes.capacity() >= pack_size {
                            let _ = spare_tx.try_send(bytes);
                        }
                        r
                    };
                    match result {
                        Ok(()) | Err(crate::backend::BackendError::AlreadyExists { .. }) => {
                            let _ = done_tx.send(PackDone { id, size, entries });
                        }
                        Err(e) => {
                            *fail.lock().unwrap() = Some(
                                anyhow::Error::new(e)
                                    .context(format!("writing pack {}", id.short())),
                            );
                            return;
                        }
                    }
                }
            }));
        }
        Uploader {
            jobs: Some(job_tx),
            batch: vec![],
            batch_bytes: 0,
            spare_chunks: chunk_back_rx,
            done: done_rx,
            threads: handles,
            failure,
        }
    }

    fn check_failure(&self) -> crate::error::Result<()> {
        if let Some(e) = self.failure.lock().unwrap().take() {
            return Err(e.into());
        }
        Ok(())
    }

    /// Queues a chunk for the encoders (see [`JOB_BATCH_BYTES`]).
    ///
    /// # Errors
    /// When the workers stopped (their failure, if they recorded one).
    fn queue(&mut self, job: EncodeJob) -> crate::error::Result<()> {
        self.batch_bytes += job.data.len();
        self.batch.push(job);
        if self.batch_bytes >= JOB_BATCH_BYTES || self.batch.len() >= JOB_BATCH_CHUNKS {
            self.flush()?;
        }
        Ok(())
    }

    /// Hands the queued chunks to the encoders.
    fn flush(&mut self) -> crate::error::Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        let jobs = self.jobs.as_ref().expect("uploader running");
        if jobs.send(batch).is_err() {
            self.check_failure()?;
            crate::error::bail!("backup workers stopped unexpectedly");
        }
        Ok(())
    }

    /// Closes the queues and waits for every pack to be written.
    fn finish(&mut self) -> crate::error::Result<()> {
        self.flush()?;
        self.jobs = None;
        for t in self.threads.drain(..) {
            t.join()
                .map_err(|_| anyhow::anyhow!("a backup worker thread panicked"))?;
        }
        self.check_failure()
    }
}

/// What the file cache holds for a file: its stat facts when it was
/// read, its content, and the last run that read or re-used it.
#[derive(Debug, Clone)]
pub struct CachedFile {
    pub facts: FileFacts,
    pub content: Vec<ContentRef>,
    pub run: i64,
}

/// Runs (of any source: the counter is the catalog's) after which a re-used
/// file cache entry is marked again.
pub const FILE_CACHE_TOUCH_AFTER: i64 = 64;
/// Runs after which an entry no run marked is dropped. Larger than
/// [`FILE_CACHE_TOUCH_AFTER`], so an entry a run re-uses is never dropped
/// by it; an entry of a deleted file stays this long (it is never matched:
/// a new file at its path differs in inode or change time).
pub const FILE_CACHE_KEEP: i64 = 2 * FILE_CACHE_TOUCH_AFTER;

/// State of one backup run.
pub struct BackupRun<'r> {
    repo: &'r Repository,
    up: Uploader,
    pending: HashSet<Id>,
    referenced: RefSet,
    written: Vec<IndexedPack>,
    /// Entries of the packs in `written`.
    written_blobs: usize,
    summary: BackupSummary,
    progress: Progress,
    chunk_buf: Vec<u8>,
    /// Catalog writes are batched in transactions of up to [`TX_OPS`] rows.
    in_tx: bool,
    /// In a read transaction of lookups (see [`Self::read_op`]).
    read_tx: bool,
    tx_ops: usize,
    cancel: Option<crate::error::CancelFlag>,
    /// When the last index fragment was written.
    last_index: Instant,
    /// The file cache in use: the source's key and this run's generation.
    file_cache: Option<(String, i64)>,
    /// Which entries are re-used without a chunk lookup.
    trust: Option<CacheRun>,
    /// The source had no file cache entries when the run began (its first
    /// backup): nothing to look up per file.
    file_cache_empty: bool,
}

const TX_OPS: usize = 512;

/// The chunks a run references, for its snapshot's sorted list: appended
/// as they come and sorted and deduplicated whenever the list has doubled
/// since the last time, so it holds at most about twice the distinct IDs
/// at 32 bytes each. (A `BTreeSet` took ~45 bytes per ID and had to be
/// copied into a list at the end: at a million files that copy was part of
/// a 281 MiB peak.)
#[derive(Default)]
struct RefSet {
    ids: Vec<Id>,
    /// Length after the last sort.
    compact: usize,
}

impl RefSet {
    fn insert(&mut self, id: Id) {
        if self.ids.len() >= 2 * self.compact.max(32_768) {
            self.sort();
        }
        self.ids.push(id);
    }

    fn sort(&mut self) {
        self.ids.sort_unstable();
        self.ids.dedup();
        self.ids.shrink_to(2 * self.ids.len());
        self.compact = self.ids.len();
    }

    fn into_sorted(mut self) -> Vec<Id> {
        self.sort();
        self.ids
    }
}

const INDEX_FLUSH_PACKS: usize = 32;

/// A running backup writes an index fragment for what it has written at
/// least this often, so prune can tell its packs from a killed run's (see
/// [`crate::repo::prune::ORPHAN_MIN_AGE`]).
pub const INDEX_FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(600);

impl<'r> BackupRun<'r> {
    /// Starts a run: indexes packs left by interrupted runs, starts threads.
    ///
    /// # Errors
    /// Storage or key errors while listing or reading pack trailers.
    pub fn start(
        repo: &'r Repository,
        threads: usize,
        progress: Progress,
    ) -> crate::error::Result<Self> {
        adopt_orphans_when_due(repo)?;
        Ok(BackupRun {
            repo,
            up: Uploader::start(repo, threads),
            pending: HashSet::new(),
            referenced: RefSet::default(),
            written: vec![],
            written_blobs: 0,
            summary: BackupSummary::default(),
            progress,
            chunk_buf: Vec::new(),
            in_tx: false,
            read_tx: false,
            tx_ops: 0,
            cancel: None,
            last_index: Instant::now(),
            file_cache: None,
            trust: None,
            file_cache_empty: false,
        })
    }

    /// Makes the run stop with [`crate::error::Cancelled`] once `flag` is set.
    pub fn set_cancel(&mut self, flag: Option<crate::error::CancelFlag>) {
        self.cancel = flag;
    }

    /// The counters of this run, for sources to fill (files, dirs, errors,
    /// files that changed while read).
    pub fn summary_mut(&mut self) -> &mut BackupSummary {
        &mut self.summary
    }

    /// Uses the file cache of `source` (a stable key, such as the absolute
    /// path of a directory): [`BackupRun::cached_files`] answers from
    /// earlier runs. An entry a run re-uses is marked with the run when
    /// its chunks had to be looked up (it is trusted again next time, see
    /// [`CacheRun`]) or when its mark is [`FILE_CACHE_TOUCH_AFTER`] runs
    /// old; otherwise an unchanged backup writes nothing per file. Entries
    /// whose mark is [`FILE_CACHE_KEEP`] runs old are dropped when a run
    /// finishes: those of files that are gone, or that no run has re-used
    /// since.
    ///
    /// # Errors
    /// Catalog errors.
    pub fn use_file_cache(&mut self, source: &str) -> crate::error::Result<()> {
        // No transaction of this run may be open: the run is numbered in
        // a write transaction of its own.
        self.tx_commit()?;
        let cat = &self.repo.catalog;
        let trust = cat.file_cache_run_start()?;
        self.file_cache_empty = !cat.file_cache_has(source)?;
        self.file_cache = Some((source.to_string(), trust.run));
        self.trust = Some(trust);
        Ok(())
    }

    /// What the last runs recorded for the files at `rels` (in that
    /// order): stat facts and content (`None` without a file cache or
    /// entry). One catalog read for the lot: a source asks for a
    /// directory's files at once.
    ///
    /// # Errors
    /// Catalog errors.
    pub fn cached_files<P: AsRef<[u8]>>(
        &mut self,
        rels: &[P],
    ) -> crate::error::Result<Vec<Option<CachedFile>>> {
        let Some((source, _)) = self.file_cache.clone().filter(|_| !self.file_cache_empty) else {
            return Ok(rels.iter().map(|_| None).collect());
        };
        self.read_op()?;
        Ok(self
            .catalog()
            .file_cache_get_many(&source, rels)?
            .into_iter()
            .map(|e| {
                e.and_then(|(facts, blob, run)| {
                    decode_content(&blob).map(|content| CachedFile {
                        facts,
                        content,
                        run,
                    })
                })
            })
            .collect())
    }

    /// Re-uses the content of cached files whose chunks are all still
    /// stored (and not on their way out) or written by this run: references
    /// them, counts their bytes of progress and keeps their cache entries.
    /// An entry the catalog vouches for ([`CacheRun`]) is not looked up;
    /// the chunks of the others are, in one pass in ID order for the whole
    /// batch, and those found whole are marked with this run. Answers, per
    /// file, whether it was re-used (`false`: a chunk is gone, read the
    /// file again).
    ///
    /// # Errors
    /// Catalog errors.
    pub fn reuse_cached_files(
        &mut self,
        files: &[(&[u8], &CachedFile)],
    ) -> crate::error::Result<Vec<bool>> {
        let trust = self.trust.clone();
        let trusted = |c: &CachedFile| trust.as_ref().is_some_and(|t| t.trusts(c.run));
        let mut ask = vec![];
        for (_, cached) in files.iter().filter(|(_, c)| !trusted(c)) {
            for c in &cached.content {
                if let ContentRef::Chunk(id) = c {
                    if !self.pending.contains(id) {
                        ask.push(*id);
                    }
                }
            }
        }
        let present = if ask.is_empty() {
            Default::default()
        } else {
            self.read_op()?;
            self.catalog().blobs_present(ask)?
        };
        let cache = self.file_cache.clone();
        let mut reused = Vec::with_capacity(files.len());
        for (rel, cached) in files {
            let vouched = trusted(cached);
            let whole = vouched
                || cached.content.iter().all(|c| match c {
                    ContentRef::Chunk(id) => self.pending.contains(id) || present.contains(id),
                    _ => true,
                });
            reused.push(whole);
            if !whole {
                continue;
            }
            if let Some((source, run_id)) = &cache {
                if !vouched || cached.run + FILE_CACHE_TOUCH_AFTER <= *run_id {
                    self.tx_op()?;
                    self.catalog().file_cache_touch(source, rel, *run_id)?;
                }
            }
            for c in &cached.content {
                if let ContentRef::Chunk(id) = c {
                    self.referenced.insert(*id);
                }
            }
            self.progress.add(cached.facts.size);
        }
        Ok(reused)
    }

    /// Records a file read in this run in the file cache (only files that
    /// did not change while read: the next run reads the others again).
    ///
    /// # Errors
    /// Catalog errors.
    pub fn cache_file(
        &mut self,
        rel: &[u8],
        facts: &FileFacts,
        content: &[ContentRef],
    ) -> crate::error::Result<()> {
        let Some((source, run_id)) = self.file_cache.clone() else {
            return Ok(());
        };
        self.tx_op()?;
        self.catalog()
            .file_cache_put(&source, rel, facts, &encode_content(content), run_id)
    }

    /// `Err(Cancelled)` once the run's cancel flag is set.
    ///
    /// # Errors
    /// [`crate::error::Cancelled`].
    pub fn check_cancel(&self) -> crate::error::Result<()> {
        if let Some(c) = &self.cancel {
            c.check()?;
        }
        Ok(())
    }

    fn catalog(&self) -> &Catalog {
        &self.repo.catalog
    }

    fn tx_begin(&mut self) -> crate::error::Result<()> {
        if self.read_tx {
            self.repo.catalog.commit()?;
            self.read_tx = false;
        }
        if !self.in_tx {
            self.repo.catalog.begin()?;
            self.in_tx = true;
        }
        Ok(())
    }

    fn tx_commit(&mut self) -> crate::error::Result<()> {
        if self.in_tx || self.read_tx {
            self.repo.catalog.commit()?;
            self.in_tx = false;
            self.read_tx = false;
            self.tx_ops = 0;
        }
        Ok(())
    }

    /// Counts one catalog lookup. Lookups run in read transactions of up
    /// to [`TX_OPS`] operations (or inside the current write batch): an
    /// unchanged backup makes two per file (its cache entry, its chunks),
    /// and each on its own took and dropped SQLite's WAL read lock
    /// (`fcntl`s and a look at the WAL index every time). A write ends the
    /// read transaction and starts a write batch.
    fn read_op(&mut self) -> crate::error::Result<()> {
        if !self.in_tx && !self.read_tx {
            self.repo.catalog.begin_temp()?;
            self.read_tx = true;
        }
        self.tx_ops += 1;
        if self.tx_ops >= TX_OPS {
            self.tx_commit()?;
        }
        Ok(())
    }

    /// Counts one catalog write in the current batch, committing full batches.
    fn tx_op(&mut self) -> crate::error::Result<()> {
        self.tx_begin()?;
        self.tx_ops += 1;
        if self.tx_ops >= TX_OPS {
            self.tx_commit()?;
        }
        Ok(())
    }

    /// Takes the packs the packer has written. They enter the catalog
    /// with their index fragment ([`Self::write_index`], see
    /// [`Catalog::add_packs`]); until then their blobs stay in `pending`,
    /// so later chunks still deduplicate against them.
    fn collect_done(&mut self) -> crate::error::Result<()> {
        while let Ok(done) = self.up.done.try_recv() {
            if index::overflows(self.written.len(), self.written_blobs, done.entries.len()) {
                self.write_index()?;
            }
            self.summary.bytes_added += done.size;
            self.summary.packs_written += 1;
            self.written_blobs += done.entries.len();
            self.written.push(IndexedPack {
                id: done.id,
                size: done.size,
                entries: done.entries,
            });
        }
        if self.written.len() >= INDEX_FLUSH_PACKS
            || (!self.written.is_empty() && self.last_index.elapsed() >= INDEX_FLUSH_INTERVAL)
        {
            self.write_index()?;
        }
        self.up.check_failure()
    }

    /// Writes an index fragment for the packs written so far (and any
    /// unindexed ones adopted at start), then adds this run's packs to the
    /// catalog as indexed by it. A run killed before that leaves packs
    /// the catalog does not know: the next run lists them and adopts them
    /// (see [`adopt_orphans_when_due`]).
    fn write_index(&mut self) -> crate::error::Result<()> {
        let new = std::mem::take(&mut self.written);
        self.written_blobs = 0;
        let adopted: Vec<IndexedPack> = self
            .catalog()
            .unindexed_packs()?
            .into_iter()
            .map(|(id, size)| {
                Ok(IndexedPack {
                    id,
                    size,
                    entries: self.catalog().pack_entries(&id)?,
                })
            })
            .collect::<crate::error::Result<_>>()?;
        if new.is_empty() && adopted.is_empty() {
            return Ok(());
        }
        let all: Vec<&IndexedPack> = new.iter().chain(&adopted).collect();
        let (id, bytes) = index::encode(&all, &self.repo.keys.meta_recipient());
        self.repo
            .backend
            .put(&format::index_name(&id), &bytes)
            .context_obj("writing index", &id)?;
        self.last_index = Instant::now();
        let ids: Vec<Id> = adopted.iter().map(|p| p.id).collect();
        self.tx_begin()?;
        self.catalog().add_packs(&new, Some(&id))?;
        self.catalog().mark_indexed(&ids, &id)?;
        self.catalog().add_index_file(&id)?;
        self.tx_commit()?;
        for e in new.iter().flat_map(|p| &p.entries) {
            self.pending.remove(&e.id);
        }
        Ok(())
    }

    /// Adds one chunk: deduplicates, else queues it for encoding.
    ///
    /// # Errors
    /// A failure of the packer (storage) or the catalog.
    pub fn add_chunk(
        &mut self,
        kind: BlobKind,
        data: Vec<u8>,
        level: i32,
    ) -> crate::error::Result<Id> {
        let id = crypto::chunk_id(&self.repo.keys.dedup_key, &data);
        self.referenced.insert(id);
        self.collect_done()?;
        if self.pending.contains(&id) || self.catalog().has_blob(&id)? {
            return Ok(id);
        }
        self.pending.insert(id);
        self.summary.chunks_new += 1;
        self.summary.bytes_new_raw += data.len() as u64;
        self.up.queue(EncodeJob {
            kind,
            id,
            data,
            level,
        })?;
        Ok(id)
    }

    /// Chunks a reader into content references.
    ///
    /// # Errors
    /// Read errors of the source (wrapped with `what`) and storage errors.
    pub fn add_stream(
        &mut self,
        reader: impl Read,
        kind: ChunkerKind,
        what: &str,
    ) -> crate::error::Result<Vec<ContentRef>> {
        let buf = std::mem::take(&mut self.chunk_buf);
        let mut chunker =
            Chunker::with_buffer(reader, kind, &self.repo.cdc, &self.repo.config.chunker, buf);
        let level = match kind {
            ChunkerKind::Fixed => self.repo.config.image_compression_level,
            ChunkerKind::Cdc => self.repo.config.compression_level,
        };
        let mut content: Vec<ContentRef> = vec![];
        loop {
            if let Err(e) = self.check_cancel() {
                self.chunk_buf = chunker.into_buffer();
                return Err(e);
            }
            let piece = match chunker.next_piece_in(self.up.spare_chunks.try_recv().ok()) {
                Ok(p) => p,
                Err(e) => {
                    self.chunk_buf = chunker.into_buffer();
                    return Err(SourceError(format!("{what}: {e}")).into());
                }
            };
            match piece {
                None => break,
                Some(Piece::Zero(n)) => {
                    self.summary.bytes_read += n;
                    self.progress.add(n);
                    if let Some(ContentRef::Zero { zero }) = content.last_mut() {
                        *zero += n;
                    } else {
                        content.push(ContentRef::Zero { zero: n });
                    }
                }
                Some(Piece::Data(d)) => {
                    self.summary.bytes_read += d.len() as u64;
                    self.progress.add(d.len() as u64);
                    let id = self.add_chunk(BlobKind::Data, d, level)?;
                    content.push(ContentRef::Chunk(id));
                }
            }
        }
        self.chunk_buf = chunker.into_buffer();
        Ok(content)
    }

    /// Stores a tree (a directory listing), returning its chunk list.
    ///
    /// # Errors
    /// Storage or catalog errors.
    pub fn add_tree(&mut self, tree: &Tree) -> crate::error::Result<Vec<Id>> {
        let json = serde_json::to_vec(tree)?;
        let cdc = self.repo.cdc.clone();
        let mut ids = vec![];
        for piece in cdc.split(&json) {
            ids.push(self.add_chunk(
                BlobKind::Tree,
                piece.to_vec(),
                self.repo.config.compression_level,
            )?);
        }
        if ids.is_empty() {
            ids.push(self.add_chunk(BlobKind::Tree, vec![], 0)?);
        }
        Ok(ids)
    }

    /// Flushes everything and writes the snapshot.
    ///
    /// # Errors
    /// Storage errors; nothing is half-written (the snapshot comes last).
    pub fn finish(
        mut self,
        source: Source,
        root: Vec<Id>,
        opts: &BackupOptions,
        started: Instant,
    ) -> crate::error::Result<BackupOutcome> {
        // A cancelled run never commits a snapshot.
        self.check_cancel()?;
        // No read transaction may be open when writing outside a batch.
        self.tx_commit()?;
        if let Some((source, run_id)) = &self.file_cache {
            self.catalog()
                .file_cache_prune(source, *run_id - FILE_CACHE_KEEP)?;
        }
        self.up.finish()?;
        self.collect_done()?;
        self.write_index()?;
        self.tx_commit()?;
        if let Some(id) = self.pending.iter().next() {
            crate::error::bail!(
                "internal error: chunk {} was queued but never written",
                id.short()
            );
        }
        self.summary.duration_ms = started.elapsed().as_millis() as u64;
        let snap = Snapshot {
            version: 1,
            time: super::now_rfc3339(),
            source,
            host: opts.host.clone(),
            tags: opts.tags.clone(),
            restore_point: opts.restore_point.clone(),
            facts: opts.facts.clone(),
            root,
            summary: self.summary.clone(),
            labctl_version: env!("CARGO_PKG_VERSION").to_string(),
        };
        let chunks = std::mem::take(&mut self.referenced).into_sorted();
        let (id, bytes) = snapshot::encode(&snap, chunks, &self.repo.keys.meta_recipient());
        self.repo
            .backend
            .put(&format::snapshot_name(&id), &bytes)
            .context_obj("writing snapshot", &id)?;
        self.catalog().add_snapshot(&id, &snap)?;
        self.catalog().set_meta(RUN_UNFINISHED, "")?;
        if let Some((_, run)) = &self.file_cache {
            self.catalog().file_cache_run_end(*run)?;
        }
        self.progress.finish();
        Ok(BackupOutcome {
            snapshot_id: id,
            summary: self.summary,
        })
    }
}

/// A source read error: a source that walks many items (files) records it
/// and goes on; [`BackupRun::add_stream`] returns it for read errors.
#[derive(Debug)]
pub struct SourceError(pub String);
impl std::fmt::Display for SourceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for SourceError {}

trait ContextObj<T> {
    fn context_obj(self, what: &str, id: &Id) -> crate::error::Result<T>;
}
impl<T, E: std::error::Error + Send + Sync + 'static> ContextObj<T> for Result<T, E> {
    fn context_obj(self, what: &str, id: &Id) -> crate::error::Result<T> {
        self.map_err(|e| {
            anyhow::Error::new(e)
                .context(format!("{what} {}", id.short()))
                .into()
        })
    }
}

/// Catalog meta key: set when a backup run starts, emptied when it writes
/// its snapshot; left set by a run that was killed or failed.
const RUN_UNFINISHED: &str = "backup-run-unfinished";
/// Catalog meta key: when packs/ was last listed for orphans (Unix secs).
const ORPHANS_LISTED: &str = "orphans-listed";
/// How often a backup lists packs/ for other hosts' orphans.
const ORPHAN_LISTING_EVERY_SECS: u64 = 24 * 3600;

/// At the start of a run, adopts orphan packs ([`adopt_orphan_packs`])
/// when it pays: a run with this catalog was cut short (its packs are
/// most likely the orphans, and re-using them saves uploading them
/// again), or the last listing is a day old (another host's killed run).
/// Listing packs/ is one request per 1,000 packs, the largest fixed cost
/// of a small backup into a big repository on a distant store; an orphan
/// not adopted costs only a second copy of its chunks, which prune
/// removes.
///
/// # Errors
/// As [`adopt_orphan_packs`], and catalog errors.
fn adopt_orphans_when_due(repo: &Repository) -> crate::error::Result<()> {
    let cat = &repo.catalog;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let interrupted = cat.get_meta(RUN_UNFINISHED)?.is_some_and(|v| !v.is_empty());
    let stale = cat
        .get_meta(ORPHANS_LISTED)?
        .and_then(|v| v.parse::<u64>().ok())
        .is_none_or(|t| now.saturating_sub(t) >= ORPHAN_LISTING_EVERY_SECS);
    if interrupted || stale {
        adopt_orphan_packs(repo)?;
        cat.set_meta(ORPHANS_LISTED, &now.to_string())?;
    }
    cat.set_meta(RUN_UNFINISHED, &now.to_string())?;
    Ok(())
}

/// Indexes packs in the backend that no index fragment or catalog entry
/// knows (left by a killed backup), so their chunks are re-used. Returns
/// the packs adopted.
///
/// # Errors
/// Storage or key errors; a pack whose trailer is unreadable is skipped
/// (check reports it).
pub fn adopt_orphan_packs(repo: &Repository) -> crate::error::Result<Vec<Id>> {
    adopt_listed_packs(repo, &repo.list_packs()?)
}

/// [`adopt_orphan_packs`] over a listing the caller already has (see
/// [`Repository::list_packs`]), so a command lists storage once.
///
/// # Errors
/// As [`adopt_orphan_packs`].
pub fn adopt_listed_packs(
    repo: &Repository,
    listed: &std::collections::HashMap<Id, u64>,
) -> crate::error::Result<Vec<Id>> {
    let cat = &repo.catalog;
    let mut orphans = vec![];
    for (id, size) in listed {
        // A marked pack is on its way out: a prune may be between deleting
        // the index fragments that list it and deleting the pack itself.
        // Adopting it would leave an index entry pointing at nothing.
        if !cat.has_pack(id)? && !cat.is_marked(id)? {
            orphans.push((*id, *size));
        }
    }
    let mut adopted = vec![];
    for (id, size) in orphans {
        if let Ok(entries) = read_pack_trailer(repo, &id, size) {
            cat.begin()?;
            cat.add_pack(&id, size, None, &entries)?;
            cat.commit()?;
            adopted.push(id);
        }
    }
    Ok(adopted)
}

/// Reads a pack's trailer with the META key (two range reads at most).
///
/// # Errors
/// Storage, key or integrity errors naming the pack.
pub fn read_pack_trailer(
    repo: &Repository,
    id: &Id,
    size: u64,
) -> crate::error::Result<Vec<PackEntry>> {
    let name = format::pack_name(id);
    let mut want = size.min(64 * 1024);
    loop {
        let tail = repo.backend.get_range(&name, size - want, want)?;
        match pack::parse_trailer(&tail, size, &repo.keys.meta_identity, &name)? {
            Ok(entries) => return Ok(entries),
            Err(need) if (need as u64) > want && (need as u64) <= size => want = need as u64,
            Err(_) => return Err(LabError::integrity(format!("{name}: bad trailer length")).into()),
        }
    }
}

/// File-cache content encoding: `0 id[32]` or `1 u64le(zero run)` per element.
fn encode_content(content: &[ContentRef]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() * 33);
    for c in content {
        match c {
            ContentRef::Chunk(id) => {
                out.push(0);
                out.extend_from_slice(&id.0);
            }
            ContentRef::Zero { zero } => {
                out.push(1);
                out.extend_from_slice(&zero.to_le_bytes());
            }
        }
    }
    out
}

fn decode_content(mut b: &[u8]) -> Option<Vec<ContentRef>> {
    let mut out = vec![];
    while let Some((&tag, rest)) = b.split_first() {
        match tag {
            0 if rest.len() >= 32 => {
                out.push(ContentRef::Chunk(Id::from_slice(&rest[..32])?));
                b = &rest[32..];
            }
            1 if rest.len() >= 8 => {
                out.push(ContentRef::Zero {
                    zero: u64::from_le_bytes(rest[..8].try_into().ok()?),
                });
                b = &rest[8..];
            }
            _ => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_set_is_the_sorted_distinct_ids_and_stays_within_twice_their_number() {
        let id = |i: u64| Id(*blake3::hash(&i.to_le_bytes()).as_bytes());
        let mut set = RefSet::default();
        let mut want = std::collections::BTreeSet::new();
        // 100,000 distinct IDs, each referenced three times, spread out.
        for round in 0..3u64 {
            for i in 0..100_000u64 {
                let k = (i * 7919 + round * 13) % 100_000;
                set.insert(id(k));
                want.insert(id(k));
                assert!(set.ids.len() <= 2 * want.len().max(32_768) + 1);
            }
        }
        assert_eq!(set.into_sorted(), want.into_iter().collect::<Vec<_>>());
        assert!(RefSet::default().into_sorted().is_empty());
    }
}
