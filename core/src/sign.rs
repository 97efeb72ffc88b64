//! Signatures on repository objects: who wrote a snapshot, an index object,
//! a prune plan, a drill report or a host registry entry.
//!
//! Encryption to the repository's public recipients says nothing about the
//! writer: every writer credential holds those recipients. So since format 3
//! each object a host writes carries an Ed25519 signature (ring's, already
//! built for TLS) by the host's own key, and objects written with the full
//! key are signed by the *admin key*, derived from the master secret's MAC
//! key, whose public half the authenticated config records.
//!
//! The signature travels in front of the object's zstd frame as a zstd
//! *skippable* frame, so `age -d … | zstd -d | jq .` (the emergency path)
//! still prints the JSON, and a format-2 reader that meets a signed object
//! decodes it as before:
//!
//! ```text
//! 0x184D2A51 u32le(101) "LBSG" 0x01 signer-public-key[32] signature[64] | zstd(JSON)
//! ```
//!
//! The signed message is a BLAKE3 digest (in derive-key mode, so it can
//! never collide with another use of the hash) of the object kind, the
//! repository ID and the JSON: a signature cannot be moved to another kind
//! of object (an index object passed off as a plan) or to another
//! repository.

use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};

/// The skippable-frame magic of a signature frame (the pack header uses
/// 0x184D2A50; zstd reserves 0x184D2A50..=0x184D2A5F).
const SIGNATURE_MAGIC: u32 = 0x184D_2A51;
/// What a signature frame's content starts with.
const SIGNATURE_TAG: &[u8; 4] = b"LBSG";
/// Bytes of a signature frame's content: tag, version, key, signature.
const CONTENT: usize = 4 + 1 + 32 + 64;
/// Bytes of a whole signature frame.
pub(crate) const FRAME: usize = 8 + CONTENT;
/// The derive-key context of the signed digest.
const DIGEST_CONTEXT: &str = "lifeboat 2026-12 signed repository object v1";
/// The derive-key context of the admin key's seed (from the MAC key).
const ADMIN_SEED_CONTEXT: &str = "lifeboat 2026-12 admin signing key v1";

/// An Ed25519 public key, as 32 bytes (hex in JSON and configs).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({})", &self.to_hex()[..16])
    }
}

impl PublicKey {
    /// Lowercase hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<PublicKey> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(PublicKey(out))
    }

    /// True when `signature` is this key's signature of `digest`.
    fn verifies(&self, digest: &[u8; 32], signature: &[u8; 64]) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.0)
            .verify(digest, signature)
            .is_ok()
    }
}

/// A private Ed25519 key that signs objects: a host's (from its writer
/// credential) or the admin key (derived from the master secret).
pub struct SigningKey {
    seed: [u8; 32],
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({:?})", self.public())
    }
}

impl Clone for SigningKey {
    fn clone(&self) -> Self {
        SigningKey::from_seed(self.seed)
    }
}

impl SigningKey {
    /// The key of a 32-byte seed.
    pub fn from_seed(seed: [u8; 32]) -> SigningKey {
        let pair = Ed25519KeyPair::from_seed_unchecked(&seed).expect("any 32 bytes are a seed");
        SigningKey { seed, pair }
    }

    /// A new random key (a host's, made by `key export-writer`).
    pub fn generate() -> SigningKey {
        SigningKey::from_seed(rand::random())
    }

    /// The admin key of a repository whose master secret holds `mac_key`.
    pub fn admin(mac_key: &[u8; 32]) -> SigningKey {
        SigningKey::from_seed(blake3::derive_key(ADMIN_SEED_CONTEXT, mac_key))
    }

    /// The seed (what a writer credential stores).
    pub fn seed(&self) -> &[u8; 32] {
        &self.seed
    }

    /// The public half.
    pub fn public(&self) -> PublicKey {
        let bytes: [u8; 32] = self
            .pair
            .public_key()
            .as_ref()
            .try_into()
            .expect("Ed25519 public keys are 32 bytes");
        PublicKey(bytes)
    }

