//! The encrypted, deduplicated repository.
//!
//! Pipeline: chunk → keyed hash → zstd → age → pack → index → snapshot.
//! Layout in the backend: `config`, `keys/<id>`, `packs/<2 hex>/<id>`,
//! `index/<id>`, `snapshots/<id>`. Objects are written once and never
//! modified; the write order (packs, then index fragments, then the
//! snapshot) means a crash at any point leaves a consistent repository: at
//! worst unindexed packs, which the next backup indexes and re-uses.
//! No lock is taken on the backup path. See `docs/FORMAT.md`.

pub mod backup;
pub mod blob;
pub mod catalog;
pub mod check;
pub mod chunker;
pub mod config;
pub mod crypto;
pub mod extract;
pub mod forget;
pub mod format;
pub mod id;
pub mod index;
pub mod keys;
pub mod open;
pub mod pack;
pub mod prune;
pub mod select;
pub mod snapshot;
#[cfg(test)]
pub(crate) mod testkit;
pub mod tree;

pub use id::{ChunkId, Id, PackId, SnapshotId};

use crate::backend::{Backend, BackendError};
use crate::error::LabError;
use crate::repo::catalog::Catalog;
use anyhow::Context;
use chunker::{Cdc, ChunkerParams};
use config::RepoConfig;
use keys::Keys;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Options for `repo init`.
#[derive(Debug, Clone)]
pub struct InitOptions {
    pub chunker: ChunkerParams,
    pub compression_level: i32,
    pub image_compression_level: i32,
    pub pack_size: u32,
    /// Escrow copies of the restore key: admin age recipients.
    pub admin_recipients: Vec<age::x25519::Recipient>,
    /// Escrow copy of the restore key under a passphrase (age scrypt).
    pub passphrase: Option<String>,
    /// S3 Object Lock for every object written (checked against the bucket).
    pub object_lock: Option<config::ObjectLockConfig>,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            chunker: ChunkerParams::default(),
            compression_level: 3,
            image_compression_level: 3,
            pack_size: 32 << 20,
            admin_recipients: vec![],
            passphrase: None,
            object_lock: None,
        }
    }
}

/// Creates a new repository and returns its (restore) keys.
///
/// # Errors
/// Refused when a repository (a `config`) already exists there.
pub fn init(backend: &dyn Backend, opts: &InitOptions) -> crate::error::Result<Keys> {
    opts.chunker.validate().map_err(LabError::usage)?;
    if !(0..=19).contains(&opts.compression_level)
        || !(0..=19).contains(&opts.image_compression_level)
    {
        return Err(LabError::usage("compression level must be 0 (off) to 19").into());
    }
    if backend.stat(format::CONFIG_NAME)?.is_some() {
        return Err(LabError::refused(format!(
            "a repository already exists at {}; labctl never overwrites one",
            backend.location()
        ))
        .into());
    }
    if let Some(lock) = &opts.object_lock {
        if lock.days == 0 || !(lock.mode == "compliance" || lock.mode == "governance") {
            return Err(LabError::usage(
                "object lock needs days > 0 and mode compliance or governance",
            )
            .into());
        }
        // Fails clearly on a store without Object Lock, before anything is written.
        backend.set_object_lock(lock.to_lock())?;
    }
    let repo_id = hex::encode(rand::random::<[u8; 16]>());
    let mut keys = Keys::generate(&repo_id);
    let config = RepoConfig {
        repo_id: repo_id.clone(),
        created: now_rfc3339(),
        chunker: opts.chunker,
        compression_level: opts.compression_level,
        image_compression_level: opts.image_compression_level,
        pack_size: opts.pack_size,
        meta_recipient: keys.meta_recipient().to_string(),
        data_recipients: keys.data_recipients.iter().map(|r| r.to_string()).collect(),
        object_lock: opts.object_lock.clone(),
    };
    config.validate()?;
    let config_bytes = config.encode();
    // Every key file (and escrow copy) pins this exact config.
    keys.config_hash = Some(Id::of_object(&config_bytes));
    // Escrow first: a config without its key copies would be a repository
    // nobody can recover.
    let plain = keys.to_json();
    if !opts.admin_recipients.is_empty() {
        let mut obj = format::header(format::MAGIC_KEY).to_vec();
        obj.extend_from_slice(&crypto::encrypt(&opts.admin_recipients, plain.as_bytes()));
        backend.put(&format!("keys/{}", Id::of_object(&obj).hex()), &obj)?;
    }
    if let Some(p) = &opts.passphrase {
        let mut obj = format::header(format::MAGIC_KEY).to_vec();
        obj.extend_from_slice(&crypto::encrypt_passphrase(p, plain.as_bytes()));
        backend.put(&format!("keys/{}", Id::of_object(&obj).hex()), &obj)?;
    }
    backend.put(format::CONFIG_NAME, &config_bytes)?;
    Ok(keys)
}

