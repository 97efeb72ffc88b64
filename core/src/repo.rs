//! The repository: config, keys, and reading and writing encrypted objects.
//!
//! Layout of a repository in its backend:
//!
//! | key | content |
//! | --- | --- |
//! | `config` | plaintext JSON: format version, chunker and compression settings, age recipients, a MAC |
//! | `keys/<random>` | JSON: the master secret sealed with one passphrase (age scrypt, armored) |
//! | `data/<xx>/<id>` | a pack: age(blob frames + header), `id` = BLAKE3 of the stored bytes |
//! | `index/<id>` | age(zstd(JSON index)) |
//! | `snapshots/<id>` | age(zstd(JSON snapshot)) |
//! | `pending/<id>` | age(zstd(JSON prune plan)): packs condemned by phase one of a prune |
//! | `drills/<id>` | age(zstd(JSON drill report)) |
//! | `hosts/<id>` | age(zstd(JSON host registry entry)), signed by the admin key |
//! | `adopt/<id>` | age(zstd(JSON adoption record)), signed by the admin key |
//!
//! Index objects and prune plans are also encrypted to the index recipient
//! (format 2), so a host holding only a writer credential can deduplicate
//! and respect prune plans without reading any snapshot, tree or pack. With
//! an Object Lock policy, packs, index objects and snapshots are written
//! with a retention date (see [`LockPolicy`]). Since format 3 every JSON
//! object carries a signature by its writer in front of its zstd frame
//! (`sign`), and what a reader believes of it is decided in `provenance`.
//!
//! `init` writes the key before the config, so a repository exists (has a
//! `config`) only once it can be opened. Every other object name is the hash
//! of its bytes, so a retried write is a no-op and nothing is ever rewritten.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::backend::{Backend, BackendError, LockMode, PutOutcome, Retention};
use crate::crypto::{ChunkKey, KeyFile, MasterKey, Recipients, WriterKey, DEFAULT_KDF_WORK_FACTOR};
use crate::error::{Error, Result};
use crate::id::Id;
use crate::index::Index;
use crate::object::ObjectKind;
use crate::pack::{decode_blob, BlobKind};
use crate::provenance::{Signer, TrustStore};
use crate::sign::{PublicKey, SigningKey};
use crate::tree::Tree;

/// The repository format version this binary writes. Version 2 added the
/// index recipient (writer credentials) and the Object Lock policy;
/// version 3 signed provenance (the admin key, host keys, the host
/// registry). Versions 1 and 2 are still read and written, without those;
/// `lifeboat upgrade` moves a version-2 repository to 3.
pub const FORMAT_VERSION: u32 = 3;
/// The oldest format version this binary reads.
const OLDEST_FORMAT_VERSION: u32 = 1;
/// The `format` field of every lifeboat repository config.
const FORMAT_NAME: &str = "lifeboat-repository";
/// Decrypted packs kept for reading trees and single blobs. Trees are
/// written in walk order, so a small cache already serves almost every tree
/// of a pack from one decryption.
const PACK_CACHE_BYTES: usize = 32 << 20;

/// Content-defined chunking parameters, fixed per repository (changing them
/// would defeat dedup against existing data).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkerParams {
    /// Minimum chunk size.
    pub min: u32,
    /// Average (target) chunk size.
    pub avg: u32,
    /// Maximum chunk size.
    pub max: u32,
}

impl Default for ChunkerParams {
    fn default() -> Self {
        ChunkerParams {
            min: 512 * 1024,
            avg: 1024 * 1024,
            max: 8 * 1024 * 1024,
        }
    }
}

/// The repository config object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Always `lifeboat-repository`.
    pub format: String,
    /// Format version.
    pub version: u32,
    /// Random repository ID (names the local cache).
    pub id: String,
    /// When the repository was created.
    pub created: String,
    /// Chunker parameters.
    pub chunker: ChunkerParams,
    /// zstd level for new blobs (0 = store raw).
    pub compression: i32,
    /// Target pack size in bytes.
    pub pack_size: u32,
    /// age recipients every object is encrypted to.
    pub recipients: Vec<String>,
    /// The recipient index objects and prune plans are also encrypted to,
    /// so writer credentials can read them (format 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_recipient: Option<String>,
    /// Object Lock retention for new packs, index objects and snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock: Option<LockPolicy>,
    /// The public half of the admin key (hex), which signs what full-key
    /// hosts write (format 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_key: Option<String>,
    /// MAC of the config with this field empty, keyed by the master key.
    #[serde(default)]
    pub mac: String,
}

impl Config {
    /// BLAKE3 of the whole config as parsed (every field, the MAC too): what
    /// a writer credential pins, since a writer cannot check the MAC.
    pub fn digest(&self) -> String {
        let bytes = serde_json::to_vec(self).expect("config serialises");
        blake3::hash(&bytes).to_hex().to_string()
    }

    /// The admin key's public half (format 3).
    pub fn admin_public(&self) -> Option<PublicKey> {
        self.admin_key.as_deref().and_then(PublicKey::from_hex)
    }

    pub(crate) fn mac_input(&self) -> Vec<u8> {
        let mut c = self.clone();
        c.mac.clear();
        serde_json::to_vec(&c).expect("config serialises")
    }
}

/// How long new objects are kept immutable by the store's Object Lock.
///
/// A snapshot is retained for `days` after it is written. Packs and index
/// objects are retained half as long again (`days * 3 / 2`), and a backup
/// extends the retention of every older pack its snapshot needs whose lock
/// would end before the snapshot's, so a still-locked snapshot never
/// depends on an unlocked pack while extensions stay rare (about one per
/// pack every `days / 2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockPolicy {
    /// Governance (privileged users may lift it) or compliance (nobody can).
    pub mode: LockMode,
    /// Days a snapshot stays locked.
    pub days: u32,
}

impl LockPolicy {
    /// The retention a snapshot written now gets.
    pub fn snapshot_retention(&self, now: chrono::DateTime<chrono::Utc>) -> Retention {
        Retention {
            mode: self.mode,
            until: now + chrono::Duration::days(i64::from(self.days)),
        }
    }

    /// The retention new packs and index objects written now get (and an
    /// older pack is extended to).
    pub fn pack_retention(&self, now: chrono::DateTime<chrono::Utc>) -> Retention {
        Retention {
            mode: self.mode,
            until: now + chrono::Duration::hours(i64::from(self.days) * 36),
        }
    }
}

/// Settings for a new repository.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// zstd level (0 = none).
    pub compression: i32,
    /// Target pack size.
    pub pack_size: u32,
    /// Chunker parameters.
    pub chunker: ChunkerParams,
    /// scrypt work factor of the first key.
    pub kdf_work_factor: u8,
    /// Object Lock policy; the store must support Object Lock.
    pub lock: Option<LockPolicy>,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            compression: 3,
            pack_size: 8 * 1024 * 1024,
            chunker: ChunkerParams::default(),
            kdf_work_factor: DEFAULT_KDF_WORK_FACTOR,
            lock: None,
        }
    }
}

/// One key of a repository, as `key list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct KeyInfo {
    /// The key's name (its object name under `keys/`).
    pub id: String,
    /// True for the key this process opened the repository with.
    pub current: bool,
    /// Metadata stored with the key.
    #[serde(flatten)]
    pub file: KeyFileMeta,
}

/// The plaintext metadata of a key file.
#[derive(Debug, Clone, Serialize)]
pub struct KeyFileMeta {
    /// When it was added.
    pub created: String,
    /// Host that added it.
    pub host: String,
    /// User that added it.
    pub user: String,
}

/// What the process holds of the repository's keys.
#[derive(Debug)]
enum Access {
    /// A key opened with a passphrase: reads and writes everything.
    Full {
        /// The master key.
        key: MasterKey,
        /// Its key file's name under `keys/`.
        name: String,
    },
    /// A writer credential: adds snapshots, reads only index objects and
    /// prune plans.
    Writer(WriterKey),
}

/// An open repository: the backend, its config and the key in use.
#[derive(Debug)]
pub struct Repository {
    backend: Arc<dyn Backend>,
    config: Config,
    access: Access,
    recipients: Recipients,
    /// `recipients` plus the index recipient (for index objects and plans).
    index_recipients: Recipients,
    pack_cache: Mutex<PackCache>,
    /// What this process signs with, and as whom (format 3).
    signing: Option<(SigningKey, Signer)>,
    /// The host registry and adoption records, read once when first needed
    /// (full key only), and read again after this process adds to them.
    trust: Mutex<Option<Arc<TrustStore>>>,
}

