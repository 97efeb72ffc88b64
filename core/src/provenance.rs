//! Provenance: who wrote each object, and whether to believe it.
//!
//! A writer credential can put any bytes under `data/`, `index/` and
//! `snapshots/`, so in a format-3 repository nothing read from there is
//! believed for what it claims until its signature names a signer the
//! repository vouches for (ARCHITECTURE.md, "Write-only hosts"):
//!
//! - the *admin key* (derived from the master secret, its public half in the
//!   authenticated config) for what full-key hosts write;
//! - a *host key* the host registry (`hosts/`, entries signed by the admin
//!   key) records under a host name, for what a writer credential writes. A
//!   snapshot's `host` must equal its signer's registered name, so a stolen
//!   web1 credential can write web1's snapshots and never db1's;
//! - for the objects of a repository's format-2 days, which nobody signed,
//!   an *adoption record* (`adopt/`, admin-signed) written by `lifeboat
//!   upgrade` that lists the snapshots it adopted and the index objects it
//!   re-signed.
//!
//! Format 1 and 2 repositories have no signatures: everything in them is
//! believed as before (`Trust::Legacy`), and `lifeboat upgrade` moves them to
//! format 3.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::id::Id;
use crate::object::{ObjectKind, Rejected};
use crate::sign::PublicKey;

/// Who signed an object, as far as the repository can tell.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase", tag = "signer", content = "host")]
pub enum Signer {
    /// A host holding the full key (the admin key signed it).
    Admin,
    /// The writer credential of this registered host.
    Host(String),
}

impl std::fmt::Display for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Signer::Admin => f.write_str("the full key"),
            Signer::Host(h) => write!(f, "host {h}'s key"),
        }
    }
}

/// Why a snapshot is believed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotTrust {
    /// Signed by a full-key host or by its own host's registered key.
    Signed(Signer),
    /// Written before the repository's upgrade to format 3 and adopted by it.
    Adopted,
    /// A format-1 or -2 repository: nothing is signed there.
    Legacy,
}

/// What an index object's listings may be used for, by its signer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum IndexTrust {
    /// Written or checked by a full-key host (or any object of a format-2
    /// repository): a location every host may dedup against and prune may
    /// count as a copy.
    Vouched,
    /// Written by this host (the signer's registered name), or relayed by a
    /// full-key host from that host's own listing: it holds what it says
    /// for that host's own dedup, and is a place restore may look.
    Host(String),
    /// Signed by a key this writer credential cannot place (another host's):
    /// not for its dedup, and not a problem either.
    Foreign,
    /// An unsigned format-2 index object that `upgrade` re-signed: its
    /// listings are in signed objects now.
    Superseded,
    /// Unsigned, badly signed or signed by a stranger: used for nothing but
    /// keeping what it lists from prune, and reported by `check`.
    Untrusted(String),
}

/// The longest host name a registry entry may hold.
const MAX_HOST_NAME: usize = 253;

/// Checks a host name for the registry: 1 to 253 of `A-Z a-z 0-9 . _ -`.
pub fn check_host_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_HOST_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "host name {name:?} is not 1 to {MAX_HOST_NAME} letters, digits, dots, underscores or hyphens"
        ))
    }
}

/// A host registry entry (`hosts/<id>`, signed by the admin key): a host
/// name, and the public key its writer credential signs with. An entry
/// without a key records a host that wrote before format 3 (`upgrade`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostRecord {
    /// Entry format version (1).
    pub version: u32,
    /// The host's name, as its snapshots carry it.
    pub host: String,
    /// Its signing key's public half (hex), if it has a writer credential.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// When the entry was written (by the writing host's clock).
    pub created: chrono::DateTime<chrono::Utc>,
}

/// An adoption record (`adopt/<id>`, signed by the admin key): snapshots
/// of the repository's format-2 days that `upgrade` vouched for, and the
/// unsigned index objects whose listings it re-signed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdoptionRecord {
    /// Record format version (1).
    pub version: u32,
    /// Snapshot IDs adopted.
    #[serde(default)]
    pub snapshots: Vec<Id>,
    /// Unsigned index objects whose listings are now in signed ones.
    #[serde(default)]
    pub superseded_index: Vec<Id>,
}

