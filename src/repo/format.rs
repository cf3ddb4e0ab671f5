//! Object kinds, magic numbers and versions of the on-disk format.
//!
//! Every stored object starts with an 8-byte header: a 6-byte ASCII magic
//! naming its kind and a little-endian u16 format version. See
//! `docs/FORMAT.md` for the full layout. **Do not modify these constants**:
//! any change to bytes on disk needs a new version, and a test that still
//! reads the old one (`tests/fixtures/repo-v1`).

use crate::error::LabError;

pub const MAGIC_CONFIG: &[u8; 6] = b"LCCONF";
pub const MAGIC_KEY: &[u8; 6] = b"LCKEYS";
pub const MAGIC_PACK: &[u8; 6] = b"LCPACK";
pub const MAGIC_PACK_TRAILER: &[u8; 6] = b"LCPTRL";
pub const MAGIC_INDEX: &[u8; 6] = b"LCINDX";
pub const MAGIC_SNAPSHOT: &[u8; 6] = b"LCSNAP";
pub const MAGIC_PRUNE: &[u8; 6] = b"LCPRUN";
/// The current version of every object kind.
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 8;

/// Blob plaintext header byte: high nibble = version (1), low nibble = codec.
pub const BLOB_RAW: u8 = 0x10;
pub const BLOB_ZSTD: u8 = 0x11;

/// Builds the 8-byte header of an object.
pub fn header(magic: &[u8; 6]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..6].copy_from_slice(magic);
    h[6..].copy_from_slice(&VERSION.to_le_bytes());
    h
}

/// Checks the header of `bytes` and returns the body after it.
///
/// # Errors
/// An integrity error naming `what` when the magic or version is wrong.
pub fn strip_header<'a>(
    bytes: &'a [u8],
    magic: &[u8; 6],
    what: &str,
) -> Result<&'a [u8], LabError> {
    if bytes.len() < HEADER_LEN || &bytes[..6] != magic {
        return Err(LabError::integrity(format!(
            "{what}: not a labctl {} object (bad magic; truncated or foreign file)",
            String::from_utf8_lossy(magic)
        )));
    }
    let version = u16::from_le_bytes([bytes[6], bytes[7]]);
    if version != VERSION {
        return Err(LabError::integrity(format!(
            "{what}: format version {version} is not supported by this labctl (supports {VERSION}); upgrade labctl"
        )));
    }
    Ok(&bytes[HEADER_LEN..])
}

/// Seals a META object: header, then `plain` as one age message to the META
/// recipient. Returns (id, object bytes); the id is the BLAKE3 of the bytes.
pub fn seal_meta(
    magic: &[u8; 6],
    plain: &[u8],
    meta: &age::x25519::Recipient,
) -> (super::Id, Vec<u8>) {
    let out = super::crypto::encrypt_after(&header(magic), std::slice::from_ref(meta), plain);
    (super::Id::of_object(&out), out)
}

/// Opens an object sealed by [`seal_meta`].
///
/// # Errors
/// Integrity errors (wrong kind, version, damage) or key errors, naming `what`.
pub fn open_meta(
    bytes: &[u8],
    magic: &[u8; 6],
    meta: &age::x25519::Identity,
    what: &str,
) -> Result<Vec<u8>, LabError> {
    let body = strip_header(bytes, magic, what)?;
    super::crypto::decrypt(meta, body, what)
}

/// Object names in the repository.
pub fn pack_name(id: &super::Id) -> String {
    let h = id.hex();
    format!("packs/{}/{}", &h[..2], h)
}
pub fn index_name(id: &super::Id) -> String {
    format!("index/{}", id.hex())
}
pub fn snapshot_name(id: &super::Id) -> String {
    format!("snapshots/{}", id.hex())
}
pub const CONFIG_NAME: &str = "config";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_pinned() {
        // Golden: do not modify.
        assert_eq!(header(MAGIC_PACK), *b"LCPACK\x01\x00");
        assert_eq!(header(MAGIC_SNAPSHOT), *b"LCSNAP\x01\x00");
        assert!(strip_header(b"LCPACK\x02\x00", MAGIC_PACK, "x").is_err());
        assert!(strip_header(b"LCINDX\x01\x00", MAGIC_PACK, "x").is_err());
        assert_eq!(
            strip_header(b"LCPACK\x01\x00ab", MAGIC_PACK, "x").unwrap(),
            b"ab"
        );
    }
}