/// Recovers the restore key from an escrow copy under `keys/`.
///
/// # Errors
/// A key error when no escrow copy opens with what was given.
pub fn recover_key(
    backend: &dyn Backend,
    passphrase: Option<&str>,
    identity: Option<&age::x25519::Identity>,
) -> crate::error::Result<Keys> {
    let mut names = vec![];
    backend.list("keys/", &mut |o| names.push(o.name))?;
    if names.is_empty() {
        return Err(LabError::key("the repository holds no escrowed keys (keys/ is empty)").into());
    }
    for name in &names {
        let bytes = backend.get(name)?;
        let body = format::strip_header(&bytes, format::MAGIC_KEY, name)?;
        if let Ok(plain) = crypto::decrypt_escrow(body, passphrase, identity, name) {
            let text = String::from_utf8(plain)
                .map_err(|_| LabError::integrity(format!("{name}: not text")))?;
            return Ok(Keys::from_json(&text, name)?);
        }
    }
    Err(LabError::key(format!(
        "none of the {} escrowed key(s) opens with the given passphrase or identity",
        names.len()
    ))
    .into())
}

pub use crate::util::now_rfc3339;

/// The default directory for catalogs: `$LABCTL_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/labctl`, else `~/.cache/labctl`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("LABCTL_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("labctl");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".cache/labctl"),
        None => PathBuf::from("/var/cache/labctl"),
    }
}

/// An open repository: backend, config, keys and the synced catalog.
pub struct Repository {
    pub backend: Arc<dyn Backend>,
    pub config: RepoConfig,
    pub keys: Keys,
    pub catalog: Catalog,
    pub cdc: Cdc,
    /// Small packs (tree packs, as backups write them) read whole for the
    /// directory walk.
    pub small_packs: SmallPacks,
    last_snapshot: std::sync::Mutex<Option<(Id, LoadedSnapshot)>>,
}

/// A snapshot manifest and its list of referenced chunks.
type LoadedSnapshot = (snapshot::Snapshot, Vec<Id>);

/// Whole small packs, kept for reading tree blobs: a restore's walk reads
/// every directory listing of a snapshot, which backups put together into
/// small packs, so one GET of such a pack replaces one ranged GET per
/// directory (35 requests for the benchmark tree, each a few milliseconds
/// of an object store's time). Bounded: packs up to [`SMALL_PACK`] bytes,
/// [`SMALL_PACKS_TOTAL`] bytes in all, oldest dropped first. Concurrent
/// readers of one pack wait for a single fetch.
#[derive(Default)]
pub struct SmallPacks {
    packs: std::sync::Mutex<SmallPackList>,
}

type SmallPackCell = Arc<std::sync::OnceLock<Option<Arc<Vec<u8>>>>>;

#[derive(Default)]
struct SmallPackList {
    entries: std::collections::VecDeque<(Id, u64, SmallPackCell)>,
    total: u64,
}

/// What `labctl repair index` did.
#[derive(Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RepairReport {
    /// The fragment written for packs no fragment listed.
    pub index_written: Vec<Id>,
    pub packs_indexed: usize,
    /// Packs the index listed that storage no longer holds, dropped from it.
    pub packs_dropped: Vec<Id>,
    /// Copies of directory listings written to get back to [`TREE_COPIES`].
    pub tree_copies_written: u64,
    pub tree_packs_written: usize,
}

/// How many copies of each directory listing (tree blob) a repository
/// keeps, each in a different pack: losing one pack never loses a
/// snapshot's directory structure (see FORMAT.md, "What survives what").
pub const TREE_COPIES: usize = 2;

/// Largest pack [`SmallPacks`] reads whole.
pub const SMALL_PACK: u64 = 4 << 20;
/// Bytes [`SmallPacks`] keeps at most.
pub const SMALL_PACKS_TOTAL: u64 = 16 << 20;

impl SmallPacks {
    /// The whole pack when it is small (`size` from the index), fetched
    /// once; `None` when it is large or could not be read whole (the caller
    /// then reads its range, which reports any error properly).
    fn get(&self, backend: &dyn Backend, pack: &Id, size: u64) -> Option<Arc<Vec<u8>>> {
        if size > SMALL_PACK {
            return None;
        }
        let cell = {
            let mut list = self.packs.lock().unwrap();
            match list.entries.iter().find(|(id, _, _)| id == pack) {
                Some((_, _, cell)) => cell.clone(),
                None => {
                    while list.total + size > SMALL_PACKS_TOTAL {
                        match list.entries.pop_front() {
                            Some((_, n, _)) => list.total -= n,
                            None => break,
                        }
                    }
                    let cell = SmallPackCell::default();
                    list.entries.push_back((*pack, size, cell.clone()));
                    list.total += size;
                    cell
                }
            }
        };
        cell.get_or_init(|| {
            backend
                .get(&format::pack_name(pack))
                .ok()
                .filter(|b| b.len() as u64 == size)
                .map(Arc::new)
        })
        .clone()
    }
}