/// What an index is loaded for: which listings it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexUse {
    /// A backup's: what it may skip uploading. Listings vouched for by a
    /// full-key host, and its own host's.
    Dedup,
    /// A reader's (restore, check, prune's tree reads): every listing by a
    /// registered signer, vouched ones tried first. Every blob read is
    /// checked against its keyed ID, so a false listing costs a retry.
    Read,
}

/// A JSON object as read ([`Repository::read_object`]): its JSON and its
/// signature, not yet judged.
#[derive(Debug)]
pub(crate) struct RawObject {
    pub(crate) kind: ObjectKind,
    pub(crate) id: Id,
    pub(crate) json: Vec<u8>,
    pub(crate) signature: Option<crate::sign::Signature>,
}

impl RawObject {
    /// Parses the JSON.
    pub(crate) fn parse<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.json).map_err(|e| {
            Error::corrupt(
                format!("{} object {}", self.kind.prefix(), self.id.short()),
                format!("invalid JSON: {e}"),
            )
        })
    }

    /// Its signer, as `repo` can tell ([`Repository::signer_of`]).
    pub(crate) fn signer(&self, repo: &Repository) -> std::result::Result<Option<Signer>, String> {
        repo.signer_of(self)
    }

    /// The error for this object not being believed.
    pub(crate) fn untrusted(&self, reason: String) -> Error {
        Error::Untrusted {
            object: self.kind.key(&self.id),
            reason,
        }
    }
}

/// A pack read by [`Repository::read_pack_salvage`].
#[derive(Debug)]
pub struct SalvagedPack {
    /// Plaintext, with zeros where segments failed.
    pub plain: Vec<u8>,
    /// Plaintext ranges that failed authentication.
    pub bad: Vec<std::ops::Range<usize>>,
    /// What is wrong with the pack, if anything.
    pub damage: Option<String>,
}

impl SalvagedPack {
    /// The frame at `offset..offset+length` if it lies in the pack and
    /// outside every damaged range.
    pub fn frame(&self, offset: u32, length: u32) -> Option<&[u8]> {
        let r = offset as usize..offset as usize + length as usize;
        if self.bad.iter().any(|b| b.start < r.end && r.start < b.end) {
            return None;
        }
        self.plain.get(r)
    }
}

/// A pack read front to back by [`Repository::open_pack`]: its
/// ciphertext, checked against its name, and a stream over it that
/// authenticates each 64 KiB segment as it is read. Frames are read out
/// one at a time, so reading a pack costs its ciphertext, not a second
/// copy as plaintext.
pub struct PackStream {
    reader: crate::crypto::AgeStream,
}

impl std::fmt::Debug for PackStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackStream").finish_non_exhaustive()
    }
}

impl PackStream {
    /// A reader of the frame at `offset..offset+length` of the plaintext.
    /// Reading fails when a segment it touches fails authentication (or
    /// ends early when the pack is shorter); the caller then salvages the
    /// pack ([`Repository::read_pack_salvage`]). Reading frames in
    /// ascending offsets decrypts each segment once.
    pub fn frame(&mut self, offset: u32, length: u32) -> std::io::Result<impl std::io::Read + '_> {
        use std::io::{Read, Seek, SeekFrom};
        self.reader.seek(SeekFrom::Start(offset as u64))?;
        Ok((&mut self.reader).take(length as u64))
    }
}

/// A pack opened by [`Repository::open_pack`].
#[derive(Debug)]
pub enum PackRead {
    /// Intact: read it frame by frame.
    Stream(PackStream),
    /// Damaged: what of it could be decrypted.
    Salvaged(SalvagedPack),
}

/// Decrypts what can be decrypted of a damaged pack's bytes.
fn salvage(
    key: &crate::crypto::MasterKey,
    bytes: &[u8],
    id: &Id,
    what: &dyn Fn() -> String,
) -> Result<SalvagedPack> {
    let (plain, bad) = key
        .decrypt_salvage(bytes)
        .map_err(|e| Error::corrupt(what(), format!("checksum mismatch and {e}")))?;
    Ok(SalvagedPack {
        damage: Some(format!(
            "pack {} is corrupt (checksum mismatch; {} of its 64 KiB segments fail authentication)",
            id.short(),
            bad.len()
        )),
        plain,
        bad,
    })
}

/// How many times an object whose bytes do not match is read before it
/// counts as damaged. A transport that truncates one read in thirty (the
/// fault-injection tests' rate) then fails a read once in 24 million;
/// real damage costs four extra reads of one object.
const READ_ATTEMPTS: u32 = 5;

/// Key of a pack object.
pub fn pack_key(id: &Id) -> String {
    let hex = id.to_hex();
    format!("data/{}/{}", &hex[..2], hex)
}

/// Reads the config object, checking the format version before anything else
/// so that a repository from a newer lifeboat is refused with a clear message.
fn read_config(backend: &dyn Backend) -> Result<Config> {
    // A damaged read is tried again, as for every other object (see
    // `Repository::get_named`); lasting damage is reported as it is.
    let mut attempt = 0;
    loop {
        match read_config_once(backend) {
            Err(Error::Corrupt { .. }) if attempt + 1 < READ_ATTEMPTS => attempt += 1,
            other => return other,
        }
    }
}

fn read_config_once(backend: &dyn Backend) -> Result<Config> {
    let bytes = match backend.get("config", Some(0..crate::object::MAX_SMALL_OBJECT + 1)) {
        Ok(b) if b.len() as u64 > crate::object::MAX_SMALL_OBJECT => {
            return Err(Error::corrupt(
                "repository config",
                "it is larger than any config lifeboat writes (64 KiB)",
            ))
        }
        Ok(b) => b,
        Err(BackendError::NotFound { .. }) => {
            return Err(Error::NoRepository {
                location: backend.location(),
            })
        }
        Err(e) => return Err(e.into()),
    };
    parse_config(&bytes)
}

/// Parses and range-checks a config object's bytes (the format version
/// first, so a newer repository is refused clearly). Public for the fuzz
/// targets through `internals`.
pub fn parse_config(bytes: &[u8]) -> Result<Config> {
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| Error::corrupt("repository config", format!("not JSON: {e}")))?;
    if value.get("format").and_then(|f| f.as_str()) != Some(FORMAT_NAME) {
        return Err(Error::corrupt(
            "repository config",
            "this is not a lifeboat repository",
        ));
    }
    let version = value.get("version").and_then(|v| v.as_u64()).unwrap_or(0) as u32;
    if version > FORMAT_VERSION {
        return Err(Error::UnsupportedVersion {
            found: version,
            supported: FORMAT_VERSION,
            hint: "upgrade lifeboat to a release that supports it",
        });
    }
    if version < OLDEST_FORMAT_VERSION {
        return Err(Error::UnsupportedVersion {
            found: version,
            supported: FORMAT_VERSION,
            hint: "it was written by an unsupported pre-release; restore with the lifeboat that wrote it",
        });
    }
    let config: Config = serde_json::from_value(value)
        .map_err(|e| Error::corrupt("repository config", e.to_string()))?;
    // The config is authenticated only after a key opens, and a hostile
    // repository may hold a valid key: check every value used for local
    // paths or allocation sizes.
    let c = config.chunker;
    let sane = config.id.len() == 32
        && config
            .id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        && (64 * 1024 <= c.min && c.min <= c.avg && c.avg <= c.max && c.max <= 64 * 1024 * 1024)
        && (1024 * 1024..=512 * 1024 * 1024).contains(&config.pack_size)
        && (-7..=22).contains(&config.compression);
    if !sane {
        return Err(Error::corrupt(
            "repository config",
            "a value is out of range (id, chunker sizes, pack size or compression)",
        ));
    }
    if version == 1 && (config.index_recipient.is_some() || config.lock.is_some()) {
        return Err(Error::corrupt(
            "repository config",
            "format 1 has no index recipient or lock policy",
        ));
    }
    if (version >= 3) != config.admin_public().is_some() {
        return Err(Error::corrupt(
            "repository config",
            "format 3, and only format 3, has an admin key of 64 hex digits",
        ));
    }
    if version >= 2 && config.index_recipient.is_none() {
        return Err(Error::corrupt(
            "repository config",
            "format 2 needs an index recipient",
        ));
    }
    if config.lock.is_some_and(|l| !(1..=36_500).contains(&l.days)) {
        return Err(Error::corrupt(
            "repository config",
            "lock days out of range (1 to 36500)",
        ));
    }
    Ok(config)
}

