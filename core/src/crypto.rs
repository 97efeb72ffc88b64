//! Repository keys and encryption.
//!
//! A repository has one master secret: an age X25519 identity (which decrypts
//! everything), a 32-byte chunk key (the BLAKE3 key that names blobs, so blob
//! IDs do not reveal content to outsiders), and a 32-byte MAC key that
//! authenticates the plaintext repository config. Every object is encrypted
//! with age to the repository's X25519 recipients, so a writer needs only the
//! public half, and anyone holding the identity can open any object with the
//! standard `age` tool (see ARCHITECTURE.md, "Emergency path").
//!
//! The master secret is stored in the repository once per passphrase, each
//! copy encrypted with age's scrypt passphrase mode in a small JSON key file.
//!
//! Since format 2 the master secret also holds an *index identity*: index
//! objects and prune plans (blob IDs, pack layout, nothing of names or
//! content) are encrypted to it as well as to the repository's recipients.
//! A [`WriterKey`] (`lifeboat key export-writer`) carries only that identity,
//! the chunk key and the public recipients: enough to deduplicate against
//! the whole repository and add snapshots, not to read any of them.

use std::io::{Read, Write};
use std::str::FromStr;

use age::secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::Id;

/// The scrypt work factor (log2 N) for new key files: 2^16 with r = 8 costs
/// 64 MiB and about 0.15 s per guess, the same budget restic calibrates for.
/// (age's interactive default of 2^18 needs 256 MiB, which made the key
/// derivation the largest memory use and half the time of an unchanged
/// backup.) `LIFEBOAT_KDF_WORK_FACTOR` at `init` or `key add` raises it.
pub const DEFAULT_KDF_WORK_FACTOR: u8 = 16;
/// The highest work factor we agree to compute when opening a key file, so a
/// hostile key file cannot make us spin for hours.
const MAX_KDF_WORK_FACTOR: u8 = 22;

/// The public part of the repository's keys: enough to write new objects.
#[derive(Clone)]
pub struct Recipients {
    recipients: Vec<age::x25519::Recipient>,
}

impl std::fmt::Debug for Recipients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.recipients.iter().map(|r| r.to_string()))
            .finish()
    }
}

