//! Lifeboat's dedup core and repository format.
//!
//! Only this crate knows how a repository is laid out (see `repo` for the
//! object table and ARCHITECTURE.md for the whole format). Callers open a
//! [`Repository`] on a [`Backend`] and drive the engines: [`backup`],
//! [`restore`], [`check`], [`prune`] and the [`retention`] policy behind
//! `forget`.

pub mod backend;
pub mod backup;
mod cache;
pub mod check;
pub mod child;
mod chunker;
mod crypto;
mod error;
pub mod forget;
mod fsmeta;
mod id;
mod index;
mod index_cache;
mod object;
mod pack;
mod parallel;
pub mod provenance;
pub mod prune;
mod repo;
pub mod restore;
pub mod retention;
mod sign;
mod snapshot_list;
mod tree;
pub mod upgrade;
pub mod walk;

pub use backend::Backend;

/// The pipeline's building blocks, exposed for the micro-benchmarks in
/// `core/benches` and for fuzz targets. Not a stable API: callers use the
/// engines above.
#[doc(hidden)]
pub mod internals {
    pub use crate::chunker::Chunker;
    pub use crate::crypto::{MasterKey, Recipients};
    pub use crate::index::{IndexBuilder, IndexFile, IndexPack};
    pub use crate::index_cache::{open as open_index_cache, write as write_index_cache};
    pub use crate::pack::{
        decode_blob, parse_pack, raw_frame, BlobEncoder, BlobKind, PackBuilder, PackEntry,
    };
    pub use crate::provenance::{check_host_name, AdoptionRecord, HostRecord};
    pub use crate::repo::parse_config;
    pub use crate::sign::{split as split_signed, Signature};
}
pub use backend::{LockMode, Retained, Retention};
pub use crypto::WriterKey;
pub use crypto::DEFAULT_KDF_WORK_FACTOR;
pub use error::{Error, Result};
pub use fsmeta::hostname;
pub use id::Id;
pub use index::Index;
pub use object::{ObjectKind, Rejected};
pub use provenance::{Signer, SnapshotTrust};
pub use repo::{
    ChunkerParams, Config, IndexUse, InitOptions, KeyInfo, LockPolicy, Repository, FORMAT_VERSION,
};
pub use sign::{PublicKey, SigningKey};
pub use snapshot_list::{Listed, Selector, SnapshotList, FUTURE_MARGIN};
pub use tree::{Bytes, Node, NodeKind, Snapshot, Summary, Tree};

#[cfg(test)]
mod engine_tests;
#[cfg(test)]
mod provenance_tests;
#[cfg(test)]
mod reliability_tests;
#[cfg(test)]
mod write_only_tests;

/// Helpers shared by the unit tests.
#[cfg(test)]
mod testutil {
    /// Deterministic, incompressible bytes (xorshift64).
    pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }
}
