//! Blobs: one chunk, compressed, then its own age message to the DATA recipients.
//!
//! Plaintext of the age message: one header byte ([`BLOB_ZSTD`] or
//! [`BLOB_RAW`]) followed by the zstd frame or the raw chunk. Raw is chosen
//! whenever zstd does not make it smaller. Decoding decrypts, decompresses,
//! and re-hashes with the dedup key; any mismatch is an integrity error.

use crate::error::LabError;
use crate::repo::crypto;
use crate::repo::format::{BLOB_RAW, BLOB_ZSTD};
use crate::repo::Id;

/// What a blob holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobKind {
    /// File or stream contents.
    Data = 0,
    /// Serialised directory trees.
    Tree = 1,
}

impl BlobKind {
    pub fn from_u8(v: u8) -> Option<BlobKind> {
        match v {
            0 => Some(BlobKind::Data),
            1 => Some(BlobKind::Tree),
            _ => None,
        }
    }
}

/// Compresses (when it helps) and encrypts one chunk.
pub fn encode(plain: &[u8], level: i32, recipients: &[age::x25519::Recipient]) -> Vec<u8> {
    let mut body = Vec::with_capacity(plain.len() + 1);
    if level > 0 {
        body.push(BLOB_ZSTD);
        let bound = zstd::zstd_safe::compress_bound(plain.len());
        body.reserve(bound);
        let mut c = zstd::bulk::Compressor::new(level).expect("valid zstd level");
        let spare = body.capacity() - 1;
        body.resize(1 + spare, 0);
        match c.compress_to_buffer(plain, &mut body[1..]) {
            Ok(n) if n < plain.len() => body.truncate(1 + n),
            _ => {
                body.clear();
            }
        }
    }
    if body.is_empty() {
        body.push(BLOB_RAW);
        body.extend_from_slice(plain);
    }
    crypto::encrypt(recipients, &body)
}

/// Decrypts, decompresses and verifies a blob.
///
/// # Errors
/// Key errors for the wrong identity; integrity errors naming `what`.
pub fn decode(
    cipher: &[u8],
    identity: &age::x25519::Identity,
    dedup_key: &[u8; 32],
    id: &Id,
    raw_len: usize,
    what: &str,
) -> Result<Vec<u8>, LabError> {
    let body = crypto::decrypt(identity, cipher, what)?;
    let plain = match body.first() {
        Some(&BLOB_RAW) => body[1..].to_vec(),
        Some(&BLOB_ZSTD) => zstd::bulk::decompress(&body[1..], raw_len)
            .map_err(|e| LabError::integrity(format!("{what}: bad compressed data ({e})")))?,
        _ => return Err(LabError::integrity(format!("{what}: unknown blob header"))),
    };
    if crypto::chunk_id(dedup_key, &plain) != *id {
        return Err(LabError::integrity(format!(
            "{what}: content does not match its ID {} (corrupted)",
            id.short()
        )));
    }
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_raw_when_incompressible() {
        let id_key = age::x25519::Identity::generate();
        let key = [3u8; 32];
        let text = b"hello hello hello hello hello hello hello hello".repeat(100);
        let c = encode(&text, 3, &[id_key.to_public()]);
        assert!(c.len() < text.len());
        let id = crypto::chunk_id(&key, &text);
        assert_eq!(
            decode(&c, &id_key, &key, &id, text.len(), "b").unwrap(),
            text
        );
        let mut noise = vec![0u8; 10000];
        blake3::Hasher::new().finalize_xof().fill(&mut noise);
        let c = encode(&noise, 3, &[id_key.to_public()]);
        let body = crypto::decrypt(&id_key, &c, "b").unwrap();
        assert_eq!(body[0], BLOB_RAW);
        let wrong = crypto::chunk_id(&key, b"other");
        assert_eq!(
            decode(&c, &id_key, &key, &wrong, noise.len(), "b")
                .unwrap_err()
                .kind,
            crate::error::ExitCode::Integrity
        );
    }
}