impl Recipients {
    /// Parses `age1…` recipient strings.
    pub fn parse(list: &[String]) -> Result<Recipients> {
        let recipients = list
            .iter()
            .map(|s| {
                age::x25519::Recipient::from_str(s).map_err(|e| {
                    Error::corrupt("repository config", format!("bad recipient {s:?}: {e}"))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if recipients.is_empty() {
            return Err(Error::corrupt("repository config", "no recipients"));
        }
        Ok(Recipients { recipients })
    }

    /// The recipients as `age1…` strings.
    pub fn to_strings(&self) -> Vec<String> {
        self.recipients.iter().map(|r| r.to_string()).collect()
    }

    /// Encrypts `plaintext` into an age file readable by any of the recipients.
    pub fn encrypt(&self, plaintext: &[u8]) -> Vec<u8> {
        let mut writer = self.encrypting(plaintext.len());
        writer
            .write_all(plaintext)
            .expect("writing to a Vec cannot fail");
        writer.finish().expect("writing to a Vec cannot fail")
    }

    /// A writer that encrypts what is written to it into an age file
    /// readable by any of the recipients, for about `size` bytes of
    /// plaintext; `finish` returns the file.
    pub fn encrypting(&self, size: usize) -> age::stream::StreamWriter<Vec<u8>> {
        self.encrypting_into(Vec::new(), size)
    }

    /// [`Recipients::encrypting`] into `out`, emptied first: a caller that
    /// keeps its buffers for reuse makes no new allocation.
    pub fn encrypting_into(
        &self,
        mut out: Vec<u8>,
        size: usize,
    ) -> age::stream::StreamWriter<Vec<u8>> {
        let encryptor = age::Encryptor::with_recipients(
            self.recipients.iter().map(|r| r as &dyn age::Recipient),
        )
        .expect("x25519 recipients always wrap");
        // age adds a header of ~200 bytes and 16 bytes per 64 KiB segment.
        out.clear();
        out.reserve_exact(size + size / 4096 + 512);
        encryptor
            .wrap_output(out)
            .expect("writing to a Vec cannot fail")
    }
}

/// The full secret of a repository: decrypts everything and names blobs.
#[derive(Clone)]
pub struct MasterKey {
    identity: age::x25519::Identity,
    /// Absent in keys of format-1 repositories, which predate writer keys.
    index_identity: Option<age::x25519::Identity>,
    chunk_key: ChunkKey,
    mac_key: [u8; 32],
}

/// The key that names blobs (keyed BLAKE3) and seeds the chunker. A full
/// key and a writer key both hold it: a writer must name new blobs exactly
/// as every other host does, or nothing would deduplicate.
#[derive(Clone)]
pub struct ChunkKey([u8; 32]);

impl std::fmt::Debug for ChunkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChunkKey(..)")
    }
}

impl ChunkKey {
    /// The keyed BLAKE3 ID of a blob's plaintext.
    pub fn blob_id(&self, plaintext: &[u8]) -> Id {
        Id(*blake3::keyed_hash(&self.0, plaintext).as_bytes())
    }

    /// A secret for `purpose`, derived from the chunk key: it keys MACs on
    /// local files (the index cache) that someone who can write the cache
    /// directory but holds no key of the repository must not forge.
    pub fn derive(&self, purpose: &str) -> [u8; 32] {
        *blake3::keyed_hash(&self.0, purpose.as_bytes()).as_bytes()
    }

    /// A hasher that computes [`Self::blob_id`] over data fed in pieces.
    pub fn blob_hasher(&self) -> blake3::Hasher {
        blake3::Hasher::new_keyed(&self.0)
    }

    /// The keyed BLAKE3 ID of a tree blob. Trees are hashed with a key of
    /// their own so that no file's content can ever share an ID with a tree
    /// (a file holding `{"nodes":[]}` would otherwise dedup with every empty
    /// directory's tree and make it unreadable as a tree).
    pub fn tree_id(&self, plaintext: &[u8]) -> Id {
        let tree_key = blake3::keyed_hash(&self.0, b"lifeboat tree key v1");
        Id(*blake3::keyed_hash(tree_key.as_bytes(), plaintext).as_bytes())
    }

    /// The ID of a blob of `kind`.
    pub fn id_for(&self, kind: crate::pack::BlobKind, plaintext: &[u8]) -> Id {
        match kind {
            crate::pack::BlobKind::Data => self.blob_id(plaintext),
            crate::pack::BlobKind::Tree => self.tree_id(plaintext),
        }
    }

    fn from_hex(hex_key: &str) -> Option<ChunkKey> {
        let mut key = [0u8; 32];
        hex::decode_to_slice(hex_key, &mut key).ok()?;
        Some(ChunkKey(key))
    }
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

/// The secret as stored (encrypted) inside a key file.
#[derive(Serialize, Deserialize)]
struct SecretJson {
    identity: String,
    chunk_key: String,
    mac_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    index_identity: Option<String>,
}

/// A key file as stored under `keys/`: who made it and when (in plaintext,
/// so `key list` can show it), and the age-encrypted secret.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct KeyFile {
    /// Format version of the key file.
    pub version: u32,
    /// When the key was added (RFC 3339).
    pub created: String,
    /// Host that added it.
    pub host: String,
    /// User that added it.
    pub user: String,
    /// scrypt work factor (log2 N) the secret is sealed with.
    pub kdf_work_factor: u8,
    /// The master secret, age scrypt-encrypted, ASCII-armored.
    pub encrypted: String,
}

impl MasterKey {
    /// Generates a fresh random master key.
    pub fn generate() -> MasterKey {
        MasterKey {
            identity: age::x25519::Identity::generate(),
            index_identity: Some(age::x25519::Identity::generate()),
            chunk_key: ChunkKey(rand::random()),
            mac_key: rand::random(),
        }
    }

    /// The recipient matching this key's identity.
    pub fn recipient(&self) -> String {
        self.identity.to_public().to_string()
    }

    /// The recipient of the index identity: index objects and prune plans
    /// are encrypted to it too. `None` for a format-1 repository's key.
    pub fn index_recipient(&self) -> Option<String> {
        self.index_identity
            .as_ref()
            .map(|i| i.to_public().to_string())
    }

    /// The key that names blobs.
    pub fn chunk(&self) -> &ChunkKey {
        &self.chunk_key
    }

    /// A MAC over `bytes` (authenticates the plaintext config).
    pub fn mac(&self, bytes: &[u8]) -> String {
        hex::encode(blake3::keyed_hash(&self.mac_key, bytes).as_bytes())
    }

    /// Decrypts an age file encrypted to this repository. `what` names the
    /// object in the error if it fails.
    pub fn decrypt(&self, ciphertext: &[u8], what: &dyn Fn() -> String) -> Result<Vec<u8>> {
        age_decrypt(&self.identity, ciphertext, what, not_for_this_repository)
    }

    /// Opens an age file encrypted to this repository as a stream that
    /// authenticates each 64 KiB segment as it is read (and seeks without
    /// decrypting what it skips), so a reader that wants a few ranges of a
    /// pack never holds the whole plaintext.
    pub fn decrypt_stream(
        &self,
        ciphertext: Vec<u8>,
        what: &dyn Fn() -> String,
    ) -> Result<AgeStream> {
        age_open(
            &self.identity,
            std::io::Cursor::new(ciphertext),
            what,
            not_for_this_repository,
        )
    }

    /// Decrypts what can be decrypted of a damaged age file. age
    /// authenticates its payload in 64 KiB segments, so damage to one
    /// segment need not cost the rest: returns the plaintext (zeros where a
    /// segment failed) and the plaintext ranges that failed. Fails only
    /// when the header itself is unusable.
    pub fn decrypt_salvage(
        &self,
        ciphertext: &[u8],
    ) -> Result<(Vec<u8>, Vec<std::ops::Range<usize>>), String> {
        use std::io::{Seek, SeekFrom};
        const SEG: usize = 64 * 1024;
        const TAG: usize = 16;
        // The payload starts after the header's "--- <mac>\n" line and the 16-byte nonce.
        let mac_line = ciphertext
            .windows(5)
            .position(|w| w == b"\n--- ")
            .ok_or("age header not found")?;
        let header_end = ciphertext[mac_line + 1..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|p| mac_line + 1 + p + 1)
            .ok_or("age header not terminated")?;
        let payload = ciphertext.len().saturating_sub(header_end + 16);
        let segments = payload.div_ceil(SEG + TAG);
        // A truncated last segment may hold fewer bytes than its tag.
        let plain_len = payload
            .saturating_sub(segments * TAG)
            .max((segments.saturating_sub(1)) * SEG);
        // After a failed segment the age reader keeps the failed ciphertext
        // buffered, so a fresh reader is opened to go on past it.
        let open = || -> Result<_, String> {
            let decryptor = age::Decryptor::new_buffered(std::io::Cursor::new(ciphertext))
                .map_err(|e| e.to_string())?;
            decryptor
                .decrypt(std::iter::once(&self.identity as &dyn age::Identity))
                .map_err(|e| e.to_string())
        };
        let mut reader = open()?;
        let mut out = vec![0u8; plain_len];
        let mut bad = Vec::new();
        for i in 0..segments {
            let range = i * SEG..((i + 1) * SEG).min(plain_len).max(i * SEG);
            if range.is_empty() {
                bad.push(range.start..range.start + 1);
                continue;
            }
            let ok = reader
                .seek(SeekFrom::Start(range.start as u64))
                .and_then(|_| reader.read_exact(&mut out[range.clone()]));
            if ok.is_err() {
                out[range.clone()].fill(0);
                bad.push(range);
                reader = open()?;
            }
        }
        Ok((out, bad))
    }

    /// Seals this key with a passphrase into a key file.
    pub fn seal(&self, passphrase: &str, work_factor: u8) -> KeyFile {
        let secret = SecretJson {
            identity: self.identity.to_string().expose_secret().to_string(),
            chunk_key: hex::encode(self.chunk_key.0),
            mac_key: hex::encode(self.mac_key),
            index_identity: self
                .index_identity
                .as_ref()
                .map(|i| i.to_string().expose_secret().to_string()),
        };
        let plaintext = serde_json::to_vec(&secret).expect("serialising a struct");
        let mut recipient = age::scrypt::Recipient::new(SecretString::from(passphrase.to_string()));
        recipient.set_work_factor(work_factor);
        let encryptor =
            age::Encryptor::with_recipients(std::iter::once(&recipient as &dyn age::Recipient))
                .expect("scrypt recipient wraps");
        let mut armored = Vec::new();
        {
            let armor = age::armor::ArmoredWriter::wrap_output(
                &mut armored,
                age::armor::Format::AsciiArmor,
            )
            .expect("writing to a Vec");
            let mut writer = encryptor.wrap_output(armor).expect("writing to a Vec");
            writer.write_all(&plaintext).expect("writing to a Vec");
            writer
                .finish()
                .and_then(|a| a.finish())
                .expect("writing to a Vec");
        }
        KeyFile {
            version: 1,
            created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            host: crate::fsmeta::hostname(),
            user: crate::fsmeta::username(),
            kdf_work_factor: work_factor,
            encrypted: String::from_utf8(armored).expect("armor is ASCII"),
        }
    }

    /// Opens a key file with a passphrase. Returns `Ok(None)` when the
    /// passphrase does not match, and an error when the file is damaged.
    pub fn unseal(file: &KeyFile, passphrase: &str, name: &str) -> Result<Option<MasterKey>> {
        let reader = age::armor::ArmoredReader::new(file.encrypted.as_bytes());
        let decryptor = age::Decryptor::new(reader)
            .map_err(|e| Error::corrupt(format!("key {name}"), e.to_string()))?;
        let mut identity = age::scrypt::Identity::new(SecretString::from(passphrase.to_string()));
        identity.set_max_work_factor(MAX_KDF_WORK_FACTOR);
        let mut reader = match decryptor.decrypt(std::iter::once(&identity as &dyn age::Identity)) {
            Ok(r) => r,
            Err(age::DecryptError::DecryptionFailed) | Err(age::DecryptError::NoMatchingKeys) => {
                return Ok(None)
            }
            Err(e) => return Err(Error::corrupt(format!("key {name}"), e.to_string())),
        };
        let mut plaintext = Vec::new();
        reader
            .read_to_end(&mut plaintext)
            .map_err(|e| Error::corrupt(format!("key {name}"), e.to_string()))?;
        let secret: SecretJson = serde_json::from_slice(&plaintext)
            .map_err(|e| Error::corrupt(format!("key {name}"), e.to_string()))?;
        let bad = |what: &str| Error::corrupt(format!("key {name}"), format!("bad {what}"));
        let identity =
            age::x25519::Identity::from_str(&secret.identity).map_err(|_| bad("identity"))?;
        let index_identity = match &secret.index_identity {
            Some(s) => Some(age::x25519::Identity::from_str(s).map_err(|_| bad("index identity"))?),
            None => None,
        };
        let chunk_key = ChunkKey::from_hex(&secret.chunk_key).ok_or_else(|| bad("chunk key"))?;
        let mut mac_key = [0u8; 32];
        hex::decode_to_slice(&secret.mac_key, &mut mac_key).map_err(|_| bad("mac key"))?;
        Ok(Some(MasterKey {
            identity,
            index_identity,
            chunk_key,
            mac_key,
        }))
    }

    /// The admin key: signs what a full-key host writes (format 3). It is
    /// derived from the MAC key, so every passphrase of a repository signs
    /// with the same key, and no writer credential can.
    pub fn admin_signing(&self) -> crate::sign::SigningKey {
        crate::sign::SigningKey::admin(&self.mac_key)
    }

    /// The age identity as an `AGE-SECRET-KEY-1…` string, for the emergency
    /// path (`lifeboat key show-identity`).
    pub fn identity_string(&self) -> String {
        self.identity.to_string().expose_secret().to_string()
    }

    /// The writer credential for this key's repository, or `None` for a
    /// format-1 repository (whose index objects no writer could read).
    /// `signer` is the host name and signing key it writes as (format 3).
    pub fn writer_key(
        &self,
        repository: &str,
        recipients: &[String],
        config_digest: &str,
        signer: Option<(String, crate::sign::SigningKey)>,
    ) -> Option<WriterKey> {
        Some(WriterKey {
            repository: repository.to_string(),
            recipients: recipients.to_vec(),
            config_digest: config_digest.to_string(),
            index_identity: self.index_identity.clone()?,
            chunk_key: self.chunk_key.clone(),
            signer,
        })
    }
}

/// The error for an object a full key cannot open.
fn not_for_this_repository(object: String) -> Error {
    Error::corrupt(object, "not encrypted to this repository's key")
}

/// Opens an age file with one X25519 identity as a decrypting stream.
/// `not_for_us` makes the error for a file that is not encrypted to it.
fn age_open<R: std::io::BufRead>(
    identity: &age::x25519::Identity,
    input: R,
    what: &dyn Fn() -> String,
    not_for_us: fn(String) -> Error,
) -> Result<age::stream::StreamReader<R>> {
    let decryptor = age::Decryptor::new_buffered(input)
        .map_err(|e| Error::corrupt(what(), format!("not an age file: {e}")))?;
    decryptor
        .decrypt(std::iter::once(identity as &dyn age::Identity))
        .map_err(|e| match e {
            age::DecryptError::NoMatchingKeys => not_for_us(what()),
            e => Error::corrupt(what(), format!("cannot decrypt: {e}")),
        })
}

/// Decrypts an age file with one X25519 identity.
/// `not_for_us` makes the error for a file that is not encrypted to it.
fn age_decrypt(
    identity: &age::x25519::Identity,
    ciphertext: &[u8],
    what: &dyn Fn() -> String,
    not_for_us: fn(String) -> Error,
) -> Result<Vec<u8>> {
    let mut reader = age_open(identity, ciphertext, what, not_for_us)?;
    let mut out = Vec::with_capacity(ciphertext.len());
    reader
        .read_to_end(&mut out)
        .map_err(|e| Error::corrupt(what(), format!("authentication failed: {e}")))?;
    Ok(out)
}

/// A decrypting stream over an age file held in memory (see
/// [`MasterKey::decrypt_stream`]).
pub type AgeStream = age::stream::StreamReader<std::io::Cursor<Vec<u8>>>;

/// The `format` of a writer credential file.
const WRITER_FORMAT: &str = "lifeboat-writer-credential";

/// A write-only credential: what a host needs to add snapshots to one
/// repository and nothing that decrypts what is already there. It holds
/// the repository's ID, public recipients and the config's digest (pinned: a
/// config that differs in any way, say with other recipients or without
/// its lock policy, is refused, so whoever can write to the bucket cannot
/// redirect a writer's backups to their own key or unlock them), the chunk
/// key (to name blobs as every host does), and the index identity (to read
/// index objects and prune plans, which hold blob IDs and pack layout, no
/// names or content). Since format 3 it also names the one host it writes
/// as and holds that host's signing key, whose public half the repository's
/// host registry records: its snapshots and index objects are signed, and a
/// stolen credential can speak for its own host only.
#[derive(Clone)]
pub struct WriterKey {
    repository: String,
    recipients: Vec<String>,
    config_digest: String,
    index_identity: age::x25519::Identity,
    chunk_key: ChunkKey,
    signer: Option<(String, crate::sign::SigningKey)>,
}

impl std::fmt::Debug for WriterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WriterKey({}, ..)", self.repository)
    }
}

