//! Synthesises the metadata of a very large labctl repository, for the
//! `big-repo` workload of `benches/run.py` (issue 22: ten million blobs,
//! about 10 TiB of 1 MiB chunks, as the lab reaches after a few years).
//!
//! ```text
//! cargo run --release --example bigrepo -- <repo dir> <backup key file> <blobs> [sources] [snapshots per source]
//! ```
//!
//! The repository must exist (`labctl repo init`); this adds to it, in the
//! shapes labctl itself writes:
//! - **data packs** of 32 blobs of 1 MiB (labctl's 32 MiB pack target), each
//!   a *sparse* file of the full size: the `LCPACK` header, a hole where the
//!   blobs would be, and a real trailer (the entry table sealed to META) and
//!   footer. Pack names are random-looking IDs, not the hash of the file
//!   (hashing 10 TiB of holes is what this avoids), so `check --read-data`
//!   and restores of these snapshots are not meaningful; every command that
//!   reads only metadata (index, trailers, snapshot lists) is;
//! - **tree packs**: one root tree blob per snapshot, 64 to a pack, each
//!   pack written twice (labctl keeps two copies of every tree blob);
//! - **index fragments** of at most `index::MAX_FRAGMENT_BLOBS` entries, as
//!   prune's consolidation writes them, sealed to META and named by their hash;
//! - **snapshots**: `sources` sources (VM disks of `blobs / sources` chunks
//!   each), `snapshots` nightly snapshots per source. Each references a
//!   quarter of its source's chunks; the window slides so that consecutive
//!   snapshots share most chunks and together they cover all of them, so
//!   every blob is used (about three references per blob in all).
//!
//! Deterministic for given arguments; run on an empty repository.

#[path = "shape.rs"]
mod shape;

use labctl::repo::blob::BlobKind;
use labctl::repo::index::{self, IndexedPack};
use labctl::repo::pack::{encode_entries, PackEntry, FOOTER_LEN};
use labctl::repo::snapshot::{self, BackupSummary, Snapshot, Source};
use labctl::repo::{crypto, format, Id};
use shape::Shape;
use std::collections::BTreeMap;
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

const RAW_LEN: u32 = 1 << 20;
/// A 1 MiB chunk that does not compress, as one age message (header with
/// one recipient stanza, nonce, STREAM tags).
const CIPHER_LEN: u32 = RAW_LEN + 16 * 16 + 200;
const TREES_PER_PACK: u64 = 64;
const TREE_CIPHER_LEN: u32 = 24_000;

fn id(tag: &str, n: u64) -> Id {
    let mut h = blake3::Hasher::new();
    h.update(b"labctl bigrepo v1 ");
    h.update(tag.as_bytes());
    h.update(&n.to_le_bytes());
    Id(*h.finalize().as_bytes())
}

fn blob_id(n: u64) -> Id {
    id("blob", n)
}

fn tree_id(n: u64) -> Id {
    id("tree", n)
}

/// Writes a sparse pack holding `entries` (offsets already set) whose
/// blobs end at `blobs_end`; returns its size.
fn write_pack(
    dir: &Path,
    pack: &Id,
    entries: &[PackEntry],
    blobs_end: u64,
    meta: &age::x25519::Recipient,
) -> u64 {
    let mut table = vec![];
    encode_entries(entries, &mut table);
    let trailer = crypto::encrypt(std::slice::from_ref(meta), &table);
    let path = dir.join(format::pack_name(pack));
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut f = fs::File::create(&path).unwrap();
    f.write_all(&format::header(format::MAGIC_PACK)).unwrap();
    f.seek(SeekFrom::Start(blobs_end)).unwrap();
    f.write_all(&trailer).unwrap();
    f.write_all(&(trailer.len() as u32).to_le_bytes()).unwrap();
    f.write_all(&format::header(format::MAGIC_PACK_TRAILER))
        .unwrap();
    blobs_end + trailer.len() as u64 + FOOTER_LEN as u64
}