impl Repository {
    /// Creates a new repository in an empty backend.
    pub fn init(
        backend: Arc<dyn Backend>,
        passphrase: &str,
        opts: &InitOptions,
    ) -> Result<Repository> {
        match backend.stat("config") {
            Ok(_) => {
                return Err(Error::AlreadyInitialised {
                    location: backend.location(),
                })
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
        if passphrase.is_empty() {
            return Err(Error::Invalid("the passphrase must not be empty".into()));
        }
        if !(-7..=22).contains(&opts.compression) {
            return Err(Error::Invalid(format!(
                "compression level {} is out of range (0 = none, 1..=22 zstd levels)",
                opts.compression
            )));
        }
        let c = opts.chunker;
        if !(64 * 1024 <= c.min && c.min <= c.avg && c.avg <= c.max && c.max <= 64 * 1024 * 1024) {
            return Err(Error::Invalid(
                "chunker sizes must satisfy 64 KiB <= min <= avg <= max <= 64 MiB".into(),
            ));
        }
        if let Some(lock) = opts.lock {
            if !(1..=36_500).contains(&lock.days) {
                return Err(Error::Invalid(format!(
                    "--lock-days {} is out of range: give 1 to 36500 days",
                    lock.days
                )));
            }
            if !backend.object_lock() {
                return Err(Error::Invalid(format!(
                    "{} has no Object Lock, so --lock-days cannot be honoured: use an S3 bucket created with Object Lock enabled (`aws s3api create-bucket --object-lock-enabled-for-bucket`; `lifeboat init` creates a missing bucket that way), or drop --lock-days",
                    backend.location()
                )));
            }
        }
        let key = MasterKey::generate();
        let mut config = Config {
            format: FORMAT_NAME.to_string(),
            version: FORMAT_VERSION,
            id: hex::encode(rand::random::<[u8; 16]>()),
            created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            chunker: opts.chunker,
            compression: opts.compression,
            pack_size: opts.pack_size.clamp(1024 * 1024, 512 * 1024 * 1024),
            recipients: vec![key.recipient()],
            index_recipient: key.index_recipient(),
            lock: opts.lock,
            admin_key: Some(key.admin_signing().public().to_hex()),
            mac: String::new(),
        };
        config.mac = key.mac(&config.mac_input());
        let key_name = write_key(backend.as_ref(), &key, passphrase, opts.kdf_work_factor)?;
        let bytes = serde_json::to_vec_pretty(&config).expect("config serialises");
        // On a store that does not enforce put-if-absent (see the S3
        // backend), two racing inits could both see `Created`; reading the
        // config back tells the loser, which then stops before using a key
        // the repository does not carry.
        if backend.put("config", &bytes)? == PutOutcome::AlreadyExists
            || backend.get("config", None)? != bytes
        {
            let _ = backend.delete(&format!("keys/{key_name}"));
            return Err(Error::AlreadyInitialised {
                location: backend.location(),
            });
        }
        Repository::assemble(
            backend,
            config,
            Access::Full {
                key,
                name: key_name,
            },
        )
    }

    fn assemble(backend: Arc<dyn Backend>, config: Config, access: Access) -> Result<Repository> {
        let recipients = Recipients::parse(&config.recipients)?;
        let mut with_index = config.recipients.clone();
        with_index.extend(config.index_recipient.clone());
        let index_recipients = Recipients::parse(&with_index)?;
        let signing = match (&access, config.version >= 3) {
            (_, false) => None,
            (Access::Full { key, .. }, true) => {
                let admin = key.admin_signing();
                if Some(admin.public()) != config.admin_public() {
                    return Err(Error::corrupt(
                        "repository config",
                        "its admin key is not this repository's: it was altered outside lifeboat",
                    ));
                }
                Some((admin, Signer::Admin))
            }
            (Access::Writer(w), true) => w
                .signer()
                .map(|(host, key)| (key.clone(), Signer::Host(host.to_string()))),
        };
        Ok(Repository {
            backend,
            config,
            access,
            recipients,
            index_recipients,
            pack_cache: Mutex::new(PackCache::new(PACK_CACHE_BYTES)),
            signing,
            trust: Mutex::new(None),
        })
    }

    /// Opens an existing repository with a writer credential: backups work
    /// (deduplicating against the whole repository); anything that reads
    /// snapshots, trees or packs fails with [`Error::NeedsFullKey`].
    ///
    /// The config is not authenticated by a MAC here (the MAC key would let
    /// a writer forge configs); instead the credential pins the repository
    /// ID, recipients and index recipient, and a config naming others is
    /// refused.
    pub fn open_writer(backend: Arc<dyn Backend>, writer: WriterKey) -> Result<Repository> {
        let config = read_config(backend.as_ref())?;
        if config.id != writer.repository() {
            return Err(Error::Invalid(format!(
                "the writer credential belongs to repository {}, but {} holds repository {}; export a credential for this repository with `lifeboat key export-writer`",
                &writer.repository()[..writer.repository().len().min(8)],
                backend.location(),
                &config.id[..8]
            )));
        }
        if config.version >= 3 && writer.signer().is_none() {
            return Err(Error::Invalid(format!(
                "the writer credential was made for format {}, before signed provenance, and repository {} is format {}: export a new one on a host with the passphrase with `lifeboat key export-writer --host NAME --out FILE`",
                config.version.min(2),
                &config.id[..8],
                config.version
            )));
        }
        if config.digest() != writer.config_digest()
            || config.recipients != writer.recipients()
            || config.index_recipient.as_deref() != Some(writer.index_recipient().as_str())
        {
            return Err(Error::corrupt(
                "repository config",
                "it differs from the config the writer credential pins (recipients, lock policy, settings): it was altered outside lifeboat; backing up could encrypt to keys the repository owner does not hold or leave snapshots unlocked. Check the bucket's config object's versions from a host with the passphrase",
            ));
        }
        Repository::assemble(backend, config, Access::Writer(writer))
    }

    /// Opens an existing repository with a passphrase.
    pub fn open(backend: Arc<dyn Backend>, passphrase: &str) -> Result<Repository> {
        let config = read_config(backend.as_ref())?;
        let mut keys = backend.list("keys/")?;
        keys.sort_by(|a, b| a.key.cmp(&b.key));
        // A damaged key file must not lock out the passphrases of the others.
        let mut damaged = Vec::new();
        for info in keys {
            let name = info.key.trim_start_matches("keys/").to_string();
            let unsealed = load_key_file(backend.as_ref(), &info.key)
                .and_then(|file| MasterKey::unseal(&file, passphrase, &name));
            let key = match unsealed {
                Ok(Some(key)) => key,
                Ok(None) => continue,
                Err(e) => {
                    damaged.push(format!("{name}: {e}"));
                    continue;
                }
            };
            if key.mac(&config.mac_input()) != config.mac {
                return Err(Error::corrupt(
                    "repository config",
                    "its MAC does not match: it was altered outside lifeboat",
                ));
            }
            return Repository::assemble(backend, config, Access::Full { key, name });
        }
        if !damaged.is_empty() {
            return Err(Error::Invalid(format!(
                "no key opens with this passphrase, and {} key file(s) are damaged: {}",
                damaged.len(),
                damaged.join("; ")
            )));
        }
        Err(Error::WrongPassphrase)
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// The config.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The key that names blobs (held by full and writer keys alike).
    pub fn ids(&self) -> &ChunkKey {
        match &self.access {
            Access::Full { key, .. } => key.chunk(),
            Access::Writer(w) => w.chunk(),
        }
    }

    /// True when the repository was opened with a writer credential.
    pub fn is_write_only(&self) -> bool {
        matches!(self.access, Access::Writer(_))
    }

    /// The master key, or [`Error::NeedsFullKey`] naming `operation` for a
    /// writer credential.
    pub fn master_key(&self, operation: &str) -> Result<&MasterKey> {
        match &self.access {
            Access::Full { key, .. } => Ok(key),
            Access::Writer(_) => Err(Error::NeedsFullKey {
                operation: operation.to_string(),
            }),
        }
    }

    /// Fails with [`Error::NeedsFullKey`] unless the full key is held.
    pub fn require_full_key(&self, operation: &str) -> Result<()> {
        self.master_key(operation).map(|_| ())
    }

    /// The writer credential for this repository (`key export-writer`).
    /// In format 3 it writes as `host`: a new signing key is made for it
    /// and registered (an admin-signed `hosts/` entry) before the
    /// credential is returned, so nothing it signs is ever unregistered.
    pub fn writer_key(&self, host: Option<&str>) -> Result<WriterKey> {
        let key = self.master_key("exporting a writer credential")?;
        let predates = || {
            Error::Invalid(format!(
                "repository {} uses format {}, which predates writer credentials (its index objects are readable only with the full key); create a new repository with this lifeboat and back up into it to use write-only hosts",
                &self.config.id[..8],
                self.config.version
            ))
        };
        if self.config.index_recipient != key.index_recipient() {
            return Err(predates());
        }
        let signer = match (self.config.version >= 3, host) {
            (true, Some(host)) => {
                crate::provenance::check_host_name(host).map_err(Error::Invalid)?;
                let signing = SigningKey::generate();
                self.register_host(host, Some(signing.public()))?;
                Some((host.to_string(), signing))
            }
            (true, None) => {
                return Err(Error::Invalid(
                    "a writer credential writes as one host: give its name with --host NAME (the name its snapshots will carry)".into(),
                ))
            }
            (false, Some(_)) => {
                return Err(Error::Invalid(format!(
                    "repository {} is format {}, whose writer credentials carry no host identity; run `lifeboat upgrade` first to sign what each host writes",
                    &self.config.id[..8],
                    self.config.version
                )))
            }
            (false, None) => None,
        };
        key.writer_key(
            &self.config.id,
            &self.config.recipients,
            &self.config.digest(),
            signer,
        )
        .ok_or_else(predates)
    }

    /// The largest pack object a reader downloads.
    fn max_pack(&self) -> u64 {
        crate::object::max_pack(self.config.pack_size)
    }

    /// The repository's Object Lock policy, if any.
    pub fn lock_policy(&self) -> Option<LockPolicy> {
        self.config.lock
    }

    fn key_name(&self) -> &str {
        match &self.access {
            Access::Full { name, .. } => name,
            Access::Writer(_) => "",
        }
    }

    /// Decrypts an object with whatever key is held.
    fn decrypt(&self, ciphertext: &[u8], what: &dyn Fn() -> String) -> Result<Vec<u8>> {
        match &self.access {
            Access::Full { key, .. } => key.decrypt(ciphertext, what),
            Access::Writer(w) => w.decrypt(ciphertext, what),
        }
    }

    /// The recipients new objects are encrypted to.
    pub fn recipients(&self) -> &Recipients {
        &self.recipients
    }

    /// Lists the repository's keys.
    pub fn list_keys(&self) -> Result<Vec<KeyInfo>> {
        self.require_full_key("listing keys")?;
        let mut out = Vec::new();
        for info in self.backend.list("keys/")? {
            let file = load_key_file(self.backend.as_ref(), &info.key)?;
            let id = info.key.trim_start_matches("keys/").to_string();
            out.push(KeyInfo {
                current: id == self.key_name(),
                id,
                file: KeyFileMeta {
                    created: file.created,
                    host: file.host,
                    user: file.user,
                },
            });
        }
        out.sort_by(|a, b| a.file.created.cmp(&b.file.created).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// Adds a key for another passphrase; returns its ID.
    pub fn add_key(&self, passphrase: &str, work_factor: u8) -> Result<String> {
        if passphrase.is_empty() {
            return Err(Error::Invalid(
                "the new passphrase must not be empty".into(),
            ));
        }
        let key = self.master_key("adding a key")?;
        write_key(self.backend.as_ref(), key, passphrase, work_factor)
    }

    /// Removes a key. Refuses to remove the key in use (so nobody locks
    /// themselves out by accident) and the last key.
    pub fn remove_key(&self, id: &str) -> Result<()> {
        let keys = self.list_keys()?;
        let matching: Vec<&KeyInfo> = keys.iter().filter(|k| k.id.starts_with(id)).collect();
        let key = match matching.as_slice() {
            [] => {
                return Err(Error::Invalid(format!(
                    "no key {id:?} (see `lifeboat key list`)"
                )))
            }
            [k] => *k,
            _ => return Err(Error::Invalid(format!("key prefix {id:?} is ambiguous"))),
        };
        if key.current {
            return Err(Error::Invalid(format!(
                "key {} is the one you opened the repository with; open it with another passphrase to remove this one, or use `lifeboat key passwd`",
                key.id
            )));
        }
        if keys.len() == 1 {
            return Err(Error::Invalid(
                "refusing to remove the last key: the repository would become unreadable".into(),
            ));
        }
        self.backend.delete(&format!("keys/{}", key.id))?;
        Ok(())
    }

    /// Replaces the current key's passphrase: adds a key with the new one,
    /// then removes the current key. Returns the new key's ID.
    pub fn change_passphrase(&self, new_passphrase: &str, work_factor: u8) -> Result<String> {
        let id = self.add_key(new_passphrase, work_factor)?;
        self.backend.delete(&format!("keys/{}", self.key_name()))?;
        Ok(id)
    }

    /// Encrypts and stores a JSON object of `kind`; returns its ID. Since
    /// format 3 it is signed by this process's key first. Index objects and
    /// prune plans are also encrypted to the index recipient (readable by
    /// writer credentials); everything else only to the repository's
    /// recipients.
    pub fn save<T: Serialize>(&self, kind: ObjectKind, value: &T) -> Result<Id> {
        self.save_retained(kind, value, None)
    }

    /// [`save`](Self::save) with an Object Lock retention.
    pub fn save_retained<T: Serialize>(
        &self,
        kind: ObjectKind,
        value: &T,
        retention: Option<&Retention>,
    ) -> Result<Id> {
        let json = serde_json::to_vec(value).expect("objects serialise");
        let mut plain = Vec::with_capacity(json.len() / 2 + crate::sign::FRAME);
        if self.config.version >= 3 {
            let (key, _) = self.signing.as_ref().ok_or_else(|| Error::NeedsFullKey {
                operation: format!(
                    "writing a {} (this credential has no signing key)",
                    kind.name()
                ),
            })?;
            plain.extend_from_slice(&key.frame(kind.name(), &self.config.id, &json));
        }
        let compressed =
            zstd::bulk::compress(&json, 3).map_err(|e| Error::Invalid(format!("zstd: {e}")))?;
        plain.extend_from_slice(&compressed);
        let recipients = if kind.for_writers() {
            &self.index_recipients
        } else {
            &self.recipients
        };
        let ciphertext = recipients.encrypt(&plain);
        let id = Id::of_bytes(&ciphertext);
        self.put_object(&kind.key(&id), ciphertext, retention)?;
        Ok(id)
    }

    /// Stores an object, with an Object Lock retention when one is given.
    /// The bytes are shared with the store's layers, never copied
    /// ([`Backend::put_shared`]).
    pub fn put_object(
        &self,
        key: &str,
        bytes: impl Into<bytes::Bytes>,
        retention: Option<&Retention>,
    ) -> Result<PutOutcome> {
        Ok(self.backend.put_shared(key, bytes.into(), retention)?)
    }

    /// Reads an object named by the hash of its bytes, at most `limit`
    /// bytes of it (a larger object is refused without being downloaded
    /// whole: one byte more is asked for, and its arrival says so). A copy
    /// that does not match its name is read again (`READ_ATTEMPTS` reads in
    /// all) before it counts as damaged: a transport that silently
    /// truncates or flips a byte looks exactly like bit rot on the first
    /// read, and only a second read tells them apart. Returns the bytes and
    /// whether they match.
    fn get_named(
        &self,
        key: &str,
        id: &Id,
        limit: u64,
        what: &dyn Fn() -> String,
    ) -> Result<(Vec<u8>, bool)> {
        let mut attempt = 0;
        loop {
            let bytes = match self.backend.get(key, Some(0..limit.saturating_add(1))) {
                Ok(b) if b.len() as u64 > limit => {
                    return Err(Error::corrupt(
                        what(),
                        format!("it is larger than any such object lifeboat writes ({limit} bytes); it was not read"),
                    ))
                }
                Ok(b) => b,
                Err(e) if e.is_not_found() => return Err(Error::Missing { object: what() }),
                Err(e) => return Err(e.into()),
            };
            if Id::of_bytes(&bytes) == *id {
                return Ok((bytes, true));
            }
            attempt += 1;
            if attempt == READ_ATTEMPTS {
                return Ok((bytes, false));
            }
            log::warn!("{} read back damaged; reading it again", what());
        }
    }

    /// Reads an object of `kind`: checks it against its name, decrypts it,
    /// takes off its signature frame (not yet checked: see
    /// [`Self::signer_of`]) and decompresses its JSON, within the kind's
    /// limits. `listed` is the size a listing gave, refused before any
    /// download when it is over the limit.
    pub(crate) fn read_object(
        &self,
        kind: ObjectKind,
        id: &Id,
        listed: Option<u64>,
    ) -> Result<RawObject> {
        let what = || format!("{} object {}", kind.prefix(), id.short());
        let (max_stored, max_json) = kind.limits(self.config.version < 3);
        if let Some(size) = listed.filter(|&s| s > max_stored) {
            return Err(Error::corrupt(
                what(),
                format!("it is {size} bytes, larger than any such object lifeboat writes ({max_stored}); it was not read"),
            ));
        }
        let (ciphertext, intact) = self.get_named(&kind.key(id), id, max_stored, &what)?;
        if !intact {
            return Err(Error::corrupt(what(), "content does not match its name"));
        }
        let plain = self.decrypt(&ciphertext, &what)?;
        drop(ciphertext);
        let (signature, compressed) =
            crate::sign::split(&plain).map_err(|e| Error::corrupt(what(), e))?;
        let mut json = Vec::new();
        let mut decoder = zstd::stream::read::Decoder::with_buffer(compressed)
            .map_err(|e| Error::corrupt(what(), e.to_string()))?
            .single_frame();
        std::io::Read::read_to_end(
            &mut std::io::Read::take(&mut decoder, max_json + 1),
            &mut json,
        )
        .map_err(|e| Error::corrupt(what(), format!("zstd: {e}")))?;
        if json.len() as u64 > max_json {
            return Err(Error::corrupt(
                what(),
                format!("it decompresses to more than {max_json} bytes, more than any such object lifeboat writes"),
            ));
        }
        Ok(RawObject {
            kind,
            id: *id,
            json,
            signature,
        })
    }

    /// Loads and decrypts a JSON object of `kind`, checking that its bytes
    /// match its name, but not who wrote it: for callers that judge the
    /// signer themselves ([`Self::signer_of`]) or objects only this host
    /// wrote.
    pub(crate) fn load<T: DeserializeOwned>(&self, kind: ObjectKind, id: &Id) -> Result<T> {
        self.read_object(kind, id, None)?.parse()
    }

    /// Loads an object only a full-key host writes (a prune plan, a drill
    /// report, a registry entry, an adoption record). In a format-3
    /// repository it must carry the admin key's signature, or it is
    /// [`Error::Untrusted`]: a writer credential may put objects anywhere
    /// its store allows, and must never be able to speak for the admin.
    pub fn load_admin<T: DeserializeOwned>(&self, kind: ObjectKind, id: &Id) -> Result<T> {
        self.load_admin_listed(kind, id, None)
    }

    /// [`load_admin`](Self::load_admin) with the size a listing gave.
    pub(crate) fn load_admin_listed<T: DeserializeOwned>(
        &self,
        kind: ObjectKind,
        id: &Id,
        listed: Option<u64>,
    ) -> Result<T> {
        let raw = self.read_object(kind, id, listed)?;
        if self.config.version >= 3 {
            match raw.signer(self) {
                Ok(Some(Signer::Admin)) => {}
                Ok(Some(other)) => {
                    return Err(raw.untrusted(format!(
                        "it is signed by {other}, and only a full-key host writes {}s",
                        kind.name()
                    )))
                }
                Ok(None) => return Err(raw.untrusted("it is not signed".into())),
                Err(why) => return Err(raw.untrusted(why)),
            }
        }
        raw.parse()
    }

    /// Who signed `raw`: `Ok(None)` for an unsigned object, `Err` naming
    /// why a signature is not believed (it fails, or no registered host
    /// holds its key). A writer credential knows only the admin key and
    /// its own; another host's key is an `Err` to it.
    pub(crate) fn signer_of(&self, raw: &RawObject) -> std::result::Result<Option<Signer>, String> {
        let Some(sig) = &raw.signature else {
            return Ok(None);
        };
        if !sig.verifies(raw.kind.name(), &self.config.id, &raw.json) {
            return Err("its signature does not verify: it was forged or altered".into());
        }
        if Some(sig.signer) == self.admin_public() {
            return Ok(Some(Signer::Admin));
        }
        if let Some((key, me)) = &self.signing {
            if key.public() == sig.signer {
                return Ok(Some(me.clone()));
            }
        }
        if self.is_write_only() {
            return Err("it is signed by another host's key".into());
        }
        let trust = self
            .trust()
            .map_err(|e| format!("the host registry cannot be read: {e}"))?;
        match trust.host_of(&sig.signer) {
            Some(host) => Ok(Some(Signer::Host(host.to_string()))),
            None => Err(format!(
                "it is signed by key {}…, which no registered host holds",
                &sig.signer.to_hex()[..16]
            )),
        }
    }

    /// The admin key's public half: derived from the full key, or read from
    /// the (pinned) config by a writer. During `upgrade` the config has none
    /// yet, and the full key's own is used.
    pub fn admin_public(&self) -> Option<PublicKey> {
        match &self.access {
            Access::Full { key, .. } => Some(key.admin_signing().public()),
            Access::Writer(_) => self.config.admin_public(),
        }
    }

    /// Who this process signs as (format 3): the admin, or its writer
    /// credential's host.
    pub fn identity(&self) -> Option<&Signer> {
        self.signing.as_ref().map(|(_, s)| s)
    }

    /// The host registry and adoption records, read once (a full-key host
    /// reads them; a writer cannot, and sees an empty store). Entries that
    /// fail verification are in its `rejected`.
    pub fn trust(&self) -> Result<Arc<TrustStore>> {
        if let Some(t) = self.trust.lock().expect("trust poisoned").as_ref() {
            return Ok(t.clone());
        }
        let mut store = TrustStore::default();
        if !self.is_write_only() {
            for (kind, info) in self
                .list_objects(ObjectKind::Host)?
                .into_iter()
                .map(|o| (ObjectKind::Host, o))
                .chain(
                    self.list_objects(ObjectKind::Adoption)?
                        .into_iter()
                        .map(|o| (ObjectKind::Adoption, o)),
                )
            {
                self.add_to_trust(&mut store, kind, &info);
            }
        }
        let store = Arc::new(store);
        *self.trust.lock().expect("trust poisoned") = Some(store.clone());
        Ok(store)
    }

    /// Verifies one registry entry or adoption record into `store`.
    fn add_to_trust(
        &self,
        store: &mut TrustStore,
        kind: ObjectKind,
        (id, info): &(Id, crate::backend::ObjectInfo),
    ) {
        let result = match kind {
            ObjectKind::Host => self
                .load_signed_by_admin::<crate::provenance::HostRecord>(kind, id, info.size)
                .and_then(|r| {
                    crate::provenance::check_host_name(&r.host)
                        .map(|()| r)
                        .map_err(|e| Error::corrupt(kind.key(id), e))
                })
                .map(|r| store.add_host(id, r)),
            _ => self
                .load_signed_by_admin::<crate::provenance::AdoptionRecord>(kind, id, info.size)
                .map(|r| store.add_adoption(r)),
        };
        if let Err(e) = result {
            store.rejected.push(crate::object::Rejected {
                object: kind.key(id),
                reason: e.to_string(),
            });
        }
    }

    /// An object that must carry the admin key's signature whatever the
    /// format (registry entries and adoption records are written before
    /// `upgrade` moves the config to format 3).
    fn load_signed_by_admin<T: DeserializeOwned>(
        &self,
        kind: ObjectKind,
        id: &Id,
        size: u64,
    ) -> Result<T> {
        let raw = self.read_object(kind, id, Some(size))?;
        let ok = raw.signature.as_ref().is_some_and(|sig| {
            Some(sig.signer) == self.admin_public()
                && sig.verifies(kind.name(), &self.config.id, &raw.json)
        });
        if !ok {
            return Err(raw.untrusted("it is not signed by the admin key".into()));
        }
        raw.parse()
    }

    /// Records `host` (and the public key its writer credential signs
    /// with) in the host registry.
    pub fn register_host(&self, host: &str, key: Option<PublicKey>) -> Result<Id> {
        self.require_full_key("registering a host")?;
        let record = crate::provenance::HostRecord {
            version: 1,
            host: host.to_string(),
            key: key.map(|k| k.to_hex()),
            created: chrono::Utc::now(),
        };
        let id = self.save_signed_by_admin(ObjectKind::Host, &record)?;
        *self.trust.lock().expect("trust poisoned") = None;
        Ok(id)
    }

    /// Stores an object signed by the admin key whatever the config's
    /// format (see [`Self::load_signed_by_admin`]).
    pub(crate) fn save_signed_by_admin<T: Serialize>(
        &self,
        kind: ObjectKind,
        value: &T,
    ) -> Result<Id> {
        let admin = self.master_key("writing a signed object")?.admin_signing();
        let json = serde_json::to_vec(value).expect("objects serialise");
        let mut plain = admin.frame(kind.name(), &self.config.id, &json).to_vec();
        plain.extend(
            zstd::bulk::compress(&json, 3).map_err(|e| Error::Invalid(format!("zstd: {e}")))?,
        );
        let recipients = if kind.for_writers() {
            &self.index_recipients
        } else {
            &self.recipients
        };
        let ciphertext = recipients.encrypt(&plain);
        let id = Id::of_bytes(&ciphertext);
        self.put_object(&kind.key(&id), ciphertext, None)?;
        *self.trust.lock().expect("trust poisoned") = None;
        Ok(id)
    }

    /// Every object of `kind`, by ID, with the size and time the store
    /// lists (keys that are not IDs are ignored).
    pub fn list_objects(&self, kind: ObjectKind) -> Result<Vec<(Id, crate::backend::ObjectInfo)>> {
        Ok(self
            .backend
            .list(&format!("{}/", kind.prefix()))?
            .into_iter()
            .filter_map(|o| {
                let id = o
                    .key
                    .strip_prefix(kind.prefix())?
                    .strip_prefix('/')?
                    .parse()
                    .ok()?;
                Some((id, o))
            })
            .collect())
    }

    /// IDs of every object of `kind`.
    pub fn list_ids(&self, kind: ObjectKind) -> Result<Vec<Id>> {
        Ok(self
            .list_objects(kind)?
            .into_iter()
            .map(|(id, _)| id)
            .collect())
    }

    /// Deletes an object of `kind`: the only way the engines delete JSON
    /// objects (`forget`, prune's plans and index consolidation).
    pub(crate) fn delete_object(&self, kind: ObjectKind, id: &Id) -> Result<()> {
        self.require_full_key("deleting objects")?;
        Ok(self.backend.delete(&kind.key(id))?)
    }

    /// Every pack in storage, by ID, with its size and time (keys under
    /// `data/` that are not pack names are ignored).
    pub fn stored_packs(&self) -> Result<HashMap<Id, crate::backend::ObjectInfo>> {
        Ok(self
            .backend
            .list("data/")?
            .into_iter()
            .filter_map(|o| {
                o.key
                    .rsplit('/')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .map(|id| (id, o))
            })
            .collect())
    }

    /// Loads every index object a reader may look in ([`IndexUse::Read`])
    /// into one in-memory index.
    pub fn load_index(&self) -> Result<Index> {
        self.load_index_over(None, IndexUse::Read, None)
    }

    /// [`Self::load_index`] for reading a snapshot of `host`: after what a
    /// full-key host vouched for, that host's own listings are tried before
    /// any other host's (which may only ever claim its blobs falsely).
    pub fn load_index_for_host(&self, host: &str) -> Result<Index> {
        self.load_index_over(None, IndexUse::Read, Some(host))
    }

    /// Loads the listings a backup may dedup against ([`IndexUse::Dedup`])
    /// into one in-memory index.
    pub fn load_dedup_index(&self) -> Result<Index> {
        self.load_index_over(None, IndexUse::Dedup, None)
    }

    /// Loads the dedup index ([`IndexUse::Dedup`]) through the index cache
    /// file under `cache_dir` (`index_cache`): the cached index is mapped
    /// rather than held in memory and only the index objects written since
    /// are loaded (into memory, on top of it); the file is rebuilt when a
    /// prune removed objects it covers, and rewritten once the objects
    /// loaded on top are an eighth of it. (Building it loads the whole
    /// index into memory once.) A cache that cannot be read or written only
    /// costs time (the reason is logged).
    pub fn load_index_cached(&self, cache_dir: &Path) -> Result<Index> {
        let repo_id = &self.config().id;
        let cached = crate::index_cache::open(cache_dir, repo_id, &self.index_cache_key());
        let index = self.load_index_over(cached, IndexUse::Dedup, None)?;
        let runs = index.runs();
        let mapped =
            |run: &crate::index::Run| matches!(run.records, crate::index::Records::Mapped { .. });
        let fold = match runs {
            [base] => !mapped(base) && base.len() > 0,
            [base, added] => !mapped(base) || added.len() > base.len() / 8,
            _ => true,
        };
        if !fold {
            if index.is_empty() && index.excluded().is_empty() {
                // An empty repository (or one pruned empty): a stale file
                // would only be verified and rejected by every backup.
                let _ = std::fs::remove_file(crate::index_cache::path(cache_dir, repo_id));
            }
            return Ok(index);
        }
        match crate::index_cache::write(cache_dir, repo_id, &self.index_cache_key(), &index) {
            Ok(mapped) => Ok(mapped),
            Err(e) => {
                log::warn!("{e}; this backup keeps the index in memory");
                Ok(index)
            }
        }
    }

    /// Loads the reader's index ([`IndexUse::Read`]) on top of the index
    /// cache file under `cache_dir` where that file is valid (mapped, as
    /// for a backup; the objects it left out as not for dedup are loaded
    /// on top), else from the index objects alone, and never writes the
    /// file: for readers such as restore, which should not pay for building
    /// a cache on a machine that has none.
    /// `host` is whose snapshot it reads ([`Self::load_index_for_host`]).
    pub fn load_index_reusing_cache(&self, cache_dir: &Path, host: Option<&str>) -> Result<Index> {
        let cached =
            crate::index_cache::open(cache_dir, &self.config().id, &self.index_cache_key());
        self.load_index_over(cached, IndexUse::Read, host)
    }

    /// The key of the index cache file's MAC, derived from the chunk key
    /// and whom this process writes as: a dedup index holds what *this*
    /// signer may dedup against, so another identity's file must not pass.
    pub(crate) fn index_cache_key(&self) -> [u8; 32] {
        let who = match self.identity() {
            None => String::new(),
            Some(Signer::Admin) => " for the admin".into(),
            Some(Signer::Host(h)) => format!(" for host {h}"),
        };
        self.ids()
            .derive(&format!("{}{who}", crate::index_cache::MAC_PURPOSE))
    }

    /// Reads one index object and judges who may use its listings for what.
    pub(crate) fn load_index_object(
        &self,
        id: &Id,
        listed: Option<u64>,
    ) -> Result<(crate::index::IndexFile, crate::provenance::IndexTrust)> {
        use crate::provenance::IndexTrust;
        let raw = self.read_object(ObjectKind::Index, id, listed)?;
        let file: crate::index::IndexFile = raw.parse()?;
        if self.config.version < 3 {
            return Ok((file, IndexTrust::Vouched));
        }
        let signer = self.signer_of(&raw);
        let superseded =
            raw.signature.is_none() && !self.is_write_only() && self.trust()?.is_superseded(id);
        let trust = crate::provenance::judge_index(
            file.origin.as_deref(),
            signer,
            superseded,
            self.is_write_only(),
        );
        Ok((file, trust))
    }

    /// The tier an index object's listings take in an index for `purpose`
    /// (lookups try tier 0 first; `prefer` is the host whose own listings
    /// come before other hosts'), or `None` when they are left out.
    fn tier_for(
        &self,
        purpose: IndexUse,
        trust: &crate::provenance::IndexTrust,
        prefer: Option<&str>,
    ) -> Option<u8> {
        use crate::provenance::IndexTrust;
        match (trust, purpose) {
            (IndexTrust::Vouched, _) => Some(0),
            // A backup trusts, besides what the admin vouched for, only its
            // own host's word: another host's listing could name blobs it
            // never stored (dedup poisoning).
            (IndexTrust::Host(h), IndexUse::Dedup) => {
                (self.identity() == Some(&Signer::Host(h.clone()))).then_some(0)
            }
            (IndexTrust::Host(h), IndexUse::Read) if Some(h.as_str()) == prefer => Some(1),
            (IndexTrust::Host(_), IndexUse::Read) => Some(2),
            (IndexTrust::Foreign | IndexTrust::Superseded | IndexTrust::Untrusted(_), _) => None,
        }
    }

    /// Loads every index object not accounted for by `base` on top of it
    /// (all of them without a base, or when an object `base` covers is
    /// gone), each into the tier `purpose` gives it or left out. An object
    /// that cannot be read or does not verify is skipped with a warning
    /// (a reader then misses what only it lists, and says so per file);
    /// only the store failing stops the load.
    fn load_index_over(
        &self,
        base: Option<Index>,
        purpose: IndexUse,
        prefer: Option<&str>,
    ) -> Result<Index> {
        // A prune may replace index objects while we read them: it writes the
        // consolidated index before deleting the old objects, so listing
        // again finds everything.
        let mut base = base;
        let mut attempt = 0;
        loop {
            let objects = self.list_objects(ObjectKind::Index)?;
            let listed: std::collections::HashSet<Id> = objects.iter().map(|(id, _)| *id).collect();
            // (Taken, not cloned: a retry after an object vanished, which
            // only a prune causes, loads everything.)
            let builder = match base.take() {
                Some(b) if b.covers().iter().all(|c| listed.contains(c)) => {
                    crate::index::IndexBuilder::over(b, purpose == IndexUse::Dedup)
                }
                _ => crate::index::IndexBuilder::new(),
            };
            let objects: Vec<_> = objects
                .into_iter()
                .filter(|(id, _)| !builder.accounts_for(id))
                .collect();
            // Each index object is merged as soon as it is parsed, so the
            // parsed objects are never all in memory at once.
            let builder = Mutex::new(builder);
            let results = crate::parallel::map(
                objects,
                crate::parallel::io_threads(self.backend()),
                |(id, info)| {
                    let (file, trust) = self.load_index_object(&id, Some(info.size))?;
                    let mut b = builder.lock().expect("index builder poisoned");
                    match self.tier_for(purpose, &trust, prefer) {
                        Some(tier) => b.add_object(id, &file, tier),
                        None => {
                            if let crate::provenance::IndexTrust::Untrusted(why) = &trust {
                                log::warn!("index/{id} is not trusted: {why}; it is skipped");
                            }
                            b.exclude(id);
                        }
                    }
                    Ok::<(), Error>(())
                },
            );
            let mut vanished = false;
            for r in results {
                match r {
                    Ok(()) => {}
                    Err(Error::Missing { .. }) if attempt < 3 => vanished = true,
                    Err(e @ (Error::Backend(_) | Error::NeedsFullKey { .. })) => return Err(e),
                    Err(e) => log::warn!("{e}; its listings are skipped"),
                }
            }
            if !vanished {
                return Ok(builder
                    .into_inner()
                    .expect("index builder poisoned")
                    .build());
            }
            attempt += 1;
        }
    }

    /// Reads, verifies and decrypts a whole pack.
    pub fn read_pack(&self, id: &Id) -> Result<Vec<u8>> {
        let what = || format!("pack {}", id.short());
        let (bytes, intact) = self.get_named(&pack_key(id), id, self.max_pack(), &what)?;
        if !intact {
            return Err(Error::corrupt(
                what(),
                "content does not match its name (checksum mismatch)",
            ));
        }
        self.master_key("reading packs")?.decrypt(&bytes, &what)
    }

    /// Hints that pack `id` is about to be read ([`Backend::prefetch`]).
    pub fn prefetch_pack(&self, id: &Id) {
        self.backend.prefetch(&pack_key(id));
    }

    /// Opens a pack for reading frame by frame (see [`PackStream`]). A
    /// pack whose bytes do not match its name even after re-reading is
    /// salvaged from those bytes instead, as [`Self::read_pack_salvage`]
    /// does, without fetching it again.
    pub fn open_pack(&self, id: &Id) -> Result<PackRead> {
        let key = self.master_key("reading packs")?;
        let what = || format!("pack {}", id.short());
        let (bytes, intact) = self.get_named(&pack_key(id), id, self.max_pack(), &what)?;
        if intact {
            let reader = key.decrypt_stream(bytes, &what)?;
            return Ok(PackRead::Stream(PackStream { reader }));
        }
        salvage(key, &bytes, id, &what).map(PackRead::Salvaged)
    }

    /// Reads a pack, salvaging what it can when it is damaged. Returns the
    /// plaintext, the plaintext ranges that could not be authenticated, and
    /// a description of the damage if there is any. Callers must still
    /// verify each blob against its ID.
    pub fn read_pack_salvage(&self, id: &Id) -> Result<SalvagedPack> {
        let key = self.master_key("reading packs")?;
        let what = || format!("pack {}", id.short());
        let (bytes, intact) = self.get_named(&pack_key(id), id, self.max_pack(), &what)?;
        if intact {
            if let Ok(plain) = key.decrypt(&bytes, &what) {
                return Ok(SalvagedPack {
                    plain,
                    bad: Vec::new(),
                    damage: None,
                });
            }
        }
        salvage(key, &bytes, id, &what)
    }

    /// Reads one blob, verifying it against its ID. Packs are cached, so
    /// walking many trees of one pack decrypts the pack once, and damaged
    /// packs are salvaged, so one bad segment costs only the blobs in it.
    /// Every location the index knows is tried, best first, until one
    /// verifies: a damaged copy, or a listing that names a blob where there
    /// is none, costs a warning when another copy is intact.
    pub fn read_blob(&self, index: &Index, id: &Id) -> Result<Vec<u8>> {
        let kind = index.get(id).map_or(BlobKind::Data, |(p, _)| p.kind);
        self.read_blob_of(index, id, kind)
    }

    /// [`Self::read_blob`] of a blob known to be of `kind`: locations in
    /// packs of another kind are not tried.
    fn read_blob_of(&self, index: &Index, id: &Id, kind: BlobKind) -> Result<Vec<u8>> {
        let mut first_error = None;
        for (pack, loc) in index.locations(id).filter(|(p, _)| p.kind == kind) {
            match self.read_blob_at(pack, loc, id) {
                Ok(data) => {
                    if let Some(e) = &first_error {
                        log::warn!(
                            "{e}; read an intact copy from pack {} instead",
                            pack.id.short()
                        );
                    }
                    return Ok(data);
                }
                Err(e @ Error::Backend(_)) => return Err(e),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.unwrap_or_else(|| Error::Missing {
            object: format!(
                "{} blob {}",
                if kind == BlobKind::Tree {
                    "tree"
                } else {
                    "data"
                },
                id.short()
            ),
        }))
    }

    /// Reads and verifies the blob `id` at one location.
    fn read_blob_at(
        &self,
        pack: &crate::index::PackInfo,
        loc: crate::index::BlobLocation,
        id: &Id,
    ) -> Result<Vec<u8>> {
        let cached = self
            .pack_cache
            .lock()
            .expect("pack cache poisoned")
            .get(&pack.id);
        let salvaged = match cached {
            Some(p) => p,
            None => {
                let p = Arc::new(self.read_pack_salvage(&pack.id)?);
                self.pack_cache
                    .lock()
                    .expect("pack cache poisoned")
                    .insert(pack.id, p.clone());
                p
            }
        };
        let what = || format!("blob {} in pack {}", id.short(), pack.id.short());
        let frame = salvaged.frame(loc.offset, loc.length).ok_or_else(|| {
            let why = salvaged
                .damage
                .clone()
                .unwrap_or_else(|| "index points past the end of the pack".into());
            Error::corrupt(what(), why)
        })?;
        let data = decode_blob(frame, loc.raw_length).map_err(|e| Error::corrupt(what(), e))?;
        if self.ids().id_for(pack.kind, &data) != *id {
            return Err(Error::corrupt(what(), "content does not match its ID"));
        }
        Ok(data)
    }

    /// Drops the decrypted packs cached for tree reads (restore calls this
    /// once its plan is made, so the memory serves the data phase instead).
    pub fn clear_pack_cache(&self) {
        let mut cache = self.pack_cache.lock().expect("pack cache poisoned");
        *cache = PackCache::new(PACK_CACHE_BYTES);
    }

    /// Loads and validates a tree.
    pub fn load_tree(&self, index: &Index, id: &Id) -> Result<Tree> {
        let bytes = self.read_blob_of(index, id, BlobKind::Tree)?;
        Tree::from_bytes(&bytes).map_err(|e| Error::corrupt(format!("tree {}", id.short()), e))
    }
}

fn load_key_file(backend: &dyn Backend, key: &str) -> Result<KeyFile> {
    let mut attempt = 0;
    let limit = crate::object::MAX_SMALL_OBJECT;
    loop {
        let bytes = backend.get(key, Some(0..limit + 1))?;
        if bytes.len() as u64 > limit {
            return Err(Error::corrupt(
                key.to_string(),
                "it is larger than any key file lifeboat writes (64 KiB)",
            ));
        }
        match serde_json::from_slice(&bytes) {
            Ok(file) => return Ok(file),
            // Read again before calling it damaged (see `get_named`).
            Err(_) if attempt + 1 < READ_ATTEMPTS => attempt += 1,
            Err(e) => {
                return Err(Error::corrupt(
                    key.to_string(),
                    format!("invalid key file: {e}"),
                ))
            }
        }
    }
}

fn write_key(
    backend: &dyn Backend,
    key: &MasterKey,
    passphrase: &str,
    work_factor: u8,
) -> Result<String> {
    let file = key.seal(passphrase, work_factor);
    let name = hex::encode(rand::random::<[u8; 16]>());
    backend.put(
        &format!("keys/{name}"),
        &serde_json::to_vec_pretty(&file).expect("key file serialises"),
    )?;
    Ok(name)
}

/// A small size-bounded cache of decrypted packs, evicting oldest first.
#[derive(Debug)]
struct PackCache {
    limit: usize,
    size: usize,
    map: HashMap<Id, Arc<SalvagedPack>>,
    order: VecDeque<Id>,
}

impl PackCache {
    fn new(limit: usize) -> PackCache {
        PackCache {
            limit,
            size: 0,
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    fn get(&mut self, id: &Id) -> Option<Arc<SalvagedPack>> {
        self.map.get(id).cloned()
    }

    fn insert(&mut self, id: Id, data: Arc<SalvagedPack>) {
        if self.map.contains_key(&id) {
            return;
        }
        self.size += data.plain.len();
        self.map.insert(id, data);
        self.order.push_back(id);
        while self.size > self.limit && self.order.len() > 1 {
            if let Some(old) = self.order.pop_front() {
                if let Some(d) = self.map.remove(&old) {
                    self.size -= d.plain.len();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemoryBackend;

    fn fast() -> InitOptions {
        InitOptions {
            kdf_work_factor: 10,
            ..InitOptions::default()
        }
    }

    #[test]
    fn init_then_open_with_the_passphrase() {
        let b: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
        let repo = Repository::init(b.clone(), "pw", &fast()).unwrap();
        let again = Repository::open(b.clone(), "pw").unwrap();
        assert_eq!(repo.config(), again.config());
        assert!(matches!(
            Repository::open(b.clone(), "nope"),
            Err(Error::WrongPassphrase)
        ));
        assert!(matches!(
            Repository::init(b, "pw", &fast()),
            Err(Error::AlreadyInitialised { .. })
        ));
    }

    #[test]
    fn opening_an_empty_location_says_there_is_no_repository() {
        let b: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
        assert!(matches!(
            Repository::open(b, "pw"),
            Err(Error::NoRepository { .. })
        ));
    }

    #[test]
    fn a_newer_format_version_is_refused_clearly() {
        let mem = Arc::new(MemoryBackend::new());
        let b: Arc<dyn Backend> = mem.clone();
        Repository::init(b.clone(), "pw", &fast()).unwrap();
        let mut v: serde_json::Value =
            serde_json::from_slice(&b.get("config", None).unwrap()).unwrap();
        v["version"] = (FORMAT_VERSION + 1).into();
        mem.corrupt("config", serde_json::to_vec(&v).unwrap());
        let err = Repository::open(b, "pw").unwrap_err();
        assert!(
            matches!(err, Error::UnsupportedVersion { found, .. } if found == FORMAT_VERSION + 1),
            "{err}"
        );
        assert!(err.to_string().contains("upgrade lifeboat"));
    }

    #[test]
    fn a_format_1_repository_still_opens_and_reads_its_index_but_exports_no_writer_key() {
        let mem = Arc::new(MemoryBackend::new());
        let b: Arc<dyn Backend> = mem.clone();
        let repo = Repository::init(b.clone(), "pw", &fast()).unwrap();
        // What a format-1 init wrote: no index recipient, MAC'd as such.
        let mut config = repo.config().clone();
        config.version = 1;
        config.index_recipient = None;
        config.admin_key = None;
        config.mac = repo.master_key("test").unwrap().mac(&config.mac_input());
        mem.corrupt("config", serde_json::to_vec(&config).unwrap());
        let repo = Repository::open(b, "pw").unwrap();
        assert_eq!(repo.config().version, 1);
        let id = repo
            .save(ObjectKind::Index, &crate::index::IndexFile::of(vec![]))
            .unwrap();
        repo.load::<crate::index::IndexFile>(ObjectKind::Index, &id)
            .unwrap();
        let err = repo.writer_key(None).unwrap_err();
        assert!(
            err.to_string().contains("predates writer credentials"),
            "{err}"
        );
    }

    #[test]
    fn a_tampered_config_is_detected() {
        let mem = Arc::new(MemoryBackend::new());
        let b: Arc<dyn Backend> = mem.clone();
        Repository::init(b.clone(), "pw", &fast()).unwrap();
        let mut v: serde_json::Value =
            serde_json::from_slice(&b.get("config", None).unwrap()).unwrap();
        v["recipients"] = serde_json::json!([crate::crypto::MasterKey::generate().recipient()]);
        mem.corrupt("config", serde_json::to_vec(&v).unwrap());
        assert!(matches!(
            Repository::open(b, "pw"),
            Err(Error::Corrupt { .. })
        ));
    }

    #[test]
    fn a_damaged_key_file_does_not_lock_out_the_other_keys() {
        let b: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
        Repository::init(b.clone(), "pw", &fast()).unwrap();
        b.put("keys/00000000000000000000000000000000", b"{ not a key file")
            .unwrap();
        Repository::open(b.clone(), "pw").expect("the good key still opens");
        let err = Repository::open(b, "wrong").unwrap_err();
        assert!(err.to_string().contains("damaged"), "{err}");
    }

    #[test]
    fn out_of_range_config_values_are_refused() {
        let mem = Arc::new(MemoryBackend::new());
        let b: Arc<dyn Backend> = mem.clone();
        Repository::init(b.clone(), "pw", &fast()).unwrap();
        let good: serde_json::Value =
            serde_json::from_slice(&b.get("config", None).unwrap()).unwrap();
        for (field, value) in [
            ("id", serde_json::json!("../../etc/x")),
            ("pack_size", serde_json::json!(1u64 << 40)),
        ] {
            let mut v = good.clone();
            v[field] = value;
            mem.corrupt("config", serde_json::to_vec(&v).unwrap());
            assert!(
                matches!(
                    Repository::open(b.clone(), "pw"),
                    Err(Error::Corrupt { .. })
                ),
                "{field}"
            );
        }
    }

    #[test]
    fn keys_can_be_added_removed_and_changed() {
        let b: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
        let repo = Repository::init(b.clone(), "one", &fast()).unwrap();
        let second = repo.add_key("two", 10).unwrap();
        assert_eq!(repo.list_keys().unwrap().len(), 2);
        let via_two = Repository::open(b.clone(), "two").unwrap();
        assert!(
            via_two.remove_key(&second).is_err(),
            "cannot remove the key in use"
        );
        repo.remove_key(&second).unwrap();
        assert!(matches!(
            Repository::open(b.clone(), "two"),
            Err(Error::WrongPassphrase)
        ));
        let only = repo.list_keys().unwrap();
        assert!(
            repo.remove_key(&only[0].id).is_err(),
            "cannot remove the last key"
        );
        repo.change_passphrase("three", 10).unwrap();
        assert!(matches!(
            Repository::open(b.clone(), "one"),
            Err(Error::WrongPassphrase)
        ));
        Repository::open(b, "three").unwrap();
    }
}