/// A writer credential file as written by `key export-writer`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WriterFile {
    format: String,
    version: u32,
    repository: String,
    recipients: Vec<String>,
    config_digest: String,
    index_identity: String,
    chunk_key: String,
    created: String,
    /// The host that made the file (not the one it writes as).
    host: String,
    /// The host name its snapshots carry (version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    writes_as: Option<String>,
    /// That host's Ed25519 signing seed, hex (version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    signing_key: Option<String>,
}

impl WriterKey {
    /// The repository ID this credential belongs to.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The recipients the credential pins.
    pub fn recipients(&self) -> &[String] {
        &self.recipients
    }

    /// The BLAKE3 digest of the config the credential was made for.
    pub fn config_digest(&self) -> &str {
        &self.config_digest
    }

    /// The public half of the index identity.
    pub fn index_recipient(&self) -> String {
        self.index_identity.to_public().to_string()
    }

    /// The key that names blobs.
    pub fn chunk(&self) -> &ChunkKey {
        &self.chunk_key
    }

    /// The host this credential writes as and its signing key (none in a
    /// credential for a format-2 repository).
    pub fn signer(&self) -> Option<(&str, &crate::sign::SigningKey)> {
        self.signer.as_ref().map(|(h, k)| (h.as_str(), k))
    }