/// One host as the registry knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RegisteredHost {
    /// Its public keys (hex): one per writer credential exported for it.
    pub keys: Vec<String>,
    /// When it was first registered.
    pub since: Option<chrono::DateTime<chrono::Utc>>,
}

/// What a full-key host has read of the registry and the adoption records.
#[derive(Debug, Default)]
pub struct TrustStore {
    /// Registered hosts by name.
    pub hosts: BTreeMap<String, RegisteredHost>,
    pub(crate) by_key: HashMap<PublicKey, String>,
    pub(crate) adopted: HashSet<Id>,
    pub(crate) superseded: HashSet<Id>,
    /// Registry entries and adoption records that failed verification.
    pub rejected: Vec<Rejected>,
}

impl TrustStore {
    /// Adds a verified registry entry. A key registered under two names
    /// speaks for neither (only an admin's mistake can cause it).
    pub(crate) fn add_host(&mut self, id: &Id, record: HostRecord) {
        let entry = self.hosts.entry(record.host.clone()).or_default();
        entry.since = Some(
            entry
                .since
                .map_or(record.created, |s| s.min(record.created)),
        );
        let Some(key) = record.key.as_deref() else {
            return;
        };
        let Some(public) = PublicKey::from_hex(key) else {
            self.rejected.push(Rejected {
                object: ObjectKind::Host.key(id),
                reason: "its key is not 64 hex digits".into(),
            });
            return;
        };
        if !entry.keys.iter().any(|k| k == key) {
            entry.keys.push(key.to_string());
        }
        match self.by_key.get(&public) {
            Some(other) if *other != record.host => {
                self.rejected.push(Rejected {
                    object: ObjectKind::Host.key(id),
                    reason: format!(
                        "its key is registered for both {other} and {}; it speaks for neither",
                        record.host
                    ),
                });
                self.by_key.insert(public, String::new());
            }
            _ => {
                self.by_key.insert(public, record.host);
            }
        }
    }

    /// Adds a verified adoption record.
    pub(crate) fn add_adoption(&mut self, record: AdoptionRecord) {
        self.adopted.extend(record.snapshots);
        self.superseded.extend(record.superseded_index);
    }

    /// The registered host a key speaks for.
    pub(crate) fn host_of(&self, key: &PublicKey) -> Option<&str> {
        self.by_key
            .get(key)
            .map(String::as_str)
            .filter(|h| !h.is_empty())
    }

    /// True when `upgrade` adopted the unsigned snapshot `id`.
    pub(crate) fn is_adopted(&self, id: &Id) -> bool {
        self.adopted.contains(id)
    }

    /// True when `upgrade` re-signed the listings of unsigned index object `id`.
    pub(crate) fn is_superseded(&self, id: &Id) -> bool {
        self.superseded.contains(id)
    }
}

/// The verdict on a snapshot of a format-3 repository, given its signer
/// (or why its signature failed) and whether `upgrade` adopted it.
pub(crate) fn judge_snapshot(
    claimed_host: &str,
    signer: Result<Option<Signer>, String>,
    adopted: bool,
) -> Result<SnapshotTrust, String> {
    match signer? {
        Some(Signer::Admin) => Ok(SnapshotTrust::Signed(Signer::Admin)),
        Some(Signer::Host(h)) if h == claimed_host => Ok(SnapshotTrust::Signed(Signer::Host(h))),
        Some(Signer::Host(h)) => Err(format!(
            "it claims host {claimed_host:?} but is signed by host {h}'s key: a host may write only its own snapshots"
        )),
        None if adopted => Ok(SnapshotTrust::Adopted),
        None => Err(
            "it is not signed (only snapshots from before `lifeboat upgrade`, which adopted them, may be)"
                .into(),
        ),
    }
}

