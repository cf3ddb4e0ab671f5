//! Index fragments: which blobs are in which pack.
//!
//! Each backup writes one or more fragments (`index/<id>`): header
//! `"LCINDX" u16le(1)`, then an age message (META) whose plaintext is
//! `u32le(pack count)` followed, per pack, by `pack id [32] | u64le(pack
//! size)` and an entry table (see [`crate::repo::pack`]). Fragments are never
//! rewritten; prune may write new ones and delete superseded ones.

use crate::error::LabError;
use crate::repo::format::{self, MAGIC_INDEX};
use crate::repo::pack::{decode_entries, encode_entries, PackEntry};
use crate::repo::Id;

/// The most blobs one fragment lists when labctl writes a fragment of
/// packs it did not just write (prune's consolidation, `repair index`):
/// about 3 MiB of plaintext, which every reader holds in memory at once
/// (restic bounds its index files the same way, at 50,000 blobs).
pub const MAX_FRAGMENT_BLOBS: usize = 65_536;

/// One pack as an index fragment records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexedPack {
    pub id: Id,
    pub size: u64,
    pub entries: Vec<PackEntry>,
}

/// Whether a fragment being filled (`run_packs` packs, `run_blobs`
/// entries) must be written before a pack of `next` entries joins it: the
/// rule that keeps fragments at [`MAX_FRAGMENT_BLOBS`] (a pack with more is
/// a fragment of its own).
pub fn overflows(run_packs: usize, run_blobs: usize, next: usize) -> bool {
    run_packs > 0 && run_blobs + next > MAX_FRAGMENT_BLOBS
}

/// Splits `packs` into runs of whole packs of at most
/// [`MAX_FRAGMENT_BLOBS`] entries each (see [`overflows`]).
pub fn split(packs: &[IndexedPack]) -> Vec<&[IndexedPack]> {
    let mut out = vec![];
    let (mut start, mut blobs) = (0, 0);
    for (i, p) in packs.iter().enumerate() {
        if overflows(i - start, blobs, p.entries.len()) {
            out.push(&packs[start..i]);
            (start, blobs) = (i, 0);
        }
        blobs += p.entries.len();
    }
    if start < packs.len() {
        out.push(&packs[start..]);
    }
    out
}

/// Serialises and encrypts an index fragment; returns (id, object bytes).
pub fn encode<P: std::borrow::Borrow<IndexedPack>>(
    packs: &[P],
    meta: &age::x25519::Recipient,
) -> (Id, Vec<u8>) {
    let mut plain = vec![];
    plain.extend_from_slice(&(packs.len() as u32).to_le_bytes());
    for p in packs.iter().map(|p| p.borrow()) {
        plain.extend_from_slice(&p.id.0);
        plain.extend_from_slice(&p.size.to_le_bytes());
        encode_entries(&p.entries, &mut plain);
    }
    format::seal_meta(MAGIC_INDEX, &plain, meta)
}

/// [`decode`] for the fragment stored as `index/<id>`, first checking that
/// its bytes hash to its name (a corrupted fragment is an integrity error
/// naming it, before any decryption).
///
/// # Errors
/// Integrity or key errors naming the fragment.
pub fn decode_named(
    bytes: &[u8],
    id: &crate::repo::Id,
    meta: &age::x25519::Identity,
    what: &str,
) -> Result<Vec<IndexedPack>, LabError> {
    if crate::repo::Id::of_object(bytes) != *id {
        return Err(LabError::integrity(format!(
            "{what}: content does not match its name (corrupted)"
        )));
    }
    decode(bytes, meta, what)
}

/// Decrypts and parses an index fragment.
///
/// # Errors
/// Integrity or key errors naming `what`.
pub fn decode(
    bytes: &[u8],
    meta: &age::x25519::Identity,
    what: &str,
) -> Result<Vec<IndexedPack>, LabError> {
    let plain = format::open_meta(bytes, MAGIC_INDEX, meta, what)?;
    let bad = || LabError::integrity(format!("{what}: malformed index"));
    if plain.len() < 4 {
        return Err(bad());
    }
    let n = u32::from_le_bytes(plain[..4].try_into().unwrap()) as usize;
    let mut rest = &plain[4..];
    let mut out = Vec::with_capacity(n.min(1 << 16));
    for _ in 0..n {
        if rest.len() < 40 {
            return Err(bad());
        }
        let id = Id::from_slice(&rest[..32]).unwrap();
        let size = u64::from_le_bytes(rest[32..40].try_into().unwrap());
        let (entries, r) = decode_entries(&rest[40..], what)?;
        rest = r;
        out.push(IndexedPack { id, size, entries });
    }
    if !rest.is_empty() {
        return Err(bad());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::blob::BlobKind;

    #[test]
    fn split_bounds_the_entries_of_each_fragment() {
        let pack = |n: usize| IndexedPack {
            id: Id([n as u8; 32]),
            size: 1,
            entries: vec![
                PackEntry {
                    kind: BlobKind::Data,
                    id: Id([0; 32]),
                    offset: 8,
                    length: 1,
                    raw_len: 1,
                };
                n
            ],
        };
        let half = MAX_FRAGMENT_BLOBS / 2;
        let packs = vec![
            pack(half),
            pack(half),
            pack(1),
            pack(MAX_FRAGMENT_BLOBS + 5),
            pack(3),
        ];
        let runs: Vec<usize> = split(&packs).iter().map(|r| r.len()).collect();
        assert_eq!(runs, vec![2, 1, 1, 1]);
        assert!(split(&[]).is_empty());
    }

    #[test]
    fn round_trip() {
        let meta = age::x25519::Identity::generate();
        let packs = vec![IndexedPack {
            id: Id([9; 32]),
            size: 1234,
            entries: vec![PackEntry {
                kind: BlobKind::Data,
                id: Id([1; 32]),
                offset: 8,
                length: 100,
                raw_len: 200,
            }],
        }];
        let (id, bytes) = encode(&packs, &meta.to_public());
        assert_eq!(id, Id::of_object(&bytes));
        assert_eq!(&bytes[..8], b"LCINDX\x01\x00");
        assert_eq!(decode(&bytes, &meta, "i").unwrap(), packs);
    }
}
