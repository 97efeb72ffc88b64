//! Tree and snapshot objects: what a backup records about files.
//!
//! A tree is one directory: its entries sorted by name bytes, each with full
//! metadata. Trees are stored as blobs (type `tree`) in their own packs and
//! named by the keyed hash of their JSON, so an unchanged directory produces
//! the same tree blob and costs nothing in the next snapshot. JSON is chosen
//! over a binary encoding so that the emergency path needs only `age`,
//! `zstd` and a text viewer.
//!
//! Names, symlink targets and xattr values are arbitrary bytes on Linux; they
//! are stored as a JSON string when they are valid UTF-8 and as
//! `{"hex": "…"}` otherwise, so nothing is lost and the common case stays
//! readable.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::id::Id;

/// Arbitrary bytes stored readably (see the module docs).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Bytes(pub Vec<u8>);

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

impl Bytes {
    /// A lossy UTF-8 rendering for humans.
    pub fn lossy(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }
}

#[derive(Serialize, Deserialize)]
struct HexBytes {
    hex: String,
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(&self.0) {
            Ok(text) => s.serialize_str(text),
            Err(_) => HexBytes {
                hex: hex::encode(&self.0),
            }
            .serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Text(String),
            Hex(HexBytes),
        }
        match Repr::deserialize(d)? {
            Repr::Text(t) => Ok(Bytes(t.into_bytes())),
            Repr::Hex(h) => hex::decode(h.hex)
                .map(Bytes)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// The type of a file system entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeKind {
    /// A directory; its entries are in `subtree`.
    Dir,
    /// A regular file; its data is the blobs in `content`.
    File,
    /// A symbolic link to `target`.
    Symlink,
    /// A named pipe.
    Fifo,
    /// A character device (`rdev`).
    Chardev,
    /// A block device (`rdev`).
    Blockdev,
    /// A Unix socket (recorded, recreated as nothing: sockets belong to processes).
    Socket,
}

/// One extended attribute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xattr {
    /// Attribute name, e.g. `user.comment`.
    pub name: Bytes,
    /// Attribute value.
    pub value: Bytes,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// One directory entry with all the metadata a restore needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// The entry's name (one path component).
    pub name: Bytes,
    /// What kind of entry.
    #[serde(rename = "type")]
    pub kind: NodeKind,
    /// Permission bits including setuid, setgid and sticky (`mode & 0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Owner's name when it was known at backup time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Group's name when it was known at backup time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Nanoseconds part of the modification time.
    #[serde(default)]
    pub mtime_nsec: u32,
    /// File size in bytes (regular files).
    #[serde(default)]
    pub size: u64,
    /// Data blobs, in order (regular files).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub content: Vec<Id>,
    /// Tree blob of a directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subtree: Option<Id>,
    /// Target of a symlink.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Bytes>,
    /// Device number of a device node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdev: Option<u64>,
    /// Inode and device of a file with several hard links; entries sharing
    /// both are restored as hard links to one file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardlink: Option<(u64, u64)>,
    /// The file had holes; restore writes zero runs as holes.
    #[serde(default, skip_serializing_if = "is_false")]
    pub sparse: bool,
    /// Extended attributes, sorted by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub xattrs: Vec<Xattr>,
}

/// A directory's entries, sorted by name bytes, names unique.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tree {
    /// The entries.
    pub nodes: Vec<Node>,
}

impl Tree {
    /// Serialises the tree to the bytes that are hashed and stored.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("trees serialise")
    }

    /// Parses and validates a stored tree: names must be safe path
    /// components, sorted and unique (a hostile repository could otherwise
    /// smuggle `..` or two entries of one name into a restore).
    pub fn from_bytes(bytes: &[u8]) -> Result<Tree, String> {
        let tree: Tree =
            serde_json::from_slice(bytes).map_err(|e| format!("invalid tree JSON: {e}"))?;
        for pair in tree.nodes.windows(2) {
            if pair[0].name >= pair[1].name {
                return Err(format!(
                    "entries not sorted or not unique at {:?}",
                    pair[1].name
                ));
            }
        }
        for node in &tree.nodes {
            if !crate::fsmeta::is_safe_name(&node.name.0) {
                return Err(format!("unsafe entry name {:?}", node.name));
            }
            match node.kind {
                NodeKind::Dir if node.subtree.is_none() => {
                    return Err(format!("directory {:?} has no subtree", node.name))
                }
                NodeKind::Symlink if node.target.is_none() => {
                    return Err(format!("symlink {:?} has no target", node.name))
                }
                _ => {}
            }
        }
        Ok(tree)
    }

    /// Finds an entry by name.
    pub fn find(&self, name: &[u8]) -> Option<&Node> {
        self.nodes
            .binary_search_by(|n| n.name.0.as_slice().cmp(name))
            .ok()
            .map(|i| &self.nodes[i])
    }
}