impl Repository {
    /// Opens a repository, checks the key belongs to it, and syncs the catalog.
    ///
    /// # Errors
    /// Key errors when the key is for another repository; storage errors.
    pub fn open(
        backend: Arc<dyn Backend>,
        keys: Keys,
        cache_dir: &Path,
    ) -> crate::error::Result<Repository> {
        let repo = Self::open_unsynced(backend, keys, cache_dir)?;
        repo.sync_catalog()?;
        Ok(repo)
    }

    /// [`Repository::open`] without bringing the catalog up to date, for
    /// `catalog rebuild`, which reloads it whole anyway.
    ///
    /// # Errors
    /// As [`Repository::open`].
    pub fn open_unsynced(
        backend: Arc<dyn Backend>,
        keys: Keys,
        cache_dir: &Path,
    ) -> crate::error::Result<Repository> {
        let bytes = match backend.get(format::CONFIG_NAME) {
            Ok(b) => b,
            Err(BackendError::NotFound { .. }) => {
                return Err(LabError::usage(format!(
                "no labctl repository at {} (no config object); create one with `labctl repo init`",
                backend.location()
            ))
                .into())
            }
            Err(e) => return Err(e.into()),
        };
        let config = RepoConfig::decode(&bytes)?;
        if config.repo_id != keys.repo_id {
            return Err(LabError::key(format!(
                "the key is for repository {} but {} is repository {}: wrong key file",
                keys.repo_id,
                backend.location(),
                config.repo_id
            ))
            .into());
        }
        if let Some(pinned) = keys.config_hash {
            if Id::of_object(&bytes) != pinned {
                return Err(LabError::integrity(format!(
                    "the repository config at {} is not the one this key file was made with (its hash differs): it was changed in storage after `repo init`; labctl will not use it (restore the original config object, or use a key file of this repository)",
                    backend.location()
                ))
                .into());
            }
        }
        config.validate()?;
        let recips: Vec<String> = keys.data_recipients.iter().map(|r| r.to_string()).collect();
        if config.meta_recipient != keys.meta_recipient().to_string()
            || config.data_recipients != recips
        {
            return Err(LabError::key(
                "the repository config names other recipients than the key file: config tampered with, or wrong key",
            )
            .into());
        }
        if let Some(lock) = &config.object_lock {
            backend.set_object_lock(lock.to_lock())?;
        }
        let catalog = Catalog::open(&cache_dir.join(&config.repo_id).join("catalog.db"))?;
        let cdc = Cdc::new(&keys.chunker_seed, &config.chunker);
        Ok(Repository {
            backend,
            config,
            keys,
            catalog,
            cdc,
            small_packs: SmallPacks::default(),
            last_snapshot: Default::default(),
        })
    }

    /// Loads index fragments and snapshots the catalog has not seen yet, and
    /// forgets snapshots that are gone. Streams into SQLite.
    ///
    /// # Errors
    /// Storage, key or integrity errors naming the object.
    pub fn sync_catalog(&self) -> crate::error::Result<()> {
        self.sync_index(false)?;
        self.sync_snapshots()
    }

