//! The kinds of JSON object a repository holds, each owning its prefix,
//! who may read it, how large it may be and what its signature is called.
//!
//! Call sites name a kind, never a prefix string: the kind decides whether
//! an object is also encrypted to the index recipient (writers read index
//! objects and prune plans, nothing else), the size a reader accepts before
//! it downloads and while it decompresses (a hostile object must not make
//! a reader allocate gigabytes; a 3.6 KB snapshot object used to decompress
//! to 257 MB), and the tag its signature covers (so a signed index object
//! can never pass for a plan).

/// A kind of JSON object stored as `prefix/<id>` (age(signature + zstd(JSON))).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectKind {
    /// `snapshots/`: the root of one backup.
    Snapshot,
    /// `index/`: which pack holds which blob.
    Index,
    /// `pending/`: packs a prune condemned.
    Plan,
    /// `drills/`: a restore drill's report.
    Drill,
    /// `hosts/`: one entry of the host registry (a host name and its key).
    Host,
    /// `adopt/`: objects of a format-2 repository that `upgrade` vouched for.
    Adoption,
}

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

impl ObjectKind {
    /// Every kind.
    pub const ALL: [ObjectKind; 6] = [
        ObjectKind::Snapshot,
        ObjectKind::Index,
        ObjectKind::Plan,
        ObjectKind::Drill,
        ObjectKind::Host,
        ObjectKind::Adoption,
    ];

    /// The key prefix, without its slash.
    pub fn prefix(self) -> &'static str {
        match self {
            ObjectKind::Snapshot => "snapshots",
            ObjectKind::Index => "index",
            ObjectKind::Plan => "pending",
            ObjectKind::Drill => "drills",
            ObjectKind::Host => "hosts",
            ObjectKind::Adoption => "adopt",
        }
    }

    /// The object's key.
    pub fn key(self, id: &crate::Id) -> String {
        format!("{}/{id}", self.prefix())
    }

    /// How the kind is named in messages and in its signature.
    pub fn name(self) -> &'static str {
        match self {
            ObjectKind::Snapshot => "snapshot",
            ObjectKind::Index => "index",
            ObjectKind::Plan => "plan",
            ObjectKind::Drill => "drill report",
            ObjectKind::Host => "host registry entry",
            ObjectKind::Adoption => "adoption record",
        }
    }

    /// True for what writer credentials read, and so what is also
    /// encrypted to the index recipient.
    pub(crate) fn for_writers(self) -> bool {
        matches!(self, ObjectKind::Index | ObjectKind::Plan)
    }

    /// The largest stored object a reader downloads, and the largest JSON
    /// it decompresses to. `legacy` is a format-2 repository's object,
    /// whose consolidated index objects could hold a thousand packs (up to
    /// 1 GiB of JSON); format 3 writes index objects of at most
    /// [`MAX_BLOBS_PER_INDEX`] blobs.
    pub(crate) fn limits(self, legacy: bool) -> (u64, u64) {
        match self {
            ObjectKind::Snapshot => (4 * MIB, 16 * MIB),
            ObjectKind::Index if legacy => (1024 * MIB, 1024 * MIB),
            ObjectKind::Index => (160 * MIB, 256 * MIB),
            ObjectKind::Plan => (64 * MIB, 128 * MIB),
            ObjectKind::Drill => (16 * MIB, 64 * MIB),
            ObjectKind::Host => (64 * KIB, 64 * KIB),
            ObjectKind::Adoption => (16 * MIB, 64 * MIB),
        }
    }
}

/// Blobs per index object a format-3 writer puts in one object (about
/// 30 MB of JSON), so that every index object fits the reader's limit.
pub(crate) const MAX_BLOBS_PER_INDEX: usize = 200_000;

/// The largest key file and config object a reader accepts.
pub(crate) const MAX_SMALL_OBJECT: u64 = 64 * KIB;

/// The largest pack a reader downloads: the target size, plus one blob of
/// the largest size a pack may hold, plus age's overhead.
pub(crate) fn max_pack(pack_size: u32) -> u64 {
    let plain = pack_size as u64 + crate::pack::MAX_BLOB as u64 + MIB;
    plain + plain / 4096 + 4 * KIB
}

/// One object that failed verification, as commands report it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Rejected {
    /// The object's key, e.g. `snapshots/3fa2…`.
    pub object: String,
    /// Why it is not trusted.
    pub reason: String,
}

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} is not trusted: {}", self.object, self.reason)
    }
}