fn entries(
    kind: BlobKind,
    ids: impl Iterator<Item = Id>,
    len: u32,
    raw: u32,
) -> (Vec<PackEntry>, u64) {
    let mut at = format::HEADER_LEN as u64;
    let out = ids
        .map(|id| {
            let e = PackEntry {
                kind,
                id,
                offset: at as u32,
                length: len,
                raw_len: raw,
            };
            at += len as u64;
            e
        })
        .collect();
    (out, at)
}

fn put(dir: &Path, name: &str, bytes: &[u8]) {
    let path = dir.join(name);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, bytes).unwrap();
}

fn main() {
    let shape = Shape::from_args(
        "bigrepo <repo dir> <backup key file> <blobs> [sources] [snapshots per source]",
    );
    let dir = shape.dir.clone();
    let keys = labctl::repo::keys::Keys::load(&shape.key).unwrap_or_else(|e| {
        eprintln!("bigrepo: {e}");
        std::process::exit(2)
    });
    let (blobs, sources, per_source) = (shape.blobs, shape.sources, shape.per_source);
    let meta = keys.meta_recipient();
    let started = std::time::Instant::now();

    // Data packs, written by two threads.
    let mut all: Vec<IndexedPack> = shape.data_packs(|p, blobs| {
        let (es, end) = entries(BlobKind::Data, blobs.map(blob_id), CIPHER_LEN, RAW_LEN);
        let pid = id("pack", p);
        let size = write_pack(&dir, &pid, &es, end, &meta);
        IndexedPack {
            id: pid,
            size,
            entries: es,
        }
    });

    // Tree packs: one root tree per snapshot, each pack twice.
    let snaps = sources * per_source;
    let mut copy = 0;
    for first in (0..snaps).step_by(TREES_PER_PACK as usize) {
        let last = (first + TREES_PER_PACK).min(snaps);
        for _ in 0..labctl::repo::TREE_COPIES {
            let (es, end) = entries(
                BlobKind::Tree,
                (first..last).map(tree_id),
                TREE_CIPHER_LEN,
                3 * TREE_CIPHER_LEN,
            );
            let pid = id("tree-pack", copy);
            copy += 1;
            let size = write_pack(&dir, &pid, &es, end, &meta);
            all.push(IndexedPack {
                id: pid,
                size,
                entries: es,
            });
        }
    }
    let runs = index::split(&all);
    let n_fragments = runs.len();
    for run in runs {
        let (fid, bytes) = index::encode(run, &meta);
        put(&dir, &format::index_name(&fid), &bytes);
    }
    let n_packs = all.len();
    drop(all);

    // Snapshots: nightly, oldest first, each a sliding quarter of its source.
    let day0 = time::macros::datetime!(2026-01-01 02:00 UTC);
    let mut refs = 0u64;
    for s in 0..sources {
        for j in 0..per_source {
            let root = tree_id(s * per_source + j);
            let window = shape.window(s, j);
            let bytes_total = (window.end - window.start) * RAW_LEN as u64;
            let mut chunks: Vec<Id> = window.map(blob_id).collect();
            chunks.push(root);
            chunks.sort_unstable();
            refs += chunks.len() as u64;
            let at =
                day0 + time::Duration::days((j * 7) as i64) + time::Duration::minutes(s as i64);
            let snap = Snapshot {
                version: 1,
                time: at
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap(),
                source: Source {
                    kind: "vm".into(),
                    name: format!("vm-{s:03}"),
                },
                host: "pve1".into(),
                tags: vec!["bigrepo".into()],
                restore_point: None,
                facts: BTreeMap::new(),
                root: vec![root],
                summary: BackupSummary {
                    bytes_total,
                    ..Default::default()
                },
                labctl_version: env!("CARGO_PKG_VERSION").into(),
            };
            let (sid, bytes) = snapshot::encode(&snap, chunks, &meta);
            put(&dir, &format::snapshot_name(&sid), &bytes);
        }
    }
    println!(
        "bigrepo: {blobs} blobs in {n_packs} packs, {} index fragments, {snaps} snapshots ({refs} chunk references), {:.1} s",
        n_fragments,
        started.elapsed().as_secs_f64()
    );
}