    /// Brings the catalog's index up to the repository's index fragments:
    /// loads new ones, and reloads all when one it knew is gone (prune
    /// replaced it) or `reload` is set. The whole change is one SQLite
    /// transaction, so a restore or backup reading the same catalog from
    /// another process sees the old index or the new one, never an empty
    /// or half-loaded one.
    ///
    /// # Errors
    /// Storage, key or integrity errors naming the fragment (nothing is
    /// changed then).
    pub fn sync_index(&self, reload: bool) -> crate::error::Result<()> {
        let mut index_ids = vec![];
        self.backend.list("index/", &mut |o| {
            if let Some(id) = o.name.strip_prefix("index/").and_then(Id::from_hex) {
                index_ids.push(id)
            }
        })?;
        let known = self.catalog.index_files()?;
        let present: std::collections::HashSet<Id> = index_ids.iter().copied().collect();
        // An index fragment vanished (prune replaced it): reload everything.
        let reload = reload || known.iter().any(|k| !present.contains(k));
        let mut todo = vec![];
        for id in &index_ids {
            if reload || !self.catalog.has_index_file(id)? {
                todo.push(*id);
            }
        }
        if todo.is_empty() && !reload {
            return Ok(());
        }
        let damaged = self.catalog.atomically(|| {
            // The whole index is (re)loaded: staged and sorted in one pass.
            let bulk = reload || self.catalog.has_no_blobs()?;
            if bulk {
                self.catalog.begin_bulk_index()?;
            }
            let mut damaged = vec![];
            for id in &todo {
                let name = format::index_name(id);
                let bytes = match self.backend.get(&name) {
                    Ok(b) => b,
                    // Replaced by a prune since the listing: the next sync
                    // sees its successor.
                    Err(BackendError::NotFound { .. }) => continue,
                    Err(e) => return Err(e.into()),
                };
                match index::decode_named(&bytes, id, &self.keys.meta_identity, &name) {
                    Ok(packs) => {
                        for p in &packs {
                            if bulk {
                                self.catalog.add_pack_bulk(&p.id, p.size, id, &p.entries)?;
                            } else {
                                self.catalog.add_pack(&p.id, p.size, Some(id), &p.entries)?;
                            }
                        }
                    }
                    // A damaged fragment is noted (check reports it) and
                    // its packs are read from their own trailers below.
                    Err(e) => damaged.push((*id, e.to_string())),
                }
                self.catalog.add_index_file(id)?;
            }
            if bulk {
                self.catalog.finish_bulk_index()?;
            }
            Ok(damaged)
        })?;
        if !damaged.is_empty() {
            for (id, why) in &damaged {
                self.catalog.note_damaged_index(id, why)?;
            }
            backup::adopt_orphan_packs(self)?;
        }
        Ok(())
    }

    /// Makes sure every chunk in `chunks` is known to the catalog: when some
    /// are not (an index fragment was deleted or is damaged), packs no index
    /// lists are read from their trailers (META) and added. Returns how many
    /// chunks are still unknown (their packs are really missing).
    ///
    /// # Errors
    /// Storage or catalog errors.
    pub fn ensure_indexed(&self, chunks: &[Id]) -> crate::error::Result<usize> {
        let missing = |cat: &Catalog| -> crate::error::Result<usize> {
            cat.reading(|| {
                let mut n = 0;
                for c in chunks {
                    if !cat.has_blob(c)? {
                        n += 1;
                    }
                }
                Ok(n)
            })
        };
        if missing(&self.catalog)? == 0 {
            return Ok(0);
        }
        backup::adopt_orphan_packs(self)?;
        missing(&self.catalog)
    }

    /// Repairs the index, as restic's `repair index` does, and restores
    /// redundancy:
    /// 1. writes an index fragment for every pack in storage that no
    ///    readable fragment lists (read from the packs' trailers);
    /// 2. drops from the index the packs that are missing from storage
    ///    (their fragments are replaced by one without them; fragments under
    ///    Object Lock stay);
    /// 3. writes the second copy of every used directory listing that has
    ///    fewer than [`TREE_COPIES`] in storage (see
    ///    [`prune::restore_tree_copies`]).
    ///
    /// Damaged fragments are left for the operator to delete. The backup
    /// key is enough.
    ///
    /// # Errors
    /// Storage, key or catalog errors.
    pub fn repair_index(&self) -> crate::error::Result<RepairReport> {
        let mut report = RepairReport::default();
        let listed = self.list_packs()?;
        backup::adopt_listed_packs(self, &listed)?;
        let mut packs = vec![];
        for (id, size) in self.catalog.unindexed_packs()? {
            if listed.contains_key(&id) && !self.catalog.is_marked(&id)? {
                packs.push(index::IndexedPack {
                    id,
                    size,
                    entries: self.catalog.pack_entries(&id)?,
                });
            }
        }
        report.packs_indexed = packs.len();
        report.index_written = self.publish_packs(&packs)?;

        let missing: Vec<(Id, u64)> = self
            .catalog
            .packs()?
            .into_iter()
            .filter(|(id, _, indexed)| *indexed && !listed.contains_key(id))
            .map(|(id, size, _)| (id, size))
            .collect();
        if !missing.is_empty() {
            let fragments = self.catalog.index_files()?;
            let now = time::OffsetDateTime::now_utc();
            let locked = prune::locked_fragments(self, &fragments, now)?;
            prune::consolidate_index(self, &fragments, &missing, &locked)?;
            let ids: Vec<Id> = missing.iter().map(|(p, _)| *p).collect();
            self.catalog.remove_packs(&ids)?;
            report.packs_dropped = ids;
        }

        prune::load_used(self)?;
        let mut alive = std::collections::HashSet::new();
        for id in listed.into_keys() {
            if !self.catalog.is_marked(&id)? {
                alive.insert(id);
            }
        }
        let copied = prune::restore_tree_copies(self, &alive, false);
        self.catalog.used_reset()?;
        let (n, written) = copied?;
        report.tree_copies_written = n;
        self.publish_packs(&written)?;
        report.tree_packs_written = written.len();
        Ok(report)
    }