    /// Decrypts an index object or prune plan. Anything else (packs,
    /// snapshots, key files) is not encrypted to the index identity and
    /// fails with [`Error::NeedsFullKey`].
    pub fn decrypt(&self, ciphertext: &[u8], what: &dyn Fn() -> String) -> Result<Vec<u8>> {
        age_decrypt(&self.index_identity, ciphertext, what, |object| {
            Error::NeedsFullKey {
                operation: format!("reading {object}"),
            }
        })
    }

    /// The credential file's bytes (JSON; keep it mode 0600).
    pub fn to_file(&self) -> Vec<u8> {
        let file = WriterFile {
            format: WRITER_FORMAT.to_string(),
            version: if self.signer.is_some() { 2 } else { 1 },
            repository: self.repository.clone(),
            recipients: self.recipients.clone(),
            config_digest: self.config_digest.clone(),
            index_identity: self.index_identity.to_string().expose_secret().to_string(),
            chunk_key: hex::encode(self.chunk_key.0),
            created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            host: crate::fsmeta::hostname(),
            writes_as: self.signer.as_ref().map(|(h, _)| h.clone()),
            signing_key: self.signer.as_ref().map(|(_, k)| hex::encode(k.seed())),
        };
        let mut out = serde_json::to_vec_pretty(&file).expect("serialising a struct");
        out.push(b'\n');
        out
    }

