//! Synthesises the metadata of a very large **restic-format** repository,
//! the peers' side of the `big-repo` workload of `benches/run.py` (issue 22):
//! the same shape as `bigrepo.rs` writes for labctl, so restic and rustic
//! run the same commands on the same number of blobs, packs and snapshot
//! references.
//!
//! ```text
//! cargo run --release --example resticrepo -- <repo dir> <master key json> <blobs> [sources] [snapshots per source]
//! ```
//!
//! The repository must exist (`restic init`); the master key is what
//! `restic cat masterkey` prints (`{"mac":{"k":…,"r":…},"encrypt":…}`).
//! Written in restic's repository format (restic `doc/design.rst`; the code
//! each rule follows is named beside it):
//! - **encryption** of every blob and file: a random 16-byte IV, AES-256-CTR
//!   under the `encrypt` key, then a Poly1305-AES tag over the ciphertext
//!   with r = `mac.r` and s = AES-128(`mac.k`, IV)
//!   (`internal/repository/crypto/crypto.go`: `Seal`, `poly1305PrepareKey`);
//! - **data packs** of 32 blobs of 1 MiB (encrypted 1 MiB + 32 bytes each),
//!   *sparse*: a hole where the blobs would be, then the real encrypted
//!   header (per blob: type byte 0, length u32 LE, 32-byte ID) and its length
//!   as u32 LE (`internal/repository/pack/pack.go`: `makeHeader`,
//!   `Finalize`); named `data/<2 hex>/<id>` with a random-looking ID, not the
//!   SHA-256 of the file (hashing 10 TiB of holes is what this avoids), so
//!   `check --read-data` and restores of these snapshots are not meaningful
//!   and every command that reads only metadata is — as for labctl;
//! - **trees**: one per snapshot, as `restic backup --stdin` writes it: a
//!   root tree `{"nodes":[…]}` plus newline holding one file node whose
//!   `content` lists the snapshot's chunk IDs (`internal/data/node.go`,
//!   `tree.go`); a tree's ID is the SHA-256 of its JSON; tree packs are real
//!   files of about 16 MiB (restic 0.14's default pack size), named by
//!   their SHA-256;
//! - **index files** of at most 50,000 blobs (restic's `indexMaxBlobs`),
//!   JSON `{"packs":[{"id","blobs":[{"id","type","offset","length"}]}]}`
//!   (`internal/repository/index/index.go`), uncompressed (a version 2
//!   repository reads a plaintext starting with `{` as uncompressed JSON),
//!   encrypted, named by the SHA-256 of the file;
//! - **snapshots**: `sources` × `snapshots per source` as in `bigrepo.rs`
//!   (each a sliding quarter of its source's chunks, weekly, host `pve1`,
//!   path `/vm-NNN.raw`), encrypted JSON named by its SHA-256
//!   (`internal/data/snapshot.go`).
//!
//! Run on an empty repository.

#[path = "shape.rs"]
mod shape;

use aws_lc_rs::cipher::{EncryptingKey, EncryptionContext, UnboundCipherKey, AES_128, AES_256};
use aws_lc_rs::digest::{digest, Context, SHA256};
use base64::Engine as _;
use poly1305::universal_hash::KeyInit;
use poly1305::Poly1305;
use rand::RngCore;
use shape::{Shape, BLOBS_PER_PACK};
use std::fmt::Write as _;
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const RAW_LEN: u64 = 1 << 20;
/// IV and tag around every encrypted blob or file (crypto.go `Extension`).
const OVERHEAD: u64 = 32;
const BLOB_LEN: u64 = RAW_LEN + OVERHEAD;
/// restic 0.14's default pack size (`--pack-size`).
const TREE_PACK_TARGET: usize = 16 << 20;
/// restic's `indexMaxBlobs` for an index file.
const INDEX_MAX_BLOBS: usize = 50_000;

struct Key {
    encrypt: [u8; 32],
    mac_k: [u8; 16],
    mac_r: [u8; 16],
}