    /// Every pack in storage with its size: one listing of `packs/`.
    ///
    /// # Errors
    /// Storage errors.
    pub fn list_packs(&self) -> crate::error::Result<std::collections::HashMap<Id, u64>> {
        let mut listed = std::collections::HashMap::new();
        self.backend.list("packs/", &mut |o| {
            if let Some(id) = o.name.rsplit('/').next().and_then(Id::from_hex) {
                listed.insert(id, o.size);
            }
        })?;
        Ok(listed)
    }

    /// Makes packs written outside a backup (prune's repacks, repair's
    /// copies) visible: index fragments listing them (at most
    /// [`index::MAX_FRAGMENT_BLOBS`] entries each), then the catalog.
    /// Returns the fragments written, none when there was nothing to index.
    ///
    /// # Errors
    /// Storage or catalog errors.
    pub fn publish_packs(&self, packs: &[index::IndexedPack]) -> crate::error::Result<Vec<Id>> {
        let mut written = vec![];
        for run in index::split(packs) {
            let id = self.write_fragment(run)?;
            self.catalog.atomically(|| {
                for p in run {
                    self.catalog
                        .add_pack(&p.id, p.size, Some(&id), &p.entries)?;
                }
                self.catalog.add_index_file(&id)
            })?;
            written.push(id);
        }
        Ok(written)
    }

    /// Writes one index fragment listing `packs` (already there is fine:
    /// fragments are named by their content); the caller updates the
    /// catalog.
    ///
    /// # Errors
    /// Storage errors.
    pub(crate) fn write_fragment(&self, packs: &[index::IndexedPack]) -> crate::error::Result<Id> {
        let (id, bytes) = index::encode(packs, &self.keys.meta_recipient());
        match self.backend.put(&format::index_name(&id), &bytes) {
            Ok(()) | Err(BackendError::AlreadyExists { .. }) => Ok(id),
            Err(e) => Err(e.into()),
        }
    }

    /// Loads new snapshots and prune marks, forgets deleted snapshots.
    fn sync_snapshots(&self) -> crate::error::Result<()> {
        let mut snap_ids = vec![];
        self.backend.list("snapshots/", &mut |o| {
            if let Some(id) = o.name.strip_prefix("snapshots/").and_then(Id::from_hex) {
                snap_ids.push(id)
            }
        })?;
        let present: std::collections::HashSet<Id> = snap_ids.iter().copied().collect();
        let now = now_rfc3339();
        for known in self.catalog.snapshot_ids()? {
            if !present.contains(&known) {
                // Not removed by a forget through this catalog (that takes
                // it out of the catalog first): deleted elsewhere, or by
                // someone with write access to storage. `check` says so.
                self.catalog.note_vanished(&known, &now)?;
                self.forget_loaded_snapshot(&known);
            }
        }
        let (_, marks) = prune::load_marks(self)?;
        self.catalog
            .set_marks(&marks.keys().copied().collect::<Vec<_>>())?;
        let known: std::collections::HashSet<Id> =
            self.catalog.snapshot_ids()?.into_iter().collect();
        for id in snap_ids.iter().filter(|i| !known.contains(i)) {
            let (snap, _) = self.load_snapshot(id)?;
            self.catalog.add_snapshot(id, &snap)?;
        }
        Ok(())
    }

    /// Reads and decrypts a snapshot manifest.
    ///
    /// # Errors
    /// Storage, key or integrity errors naming the snapshot.
    /// The last one read is kept (snapshots never change once written), so
    /// a command that reads the same snapshot twice fetches it once.
    pub fn load_snapshot(&self, id: &Id) -> crate::error::Result<(snapshot::Snapshot, Vec<Id>)> {
        if let Some((last, snap)) = &*self.last_snapshot.lock().unwrap() {
            if last == id {
                return Ok(snap.clone());
            }
        }
        let name = format::snapshot_name(id);
        let bytes = self.backend.get(&name)?;
        let snap = snapshot::decode(&bytes, &self.keys.meta_identity, &name)?;
        *self.last_snapshot.lock().unwrap() = Some((*id, snap.clone()));
        Ok(snap)
    }

    /// Drops a deleted snapshot from the one [`Repository::load_snapshot`]
    /// keeps.
    pub fn forget_loaded_snapshot(&self, id: &Id) {
        let mut last = self.last_snapshot.lock().unwrap();
        if last.as_ref().is_some_and(|(l, _)| l == id) {
            *last = None;
        }
    }

