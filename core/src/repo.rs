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
//!
//! Index objects and prune plans are also encrypted to the index recipient
//! (format 2), so a host holding only a writer credential can deduplicate
//! and respect prune plans without reading any snapshot, tree or pack. With
//! an Object Lock policy, packs, index objects and snapshots are written
//! with a retention date (see [`LockPolicy`]).
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
use crate::index::{Index, IndexFile};
use crate::pack::{decode_blob, BlobKind};
use crate::tree::{Snapshot, Tree};

/// The repository format version this binary writes. Version 2 added the
/// index recipient (writer credentials) and the Object Lock policy; version
/// 1 repositories are still read and written, without those.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format version this binary reads.
const OLDEST_FORMAT_VERSION: u32 = 1;
/// The `format` field of every lifeboat repository config.
const FORMAT_NAME: &str = "lifeboat-repository";
/// Decrypted packs kept for reading trees and single blobs. Trees are
/// written in walk order, so a small cache already serves almost every tree
/// of a pack from one decryption.
const PACK_CACHE_BYTES: usize = 32 << 20;
/// Largest decompressed JSON object we accept (a hostile repository must not
/// be able to exhaust memory with a zstd bomb).
const MAX_JSON_OBJECT: usize = 1 << 30;

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

    fn mac_input(&self) -> Vec<u8> {
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
    let bytes = match backend.get("config", None) {
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
        Ok(Repository {
            backend,
            config,
            access,
            recipients,
            index_recipients,
            pack_cache: Mutex::new(PackCache::new(PACK_CACHE_BYTES)),
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
    pub fn writer_key(&self) -> Result<WriterKey> {
        let key = self.master_key("exporting a writer credential")?;
        key.writer_key(
            &self.config.id,
            &self.config.recipients,
            &self.config.digest(),
        )
            .filter(|_| self.config.index_recipient == key.index_recipient())
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "repository {} uses format {}, which predates writer credentials (its index objects are readable only with the full key); create a new repository with this lifeboat and back up into it to use write-only hosts",
                    &self.config.id[..8],
                    self.config.version
                ))
            })
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

    /// Encrypts and stores a JSON object under `prefix/`; returns its ID.
    /// Index objects and prune plans are also encrypted to the index
    /// recipient (readable by writer credentials); everything else only to
    /// the repository's recipients.
    pub fn save_json<T: Serialize>(&self, prefix: &str, value: &T) -> Result<Id> {
        self.save_json_retained(prefix, value, None)
    }

    /// [`save_json`](Self::save_json) with an Object Lock retention.
    pub fn save_json_retained<T: Serialize>(
        &self,
        prefix: &str,
        value: &T,
        retention: Option<&Retention>,
    ) -> Result<Id> {
        let json = serde_json::to_vec(value).expect("objects serialise");
        let compressed =
            zstd::bulk::compress(&json, 3).map_err(|e| Error::Invalid(format!("zstd: {e}")))?;
        let recipients = match prefix {
            "index" | "pending" => &self.index_recipients,
            _ => &self.recipients,
        };
        let ciphertext = recipients.encrypt(&compressed);
        let id = Id::of_bytes(&ciphertext);
        self.put_object(&format!("{prefix}/{id}"), ciphertext, retention)?;
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

    /// Reads an object named by the hash of its bytes. A copy that does not
    /// match its name is read again (`READ_ATTEMPTS` reads in all) before it counts as
    /// damaged: a transport that silently truncates or flips a byte looks
    /// exactly like bit rot on the first read, and only a second read tells
    /// them apart. Returns the bytes and whether they match.
    fn get_named(&self, key: &str, id: &Id, what: &dyn Fn() -> String) -> Result<(Vec<u8>, bool)> {
        let mut attempt = 0;
        loop {
            let bytes = match self.backend.get(key, None) {
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

    /// Loads and decrypts a JSON object, checking that its bytes match its name.
    pub fn load_json<T: DeserializeOwned>(&self, prefix: &str, id: &Id) -> Result<T> {
        let key = format!("{prefix}/{id}");
        let what = || format!("{prefix} object {}", id.short());
        let (ciphertext, intact) = self.get_named(&key, id, &what)?;
        if !intact {
            return Err(Error::corrupt(what(), "content does not match its name"));
        }
        let compressed = self.decrypt(&ciphertext, &what)?;
        let mut json = Vec::new();
        let mut decoder = zstd::stream::read::Decoder::new(compressed.as_slice())
            .map_err(|e| Error::corrupt(what(), e.to_string()))?;
        std::io::Read::read_to_end(
            &mut std::io::Read::take(&mut decoder, MAX_JSON_OBJECT as u64 + 1),
            &mut json,
        )
        .map_err(|e| Error::corrupt(what(), format!("zstd: {e}")))?;
        if json.len() > MAX_JSON_OBJECT {
            return Err(Error::corrupt(what(), "decompresses to more than 1 GiB"));
        }
        serde_json::from_slice(&json)
            .map_err(|e| Error::corrupt(what(), format!("invalid JSON: {e}")))
    }

    /// IDs of every object under `prefix/`, skipping names that are not IDs.
    pub fn list_ids(&self, prefix: &str) -> Result<Vec<Id>> {
        Ok(self
            .backend
            .list(&format!("{prefix}/"))?
            .into_iter()
            .filter_map(|o| o.key.rsplit('/').next().and_then(|n| n.parse().ok()))
            .collect())
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

    /// Loads every index object into one in-memory index.
    pub fn load_index(&self) -> Result<Index> {
        self.load_index_over(None)
    }

    /// Loads the index through the index cache file under `cache_dir`
    /// (`index_cache`): the cached index is mapped rather than held in
    /// memory and only the index objects written since are loaded (into
    /// memory, on top of it); the file is rebuilt when a prune removed
    /// objects it covers, and rewritten once the objects loaded on top are
    /// an eighth of it. (Building it loads the whole index into memory
    /// once, as [`Repository::load_index`] does.) A cache that cannot be
    /// read or written only costs time (the reason is logged).
    pub fn load_index_cached(&self, cache_dir: &Path) -> Result<Index> {
        let repo_id = &self.config().id;
        let index = self.load_index_reusing_cache(cache_dir)?;
        let runs = index.runs();
        let mapped =
            |run: &crate::index::Run| matches!(run.records, crate::index::Records::Mapped { .. });
        let fold = match runs {
            [base] => !mapped(base) && base.len() > 0,
            [base, added] => !mapped(base) || added.len() > base.len() / 8,
            _ => true,
        };
        if !fold {
            if index.is_empty() {
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

    /// Loads the index on top of the index cache file under `cache_dir`
    /// where that file is valid (mapped, as for a backup), else from the
    /// index objects alone, and never writes the file: for readers such
    /// as restore, which should not pay for building a cache on a machine
    /// that has none.
    pub fn load_index_reusing_cache(&self, cache_dir: &Path) -> Result<Index> {
        let cached =
            crate::index_cache::open(cache_dir, &self.config().id, &self.index_cache_key());
        self.load_index_over(cached)
    }

    /// The key of the index cache file's MAC, derived from the chunk key.
    fn index_cache_key(&self) -> [u8; 32] {
        self.ids().derive(crate::index_cache::MAC_PURPOSE)
    }

    /// Loads every index object not covered by `base` on top of it (all of
    /// them without a base, or when an object `base` covers is gone).
    fn load_index_over(&self, base: Option<Index>) -> Result<Index> {
        // A prune may replace index objects while we read them: it writes the
        // consolidated index before deleting the old objects, so listing
        // again finds everything.
        let mut base = base;
        let mut attempt = 0;
        loop {
            let ids = self.list_ids("index")?;
            let listed: std::collections::HashSet<Id> = ids.iter().copied().collect();
            // (Taken, not cloned: a retry after an object vanished, which
            // only a prune causes, loads everything.)
            let builder = match base.take() {
                Some(b) if b.covers().iter().all(|c| listed.contains(c)) => {
                    crate::index::IndexBuilder::over(b)
                }
                _ => crate::index::IndexBuilder::new(),
            };
            let ids: Vec<Id> = ids.into_iter().filter(|id| !builder.covers(id)).collect();
            // Each index object is merged as soon as it is parsed, so the
            // parsed objects are never all in memory at once.
            let builder = Mutex::new(builder);
            let results =
                crate::parallel::map(ids, crate::parallel::io_threads(self.backend()), |id| {
                    let file = self.load_json::<IndexFile>("index", &id)?;
                    builder
                        .lock()
                        .expect("index builder poisoned")
                        .add_object(id, &file);
                    Ok::<(), Error>(())
                });
            let mut vanished = false;
            for r in results {
                match r {
                    Ok(()) => {}
                    Err(Error::Missing { .. }) if attempt < 3 => vanished = true,
                    Err(e) => return Err(e),
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

    /// Loads every snapshot, oldest first.
    pub fn snapshots(&self) -> Result<Vec<(Id, Snapshot)>> {
        self.require_full_key("reading snapshots")?;
        let ids = self.list_ids("snapshots")?;
        let loaded = crate::parallel::map(
            ids.clone(),
            crate::parallel::io_threads(self.backend()),
            |id| self.load_json::<Snapshot>("snapshots", &id),
        );
        let mut out = Vec::with_capacity(ids.len());
        for (id, snap) in ids.into_iter().zip(loaded) {
            out.push((id, snap?));
        }
        out.sort_by(|a, b| a.1.time.cmp(&b.1.time).then(a.0.cmp(&b.0)));
        Ok(out)
    }

    /// Resolves `latest` or a unique ID prefix to a snapshot.
    pub fn find_snapshot(&self, spec: &str) -> Result<(Id, Snapshot)> {
        let snaps = self.snapshots()?;
        if spec == "latest" {
            return snaps
                .into_iter()
                .next_back()
                .ok_or_else(|| Error::SnapshotNotFound(spec.to_string()));
        }
        let spec_lc = spec.to_ascii_lowercase();
        let mut matching = snaps
            .into_iter()
            .filter(|(id, _)| id.to_hex().starts_with(&spec_lc));
        match (matching.next(), matching.next()) {
            (Some(found), None) if !spec.is_empty() => Ok(found),
            (Some(_), Some(_)) => Err(Error::AmbiguousSnapshot(spec.to_string())),
            _ => Err(Error::SnapshotNotFound(spec.to_string())),
        }
    }

    /// Reads, verifies and decrypts a whole pack.
    pub fn read_pack(&self, id: &Id) -> Result<Vec<u8>> {
        let what = || format!("pack {}", id.short());
        let (bytes, intact) = self.get_named(&pack_key(id), id, &what)?;
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
        let (bytes, intact) = self.get_named(&pack_key(id), id, &what)?;
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
        let (bytes, intact) = self.get_named(&pack_key(id), id, &what)?;
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
    pub fn read_blob(&self, index: &Index, id: &Id) -> Result<Vec<u8>> {
        let (pack, loc) = index.get(id).ok_or_else(|| Error::Missing {
            object: format!("blob {}", id.short()),
        })?;
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
        if let Some((pack, _)) = index.get(id) {
            if pack.kind != BlobKind::Tree {
                return Err(Error::corrupt(
                    format!("tree {}", id.short()),
                    "stored as a data blob",
                ));
            }
        }
        let bytes = self.read_blob(index, id)?;
        Tree::from_bytes(&bytes).map_err(|e| Error::corrupt(format!("tree {}", id.short()), e))
    }
}

fn load_key_file(backend: &dyn Backend, key: &str) -> Result<KeyFile> {
    let mut attempt = 0;
    loop {
        let bytes = backend.get(key, None)?;
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
        config.mac = repo.master_key("test").unwrap().mac(&config.mac_input());
        mem.corrupt("config", serde_json::to_vec(&config).unwrap());
        let repo = Repository::open(b, "pw").unwrap();
        assert_eq!(repo.config().version, 1);
        let id = repo
            .save_json(
                "index",
                &crate::index::IndexFile {
                    version: 1,
                    packs: vec![],
                },
            )
            .unwrap();
        repo.load_json::<crate::index::IndexFile>("index", &id)
            .unwrap();
        let err = repo.writer_key().unwrap_err();
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