impl Key {
    fn load(path: &Path) -> Key {
        let text = fs::read_to_string(path).unwrap_or_else(|e| {
            eprintln!("resticrepo: {}: {e}", path.display());
            std::process::exit(2)
        });
        let v: serde_json::Value = serde_json::from_str(&text).expect("master key: JSON");
        let field = |p: &str| -> Vec<u8> {
            let s = v.pointer(p).and_then(|s| s.as_str()).unwrap_or_else(|| {
                eprintln!("resticrepo: master key has no {p}");
                std::process::exit(2)
            });
            base64::engine::general_purpose::STANDARD
                .decode(s)
                .expect("master key: base64")
        };
        Key {
            encrypt: field("/encrypt").try_into().expect("encrypt: 32 bytes"),
            mac_k: field("/mac/k").try_into().expect("mac.k: 16 bytes"),
            mac_r: field("/mac/r").try_into().expect("mac.r: 16 bytes"),
        }
    }

    /// IV ‖ AES-256-CTR(plain) ‖ Poly1305-AES(ciphertext), as restic's
    /// `Key.Seal` with the nonce prepended.
    fn seal(&self, plain: &[u8]) -> Vec<u8> {
        let mut iv = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut iv);
        let mut out = Vec::with_capacity(plain.len() + OVERHEAD as usize);
        out.extend_from_slice(&iv);
        out.extend_from_slice(plain);
        let ctr =
            EncryptingKey::ctr(UnboundCipherKey::new(&AES_256, &self.encrypt).unwrap()).unwrap();
        ctr.less_safe_encrypt(&mut out[16..], EncryptionContext::Iv128(iv.into()))
            .unwrap();
        // poly1305PrepareKey: r ‖ AES-128(k, nonce).
        let mut s = iv;
        let ecb =
            EncryptingKey::ecb(UnboundCipherKey::new(&AES_128, &self.mac_k).unwrap()).unwrap();
        ecb.less_safe_encrypt(&mut s, EncryptionContext::None)
            .unwrap();
        let mut one_time = [0u8; 32];
        one_time[..16].copy_from_slice(&self.mac_r);
        one_time[16..].copy_from_slice(&s);
        let tag = Poly1305::new(&one_time.into()).compute_unpadded(&out[16..]);
        out.extend_from_slice(&tag);
        out
    }
}

type Id = [u8; 32];

fn sha256(bytes: &[u8]) -> Id {
    digest(&SHA256, bytes).as_ref().try_into().unwrap()
}

fn id(tag: &str, n: u64) -> Id {
    let mut c = Context::new(&SHA256);
    c.update(b"labctl resticrepo v1 ");
    c.update(tag.as_bytes());
    c.update(&n.to_le_bytes());
    c.finish().as_ref().try_into().unwrap()
}

fn blob_id(n: u64) -> Id {
    id("blob", n)
}

/// A blob as the index lists it: (type, id, offset, length).
type Entry = (&'static str, Id, u64, u64);

struct Pack {
    id: Id,
    blobs: Vec<Entry>,
}

/// The encrypted pack header for `blobs` and its length (pack.go
/// `makeHeader`: uncompressed blobs, type 0 data or 1 tree).
fn header(key: &Key, blobs: &[Entry]) -> Vec<u8> {
    let mut plain = Vec::with_capacity(blobs.len() * 37);
    for (kind, id, _, len) in blobs {
        plain.push(if *kind == "tree" { 1 } else { 0 });
        plain.extend_from_slice(&(*len as u32).to_le_bytes());
        plain.extend_from_slice(id);
    }
    let mut h = key.seal(&plain);
    let n = h.len() as u32;
    h.extend_from_slice(&n.to_le_bytes());
    h
}

fn pack_path(dir: &Path, id: &Id) -> PathBuf {
    let hex = hex::encode(id);
    dir.join("data").join(&hex[..2]).join(hex)
}

fn put(dir: &Path, kind: &str, bytes: &[u8]) -> Id {
    let id = sha256(bytes);
    let path = dir.join(kind).join(hex::encode(id));
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, bytes).unwrap();
    id
}