    /// The signature frame for the JSON `json` of an object of `kind` in
    /// repository `repo_id`.
    pub fn frame(&self, kind: &str, repo_id: &str, json: &[u8]) -> [u8; FRAME] {
        let digest = digest(kind, repo_id, json);
        let signature = self.pair.sign(&digest);
        let mut out = [0u8; FRAME];
        out[..4].copy_from_slice(&SIGNATURE_MAGIC.to_le_bytes());
        out[4..8].copy_from_slice(&(CONTENT as u32).to_le_bytes());
        out[8..12].copy_from_slice(SIGNATURE_TAG);
        out[12] = 1;
        out[13..45].copy_from_slice(&self.public().0);
        out[45..].copy_from_slice(signature.as_ref());
        out
    }
}

/// A signature frame as read from an object, not yet checked.
#[derive(Debug, Clone, Copy)]
pub struct Signature {
    /// The key that claims to have signed.
    pub signer: PublicKey,
    bytes: [u8; 64],
}

impl Signature {
    /// True when this is a valid signature of the JSON `json` of an object
    /// of `kind` in repository `repo_id` by `self.signer`.
    pub fn verifies(&self, kind: &str, repo_id: &str, json: &[u8]) -> bool {
        self.signer
            .verifies(&digest(kind, repo_id, json), &self.bytes)
    }
}

/// Splits an object's plaintext into its signature frame, if it starts
/// with one, and the rest (the zstd frame). A frame that starts like a
/// signature frame but is malformed is an error.
pub fn split(plain: &[u8]) -> Result<(Option<Signature>, &[u8]), String> {
    if plain.len() < 4 || plain[..4] != SIGNATURE_MAGIC.to_le_bytes() {
        return Ok((None, plain));
    }
    if plain.len() < FRAME
        || plain[4..8] != (CONTENT as u32).to_le_bytes()
        || &plain[8..12] != SIGNATURE_TAG
        || plain[12] != 1
    {
        return Err("its signature frame is malformed or of an unknown version".into());
    }
    let signer = PublicKey(plain[13..45].try_into().expect("32 bytes"));
    let bytes = plain[45..FRAME].try_into().expect("64 bytes");
    Ok((Some(Signature { signer, bytes }), &plain[FRAME..]))
}

fn digest(kind: &str, repo_id: &str, json: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key(DIGEST_CONTEXT);
    h.update(&(kind.len() as u64).to_le_bytes());
    h.update(kind.as_bytes());
    h.update(&(repo_id.len() as u64).to_le_bytes());
    h.update(repo_id.as_bytes());
    h.update(json);
    *h.finalize().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_only_for_its_kind_repository_and_bytes() {
        let key = SigningKey::generate();
        let frame = key.frame("snapshot", "repo1", b"{\"a\":1}");
        let mut plain = frame.to_vec();
        plain.extend_from_slice(b"rest");
        let (sig, rest) = split(&plain).unwrap();
        let sig = sig.unwrap();
        assert_eq!(rest, b"rest");
        assert_eq!(sig.signer, key.public());
        assert!(sig.verifies("snapshot", "repo1", b"{\"a\":1}"));
        assert!(!sig.verifies("index", "repo1", b"{\"a\":1}"));
        assert!(!sig.verifies("snapshot", "repo2", b"{\"a\":1}"));
        assert!(!sig.verifies("snapshot", "repo1", b"{\"a\":2}"));
        // Another key's claim to the same signature fails.
        let mut forged = plain.clone();
        forged[13..45].copy_from_slice(&SigningKey::generate().public().0);
        let (sig, _) = split(&forged).unwrap();
        assert!(!sig.unwrap().verifies("snapshot", "repo1", b"{\"a\":1}"));
    }

    #[test]
    fn unsigned_and_malformed_frames_are_told_apart() {
        assert!(split(b"\x28\xb5\x2f\xfdzstd").unwrap().0.is_none());
        assert!(split(b"").unwrap().0.is_none());
        let mut short = SIGNATURE_MAGIC.to_le_bytes().to_vec();
        short.extend_from_slice(&[0; 20]);
        assert!(split(&short).is_err());
    }

    #[test]
    fn the_admin_key_is_a_function_of_the_mac_key() {
        let a = SigningKey::admin(&[7; 32]);
        assert_eq!(a.public(), SigningKey::admin(&[7; 32]).public());
        assert_ne!(a.public(), SigningKey::admin(&[8; 32]).public());
        assert_eq!(
            SigningKey::from_seed(*a.seed()).public(),
            a.public(),
            "a seed round-trips"
        );
    }
}
