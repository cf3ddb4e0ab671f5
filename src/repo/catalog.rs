//! The local catalog: a SQLite cache of the repository, on disk.
//!
//! Holds the index working copy (which blob is in which pack), the snapshot
//! list and the file cache used to skip unchanged files. It is only a cache:
//! `labctl catalog rebuild` deletes it and recreates it from the repository,
//! and every fact in it can be re-derived from index fragments, pack
//! trailers and snapshots. Lookups go to SQLite on disk, never to an in-memory
//! copy, so memory does not grow with repository size. Schema versioned,
//! WAL mode, busy timeout (several labctl processes may share it).
//!
//! Beside it, in the same directory, `jobs.db`
//! ([`crate::records::jobs::JobHistory`]) holds the daemon's job history,
//! which is not derived from the repository and so is not part of this cache.

use crate::repo::blob::BlobKind;
use crate::repo::pack::PackEntry;
use crate::repo::Id;
use anyhow::Context;
use rusqlite::{params, Connection, OptionalExtension};
use std::path::{Path, PathBuf};

const SCHEMA_VERSION: i64 = 2;

/// Moves meta `blobs-lost-run` ([`BLOBS_LOST_RUN`]) to the run counter's
/// value ([`LAST_RUN`]), inserting it when missing: the statements of the
/// loss triggers in [`SCHEMA`] and of [`note_blobs_lost`]. No OR REPLACE:
/// inside a trigger, an outer INSERT OR IGNORE would turn it into OR IGNORE.
macro_rules! note_lost_sql {
    () => {
        "UPDATE meta SET value=COALESCE((SELECT value FROM meta WHERE key='last-run'), '0')
    WHERE key='blobs-lost-run';
INSERT INTO meta(key,value)
    SELECT 'blobs-lost-run', COALESCE((SELECT value FROM meta WHERE key='last-run'), '0')
    WHERE NOT EXISTS (SELECT 1 FROM meta WHERE key='blobs-lost-run');"
    };
}

