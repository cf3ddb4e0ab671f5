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

/// Compresses (when it helps) and encrypts chunks; one per worker thread,
/// so zstd contexts and buffers are reused instead of re-created per blob.
pub struct BlobEncoder {
    sealer: crypto::Sealer,
    contexts: Vec<(i32, zstd::bulk::Compressor<'static>)>,
    scratch: Vec<u8>,
}

impl BlobEncoder {
    pub fn new(recipients: Vec<age::x25519::Recipient>) -> Self {
        BlobEncoder {
            sealer: crypto::Sealer::new(recipients),
            contexts: vec![],
            scratch: vec![],
        }
    }

    fn compressor(&mut self, level: i32) -> &mut zstd::bulk::Compressor<'static> {
        let i = match self.contexts.iter().position(|(l, _)| *l == level) {
            Some(i) => i,
            None => {
                let c = zstd::bulk::Compressor::new(level).expect("valid zstd level");
                self.contexts.push((level, c));
                self.contexts.len() - 1
            }
        };
        &mut self.contexts[i].1
    }

    /// Whether a quick zstd-1 pass over four 8 KiB samples (at 0, 1/4, 1/2
    /// and 3/4 of the chunk) shrinks any of them by at least 2%. Random or
    /// already-compressed chunks fail this and are stored raw without a full
    /// compression pass.
    fn looks_compressible(&mut self, plain: &[u8]) -> bool {
        const SAMPLE: usize = 8 * 1024;
        if plain.len() < 16 * SAMPLE {
            return true;
        }
        let q = plain.len() / 4;
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut result = false;
        for at in [0, q, 2 * q, 3 * q] {
            let sample = &plain[at..at + SAMPLE];
            scratch.clear();
            scratch.reserve(zstd::zstd_safe::compress_bound(SAMPLE));
            if let Ok(n) = self.compressor(1).compress_to_buffer(sample, &mut scratch) {
                if n * 100 < SAMPLE * 98 {
                    result = true;
                    break;
                }
            }
        }
        self.scratch = scratch;
        result
    }

    /// Encodes one chunk at zstd `level` (0 = store raw).
    pub fn encode(&mut self, plain: &[u8], level: i32) -> Vec<u8> {
        let mut compressed = false;
        if level > 0 && !plain.is_empty() && self.looks_compressible(plain) {
            let mut scratch = std::mem::take(&mut self.scratch);
            scratch.clear();
            scratch.reserve(zstd::zstd_safe::compress_bound(plain.len()));
            if let Ok(n) = self
                .compressor(level)
                .compress_to_buffer(plain, &mut scratch)
            {
                compressed = n < plain.len();
            }
            self.scratch = scratch;
        }
        let (header, body): (u8, &[u8]) = if compressed {
            (BLOB_ZSTD, &self.scratch)
        } else {
            (BLOB_RAW, plain)
        };
        self.sealer.seal_parts(&[&[header], body])
    }
}

/// Compresses (when it helps) and encrypts one chunk (convenience form).
pub fn encode(plain: &[u8], level: i32, recipients: &[age::x25519::Recipient]) -> Vec<u8> {
    BlobEncoder::new(recipients.to_vec()).encode(plain, level)
}

thread_local! {
    /// One zstd decompression context per thread, reused across blobs
    /// (creating one per blob showed up in restore profiles).
    static DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

fn decompress(data: &[u8], raw_len: usize) -> std::io::Result<Vec<u8>> {
    DCTX.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new()?);
        }
        slot.as_mut().expect("set above").decompress(data, raw_len)
    })
}

/// Decrypts, decompresses and verifies a blob.
///
/// # Errors
/// Key errors for the wrong identity; integrity errors naming `what`.
pub fn decode(
    cipher: &[u8],
    identity: &crypto::DataIdentity,
    dedup_key: &[u8; 32],
    id: &Id,
    raw_len: usize,
    what: &dyn Fn() -> String,
) -> Result<Vec<u8>, LabError> {
    let mut body = identity.open(cipher, what)?;
    let plain = match body.first() {
        Some(&BLOB_RAW) => {
            body.drain(..1);
            body
        }
        Some(&BLOB_ZSTD) => decompress(&body[1..], raw_len)
            .map_err(|e| LabError::integrity(format!("{}: bad compressed data ({e})", what())))?,
        _ => {
            return Err(LabError::integrity(format!(
                "{}: unknown blob header",
                what()
            )))
        }
    };
    if crypto::chunk_id(dedup_key, &plain) != *id {
        return Err(LabError::integrity(format!(
            "{}: content does not match its ID {} (corrupted)",
            what(),
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
        let data_id = crypto::DataIdentity::new(id_key.clone());
        let key = [3u8; 32];
        let text = b"hello hello hello hello hello hello hello hello".repeat(100);
        let c = encode(&text, 3, &[id_key.to_public()]);
        assert!(c.len() < text.len());
        let id = crypto::chunk_id(&key, &text);
        assert_eq!(
            decode(&c, &data_id, &key, &id, text.len(), &|| "b".into()).unwrap(),
            text
        );
        let mut noise = vec![0u8; 10000];
        blake3::Hasher::new().finalize_xof().fill(&mut noise);
        let c = encode(&noise, 3, &[id_key.to_public()]);
        let body = crypto::decrypt(&id_key, &c, "b").unwrap();
        assert_eq!(body[0], BLOB_RAW);
        let wrong = crypto::chunk_id(&key, b"other");
        assert_eq!(
            decode(&c, &data_id, &key, &wrong, noise.len(), &|| "b".into())
                .unwrap_err()
                .exit_code(),
            crate::error::ExitCode::Integrity
        );
    }
}