/// The verdict on an index object of a format-3 repository whose JSON
/// names `origin` (a full-key host's relay of a host's listings), given its
/// signer (`None` for unsigned; `Err` for a signature that failed or a key
/// that `Foreign` explains).
pub(crate) fn judge_index(
    origin: Option<&str>,
    signer: Result<Option<Signer>, String>,
    superseded: bool,
    foreign: bool,
) -> IndexTrust {
    match (signer, origin) {
        (Err(_), _) if foreign => IndexTrust::Foreign,
        (Err(why), _) => IndexTrust::Untrusted(why),
        (Ok(Some(Signer::Admin)), None) => IndexTrust::Vouched,
        (Ok(Some(Signer::Admin)), Some(h)) => match check_host_name(h) {
            Ok(()) => IndexTrust::Host(h.to_string()),
            Err(e) => IndexTrust::Untrusted(e),
        },
        (Ok(Some(Signer::Host(h))), None) => IndexTrust::Host(h),
        (Ok(Some(Signer::Host(h))), Some(o)) if o == h => IndexTrust::Host(h),
        (Ok(Some(Signer::Host(h))), Some(o)) => IndexTrust::Untrusted(format!(
            "host {h} signed it but it relays host {o}'s listings, which only a full-key host may"
        )),
        (Ok(None), _) if superseded => IndexTrust::Superseded,
        (Ok(None), _) => IndexTrust::Untrusted("it is not signed".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_key_speaks_only_for_its_own_host_name() {
        let web1 = || Ok(Some(Signer::Host("web1".into())));
        assert_eq!(
            judge_snapshot("web1", web1(), false),
            Ok(SnapshotTrust::Signed(Signer::Host("web1".into())))
        );
        let err = judge_snapshot("db1", web1(), false).unwrap_err();
        assert!(err.contains("claims host \"db1\""), "{err}");
        assert_eq!(
            judge_snapshot("db1", Ok(Some(Signer::Admin)), false),
            Ok(SnapshotTrust::Signed(Signer::Admin)),
            "the full key may write for any host"
        );
        assert!(judge_snapshot("web1", Ok(None), false).is_err());
        assert_eq!(
            judge_snapshot("web1", Ok(None), true),
            Ok(SnapshotTrust::Adopted)
        );
        assert!(judge_snapshot("web1", Err("bad".into()), true).is_err());
    }

    #[test]
    fn only_a_full_key_host_may_relay_another_hosts_listings() {
        assert_eq!(
            judge_index(None, Ok(Some(Signer::Admin)), false, false),
            IndexTrust::Vouched
        );
        assert_eq!(
            judge_index(Some("web1"), Ok(Some(Signer::Admin)), false, false),
            IndexTrust::Host("web1".into())
        );
        assert!(matches!(
            judge_index(
                Some("db1"),
                Ok(Some(Signer::Host("web1".into()))),
                false,
                false
            ),
            IndexTrust::Untrusted(_)
        ));
        assert_eq!(
            judge_index(None, Ok(None), true, false),
            IndexTrust::Superseded
        );
        assert!(matches!(
            judge_index(None, Ok(None), false, false),
            IndexTrust::Untrusted(_)
        ));
        assert_eq!(
            judge_index(None, Err("x".into()), false, true),
            IndexTrust::Foreign
        );
    }

    #[test]
    fn a_key_registered_under_two_names_speaks_for_neither() {
        let key = crate::sign::SigningKey::generate().public();
        let mut store = TrustStore::default();
        let record = |host: &str| HostRecord {
            version: 1,
            host: host.into(),
            key: Some(key.to_hex()),
            created: chrono::Utc::now(),
        };
        store.add_host(&Id::of_bytes(b"1"), record("web1"));
        assert_eq!(store.host_of(&key), Some("web1"));
        store.add_host(&Id::of_bytes(b"2"), record("db1"));
        assert_eq!(store.host_of(&key), None);
        assert_eq!(store.rejected.len(), 1);
    }

    #[test]
    fn host_names_are_plain() {
        for good in ["web1", "db-1.example.com", "A_b"] {
            assert!(check_host_name(good).is_ok(), "{good}");
        }
        for bad in ["", "a/b", "a b", "ä", &"x".repeat(254)] {
            assert!(check_host_name(bad).is_err(), "{bad}");
        }
    }
}
