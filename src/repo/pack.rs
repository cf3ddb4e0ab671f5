//! Packs: many blobs in one object, with an encrypted trailer listing them.
//!
//! ```text
//! "LCPACK" u16le(1)                         8-byte header
//! blob 0 | blob 1 | ... | blob n-1          each an age message (DATA)
//! trailer                                   age message (META) of the entry table
//! u32le(trailer length) "LCPTRL" u16le(1)   12-byte footer
//! ```
//! The entry table is `u32le(n)` then n × 45 bytes:
//! `kind u8 | chunk id [32] | offset u32le | length u32le | raw length u32le`.
//! Offsets count from the start of the pack. The pack ID is the BLAKE3 hash
//! of the whole object, so a reader can verify a pack without any key.

use crate::error::LabError;
use crate::repo::blob::BlobKind;
use crate::repo::format::{self, MAGIC_PACK, MAGIC_PACK_TRAILER};
use crate::repo::{crypto, Id};

pub const FOOTER_LEN: usize = 12;
pub const ENTRY_LEN: usize = 45;

/// Where a blob lives in a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackEntry {
    pub kind: BlobKind,
    pub id: Id,
    pub offset: u32,
    pub length: u32,
    pub raw_len: u32,
}

/// Serialises an entry table (the plaintext of trailers and index records).
pub fn encode_entries(entries: &[PackEntry], out: &mut Vec<u8>) {
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        out.push(e.kind as u8);
        out.extend_from_slice(&e.id.0);
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.length.to_le_bytes());
        out.extend_from_slice(&e.raw_len.to_le_bytes());
    }
}

/// Parses an entry table, returning the entries and the bytes after it.
///
/// # Errors
/// An integrity error naming `what` when the table is malformed.
pub fn decode_entries<'a>(
    buf: &'a [u8],
    what: &str,
) -> Result<(Vec<PackEntry>, &'a [u8]), LabError> {
    let bad = || LabError::integrity(format!("{what}: malformed blob table"));
    if buf.len() < 4 {
        return Err(bad());
    }
    let n = u32::from_le_bytes(buf[..4].try_into().unwrap()) as usize;
    let need = 4 + n.checked_mul(ENTRY_LEN).ok_or_else(bad)?;
    if buf.len() < need {
        return Err(bad());
    }
    let mut out = Vec::with_capacity(n);
    for rec in buf[4..need].chunks_exact(ENTRY_LEN) {
        out.push(PackEntry {
            kind: BlobKind::from_u8(rec[0]).ok_or_else(bad)?,
            id: Id::from_slice(&rec[1..33]).unwrap(),
            offset: u32::from_le_bytes(rec[33..37].try_into().unwrap()),
            length: u32::from_le_bytes(rec[37..41].try_into().unwrap()),
            raw_len: u32::from_le_bytes(rec[41..45].try_into().unwrap()),
        });
    }
    Ok((out, &buf[need..]))
}

/// Builds one pack in memory.
pub struct PackBuilder {
    buf: Vec<u8>,
    entries: Vec<PackEntry>,
}

