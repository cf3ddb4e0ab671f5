//! Trees: one serialised directory listing per directory.
//!
//! A tree is JSON (`{"v":1,"nodes":[...]}`), stored as one or more `Tree`
//! blobs (the JSON is cut with the same FastCDC chunker, so a large directory
//! that changes a little dedups). A node is a directory, file or symlink with
//! its mode, owner, times and, for files, an ordered content list of chunk
//! IDs and zero runs. FIFOs and device nodes are recorded too (no content;
//! a device keeps its number in `rdev`); sockets are not.

use crate::repo::Id;
use serde::{Deserialize, Serialize};

/// One element of a file's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ContentRef {
    /// A stored chunk.
    Chunk(Id),
    /// A run of zero bytes that was not stored.
    Zero { zero: u64 },
}

/// What a node is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NodeType {
    Dir,
    File,
    Symlink,
    /// A named pipe (no content; recreated with mkfifo).
    Fifo,
    /// A character device (`rdev` holds its number; recreated as root).
    Chardev,
    /// A block device (`rdev` holds its number; recreated as root).
    Blockdev,
}

/// One entry of a directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Node {
    /// The name as raw bytes (hex) when it is not UTF-8, else the name.
    pub name: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub name_hex: bool,
    #[serde(rename = "type")]
    pub node_type: NodeType,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i128,
    #[serde(default)]
    pub size: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub content: Vec<ContentRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subtree: Option<Vec<Id>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub target_hex: bool,
    /// A hard link: the path (from the snapshot root, `/`-separated) of the
    /// file recorded first with the same inode. Such a node has no content
    /// and size 0; a reader links it to that file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardlink: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hardlink_hex: bool,
    /// Device number (`st_rdev`) of a character or block device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdev: Option<u64>,
}

impl Node {
    /// A node named `name` with the given type and stat facts; no content,
    /// subtree, target or link yet (the source fills what its type needs).
    pub fn new(
        name: &[u8],
        node_type: NodeType,
        mode: u32,
        uid: u32,
        gid: u32,
        mtime_ns: i128,
    ) -> Node {
        let mut n = Node {
            name: String::new(),
            name_hex: false,
            node_type,
            mode,
            uid,
            gid,
            mtime_ns,
            size: 0,
            content: vec![],
            subtree: None,
            target: None,
            target_hex: false,
            hardlink: None,
            hardlink_hex: false,
            rdev: None,
        };
        n.set_name(name);
        n
    }

    /// The name as OS bytes.
    pub fn name_bytes(&self) -> Vec<u8> {
        if self.name_hex {
            hex::decode(&self.name).unwrap_or_default()
        } else {
            self.name.as_bytes().to_vec()
        }
    }
    /// The symlink target as OS bytes.
    pub fn target_bytes(&self) -> Option<Vec<u8>> {
        Some(field_to_bytes(self.target.as_ref()?, self.target_hex))
    }
    pub fn set_target(&mut self, raw: &[u8]) {
        let (s, h) = bytes_to_field(raw);
        self.target = Some(s);
        self.target_hex = h;
    }
    /// The hard link's first path as OS bytes.
    pub fn hardlink_bytes(&self) -> Option<Vec<u8>> {
        Some(field_to_bytes(self.hardlink.as_ref()?, self.hardlink_hex))
    }
    pub fn set_hardlink(&mut self, raw: &[u8]) {
        let (s, h) = bytes_to_field(raw);
        self.hardlink = Some(s);
        self.hardlink_hex = h;
    }
    pub fn set_name(&mut self, raw: &[u8]) {
        (self.name, self.name_hex) = bytes_to_field(raw);
    }
}

/// A directory listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tree {
    pub v: u32,
    pub nodes: Vec<Node>,
}

/// OS bytes back from a string field (see [`bytes_to_field`]).
fn field_to_bytes(s: &str, is_hex: bool) -> Vec<u8> {
    if is_hex {
        hex::decode(s).unwrap_or_default()
    } else {
        s.as_bytes().to_vec()
    }
}

/// A string field for OS bytes: UTF-8 as is, else hex with a flag.
fn bytes_to_field(raw: &[u8]) -> (String, bool) {
    match std::str::from_utf8(raw) {
        Ok(s) => (s.to_string(), false),
        Err(_) => (hex::encode(raw), true),
    }
}
