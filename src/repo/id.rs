//! 32-byte identifiers shown as lowercase hex.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// A 32-byte identifier: a chunk ID (keyed BLAKE3 of plaintext), a pack,
/// index or snapshot ID (BLAKE3 of the stored object bytes).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Id(pub [u8; 32]);

pub type ChunkId = Id;
pub type PackId = Id;
pub type SnapshotId = Id;

impl Id {
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }
    /// BLAKE3 (unkeyed) of object bytes, used to name stored objects.
    pub fn of_object(bytes: &[u8]) -> Id {
        Id(*blake3::hash(bytes).as_bytes())
    }
    pub fn from_hex(s: &str) -> Option<Id> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Id(out))
    }
    pub fn from_slice(b: &[u8]) -> Option<Id> {
        Some(Id(b.try_into().ok()?))
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Id({})", self.short())
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl Serialize for Id {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.hex())
    }
}

impl<'de> Deserialize<'de> for Id {
    /// From the string in place (no copy of it: a listing of a million
    /// files spent 11% of its time allocating these strings).
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Hex;
        impl serde::de::Visitor<'_> for Hex {
            type Value = Id;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("64 hex digits")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Id, E> {
                Id::from_hex(s).ok_or_else(|| E::custom("expected 64 hex digits"))
            }
        }
        d.deserialize_str(Hex)
    }
}