const SCHEMA: &str = concat!(
    "
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS packs(id BLOB PRIMARY KEY, size INTEGER NOT NULL, index_id BLOB) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS blobs(id BLOB NOT NULL, pack BLOB NOT NULL, kind INTEGER NOT NULL,
    offset INTEGER NOT NULL, length INTEGER NOT NULL, raw_len INTEGER NOT NULL, PRIMARY KEY(id, pack)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS marked_packs(id BLOB PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS uploads_seen(id TEXT PRIMARY KEY, first_seen INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS blobs_by_pack ON blobs(pack);
CREATE TABLE IF NOT EXISTS index_files(id BLOB PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS snapshots(id BLOB PRIMARY KEY, time TEXT NOT NULL, kind TEXT NOT NULL,
    name TEXT NOT NULL, host TEXT NOT NULL, tags TEXT NOT NULL, json TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS file_cache(source TEXT NOT NULL, path BLOB NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL, ino INTEGER NOT NULL, content BLOB NOT NULL,
    run INTEGER NOT NULL, PRIMARY KEY(source, path)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS damaged_index(id BLOB PRIMARY KEY, why TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS vanished(id BLOB PRIMARY KEY, json TEXT NOT NULL, noticed TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS runs_open(run INTEGER PRIMARY KEY);
CREATE TRIGGER IF NOT EXISTS blobs_lost AFTER DELETE ON blobs BEGIN
",
    note_lost_sql!(),
    "
END;
CREATE TRIGGER IF NOT EXISTS packs_marked AFTER INSERT ON marked_packs BEGIN
",
    note_lost_sql!(),
    "
END;
"
);

/// Meta key: the backup run counter (see [`Catalog::file_cache_run_start`];
/// spelled out in `note_lost_sql!`).
const LAST_RUN: &str = "last-run";
/// Meta key: the run counter's value when the catalog last lost a blob
/// (packs removed, the index reloaded) or marked a pack for deletion. Kept
/// by triggers in the catalog itself (`blobs_lost`, `packs_marked` in
/// [`SCHEMA`]), so whatever deletes a blob row or adds a mark, whichever
/// labctl it is, moves it; a reload drops the table and notes it itself,
/// and a catalog found without the trigger (made or reloaded by an
/// earlier labctl) is noted at open. (Spelled out in `note_lost_sql!`.)
const BLOBS_LOST_RUN: &str = "blobs-lost-run";

/// What a backup run that uses the file cache starts with
/// ([`Catalog::file_cache_run_start`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheRun {
    /// This run's number.
    pub run: i64,
    /// A file cache entry last written or marked by a run numbered above
    /// this and below [`CacheRun::run`], and not [`CacheRun::open`], has
    /// every chunk stored, in packs not marked for deletion: no blob has
    /// been lost or marked since, and the run that wrote it finished.
    /// Other entries (older ones, those of runs still going or killed,
    /// and those of runs started since) must be looked up.
    pub trusted_after: i64,
    /// Runs above `trusted_after` that were started and have not finished
    /// (still going, or killed).
    pub open: Vec<i64>,
}

impl CacheRun {
    /// Whether an entry last marked by run `entry_run` is vouched for.
    pub fn trusts(&self, entry_run: i64) -> bool {
        self.trusted_after < entry_run && entry_run < self.run && !self.open.contains(&entry_run)
    }
}

/// Where a blob is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobLocation {
    pub pack: Id,
    pub kind: BlobKind,
    pub offset: u32,
    pub length: u32,
    pub raw_len: u32,
}

/// A file-cache entry: the stat facts that must match, and the content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileFacts {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
}

/// A file cache entry as stored: stat facts, encoded content, the run that
/// last wrote or marked it.
pub type CacheEntry = (FileFacts, Vec<u8>, i64);

/// One blob ID of a range scan ([`Catalog::blob_copies_in_range`]).
#[derive(Debug, Clone, Copy)]
pub struct BlobCopies {
    pub id: Id,
    /// Copies in stored packs (saturating).
    pub stored: u8,
    pub tree: bool,
}

/// A snapshot row.
#[derive(Debug, Clone)]
pub struct SnapshotRow {
    pub id: Id,
    pub json: String,
}

pub struct Catalog {
    conn: Connection,
    path: PathBuf,
}

/// The five `blobs` columns `(id or pack, kind, offset, length, raw_len)`,
/// selected from column `at` on.
fn blob_row(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<(Id, BlobKind, u32, u32, u32)> {
    Ok((
        id_of(r.get(at)?),
        BlobKind::from_u8(r.get(at + 1)?).unwrap_or(BlobKind::Data),
        r.get(at + 2)?,
        r.get(at + 3)?,
        r.get(at + 4)?,
    ))
}

/// A [`BlobLocation`] from `pack, kind, offset, length, raw_len` selected
/// from column `at` on.
fn location_at(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<BlobLocation> {
    let (pack, kind, offset, length, raw_len) = blob_row(r, at)?;
    Ok(BlobLocation {
        pack,
        kind,
        offset,
        length,
        raw_len,
    })
}

const INSERT_BLOB: &str =
    "INSERT OR IGNORE INTO blobs(id,pack,kind,offset,length,raw_len) VALUES(?1,?2,?3,?4,?5,?6)";

/// Records, in the caller's transaction, that blobs were lost or packs
/// marked: file cache entries of runs numbered up to now are no longer
/// trusted without a lookup of their chunks (see [`CacheRun`]); what the
/// triggers do, for the changes no trigger sees.
fn note_blobs_lost(conn: &Connection) -> crate::error::Result<()> {
    conn.execute_batch(note_lost_sql!())?;
    Ok(())
}

fn id_of(v: Vec<u8>) -> Id {
    Id::from_slice(&v).unwrap_or(Id([0; 32]))
}

/// [`id_of`] column `at` of a row, read in place (no copy of the blob):
/// for the scans over every blob row.
fn id_at(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Id> {
    Ok(Id::from_slice(r.get_ref(at)?.as_blob()?).unwrap_or(Id([0; 32])))
}

impl Catalog {
    /// Opens (creating if needed) the catalog at `path`.
    ///
    /// # Errors
    /// When the file cannot be opened or has a newer schema.
    pub fn open(path: &Path) -> crate::error::Result<Catalog> {
        crate::util::sqlite::private_file(path)?;
        let conn = Connection::open(path)
            .with_context(|| format!("opening catalog {}", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        crate::util::sqlite::set_wal(&conn)?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // 32 MiB of page cache (SQLite's default is 2 MiB): the upper
        // levels of a ten-million-blob index stay cached instead of being
        // read again with a system call per page on every lookup. Bounded,
        // so memory does not grow with the repository.
        conn.pragma_update(None, "cache_size", -32768)?;
        // Several processes (or daemon jobs) may open a new catalog at the
        // same moment: check and create the schema in one write transaction.
        conn.execute_batch("BEGIN IMMEDIATE")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);",
        )?;
        let v: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key='schema'", [], |r| {
                r.get(0)
            })
            .optional()?;
        if v.as_deref() != Some(SCHEMA_VERSION.to_string().as_str()) {
            // Another schema (or none): it is only a cache, so start afresh;
            // the next sync reloads it from the repository.
            conn.execute_batch(
                "DROP TABLE IF EXISTS packs; DROP TABLE IF EXISTS blobs; DROP TABLE IF EXISTS index_files;
                 DROP TABLE IF EXISTS snapshots; DROP TABLE IF EXISTS file_cache; DROP TABLE IF EXISTS marked_packs;
                 DROP TABLE IF EXISTS vanished; DROP TABLE IF EXISTS damaged_index; DELETE FROM meta;",
            )?;
            conn.execute(
                "INSERT OR REPLACE INTO meta(key,value) VALUES('schema',?1)",
                [SCHEMA_VERSION.to_string()],
            )?;
        }
        let tracked = conn
            .prepare("SELECT 1 FROM sqlite_master WHERE type='trigger' AND name='blobs_lost'")?
            .exists([])?;
        conn.execute_batch(SCHEMA)?;
        if !tracked {
            note_blobs_lost(&conn)?;
        }
        conn.execute_batch("COMMIT")?;
        conn.execute_batch(
            "CREATE TEMP TABLE IF NOT EXISTS used(id BLOB PRIMARY KEY) WITHOUT ROWID;
             CREATE TEMP TABLE IF NOT EXISTS absent(id BLOB PRIMARY KEY) WITHOUT ROWID;",
        )?;
        Ok(Catalog {
            conn,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Begins a write transaction, taking the write lock at once (`BEGIN
    /// IMMEDIATE`, waiting for it up to the busy timeout). A deferred
    /// `BEGIN` would take a read snapshot at the first read, and a write
    /// after another connection has committed would then be refused at
    /// once (SQLITE_BUSY_SNAPSHOT, "cannot promote read transaction"),
    /// without waiting: a prune's bookkeeping failed that way while a
    /// backup wrote.
    pub fn begin(&self) -> crate::error::Result<()> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        Ok(())
    }

    /// Begins a transaction for work that writes only this connection's
    /// TEMP tables (the used set): deferred, so it never holds the
    /// catalog's write lock and never blocks a backup.
    pub fn begin_temp(&self) -> crate::error::Result<()> {
        self.conn.execute_batch("BEGIN")?;
        Ok(())
    }
    pub fn commit(&self) -> crate::error::Result<()> {
        self.conn.execute_batch("COMMIT")?;
        Ok(())
    }

    /// Runs `f` in one write transaction taken at once (`BEGIN IMMEDIATE`,
    /// so two processes never deadlock upgrading a read lock): readers of
    /// this catalog, in this process or another, see the state before or
    /// after, never a part. Rolled back when `f` fails.
    ///
    /// # Errors
    /// `f`'s error, or SQLite's.
    pub fn atomically<T>(
        &self,
        f: impl FnOnce() -> crate::error::Result<T>,
    ) -> crate::error::Result<T> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        match f() {
            Ok(v) => {
                self.conn.execute_batch("COMMIT")?;
                Ok(v)
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    /// Runs `f`, which only reads, in one read transaction: one snapshot
    /// of the catalog and one lock for all its queries instead of a lock
    /// taken and released per query. Inside a transaction already, `f`
    /// just runs in it.
    ///
    /// # Errors
    /// `f`'s error, or SQLite's.
    pub fn reading<T>(
        &self,
        f: impl FnOnce() -> crate::error::Result<T>,
    ) -> crate::error::Result<T> {
        if !self.conn.is_autocommit() {
            return f();
        }
        self.conn.execute_batch("BEGIN")?;
        let r = f();
        let end = self
            .conn
            .execute_batch(if r.is_ok() { "COMMIT" } else { "ROLLBACK" });
        let v = r?;
        end?;
        Ok(v)
    }

    pub fn get_meta(&self, key: &str) -> crate::error::Result<Option<String>> {
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key=?1", [key], |r| r.get(0))
            .optional()?)
    }
    pub fn set_meta(&self, key: &str, value: &str) -> crate::error::Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO meta(key,value) VALUES(?1,?2)",
            params![key, value],
        )?;
        Ok(())
    }

    /// Records a pack and its blobs (in the caller's transaction, if any).
    pub fn add_pack(
        &self,
        pack: &Id,
        size: u64,
        index_id: Option<&Id>,
        entries: &[PackEntry],
    ) -> crate::error::Result<()> {
        self.insert_pack(pack, size, index_id, entries, INSERT_BLOB)
    }

    /// Adds several packs of one index fragment in one go: the pack rows,
    /// then all their blobs in ID order. A backup adds its packs here when
    /// it writes their fragment, not pack by pack: rows inserted in key
    /// order share B-tree pages, where a pack's own entries (random IDs)
    /// dirtied a page each, and every commit wrote those pages to the WAL
    /// again (at a million blobs, ~8 MiB per pack).
    pub fn add_packs(
        &self,
        packs: &[crate::repo::index::IndexedPack],
        index_id: Option<&Id>,
    ) -> crate::error::Result<()> {
        for p in packs {
            self.insert_pack_row(&p.id, p.size, index_id)?;
        }
        let mut rows: Vec<(&PackEntry, &Id)> = packs
            .iter()
            .flat_map(|p| p.entries.iter().map(move |e| (e, &p.id)))
            .collect();
        rows.sort_unstable_by(|a, b| (a.0.id, a.1).cmp(&(b.0.id, b.1)));
        self.insert_blobs(INSERT_BLOB, rows)
    }

    /// Runs `sql` (six parameters: id, pack, kind, offset, length, raw
    /// length) for each (entry, pack).
    fn insert_blobs<'a>(
        &self,
        sql: &str,
        rows: impl IntoIterator<Item = (&'a PackEntry, &'a Id)>,
    ) -> crate::error::Result<()> {
        let mut st = self.conn.prepare_cached(sql)?;
        for (e, pack) in rows {
            st.execute(params![
                &e.id.0[..],
                &pack.0[..],
                e.kind as u8,
                e.offset,
                e.length,
                e.raw_len
            ])?;
        }
        Ok(())
    }

    fn insert_pack_row(
        &self,
        pack: &Id,
        size: u64,
        index_id: Option<&Id>,
    ) -> crate::error::Result<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO packs(id,size,index_id) VALUES(?1,?2,?3)
                 ON CONFLICT(id) DO UPDATE SET index_id=COALESCE(excluded.index_id, packs.index_id)",
            )?
            .execute(params![&pack.0[..], size as i64, index_id.map(|i| i.0.to_vec())])?;
        Ok(())
    }

    /// The pack row, then each entry through `insert_blob` (six parameters:
    /// id, pack, kind, offset, length, raw length).
    fn insert_pack(
        &self,
        pack: &Id,
        size: u64,
        index_id: Option<&Id>,
        entries: &[PackEntry],
        insert_blob: &str,
    ) -> crate::error::Result<()> {
        self.insert_pack_row(pack, size, index_id)?;
        self.insert_blobs(insert_blob, entries.iter().map(|e| (e, pack)))
    }

    /// Whether a blob is stored in a pack that is not marked for deletion
    /// (backups deduplicate only against those).
    pub fn has_blob(&self, id: &Id) -> crate::error::Result<bool> {
        let mut st = self.conn.prepare_cached(
            "SELECT 1 FROM blobs WHERE id=?1 AND pack NOT IN (SELECT id FROM marked_packs)",
        )?;
        Ok(st.exists([&id.0[..]])?)
    }

    /// Of `ids`, those [`Catalog::has_blob`] finds: for many blobs at once
    /// (an unchanged backup checks every chunk of every file it re-uses),
    /// in ID order, with one prepared statement in one read transaction;
    /// marks are looked up per copy only when some pack is marked (the
    /// per-row `NOT IN` subquery of `has_blob` is set up on every lookup).
    ///
    /// # Errors
    /// SQLite's.
    pub fn blobs_present(
        &self,
        mut ids: Vec<Id>,
    ) -> crate::error::Result<std::collections::HashSet<Id>> {
        ids.sort_unstable();
        ids.dedup();
        self.reading(|| {
            let any_marked = self
                .conn
                .prepare_cached("SELECT 1 FROM marked_packs LIMIT 1")?
                .exists([])?;
            let mut out = std::collections::HashSet::with_capacity(ids.len());
            if !any_marked {
                let mut st = self
                    .conn
                    .prepare_cached("SELECT 1 FROM blobs WHERE id=?1")?;
                for id in ids {
                    if st.exists([&id.0[..]])? {
                        out.insert(id);
                    }
                }
                return Ok(out);
            }
            let mut st = self
                .conn
                .prepare_cached("SELECT pack FROM blobs WHERE id=?1")?;
            for id in ids {
                let mut rows = st.query([&id.0[..]])?;
                while let Some(r) = rows.next()? {
                    if !self.is_marked(&id_of(r.get(0)?))? {
                        out.insert(id);
                        break;
                    }
                }
            }
            Ok(out)
        })
    }

    /// A stored copy of a blob, one in a pack not marked for deletion when
    /// there is one (restores look up every chunk: one row, no list).
    pub fn blob(&self, id: &Id) -> crate::error::Result<Option<BlobLocation>> {
        let mut st = self.conn.prepare_cached(
            "SELECT pack,kind,offset,length,raw_len FROM blobs WHERE id=?1
             ORDER BY pack IN (SELECT id FROM marked_packs), pack LIMIT 1",
        )?;
        Ok(st
            .query_row([&id.0[..]], |r| location_at(r, 0))
            .optional()?)
    }

    /// [`Catalog::blob`] for many blobs, in one read transaction and with
    /// one prepared statement (a restore of a million small files spent a
    /// tenth of its CPU in per-lookup statement-cache hashing, locking and
    /// the per-row ordering subquery). Lookups go in ID order, so
    /// neighbouring ones share B-tree pages. Marks are looked up only for
    /// blobs with more than one copy.
    ///
    /// # Errors
    /// SQLite's.
    pub fn blob_many(
        &self,
        mut ids: Vec<Id>,
    ) -> crate::error::Result<std::collections::HashMap<Id, Option<BlobLocation>>> {
        ids.sort_unstable();
        ids.dedup();
        self.reading(|| {
            let mut st = self.conn.prepare_cached(
                "SELECT pack,kind,offset,length,raw_len FROM blobs WHERE id=?1 ORDER BY pack",
            )?;
            let mut out = std::collections::HashMap::with_capacity(ids.len());
            let mut copies = vec![];
            for id in ids.iter() {
                copies.clear();
                let mut rows = st.query([&id.0[..]])?;
                while let Some(r) = rows.next()? {
                    copies.push(location_at(r, 0)?);
                }
                // Several copies: the first one not in a marked pack.
                let mut chosen = copies.first().copied();
                if copies.len() > 1 {
                    for c in &copies {
                        if !self.is_marked(&c.pack)? {
                            chosen = Some(*c);
                            break;
                        }
                    }
                }
                out.insert(*id, chosen);
            }
            Ok(out)
        })
    }

    /// Every stored copy of a blob, those in packs not marked for deletion
    /// first (directory listings have two, see [`crate::repo::TREE_COPIES`]).
    pub fn blob_locations(&self, id: &Id) -> crate::error::Result<Vec<BlobLocation>> {
        let mut st = self.conn.prepare_cached(
            "SELECT pack,kind,offset,length,raw_len FROM blobs WHERE id=?1
             ORDER BY pack IN (SELECT id FROM marked_packs), pack",
        )?;
        let rows = st.query_map([&id.0[..]], |r| location_at(r, 0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// All packs: (id, size, indexed?).
    pub fn packs(&self) -> crate::error::Result<Vec<(Id, u64, bool)>> {
        let mut st = self
            .conn
            .prepare("SELECT id,size,index_id IS NOT NULL FROM packs")?;
        let rows = st.query_map([], |r| {
            Ok((id_of(r.get(0)?), r.get::<_, i64>(1)? as u64, r.get(2)?))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// How many packs the catalog knows and their total size in bytes (the
    /// repository's size, as `/metrics` reports it).
    pub fn packs_total(&self) -> crate::error::Result<(u64, u64)> {
        Ok(self.conn.query_row(
            "SELECT COUNT(*), COALESCE(SUM(size),0) FROM packs",
            [],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
        )?)
    }

    /// A pack's size, when the index knows the pack.
    ///
    /// # Errors
    /// Database errors.
    pub fn pack_size(&self, id: &Id) -> crate::error::Result<Option<u64>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT size FROM packs WHERE id=?1")?;
        let mut rows = st.query([&id.0[..]])?;
        Ok(match rows.next()? {
            Some(r) => Some(r.get::<_, i64>(0)? as u64),
            None => None,
        })
    }

    pub fn has_pack(&self, id: &Id) -> crate::error::Result<bool> {
        let mut st = self
            .conn
            .prepare_cached("SELECT 1 FROM packs WHERE id=?1")?;
        Ok(st.exists([&id.0[..]])?)
    }

    /// Blobs stored in one pack.
    pub fn pack_entries(&self, pack: &Id) -> crate::error::Result<Vec<PackEntry>> {
        let mut st = self.conn.prepare_cached(
            "SELECT id,kind,offset,length,raw_len FROM blobs WHERE pack=?1 ORDER BY offset",
        )?;
        let rows = st.query_map([&pack.0[..]], |r| {
            let (id, kind, offset, length, raw_len) = blob_row(r, 0)?;
            Ok(PackEntry {
                id,
                kind,
                offset,
                length,
                raw_len,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// [`Catalog::pack_entries`], each with whether it is in the used set
    /// and in how many packs the catalog lists it, in one query.
    pub fn pack_entries_with_use(
        &self,
        pack: &Id,
    ) -> crate::error::Result<Vec<(PackEntry, bool, u32)>> {
        let mut st = self.conn.prepare_cached(
            "SELECT b.id,b.kind,b.offset,b.length,b.raw_len,
                    EXISTS(SELECT 1 FROM temp.used u WHERE u.id=b.id),
                    (SELECT COUNT(*) FROM blobs c WHERE c.id=b.id)
             FROM blobs b WHERE b.pack=?1 ORDER BY b.offset",
        )?;
        let rows = st.query_map([&pack.0[..]], |r| {
            let (id, kind, offset, length, raw_len) = blob_row(r, 0)?;
            Ok((
                PackEntry {
                    id,
                    kind,
                    offset,
                    length,
                    raw_len,
                },
                r.get(5)?,
                r.get(6)?,
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Every blob row in ID order (the copies of a blob adjacent), each with
    /// whether its ID is in the used set: one ordered scan, with the used set
    /// looked up in the same order. (Asking pack by pack went to random
    /// pages of both tables for every row: 8 of the 14 s of a million-blob
    /// prune's planning.)
    pub fn blobs_with_use(
        &self,
        each: &mut dyn FnMut(Id, BlobLocation, bool) -> crate::error::Result<()>,
    ) -> crate::error::Result<()> {
        let mut st = self.conn.prepare(
            "SELECT b.id,b.pack,b.kind,b.offset,b.length,b.raw_len,
                    EXISTS(SELECT 1 FROM temp.used u WHERE u.id=b.id)
             FROM blobs b ORDER BY b.id",
        )?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            each(id_at(r, 0)?, location_at(r, 1)?, r.get(6)?)?;
        }
        Ok(())
    }

    /// Packs not yet listed in any index fragment.
    pub fn unindexed_packs(&self) -> crate::error::Result<Vec<(Id, u64)>> {
        let mut st = self
            .conn
            .prepare("SELECT id,size FROM packs WHERE index_id IS NULL")?;
        let rows = st.query_map([], |r| Ok((id_of(r.get(0)?), r.get::<_, i64>(1)? as u64)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn mark_indexed(&self, packs: &[Id], index_id: &Id) -> crate::error::Result<()> {
        let mut st = self
            .conn
            .prepare_cached("UPDATE packs SET index_id=?1 WHERE id=?2")?;
        for p in packs {
            st.execute(params![&index_id.0[..], &p.0[..]])?;
        }
        Ok(())
    }

    /// Runs `sql` (one `?1` parameter) once per id.
    fn each_id(&self, sql: &str, ids: &[Id]) -> crate::error::Result<()> {
        let mut st = self.conn.prepare_cached(sql)?;
        for id in ids {
            st.execute([&id.0[..]])?;
        }
        Ok(())
    }

    /// Marks packs as listed by no index fragment (a prune is deleting them).
    pub fn mark_unindexed(&self, packs: &[Id]) -> crate::error::Result<()> {
        self.each_id("UPDATE packs SET index_id=NULL WHERE id=?1", packs)
    }

    pub fn has_index_file(&self, id: &Id) -> crate::error::Result<bool> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM index_files WHERE id=?1")?
            .exists([&id.0[..]])?)
    }
    pub fn add_index_file(&self, id: &Id) -> crate::error::Result<()> {
        self.conn.execute(
            "INSERT OR IGNORE INTO index_files(id) VALUES(?1)",
            [&id.0[..]],
        )?;
        Ok(())
    }
    pub fn index_files(&self) -> crate::error::Result<Vec<Id>> {
        let mut st = self.conn.prepare("SELECT id FROM index_files")?;
        let rows = st.query_map([], |r| Ok(id_of(r.get(0)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Starts loading the whole index afresh (inside a transaction):
    /// empties the index tables, and until [`Catalog::finish_bulk_index`]
    /// [`Catalog::add_pack_bulk`] appends blobs to a staging table, which
    /// `finish` sorts into `blobs` in one pass. Inserting ten million
    /// blobs in hash order straight into the ID-ordered table touched a
    /// random page per row; appending and sorting once is sequential.
    pub fn begin_bulk_index(&self) -> crate::error::Result<()> {
        // The reload may lack blobs the catalog had (prune replaced
        // fragments), and dropping the table fires no trigger.
        note_blobs_lost(&self.conn)?;
        self.conn.execute_batch(
            "DELETE FROM packs; DELETE FROM index_files; DELETE FROM damaged_index;
             DROP TABLE IF EXISTS blobs;
             CREATE TEMP TABLE IF NOT EXISTS bulk_blobs(id BLOB NOT NULL, pack BLOB NOT NULL,
                 kind INTEGER NOT NULL, offset INTEGER NOT NULL, length INTEGER NOT NULL,
                 raw_len INTEGER NOT NULL);
             DELETE FROM temp.bulk_blobs;",
        )?;
        Ok(())
    }

    /// [`Catalog::add_pack`] between [`Catalog::begin_bulk_index`] and
    /// [`Catalog::finish_bulk_index`].
    pub fn add_pack_bulk(
        &self,
        pack: &Id,
        size: u64,
        index_id: &Id,
        entries: &[PackEntry],
    ) -> crate::error::Result<()> {
        self.insert_pack(
            pack,
            size,
            Some(index_id),
            entries,
            "INSERT INTO temp.bulk_blobs(id,pack,kind,offset,length,raw_len) VALUES(?1,?2,?3,?4,?5,?6)",
        )
    }

    /// Ends a bulk load: the staged blobs go into `blobs` in key order
    /// (SQLite's external sorter: memory bounded), then the by-pack index
    /// is built.
    pub fn finish_bulk_index(&self) -> crate::error::Result<()> {
        // SCHEMA makes the empty table and its index; the index is dropped
        // for the load and made again by SCHEMA afterwards (a sort of its
        // own, cheaper than keeping it up to date row by row).
        self.conn.execute_batch(SCHEMA)?;
        self.conn.execute_batch(
            "DROP INDEX blobs_by_pack;
             INSERT OR IGNORE INTO blobs(id,pack,kind,offset,length,raw_len)
                 SELECT id,pack,kind,offset,length,raw_len FROM temp.bulk_blobs ORDER BY id, pack;
             DELETE FROM temp.bulk_blobs;",
        )?;
        self.conn.execute_batch(SCHEMA)?;
        Ok(())
    }

    /// Whether the catalog lists no blob at all (a new catalog).
    pub fn has_no_blobs(&self) -> crate::error::Result<bool> {
        Ok(!self
            .conn
            .prepare_cached("SELECT 1 FROM blobs LIMIT 1")?
            .exists([])?)
    }

    pub fn remove_index_file(&self, id: &Id) -> crate::error::Result<()> {
        self.conn
            .execute("DELETE FROM index_files WHERE id=?1", [&id.0[..]])?;
        Ok(())
    }

    /// Forgets packs (after prune deleted them).
    pub fn remove_packs(&self, packs: &[Id]) -> crate::error::Result<()> {
        self.begin()?;
        for p in packs {
            self.conn
                .execute("DELETE FROM blobs WHERE pack=?1", [&p.0[..]])?;
            self.conn
                .execute("DELETE FROM packs WHERE id=?1", [&p.0[..]])?;
        }
        self.commit()
    }

    /// Numbers a new backup run that uses the file cache and notes it as
    /// open until [`Catalog::file_cache_run_end`] (a run that is killed or
    /// fails stays open, so entries it wrote, whose chunks may never have
    /// been stored, are never trusted), in one write transaction.
    ///
    /// # Errors
    /// SQLite's.
    pub fn file_cache_run_start(&self) -> crate::error::Result<CacheRun> {
        self.atomically(|| {
            self.conn.execute(
                "INSERT INTO meta(key,value) VALUES(?1,'1')
                 ON CONFLICT(key) DO UPDATE SET value=CAST(value AS INTEGER)+1",
                [LAST_RUN],
            )?;
            let run: i64 = self.conn.query_row(
                "SELECT CAST(value AS INTEGER) FROM meta WHERE key=?1",
                [LAST_RUN],
                |r| r.get(0),
            )?;
            let lost: i64 = self.conn.query_row(
                "SELECT COALESCE((SELECT CAST(value AS INTEGER) FROM meta WHERE key=?1), 0)",
                [BLOBS_LOST_RUN],
                |r| r.get(0),
            )?;
            // Entries of runs up to `lost` are looked up anyway: their
            // open marks no longer matter.
            self.conn
                .execute("DELETE FROM runs_open WHERE run<=?1", [lost])?;
            let open = {
                let mut st = self.conn.prepare("SELECT run FROM runs_open")?;
                let rows = st.query_map([], |r| r.get(0))?;
                rows.collect::<Result<Vec<i64>, _>>()?
            };
            self.conn
                .execute("INSERT OR IGNORE INTO runs_open(run) VALUES(?1)", [run])?;
            Ok(CacheRun {
                run,
                trusted_after: lost,
                open,
            })
        })
    }

    /// Ends a run begun with [`Catalog::file_cache_run_start`] (after its
    /// packs are indexed and its snapshot is written).
    ///
    /// # Errors
    /// SQLite's.
    pub fn file_cache_run_end(&self, run: i64) -> crate::error::Result<()> {
        self.conn
            .execute("DELETE FROM runs_open WHERE run=?1", [run])?;
        Ok(())
    }

    /// Packs whose (first) index fragment is one of `files`, with sizes.
    pub fn packs_in_index_files(&self, files: &[Id]) -> crate::error::Result<Vec<(Id, u64)>> {
        let set: std::collections::HashSet<Id> = files.iter().copied().collect();
        let mut st = self
            .conn
            .prepare("SELECT id,size,index_id FROM packs WHERE index_id IS NOT NULL")?;
        let rows = st.query_map([], |r| {
            Ok((
                id_of(r.get(0)?),
                r.get::<_, i64>(1)? as u64,
                id_of(r.get(2)?),
            ))
        })?;
        let mut out = vec![];
        for row in rows {
            let (id, size, index) = row?;
            if set.contains(&index) {
                out.push((id, size));
            }
        }
        Ok(out)
    }

    /// Replaces the set of packs marked for deletion.
    /// Records which unfinished uploads exist now (`now` in Unix seconds)
    /// and returns when each was first seen; forgets the ones gone.
    ///
    /// # Errors
    /// Database errors.
    pub fn note_uploads(
        &self,
        ids: &[String],
        now: i64,
    ) -> crate::error::Result<std::collections::HashMap<String, i64>> {
        self.note_seen("upload:", ids, now)
    }

    /// When this catalog first saw each pack in `packs` without an index
    /// (unix seconds); packs no longer in that state are forgotten.
    pub fn note_orphans(
        &self,
        packs: &[Id],
        now: i64,
    ) -> crate::error::Result<std::collections::HashMap<Id, i64>> {
        let ids: Vec<String> = packs.iter().map(|p| p.hex()).collect();
        let seen = self.note_seen("orphan:", &ids, now)?;
        Ok(seen
            .into_iter()
            .filter_map(|(k, v)| Id::from_hex(&k).map(|id| (id, v)))
            .collect())
    }

    /// First-seen times of one kind of thing (rows keyed `prefix` + id):
    /// records `now` for new ids, forgets ids of that kind not given.
    fn note_seen(
        &self,
        prefix: &str,
        ids: &[String],
        now: i64,
    ) -> crate::error::Result<std::collections::HashMap<String, i64>> {
        self.begin()?;
        let mut seen = std::collections::HashMap::new();
        for id in ids {
            let key = format!("{prefix}{id}");
            self.conn.execute(
                "INSERT OR IGNORE INTO uploads_seen(id, first_seen) VALUES(?1, ?2)",
                rusqlite::params![key, now],
            )?;
            let t: i64 = self.conn.query_row(
                "SELECT first_seen FROM uploads_seen WHERE id=?1",
                [&key],
                |r| r.get(0),
            )?;
            seen.insert(id.clone(), t);
        }
        let mut stmt = self.conn.prepare("SELECT id FROM uploads_seen")?;
        let known: Vec<String> = stmt
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        for key in &known {
            // Rows of this kind no longer given, and rows from before kinds
            // had prefixes (upload IDs: seen again as "upload:" ones).
            let stale = match key.strip_prefix(prefix) {
                Some(id) => !seen.contains_key(id),
                None => !key.starts_with("upload:") && !key.starts_with("orphan:"),
            };
            if stale {
                self.conn
                    .execute("DELETE FROM uploads_seen WHERE id=?1", [key])?;
            }
        }
        self.commit()?;
        Ok(seen)
    }

    /// Makes `packs` the marked set. Only marks not there before are
    /// inserted: an insert is what withdraws the file cache's trust (see
    /// [`BLOBS_LOST_RUN`]), and every open loads the same marks again.
    pub fn set_marks(&self, packs: &[Id]) -> crate::error::Result<()> {
        self.begin()?;
        let keep: std::collections::HashSet<&Id> = packs.iter().collect();
        let old: Vec<Id> = {
            let mut st = self.conn.prepare("SELECT id FROM marked_packs")?;
            let rows = st.query_map([], |r| Ok(id_of(r.get(0)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        for p in old.iter().filter(|p| !keep.contains(p)) {
            self.conn
                .execute("DELETE FROM marked_packs WHERE id=?1", [&p.0[..]])?;
        }
        for p in packs {
            self.conn.execute(
                "INSERT OR IGNORE INTO marked_packs(id) VALUES(?1)",
                [&p.0[..]],
            )?;
        }
        self.commit()
    }

    /// The blobs with IDs in `[lo, hi)` (no upper end when `hi` is `None`),
    /// in ID order, each with how many of its copies are in a pack for
    /// which `stored` says so and whether it is a tree blob. `stored` is
    /// given the packs of the rows a batch at a time, and fills the
    /// second argument with one answer per pack.
    pub fn blob_copies_in_range(
        &self,
        lo: &Id,
        hi: Option<&Id>,
        stored: &mut dyn FnMut(&[Id], &mut Vec<bool>),
    ) -> crate::error::Result<Vec<BlobCopies>> {
        const BATCH: usize = 256;
        let hi = hi.map_or(vec![0xffu8; 33], |h| h.0.to_vec());
        let mut st = self
            .conn
            .prepare_cached("SELECT id,pack,kind FROM blobs WHERE id>=?1 AND id<?2 ORDER BY id")?;
        let mut rows = st.query(params![&lo.0[..], &hi[..]])?;
        let mut out: Vec<BlobCopies> = vec![];
        let (mut ids, mut packs, mut here) = (vec![], vec![], vec![]);
        let mut add = |ids: &mut Vec<(Id, bool)>, packs: &mut Vec<Id>| {
            stored(packs, &mut here);
            for ((id, tree), here) in ids.drain(..).zip(&here) {
                let here = u8::from(*here);
                match out.last_mut() {
                    Some(last) if last.id == id => {
                        last.stored = last.stored.saturating_add(here);
                        last.tree |= tree;
                    }
                    _ => out.push(BlobCopies {
                        id,
                        stored: here,
                        tree,
                    }),
                }
            }
            packs.clear();
        };
        while let Some(r) = rows.next()? {
            let id = id_at(r, 0)?;
            packs.push(id_at(r, 1)?);
            ids.push((id, r.get::<_, u8>(2)? == BlobKind::Tree as u8));
            if ids.len() == BATCH {
                add(&mut ids, &mut packs);
            }
        }
        add(&mut ids, &mut packs);
        Ok(out)
    }

    pub fn is_marked(&self, pack: &Id) -> crate::error::Result<bool> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM marked_packs WHERE id=?1")?
            .exists([&pack.0[..]])?)
    }

    /// Empties the (per-connection, temporary) set of used chunks.
    pub fn used_reset(&self) -> crate::error::Result<()> {
        self.conn.execute("DELETE FROM temp.used", [])?;
        Ok(())
    }
    pub fn used_add(&self, ids: &[Id]) -> crate::error::Result<()> {
        self.each_id("INSERT OR IGNORE INTO temp.used(id) VALUES(?1)", ids)
    }

    /// Sets the packs this catalog lists that storage no longer holds (for
    /// this connection): [`Catalog::pack_holds_needed_blob`] never counts
    /// their copies.
    pub fn set_absent(&self, packs: &[Id]) -> crate::error::Result<()> {
        self.conn.execute("DELETE FROM temp.absent", [])?;
        self.each_id("INSERT OR IGNORE INTO temp.absent(id) VALUES(?1)", packs)
    }

    /// Whether `pack` holds a used blob of which unmarked packs other than
    /// it (and not absent from storage) hold fewer copies than its kind needs (one for data, two for
    /// directory listings).
    pub fn pack_holds_needed_blob(&self, pack: &Id) -> crate::error::Result<bool> {
        let mut st = self.conn.prepare_cached(
            "SELECT 1 FROM blobs b WHERE b.pack=?1 AND b.id IN (SELECT id FROM temp.used)
             AND (SELECT COUNT(*) FROM blobs o WHERE o.id=b.id AND o.pack<>b.pack
                  AND o.pack NOT IN (SELECT id FROM marked_packs)
                  AND o.pack NOT IN (SELECT id FROM temp.absent))
                 < (CASE WHEN b.kind=?2 THEN ?3 ELSE 1 END)",
        )?;
        Ok(st.exists(rusqlite::params![
            &pack.0[..],
            BlobKind::Tree as u8,
            crate::repo::TREE_COPIES as i64
        ])?)
    }

    /// Used directory listings and every stored copy of each, grouped by
    /// listing (for keeping [`crate::repo::TREE_COPIES`] copies of each).
    pub fn used_tree_locations(&self) -> crate::error::Result<Vec<(Id, BlobLocation)>> {
        let mut st = self.conn.prepare(
            "SELECT id,pack,kind,offset,length,raw_len FROM blobs
             WHERE kind=?1 AND id IN (SELECT id FROM temp.used) ORDER BY id",
        )?;
        let rows = st.query_map([BlobKind::Tree as u8], |r| {
            Ok((id_of(r.get(0)?), location_at(r, 1)?))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// [`Catalog::used_tree_locations`] of one pack.
    pub fn used_tree_locations_in(
        &self,
        pack: &Id,
    ) -> crate::error::Result<Vec<(Id, BlobLocation)>> {
        let mut st = self.conn.prepare_cached(
            "SELECT id,pack,kind,offset,length,raw_len FROM blobs
             WHERE pack=?1 AND kind=?2 AND id IN (SELECT id FROM temp.used)",
        )?;
        let rows = st.query_map(params![&pack.0[..], BlobKind::Tree as u8], |r| {
            Ok((id_of(r.get(0)?), location_at(r, 1)?))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn add_snapshot(
        &self,
        id: &Id,
        snap: &crate::repo::snapshot::Snapshot,
    ) -> crate::error::Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO snapshots(id,time,kind,name,host,tags,json) VALUES(?1,?2,?3,?4,?5,?6,?7)",
            params![
                &id.0[..],
                snap.time,
                snap.source.kind,
                snap.source.name,
                snap.host,
                snap.tags.join(","),
                serde_json::to_string(snap)?
            ],
        )?;
        Ok(())
    }
    pub fn remove_snapshot(&self, id: &Id) -> crate::error::Result<()> {
        self.conn
            .execute("DELETE FROM snapshots WHERE id=?1", [&id.0[..]])?;
        Ok(())
    }
    /// Notes an index fragment that could not be read (its packs were
    /// indexed from their trailers instead).
    pub fn note_damaged_index(&self, id: &Id, why: &str) -> crate::error::Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO damaged_index(id,why) VALUES(?1,?2)",
            params![&id.0[..], why],
        )?;
        Ok(())
    }
    /// Index fragments noted as damaged: (id, why).
    pub fn damaged_index(&self) -> crate::error::Result<Vec<(Id, String)>> {
        let mut st = self.conn.prepare("SELECT id,why FROM damaged_index")?;
        let rows = st.query_map([], |r| Ok((id_of(r.get(0)?), r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
    /// Moves a snapshot that storage no longer has, and that no `forget`
    /// of this catalog removed, to the vanished list (`check` reports it).
    pub fn note_vanished(&self, id: &Id, noticed: &str) -> crate::error::Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO vanished(id,json,noticed) SELECT id,json,?2 FROM snapshots WHERE id=?1",
            params![&id.0[..], noticed],
        )?;
        self.remove_snapshot(id)
    }
    /// Snapshots that vanished from storage: (id, snapshot JSON, when noticed).
    pub fn vanished(&self) -> crate::error::Result<Vec<(Id, String, String)>> {
        let mut st = self
            .conn
            .prepare("SELECT id,json,noticed FROM vanished ORDER BY noticed, id")?;
        let rows = st.query_map([], |r| Ok((id_of(r.get(0)?), r.get(1)?, r.get(2)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
    /// Snapshot manifests, oldest first, parsed (for listing, retention and
    /// restore points, which decide on the manifest alone).
    pub fn snapshot_manifests(
        &self,
    ) -> crate::error::Result<Vec<(Id, crate::repo::snapshot::Snapshot)>> {
        self.snapshots()?
            .into_iter()
            .map(|row| Ok((row.id, serde_json::from_str(&row.json)?)))
            .collect()
    }
    /// Forgets the vanished list (`catalog rebuild`: the operator acknowledged it).
    pub fn clear_vanished(&self) -> crate::error::Result<()> {
        self.conn.execute("DELETE FROM vanished", [])?;
        Ok(())
    }
    pub fn snapshot_ids(&self) -> crate::error::Result<Vec<Id>> {
        let mut st = self.conn.prepare("SELECT id FROM snapshots")?;
        let rows = st.query_map([], |r| Ok(id_of(r.get(0)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
    /// Snapshots, oldest first.
    pub fn snapshots(&self) -> crate::error::Result<Vec<SnapshotRow>> {
        let mut st = self
            .conn
            .prepare("SELECT id,json FROM snapshots ORDER BY time, id")?;
        let rows = st.query_map([], |r| {
            Ok(SnapshotRow {
                id: id_of(r.get(0)?),
                json: r.get(1)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The file cache entries of several paths of one source, in the
    /// order given, with one prepared statement in one read transaction (a
    /// backup asks for a directory's files at once).
    ///
    /// # Errors
    /// SQLite's.
    pub fn file_cache_get_many<P: AsRef<[u8]>>(
        &self,
        source: &str,
        paths: &[P],
    ) -> crate::error::Result<Vec<Option<CacheEntry>>> {
        self.reading(|| {
            let mut st = self.conn.prepare_cached(
                "SELECT size,mtime_ns,ctime_ns,ino,content,run FROM file_cache WHERE source=?1 AND path=?2",
            )?;
            let mut out = Vec::with_capacity(paths.len());
            for path in paths {
                out.push(
                    st.query_row(params![source, path.as_ref()], |r| {
                        Ok((
                            FileFacts {
                                size: r.get::<_, i64>(0)? as u64,
                                mtime_ns: r.get(1)?,
                                ctime_ns: r.get(2)?,
                                ino: r.get::<_, i64>(3)? as u64,
                            },
                            r.get(4)?,
                            r.get(5)?,
                        ))
                    })
                    .optional()?,
                );
            }
            Ok(out)
        })
    }
    /// Whether the file cache holds any entry of `source`.
    pub fn file_cache_has(&self, source: &str) -> crate::error::Result<bool> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM file_cache WHERE source=?1 LIMIT 1")?
            .exists([source])?)
    }
    pub fn file_cache_put(
        &self,
        source: &str,
        path: &[u8],
        f: &FileFacts,
        content: &[u8],
        run: i64,
    ) -> crate::error::Result<()> {
        let mut st = self.conn.prepare_cached(
            "INSERT OR REPLACE INTO file_cache(source,path,size,mtime_ns,ctime_ns,ino,content,run) VALUES(?1,?2,?3,?4,?5,?6,?7,?8)",
        )?;
        st.execute(params![
            source,
            path,
            f.size as i64,
            f.mtime_ns,
            f.ctime_ns,
            f.ino as i64,
            content,
            run
        ])?;
        Ok(())
    }
    pub fn file_cache_touch(
        &self,
        source: &str,
        path: &[u8],
        run: i64,
    ) -> crate::error::Result<()> {
        let mut st = self
            .conn
            .prepare_cached("UPDATE file_cache SET run=?3 WHERE source=?1 AND path=?2")?;
        st.execute(params![source, path, run])?;
        Ok(())
    }
    /// Drops cache entries last marked before run `before`.
    pub fn file_cache_prune(&self, source: &str, before: i64) -> crate::error::Result<()> {
        self.conn.execute(
            "DELETE FROM file_cache WHERE source=?1 AND run<?2",
            params![source, before],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A transaction from `begin` may read first and write later while
    /// other connections write: the other writer waits (here: gives up
    /// after its short busy timeout), the transaction's own write is never
    /// refused. With a deferred BEGIN the other writer got in and this
    /// transaction's write failed with "database is locked" at once (the
    /// intermittent failure of prune's orphan bookkeeping beside a backup).
    #[test]
    fn a_write_transaction_that_reads_first_is_not_refused_its_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let c = Catalog::open(&path).unwrap();
        c.set_meta("k", "0").unwrap();
        let other = Connection::open(&path).unwrap();
        other
            .busy_timeout(std::time::Duration::from_millis(50))
            .unwrap();
        c.begin().unwrap();
        assert_eq!(c.get_meta("k").unwrap().as_deref(), Some("0"));
        let theirs = other.execute("INSERT OR REPLACE INTO meta(key,value) VALUES('k','1')", []);
        c.set_meta("k", "2").unwrap();
        c.commit().unwrap();
        assert!(theirs.is_err(), "the other writer got in mid-transaction");
        assert_eq!(c.get_meta("k").unwrap().as_deref(), Some("2"));
    }

    #[test]
    fn packs_blobs_and_file_cache() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(&dir.path().join("c.db")).unwrap();
        let e = PackEntry {
            kind: BlobKind::Data,
            id: Id([1; 32]),
            offset: 8,
            length: 10,
            raw_len: 20,
        };
        c.add_pack(&Id([9; 32]), 100, None, &[e]).unwrap();
        assert!(c.has_blob(&Id([1; 32])).unwrap());
        assert_eq!(c.blob(&Id([1; 32])).unwrap().unwrap().pack, Id([9; 32]));
        assert_eq!(c.unindexed_packs().unwrap().len(), 1);
        c.mark_indexed(&[Id([9; 32])], &Id([5; 32])).unwrap();
        assert!(c.unindexed_packs().unwrap().is_empty());
        let f = FileFacts {
            size: 1,
            mtime_ns: 2,
            ctime_ns: 3,
            ino: 4,
        };
        c.file_cache_put("s", b"a/b", &f, b"xx", 1).unwrap();
        let get = |c: &Catalog| {
            c.file_cache_get_many("s", &[b"a/b"])
                .unwrap()
                .pop()
                .flatten()
        };
        assert_eq!(get(&c).unwrap().0, f);
        c.file_cache_prune("s", 2).unwrap();
        assert!(get(&c).is_none());
        drop(c);
        // Reopen keeps data.
        let c = Catalog::open(&dir.path().join("c.db")).unwrap();
        assert!(c.has_blob(&Id([1; 32])).unwrap());
    }

    /// A data blob `[b; 32]` at `offset`, as a pack's trailer lists it.
    fn data_entry(b: u8, offset: u32) -> PackEntry {
        PackEntry {
            kind: BlobKind::Data,
            id: Id([b; 32]),
            offset,
            length: 10,
            raw_len: 20,
        }
    }

    #[test]
    fn many_lookups_choose_the_copy_one_lookup_chooses() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(&dir.path().join("c.db")).unwrap();
        let entry = data_entry;
        // Blob 1 in packs 3, 4 and 5; blob 2 in pack 4 only.
        c.add_pack(&Id([3; 32]), 100, None, &[entry(1, 8)]).unwrap();
        c.add_pack(&Id([4; 32]), 100, None, &[entry(1, 18), entry(2, 28)])
            .unwrap();
        c.add_pack(&Id([5; 32]), 100, None, &[entry(1, 38)])
            .unwrap();
        let ids = [Id([2; 32]), Id([1; 32]), Id([7; 32]), Id([1; 32])];
        for marks in [vec![], vec![Id([3; 32])], vec![Id([3; 32]), Id([4; 32])]] {
            c.set_marks(&marks).unwrap();
            let many = c.blob_many(ids.to_vec()).unwrap();
            assert_eq!(many.len(), 3, "one answer per distinct ID");
            for id in &ids {
                assert_eq!(many[id], c.blob(id).unwrap(), "marks {marks:?}");
            }
        }
        // All copies marked: the first still answers.
        c.set_marks(&[Id([3; 32]), Id([4; 32]), Id([5; 32])])
            .unwrap();
        let many = c.blob_many(vec![Id([1; 32])]).unwrap();
        assert_eq!(many[&Id([1; 32])].unwrap().pack, Id([3; 32]));
        assert_eq!(c.blob(&Id([1; 32])).unwrap().unwrap().pack, Id([3; 32]));
    }

    #[test]
    fn presence_of_many_is_what_has_blob_says_of_each() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(&dir.path().join("c.db")).unwrap();
        let entry = |b: u8| data_entry(b, 8);
        // Blob 1 in packs 3 and 4, blob 2 in pack 4, blob 6 in pack 5.
        c.add_pack(&Id([3; 32]), 100, None, &[entry(1)]).unwrap();
        c.add_pack(&Id([4; 32]), 100, None, &[entry(1), entry(2)])
            .unwrap();
        c.add_pack(&Id([5; 32]), 100, None, &[entry(6)]).unwrap();
        let ids = [
            Id([2; 32]),
            Id([1; 32]),
            Id([7; 32]),
            Id([1; 32]),
            Id([6; 32]),
        ];
        for marks in [
            vec![],
            vec![Id([3; 32])],
            vec![Id([4; 32])],
            vec![Id([3; 32]), Id([4; 32])],
            vec![Id([5; 32])],
        ] {
            c.set_marks(&marks).unwrap();
            let present = c.blobs_present(ids.to_vec()).unwrap();
            let expected: std::collections::HashSet<Id> = ids
                .iter()
                .filter(|id| c.has_blob(id).unwrap())
                .copied()
                .collect();
            assert_eq!(present, expected, "marks {marks:?}");
        }
        // And the expectations themselves: both copies of 1 marked, 1 gone.
        c.set_marks(&[Id([3; 32]), Id([4; 32])]).unwrap();
        assert!(!c.has_blob(&Id([1; 32])).unwrap());
        c.set_marks(&[Id([3; 32])]).unwrap();
        assert!(c.has_blob(&Id([1; 32])).unwrap());
    }

    /// Which file cache entries a run may re-use without looking up their
    /// chunks: those of finished runs since the catalog last lost a blob
    /// or marked a pack.
    #[test]
    fn losing_or_marking_blobs_and_unfinished_runs_withdraw_the_trust() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(&dir.path().join("c.db")).unwrap();
        let entry = |b: u8| data_entry(b, 8);
        c.add_pack(&Id([3; 32]), 100, None, &[entry(1)]).unwrap();
        c.add_pack(&Id([4; 32]), 100, None, &[entry(2)]).unwrap();
        let run = || {
            let r = c.file_cache_run_start().unwrap();
            c.file_cache_run_end(r.run).unwrap();
            r
        };
        let first = run();
        let r = run();
        assert_eq!((first.run, r.run), (1, 2));
        assert!(r.trusted_after < first.run, "{r:?}");
        // Each change, and whether a run after it trusts less than the run
        // before it did: the marks loaded again or fewer, no; a new mark,
        // yes; removed packs only when blobs went; a reload of the whole
        // index, yes; a deletion or a mark made without labctl's functions
        // (an earlier labctl's), yes: the triggers see it.
        let reload = || {
            c.atomically(|| {
                c.begin_bulk_index()?;
                c.add_pack_bulk(&Id([3; 32]), 100, &Id([7; 32]), &[entry(1)])?;
                c.finish_bulk_index()
            })
        };
        let raw = |sql: &str, id: u8| c.conn.execute(sql, [&[id; 32][..]]).map(|_| ());
        type Change<'a> = Box<dyn Fn() -> crate::error::Result<()> + 'a>;
        let changes: Vec<(&str, Change<'_>, bool)> = vec![
            ("no marks", Box::new(|| c.set_marks(&[])), false),
            ("a new mark", Box::new(|| c.set_marks(&[Id([3; 32])])), true),
            (
                "the same mark",
                Box::new(|| c.set_marks(&[Id([3; 32])])),
                false,
            ),
            ("a mark taken away", Box::new(|| c.set_marks(&[])), false),
            (
                "an unknown pack removed",
                Box::new(|| c.remove_packs(&[Id([9; 32])])),
                false,
            ),
            (
                "a pack removed",
                Box::new(|| c.remove_packs(&[Id([4; 32])])),
                true,
            ),
            ("a reload", Box::new(reload), true),
            (
                "a raw delete",
                Box::new(|| Ok(raw("DELETE FROM blobs WHERE id=?1", 1)?)),
                true,
            ),
            (
                "a raw mark",
                Box::new(|| Ok(raw("INSERT INTO marked_packs(id) VALUES(?1)", 4)?)),
                true,
            ),
        ];
        let mut last = r;
        for (what, change, loses) in changes {
            change().unwrap();
            let r = run();
            let want = if loses { last.run } else { last.trusted_after };
            assert_eq!(r.trusted_after, want, "{what}: {r:?} after {last:?}");
            last = r;
        }
        let r = last;
        // A catalog without the triggers (an earlier labctl's) is noted
        // at open.
        c.conn
            .execute_batch("DROP TRIGGER blobs_lost; DROP TRIGGER packs_marked;")
            .unwrap();
        let (last, r) = (r, run());
        assert_eq!(r.trusted_after, last.trusted_after);
        let c = Catalog::open(&dir.path().join("c.db")).unwrap();
        let r2 = c.file_cache_run_start().unwrap();
        c.file_cache_run_end(r2.run).unwrap();
        assert_eq!(r2.trusted_after, r.run);
        // A run that never ends (killed): later runs do not trust its
        // entries, however many finish meanwhile; those of the runs
        // around it they do.
        let before = c.file_cache_run_start().unwrap();
        c.file_cache_run_end(before.run).unwrap();
        let killed = c.file_cache_run_start().unwrap();
        let run = || {
            let r = c.file_cache_run_start().unwrap();
            c.file_cache_run_end(r.run).unwrap();
            r
        };
        let after = run();
        let r = run();
        assert_eq!(r.open, vec![killed.run]);
        assert!(r.trusts(before.run) && r.trusts(after.run) && !r.trusts(killed.run));
        assert!(!r.trusts(r.run) && !r.trusts(r.run + 1) && !r.trusts(r.trusted_after));
        // Once a loss covers it, its mark goes.
        c.set_marks(&[Id([6; 32])]).unwrap();
        let r = run();
        assert!(r.open.is_empty() && r.trusted_after > killed.run, "{r:?}");
    }

    #[test]
    fn many_cache_lookups_answer_in_the_order_asked() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(&dir.path().join("c.db")).unwrap();
        let facts = |size| FileFacts {
            size,
            mtime_ns: 1,
            ctime_ns: 2,
            ino: 3,
        };
        c.file_cache_put("s", b"b", &facts(2), b"B", 7).unwrap();
        c.file_cache_put("s", b"a", &facts(1), b"A", 6).unwrap();
        c.file_cache_put("t", b"c", &facts(3), b"C", 5).unwrap();
        let got = c
            .file_cache_get_many("s", &[&b"b"[..], b"c", b"a"])
            .unwrap();
        assert_eq!(got[0], Some((facts(2), b"B".to_vec(), 7)));
        assert_eq!(got[1], None, "another source's entry");
        assert_eq!(got[2], Some((facts(1), b"A".to_vec(), 6)));
    }

    #[test]
    fn concurrent_first_opens_agree_on_the_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let p = path.clone();
                std::thread::spawn(move || Catalog::open(&p).map(|_| ()))
            })
            .collect();
        for h in handles {
            h.join().unwrap().unwrap();
        }
    }
}