    /// Resolves `latest`, a full ID or a unique prefix of at least 4 hex digits.
    ///
    /// # Errors
    /// A usage error when nothing or more than one snapshot matches.
    pub fn resolve_snapshot(&self, spec: &str) -> crate::error::Result<Id> {
        let rows = self.catalog.snapshots()?;
        if spec == "latest" {
            return rows
                .last()
                .map(|r| r.id)
                .ok_or_else(|| LabError::usage("the repository has no snapshots yet").into());
        }
        if spec.len() < 4 {
            return Err(LabError::usage(format!(
                "snapshot '{spec}': give at least 4 hex digits or 'latest'"
            ))
            .into());
        }
        let matches: Vec<Id> = rows
            .iter()
            .map(|r| r.id)
            .filter(|id| id.hex().starts_with(spec))
            .collect();
        match matches.len() {
            1 => Ok(matches[0]),
            0 => Err(LabError::usage(format!(
                "no snapshot matches '{spec}'; list them with `labctl snapshots`"
            ))
            .into()),
            n => Err(
                LabError::usage(format!("'{spec}' matches {n} snapshots; give more digits")).into(),
            ),
        }
    }

    /// Fetches and decodes one blob (needs the DATA identity).
    ///
    /// # Errors
    /// Missing blob, storage, key or integrity errors naming pack and blob.
    pub fn read_blob(&self, id: &Id) -> crate::error::Result<Vec<u8>> {
        self.read_any_copy(id, |loc| read_blob_at(&*self.backend, &self.keys, id, loc))
    }