fn rfc3339(day: u64, minute: u64) -> String {
    let at = time::macros::datetime!(2026-01-01 02:00 UTC)
        + time::Duration::days(day as i64)
        + time::Duration::minutes(minute as i64);
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

fn main() {
    let shape = Shape::from_args(
        "resticrepo <repo dir> <master key json> <blobs> [sources] [snapshots per source]",
    );
    let dir = shape.dir.clone();
    let key = Key::load(&shape.key);
    let (blobs, sources, per_source) = (shape.blobs, shape.sources, shape.per_source);
    let started = std::time::Instant::now();

    // Data packs, written by two threads.
    let mut packs: Vec<Pack> = shape.data_packs(|p, blobs| {
        let entries: Vec<Entry> = blobs
            .enumerate()
            .map(|(i, b)| ("data", blob_id(b), i as u64 * BLOB_LEN, BLOB_LEN))
            .collect();
        let pid = id("pack", p);
        let mut f = fs::File::create(pack_path(&dir, &pid)).unwrap();
        f.seek(SeekFrom::Start(entries.len() as u64 * BLOB_LEN))
            .unwrap();
        f.write_all(&header(&key, &entries)).unwrap();
        Pack {
            id: pid,
            blobs: entries,
        }
    });

    // One root tree per snapshot (the `--stdin` shape), packed ~16 MiB a pack.
    let mut snaps = vec![];
    let mut pending: (Vec<u8>, Vec<Entry>) = (vec![], vec![]);
    let mut refs = 0u64;
    let flush = |pending: &mut (Vec<u8>, Vec<Entry>), packs: &mut Vec<Pack>| {
        let (mut bytes, entries) = std::mem::take(pending);
        bytes.extend_from_slice(&header(&key, &entries));
        let pid = sha256(&bytes);
        let path = pack_path(&dir, &pid);
        fs::write(path, &bytes).unwrap();
        packs.push(Pack {
            id: pid,
            blobs: entries,
        });
    };
    for s in 0..sources {
        for j in 0..per_source {
            let chunks = shape.window(s, j);
            let window = chunks.end - chunks.start;
            let at = rfc3339(j * 7, s);
            let mut json = String::with_capacity(window as usize * 67 + 512);
            write!(
                json,
                r#"{{"nodes":[{{"name":"vm-{s:03}.raw","type":"file","mode":384,"mtime":"{at}","atime":"{at}","ctime":"{at}","uid":0,"gid":0,"user":"root","group":"root","size":{},"content":["#,
                window * RAW_LEN
            )
            .unwrap();
            for (i, b) in chunks.enumerate() {
                if i > 0 {
                    json.push(',');
                }
                json.push('"');
                json.push_str(&hex::encode(blob_id(b)));
                json.push('"');
            }
            json.push_str("]}]}\n");
            refs += window;
            let tree = sha256(json.as_bytes());
            let sealed = key.seal(json.as_bytes());
            let offset = pending.0.len() as u64;
            pending.0.extend_from_slice(&sealed);
            pending.1.push(("tree", tree, offset, sealed.len() as u64));
            if pending.0.len() >= TREE_PACK_TARGET {
                flush(&mut pending, &mut packs);
            }
            snaps.push((s, at, tree));
        }
    }
    if !pending.1.is_empty() {
        flush(&mut pending, &mut packs);
    }

    // Index files of at most INDEX_MAX_BLOBS blobs, whole packs each.
    let mut n_index = 0;
    let mut json = String::new();
    let mut in_file = 0usize;
    let write_index = |json: &mut String, n_index: &mut usize| {
        json.push_str("]}");
        put(&dir, "index", &key.seal(json.as_bytes()));
        json.clear();
        *n_index += 1;
    };
    for (i, p) in packs.iter().enumerate() {
        if json.is_empty() {
            json.push_str(r#"{"packs":["#);
        } else {
            json.push(',');
        }
        write!(json, r#"{{"id":"{}","blobs":["#, hex::encode(p.id)).unwrap();
        for (k, (kind, bid, offset, len)) in p.blobs.iter().enumerate() {
            if k > 0 {
                json.push(',');
            }
            write!(
                json,
                r#"{{"id":"{}","type":"{kind}","offset":{offset},"length":{len}}}"#,
                hex::encode(bid)
            )
            .unwrap();
        }
        json.push_str("]}");
        in_file += p.blobs.len();
        let last = i + 1 == packs.len();
        if in_file + BLOBS_PER_PACK as usize > INDEX_MAX_BLOBS || last {
            write_index(&mut json, &mut n_index);
            in_file = 0;
        }
    }
    let total_packs = packs.len();
    packs.clear();

    for (s, at, tree) in &snaps {
        let json = format!(
            r#"{{"time":"{at}","tree":"{}","paths":["/vm-{s:03}.raw"],"hostname":"pve1","username":"root","tags":["bigrepo"]}}"#,
            hex::encode(tree)
        );
        put(&dir, "snapshots", &key.seal(json.as_bytes()));
    }
    println!(
        "resticrepo: {blobs} blobs in {total_packs} packs, {n_index} index files, {} snapshots ({refs} chunk references), {:.1} s",
        snaps.len(),
        started.elapsed().as_secs_f64()
    );
}