impl Default for PackBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl PackBuilder {
    pub fn new() -> Self {
        Self::with_capacity(1 << 20)
    }
    pub fn with_capacity(capacity: usize) -> Self {
        Self::with_buffer(Vec::with_capacity(capacity))
    }
    /// A builder that fills `buf` (cleared first): re-using the buffer of
    /// a pack already written saves faulting in fresh pages for each pack.
    pub fn with_buffer(mut buf: Vec<u8>) -> Self {
        buf.clear();
        buf.extend_from_slice(&format::header(MAGIC_PACK));
        PackBuilder {
            buf,
            entries: vec![],
        }
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    pub fn len(&self) -> usize {
        self.buf.len()
    }
    pub fn add(&mut self, kind: BlobKind, id: Id, cipher: &[u8], raw_len: u32) {
        self.entries.push(PackEntry {
            kind,
            id,
            offset: self.buf.len() as u32,
            length: cipher.len() as u32,
            raw_len,
        });
        self.buf.extend_from_slice(cipher);
    }
    /// Appends the trailer and returns (pack id, bytes, entries).
    pub fn finish(mut self, meta: &age::x25519::Recipient) -> (Id, Vec<u8>, Vec<PackEntry>) {
        let mut table = vec![];
        encode_entries(&self.entries, &mut table);
        let trailer = crypto::encrypt(std::slice::from_ref(meta), &table);
        self.buf.extend_from_slice(&trailer);
        self.buf
            .extend_from_slice(&(trailer.len() as u32).to_le_bytes());
        self.buf
            .extend_from_slice(&format::header(MAGIC_PACK_TRAILER));
        let id = Id::of_object(&self.buf);
        (id, self.buf, self.entries)
    }
}

/// Reads the trailer of a pack given its last bytes (`tail`) and total size.
/// Returns `Err(needed)` style via `TrailerNeed` when `tail` is too short.
///
/// # Errors
/// Integrity or key errors naming the pack.
pub fn parse_trailer(
    tail: &[u8],
    pack_size: u64,
    meta: &age::x25519::Identity,
    what: &str,
) -> Result<Result<Vec<PackEntry>, usize>, LabError> {
    if tail.len() < FOOTER_LEN || (pack_size as usize) < format::HEADER_LEN + FOOTER_LEN {
        return Err(LabError::integrity(format!(
            "{what}: too short to be a pack (truncated?)"
        )));
    }
    let footer = &tail[tail.len() - FOOTER_LEN..];
    format::strip_header(&footer[4..], MAGIC_PACK_TRAILER, what).map_err(|_| {
        LabError::integrity(format!(
            "{what}: pack footer missing (truncated or damaged pack)"
        ))
    })?;
    let tlen = u32::from_le_bytes(footer[..4].try_into().unwrap()) as usize;
    if (tlen + FOOTER_LEN + format::HEADER_LEN) as u64 > pack_size {
        return Err(LabError::integrity(format!(
            "{what}: trailer length out of range"
        )));
    }
    if tail.len() < tlen + FOOTER_LEN {
        return Ok(Err(tlen + FOOTER_LEN));
    }
    let trailer = &tail[tail.len() - FOOTER_LEN - tlen..tail.len() - FOOTER_LEN];
    let table = crypto::decrypt(meta, trailer, &format!("{what} trailer"))?;
    let (entries, rest) = decode_entries(&table, what)?;
    if !rest.is_empty() {
        return Err(LabError::integrity(format!(
            "{what}: trailing bytes after blob table"
        )));
    }
    Ok(Ok(entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_table_is_pinned() {
        let e = PackEntry {
            kind: BlobKind::Tree,
            id: Id([0xab; 32]),
            offset: 8,
            length: 300,
            raw_len: 1000,
        };
        let mut out = vec![];
        encode_entries(&[e], &mut out);
        // Golden: do not modify.
        let mut want = vec![1, 0, 0, 0, 1];
        want.extend_from_slice(&[0xab; 32]);
        want.extend_from_slice(&[8, 0, 0, 0, 0x2c, 1, 0, 0, 0xe8, 3, 0, 0]);
        assert_eq!(out, want);
        assert_eq!(decode_entries(&out, "t").unwrap().0, vec![e]);
    }

    #[test]
    fn trailer_round_trip() {
        let meta = age::x25519::Identity::generate();
        let mut b = PackBuilder::new();
        b.add(BlobKind::Data, Id([1; 32]), b"cipher-one", 10);
        b.add(BlobKind::Data, Id([2; 32]), b"cipher-two!", 11);
        let (id, bytes, entries) = b.finish(&meta.to_public());
        assert_eq!(id, Id::of_object(&bytes));
        let parsed = parse_trailer(&bytes, bytes.len() as u64, &meta, "p")
            .unwrap()
            .unwrap();
        assert_eq!(parsed, entries);
        assert_eq!(&bytes[entries[1].offset as usize..][..11], b"cipher-two!");
        // A short tail asks for more.
        let need = parse_trailer(&bytes[bytes.len() - 12..], bytes.len() as u64, &meta, "p")
            .unwrap()
            .unwrap_err();
        assert!(need > 12);
        // Truncation is detected.
        assert!(parse_trailer(
            &bytes[..bytes.len() - 3],
            bytes.len() as u64 - 3,
            &meta,
            "p"
        )
        .is_err());
    }
}