    /// Reads a blob through `read`, trying each stored copy in turn (a
    /// directory listing has two): the first copy that reads and decodes
    /// wins; when none does, the first copy's error is returned.
    fn read_any_copy(
        &self,
        id: &Id,
        mut read: impl FnMut(&crate::repo::catalog::BlobLocation) -> crate::error::Result<Vec<u8>>,
    ) -> crate::error::Result<Vec<u8>> {
        let mut first_err = None;
        for loc in self.catalog.blob_locations(id)? {
            match read(&loc) {
                Ok(b) => return Ok(b),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(first_err.unwrap_or_else(|| {
            LabError::integrity(format!(
                "blob {} is not in the index (missing data)",
                id.short()
            ))
            .into()
        }))
    }

    /// Reads a tree (directory listing) by its chunk list.
    ///
    /// # Errors
    /// As [`Repository::read_blob`], or a malformed tree.
    pub fn read_tree(&self, chunks: &[Id]) -> crate::error::Result<tree::Tree> {
        let mut json = vec![];
        for c in chunks {
            json.extend_from_slice(&self.read_any_copy(c, |loc| {
                let size = self.catalog.pack_size(&loc.pack)?.unwrap_or(u64::MAX);
                read_tree_blob_at(&*self.backend, &self.keys, &self.small_packs, c, loc, size)
            })?);
        }
        serde_json::from_slice(&json).map_err(|e| {
            LabError::integrity(format!(
                "tree {}: malformed ({e})",
                chunks.first().map(|c| c.short()).unwrap_or_default()
            ))
            .into()
        })
    }
}

/// [`read_blob_at`] for a tree blob: from the whole pack when it is small
/// (see [`SmallPacks`]; `pack_size` from the index).
///
/// # Errors
/// As [`read_blob_at`].
pub fn read_tree_blob_at(
    backend: &dyn Backend,
    keys: &Keys,
    small: &SmallPacks,
    id: &Id,
    loc: &crate::repo::catalog::BlobLocation,
    pack_size: u64,
) -> crate::error::Result<Vec<u8>> {
    let (start, end) = (
        loc.offset as usize,
        loc.offset as usize + loc.length as usize,
    );
    match small.get(backend, &loc.pack, pack_size) {
        Some(pack) if end <= pack.len() => {
            decode_blob(keys, "reading backed-up data", id, loc, &pack[start..end])
        }
        _ => read_blob_at(backend, keys, id, loc),
    }
}

/// Fetches one blob at a known location and decodes it (usable from worker threads).
///
/// # Errors
/// Storage, key or integrity errors naming pack and blob.
pub fn read_blob_at(
    backend: &dyn Backend,
    keys: &Keys,
    id: &Id,
    loc: &crate::repo::catalog::BlobLocation,
) -> crate::error::Result<Vec<u8>> {
    let name = format::pack_name(&loc.pack);
    let cipher = backend
        .get_range(&name, loc.offset as u64, loc.length as u64)
        .with_context(|| format!("reading blob {} from pack {}", id.short(), loc.pack.short()))?;
    decode_blob(keys, "reading backed-up data", id, loc, &cipher)
}

/// Decodes the stored bytes of one blob (decrypt with the DATA identity,
/// decompress, re-hash); errors name the blob and its pack. `purpose`
/// completes the message when the key file has no DATA identity.
///
/// # Errors
/// Key or integrity errors.
pub fn decode_blob(
    keys: &Keys,
    purpose: &str,
    id: &Id,
    loc: &crate::repo::catalog::BlobLocation,
    cipher: &[u8],
) -> crate::error::Result<Vec<u8>> {
    let identity = keys.data_identity(purpose)?;
    let what = || format!("blob {} in pack {}", id.short(), loc.pack.hex());
    Ok(blob::decode(
        cipher,
        identity,
        &keys.dedup_key,
        id,
        loc.raw_len as usize,
        &what,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::fs::FsBackend;
    use crate::backend::{BackendResult, ObjectInfo};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// The local backend, counting whole-object reads.
    struct Counting {
        inner: FsBackend,
        gets: AtomicUsize,
    }

    impl Backend for Counting {
        fn location(&self) -> String {
            self.inner.location()
        }
        fn put(&self, name: &str, data: &[u8]) -> BackendResult<()> {
            self.inner.put(name, data)
        }
        fn get(&self, name: &str) -> BackendResult<Vec<u8>> {
            self.gets.fetch_add(1, Ordering::SeqCst);
            self.inner.get(name)
        }
        fn get_range(&self, name: &str, offset: u64, len: u64) -> BackendResult<Vec<u8>> {
            self.inner.get_range(name, offset, len)
        }
        fn list(&self, prefix: &str, f: &mut dyn FnMut(ObjectInfo)) -> BackendResult<()> {
            self.inner.list(prefix, f)
        }
        fn stat(&self, name: &str) -> BackendResult<Option<u64>> {
            self.inner.stat(name)
        }
        fn delete(&self, name: &str) -> BackendResult<()> {
            self.inner.delete(name)
        }
    }

    /// Packs `1..` holding `sizes[i]` made-up data blobs each.
    fn synthetic_packs(sizes: &[usize]) -> Vec<index::IndexedPack> {
        use crate::repo::blob::BlobKind;
        use crate::repo::pack::PackEntry;
        sizes
            .iter()
            .enumerate()
            .map(|(p, &n)| index::IndexedPack {
                id: Id([p as u8 + 1; 32]),
                size: 8 + 100 * n as u64,
                entries: (0..n)
                    .map(|i| PackEntry {
                        kind: BlobKind::Data,
                        id: Id(
                            *blake3::hash(&[p as u8, (i >> 16) as u8, (i >> 8) as u8, i as u8])
                                .as_bytes(),
                        ),
                        offset: 8 + 100 * i as u32,
                        length: 100,
                        raw_len: 200,
                    })
                    .collect(),
            })
            .collect()
    }

    /// A new local repository under `dir`, its keys, and it opened with a
    /// catalog of its own.
    fn fresh_repo(dir: &Path) -> (Arc<dyn Backend>, Keys, Repository) {
        let backend: Arc<dyn Backend> = Arc::new(FsBackend::new(dir.join("repo")));
        let keys = init(backend.as_ref(), &InitOptions::default()).unwrap();
        let repo = Repository::open(backend.clone(), keys.clone(), &dir.join("a")).unwrap();
        (backend, keys, repo)
    }

    /// Prune's consolidation keeps to the same bound as every other
    /// fragment writer: three packs of 40% each never share one fragment.
    #[test]
    fn consolidation_never_writes_a_fragment_over_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let (backend, keys, repo) = fresh_repo(dir.path());
        let per = index::MAX_FRAGMENT_BLOBS * 2 / 5;
        let packs = synthetic_packs(&[per, per, per]);
        let written = repo.publish_packs(&packs).unwrap();
        prune::consolidate_index(&repo, &written, &[], &Default::default()).unwrap();
        let mut blobs = vec![];
        backend
            .list("index/", &mut |o| {
                let bytes = backend.get(&o.name).unwrap();
                let f = index::decode(&bytes, &keys.meta_identity, "i").unwrap();
                blobs.push(f.iter().map(|p| p.entries.len()).sum::<usize>());
            })
            .unwrap();
        blobs.sort();
        assert_eq!(blobs, vec![per, 2 * per]);
    }

    /// Index fragments written outside a backup stay bounded, prune's
    /// consolidation keeps every pack but the deleted ones, and a new
    /// catalog's bulk load agrees with the catalog that wrote them.
    #[test]
    fn fragments_are_bounded_and_a_bulk_load_agrees_with_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let (backend, keys, repo) = fresh_repo(dir.path());
        // Three packs of 40% of a fragment each, and a small one.
        let per = index::MAX_FRAGMENT_BLOBS * 2 / 5;
        let packs = synthetic_packs(&[per, per, per, 7]);
        let written = repo.publish_packs(&packs).unwrap();
        assert_eq!(
            written.len(),
            2,
            "two packs fit a fragment, the rest the next"
        );
        let fragment_blobs = |id: &Id| -> Vec<(Id, usize)> {
            let bytes = backend.get(&format::index_name(id)).unwrap();
            index::decode(&bytes, &keys.meta_identity, "i")
                .unwrap()
                .iter()
                .map(|p| (p.id, p.entries.len()))
                .collect()
        };
        for id in &written {
            let n: usize = fragment_blobs(id).iter().map(|(_, n)| n).sum();
            assert!(n <= index::MAX_FRAGMENT_BLOBS, "{n} blobs in one fragment");
        }
        // Consolidation without pack 2: bounded fragments, the others once each.
        let gone = packs[1].id;
        prune::consolidate_index(
            &repo,
            &written,
            &[(gone, packs[1].size)],
            &Default::default(),
        )
        .unwrap();
        let mut now = vec![];
        backend
            .list("index/", &mut |o| {
                now.push(Id::from_hex(&o.name[6..]).unwrap())
            })
            .unwrap();
        let mut listed = vec![];
        for id in &now {
            let f = fragment_blobs(id);
            assert!(f.iter().map(|(_, n)| n).sum::<usize>() <= index::MAX_FRAGMENT_BLOBS);
            listed.extend(f);
        }
        listed.sort();
        let mut want: Vec<(Id, usize)> = packs
            .iter()
            .filter(|p| p.id != gone)
            .map(|p| (p.id, p.entries.len()))
            .collect();
        want.sort();
        assert_eq!(listed, want);
        // A new catalog loads it in bulk and agrees with the writer's.
        let fresh = Repository::open(backend.clone(), keys, &dir.path().join("b")).unwrap();
        for p in packs.iter().filter(|p| p.id != gone) {
            assert_eq!(
                fresh.catalog.pack_entries(&p.id).unwrap(),
                repo.catalog.pack_entries(&p.id).unwrap()
            );
        }
        assert!(fresh.catalog.pack_entries(&gone).unwrap().is_empty());
        let probe = packs[2].entries[per / 2];
        assert_eq!(
            fresh.catalog.blob(&probe.id).unwrap().unwrap().pack,
            packs[2].id
        );
        assert!(!fresh.catalog.has_blob(&packs[1].entries[0].id).unwrap());
        // A reload (prune replaced fragments elsewhere) is the same bulk path.
        fresh.sync_index(true).unwrap();
        assert_eq!(fresh.catalog.packs().unwrap().len(), 3);
        assert_eq!(
            fresh.catalog.pack_entries(&packs[0].id).unwrap(),
            packs[0].entries
        );
    }

    #[test]
    fn small_packs_are_fetched_once_bounded_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let b = Counting {
            inner: FsBackend::new(dir.path()),
            gets: AtomicUsize::new(0),
        };
        let pack = |i: u8| Id([i; 32]);
        let bytes = |i: u8, n: u64| vec![i; n as usize];
        const MIB: u64 = 1 << 20;
        for i in 0..20u8 {
            b.put(&format::pack_name(&pack(i)), &bytes(i, MIB)).unwrap();
        }
        b.put(&format::pack_name(&pack(99)), &bytes(99, SMALL_PACK + 1))
            .unwrap();
        let cache = SmallPacks::default();
        // Eight readers of one pack at once: one fetch.
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    let got = cache.get(&b, &pack(0), MIB).unwrap();
                    assert_eq!(*got, bytes(0, MIB));
                });
            }
        });
        assert_eq!(b.gets.load(Ordering::SeqCst), 1);
        // Too large: not read whole.
        assert!(cache.get(&b, &pack(99), SMALL_PACK + 1).is_none());
        assert_eq!(b.gets.load(Ordering::SeqCst), 1);
        // A pack whose size differs from the index is not used.
        assert!(cache.get(&b, &pack(1), MIB - 1).is_none());
        // A missing pack neither: the caller's ranged read reports it.
        assert!(cache.get(&b, &pack(50), MIB).is_none());
        // At most SMALL_PACKS_TOTAL bytes: filling it drops the oldest.
        let before = b.gets.load(Ordering::SeqCst);
        for i in 2..20u8 {
            assert!(cache.get(&b, &pack(i), MIB).is_some());
        }
        let list = cache.packs.lock().unwrap();
        assert!(list.total <= SMALL_PACKS_TOTAL);
        assert!(!list.entries.iter().any(|(id, _, _)| *id == pack(0)));
        drop(list);
        assert_eq!(b.gets.load(Ordering::SeqCst), before + 18);
        assert!(cache.get(&b, &pack(0), MIB).is_some());
        assert_eq!(b.gets.load(Ordering::SeqCst), before + 19);
    }
}