    /// Parses a credential file; `name` (its path) goes into errors.
    pub fn from_file(bytes: &[u8], name: &str) -> Result<WriterKey> {
        let bad = |what: String| {
            Error::Invalid(format!(
                "{name} is not a lifeboat writer credential ({what}); create one with `lifeboat key export-writer --out FILE`"
            ))
        };
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("not JSON: {e}")))?;
        if value.get("format").and_then(|f| f.as_str()) != Some(WRITER_FORMAT) {
            return Err(bad("no \"format\": \"lifeboat-writer-credential\"".into()));
        }
        let file: WriterFile = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
        if file.version > 2 || file.version == 0 {
            return Err(bad(format!(
                "version {} is newer than this lifeboat understands; upgrade lifeboat",
                file.version
            )));
        }
        Recipients::parse(&file.recipients).map_err(|e| bad(e.to_string()))?;
        let signer = match (file.version, file.writes_as, file.signing_key) {
            (1, None, None) => None,
            (2, Some(host), Some(seed)) => {
                crate::provenance::check_host_name(&host).map_err(bad)?;
                let mut bytes = [0u8; 32];
                hex::decode_to_slice(&seed, &mut bytes)
                    .map_err(|_| bad("bad signing key".into()))?;
                Some((host, crate::sign::SigningKey::from_seed(bytes)))
            }
            _ => {
                return Err(bad(
                    "its host and signing key do not match its version".into()
                ))
            }
        };
        Ok(WriterKey {
            repository: file.repository,
            recipients: file.recipients,
            config_digest: file.config_digest,
            index_identity: age::x25519::Identity::from_str(&file.index_identity)
                .map_err(|_| bad("bad index identity".into()))?,
            chunk_key: ChunkKey::from_hex(&file.chunk_key)
                .ok_or_else(|| bad("bad chunk key".into()))?,
            signer,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_key_opens_with_its_passphrase_only() {
        let key = MasterKey::generate();
        let file = key.seal("correct horse", 10);
        let opened = MasterKey::unseal(&file, "correct horse", "k")
            .unwrap()
            .unwrap();
        assert_eq!(opened.chunk().blob_id(b"x"), key.chunk().blob_id(b"x"));
        assert!(MasterKey::unseal(&file, "wrong", "k").unwrap().is_none());
    }

    #[test]
    fn encrypted_objects_decrypt_with_the_identity_and_detect_tampering() {
        let key = MasterKey::generate();
        let recipients = Recipients::parse(&[key.recipient()]).unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let mut ct = recipients.encrypt(&data);
        assert_eq!(key.decrypt(&ct, &|| "obj".into()).unwrap(), data);
        let n = ct.len();
        ct[n - 100] ^= 1;
        assert!(matches!(
            key.decrypt(&ct, &|| "obj".into()),
            Err(Error::Corrupt { .. })
        ));
        let other = MasterKey::generate();
        assert!(other
            .decrypt(&recipients.encrypt(b"x"), &|| "obj".into())
            .is_err());
    }

    #[test]
    fn salvage_recovers_every_segment_but_the_damaged_one() {
        let key = MasterKey::generate();
        let recipients = Recipients::parse(&[key.recipient()]).unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut ct = recipients.encrypt(&data);
        let (plain, bad) = key.decrypt_salvage(&ct).unwrap();
        assert_eq!(plain, data);
        assert!(bad.is_empty());
        let n = ct.len();
        ct[n - 250_000] ^= 1;
        let (plain, bad) = key.decrypt_salvage(&ct).unwrap();
        assert_eq!(bad.len(), 1, "{bad:?}");
        // Truncations at every length near a segment boundary never panic.
        let full = recipients.encrypt(&data);
        for cut in [1usize, 5, 15, 16, 17, 100, 65_552, 65_560] {
            let _ = key.decrypt_salvage(&full[..full.len() - cut]);
        }
        for (i, (a, b)) in plain.iter().zip(&data).enumerate() {
            if !bad[0].contains(&i) {
                assert_eq!(a, b, "byte {i} outside the damaged segment is recovered");
            }
        }
    }

    #[test]
    fn blob_ids_depend_on_the_repository_key() {
        let a = MasterKey::generate();
        let b = MasterKey::generate();
        assert_ne!(a.chunk().blob_id(b"same"), b.chunk().blob_id(b"same"));
        assert_eq!(a.chunk().blob_id(b"same"), a.chunk().blob_id(b"same"));
    }
}