/// Counts of what a backup did, stored in its snapshot.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Files not in the cache before.
    pub files_new: u64,
    /// Files whose metadata changed since the cached state.
    pub files_changed: u64,
    /// Files reused from the cache without reading.
    pub files_unmodified: u64,
    /// Directories.
    pub dirs: u64,
    /// Other entries (symlinks, devices, FIFOs, sockets).
    pub others: u64,
    /// Total size of all files in the snapshot.
    pub total_bytes: u64,
    /// Bytes read from files.
    pub bytes_read: u64,
    /// New blobs stored.
    pub blobs_added: u64,
    /// Plaintext bytes of the new blobs.
    pub bytes_added_raw: u64,
    /// Bytes of the new blobs after compression, before encryption.
    pub bytes_added_stored: u64,
    /// Wall time in seconds.
    pub duration_secs: f64,
    /// Entries that could not be read (the snapshot is incomplete).
    pub errors: u64,
}

/// A snapshot: the root of one backup, written last.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Snapshot format version.
    pub version: u32,
    /// When the backup started.
    pub time: chrono::DateTime<chrono::Utc>,
    /// The host backed up.
    pub host: String,
    /// The user who ran the backup.
    pub user: String,
    /// The paths given to `backup` (absolute, lossy UTF-8 for display).
    pub paths: Vec<String>,
    /// Tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// The root tree.
    pub tree: Id,
    /// True when some entries could not be read.
    #[serde(default)]
    pub incomplete: bool,
    /// What the backup did.
    pub summary: Summary,
    /// The lifeboat version that wrote it.
    pub program: String,
    /// End of the snapshot object's Object Lock retention, when the
    /// repository has a lock policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locked_until: Option<chrono::DateTime<chrono::Utc>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn node(name: &[u8]) -> Node {
        Node {
            name: Bytes(name.to_vec()),
            kind: NodeKind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            user: None,
            group: None,
            mtime: 1,
            mtime_nsec: 2,
            size: 0,
            content: vec![],
            subtree: None,
            target: None,
            rdev: None,
            hardlink: None,
            sparse: false,
            xattrs: vec![],
        }
    }

    proptest! {
        #[test]
        fn bytes_round_trip_through_json(v in proptest::collection::vec(any::<u8>(), 0..64)) {
            let b = Bytes(v);
            let json = serde_json::to_string(&b).unwrap();
            prop_assert_eq!(serde_json::from_str::<Bytes>(&json).unwrap(), b);
        }

        #[test]
        fn trees_round_trip(names in proptest::collection::btree_set(proptest::collection::vec(1u8..=255, 1..20), 0..20)) {
            let nodes: Vec<Node> = names.into_iter()
                .filter(|n| crate::fsmeta::is_safe_name(n))
                .map(|n| node(&n)).collect();
            let tree = Tree { nodes };
            prop_assert_eq!(Tree::from_bytes(&tree.to_bytes()).unwrap(), tree);
        }
    }

    #[test]
    fn trees_with_dot_dot_or_slashes_are_rejected() {
        for bad in [&b".."[..], b".", b"a/b", b""] {
            let tree = Tree {
                nodes: vec![node(bad)],
            };
            assert!(Tree::from_bytes(&tree.to_bytes()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn trees_with_duplicate_names_are_rejected() {
        let tree = Tree {
            nodes: vec![node(b"a"), node(b"a")],
        };
        assert!(Tree::from_bytes(&tree.to_bytes()).is_err());
    }

    #[test]
    fn non_utf8_names_are_stored_as_hex() {
        let json = serde_json::to_string(&Bytes(b"caf\xe9".to_vec())).unwrap();
        assert_eq!(json, r#"{"hex":"636166e9"}"#);
    }
}
