//! Listing snapshots as a full-key host believes them, and choosing one.
//!
//! Every snapshot object is read (bounded in size, in parallel) and judged
//! (`provenance`): what verifies is listed, what does not is reported by
//! name and skipped, so one bad object never stops a listing, a restore by
//! ID, `forget`, `prune` or a drill. A snapshot dated after its own object's
//! upload time (the store's clock) plus [`FUTURE_MARGIN`] is listed but
//! flagged: it is never `latest` and never counts in a retention decision,
//! so a forged date cannot push real snapshots out of `--keep-daily` slots.
//!
//! `latest` and every selector take a host, paths and tags (as restic's
//! do): drills and the agent always select within the host and source they
//! mean, never the repository-wide newest.

use crate::error::{Error, Result};
use crate::id::Id;
use crate::object::{ObjectKind, Rejected};
use crate::provenance::SnapshotTrust;
use crate::repo::Repository;
use crate::tree::Snapshot;

/// How far a snapshot's time may lie after its object's upload time (by
/// the store's clock) before it counts as dated in the future. Backups
/// record their start, so an honest snapshot's time is before its upload,
/// by as long as the backup ran, give or take its host's clock error.
pub const FUTURE_MARGIN: chrono::TimeDelta = chrono::TimeDelta::hours(1);

/// One snapshot that verified.
#[derive(Debug, Clone)]
pub struct Listed {
    /// Its ID.
    pub id: Id,
    /// What it records.
    pub snapshot: Snapshot,
    /// Why it is believed.
    pub trust: SnapshotTrust,
    /// When the store says its object was written.
    pub written: chrono::DateTime<chrono::Utc>,
    /// Its time is after `written` plus [`FUTURE_MARGIN`]: never `latest`,
    /// never in a retention decision.
    pub future: bool,
}

/// Every snapshot of a repository, as far as it can be believed.
#[derive(Debug, Clone, Default)]
pub struct SnapshotList {
    /// Snapshots that verified, oldest first.
    pub snapshots: Vec<Listed>,
    /// Objects under `snapshots/` that did not (unreadable, unsigned, or
    /// signed by a host other than the one they claim).
    pub rejected: Vec<Rejected>,
    /// Root trees of rejected snapshots that could be read: prune still
    /// keeps what they reference (reading them is never a reason to
    /// delete), but nothing else uses them.
    pub(crate) untrusted_trees: Vec<Id>,
}

/// Which snapshots a command means: all of them, or those of one host,
/// with these paths and tags.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    /// Only this host's.
    pub host: Option<String>,
    /// Only snapshots whose paths include every one of these.
    pub paths: Vec<String>,
    /// Only snapshots carrying every one of these tags.
    pub tags: Vec<String>,
}

impl Selector {
    /// Snapshots of `host`.
    pub fn host(host: &str) -> Selector {
        Selector {
            host: Some(host.to_string()),
            ..Selector::default()
        }
    }

    /// True when `s` is one of the selected snapshots.
    pub fn matches(&self, s: &Snapshot) -> bool {
        self.host.as_ref().is_none_or(|h| &s.host == h)
            && self.paths.iter().all(|p| {
                let p = p.trim_end_matches('/');
                s.paths
                    .iter()
                    .any(|sp| sp == p || (p.is_empty() && sp == "/"))
            })
            && self.tags.iter().all(|t| s.tags.contains(t))
    }
}

impl SnapshotList {
    /// How many snapshots verified.
    pub fn len(&self) -> usize {
        self.snapshots.len()
    }

    /// True when none verified.
    pub fn is_empty(&self) -> bool {
        self.snapshots.is_empty()
    }

    /// The verified snapshots as (ID, snapshot) pairs, oldest first.
    pub fn pairs(&self) -> Vec<(Id, Snapshot)> {
        self.snapshots
            .iter()
            .map(|l| (l.id, l.snapshot.clone()))
            .collect()
    }

    /// The verified snapshots `sel` selects, oldest first.
    pub fn select<'a>(&'a self, sel: &'a Selector) -> impl DoubleEndedIterator<Item = &'a Listed> {
        self.snapshots
            .iter()
            .filter(move |l| sel.matches(&l.snapshot))
    }

    /// The newest selected snapshot not dated in the future.
    pub fn latest(&self, sel: &Selector) -> Option<&Listed> {
        self.snapshots
            .iter()
            .rfind(|l| !l.future && sel.matches(&l.snapshot))
    }

    /// Resolves `latest` (within `sel`) or a unique ID prefix. An ID that
    /// names an object which did not verify is refused with the reason.
    pub fn find(&self, spec: &str, sel: &Selector) -> Result<&Listed> {
        if spec == "latest" {
            return self.latest(sel).ok_or_else(|| {
                let future = self.select(sel).filter(|l| l.future).count();
                if future > 0 {
                    Error::Invalid(format!(
                        "no snapshot matches \"latest\": the {future} selected ones are dated in the future by the store's clock, so none is taken as latest; give a snapshot ID to restore one of them"
                    ))
                } else {
                    Error::SnapshotNotFound(spec.to_string())
                }
            });
        }
        let spec_lc = spec.to_ascii_lowercase();
        if spec_lc.is_empty() {
            return Err(Error::SnapshotNotFound(spec.to_string()));
        }
        let mut matching = self
            .snapshots
            .iter()
            .filter(|l| l.id.to_hex().starts_with(&spec_lc));
        let rejected = self.rejected.iter().find(|r| {
            r.object
                .strip_prefix("snapshots/")
                .is_some_and(|id| id.starts_with(&spec_lc))
        });
        match (matching.next(), matching.next(), rejected) {
            (Some(found), None, None) => Ok(found),
            (None, None, Some(r)) => Err(Error::Untrusted {
                object: r.object.clone(),
                reason: r.reason.clone(),
            }),
            (None, None, None) => Err(Error::SnapshotNotFound(spec.to_string())),
            _ => Err(Error::AmbiguousSnapshot(spec.to_string())),
        }
    }

    /// One line per problem worth telling the user: rejected objects and
    /// snapshots dated in the future.
    pub fn warnings(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .rejected
            .iter()
            .map(|r| format!("{r}; it is skipped"))
            .collect();
        for l in self.snapshots.iter().filter(|l| l.future) {
            out.push(format!(
                "snapshot {} of host {} is dated {}, after the store received it ({}): it is never taken as latest and retention leaves it alone",
                l.id.short(),
                l.snapshot.host,
                l.snapshot.time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                l.written.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ));
        }
        out
    }
}

impl Repository {
    /// Reads and judges every snapshot (full key only): see the module docs.
    pub fn snapshots(&self) -> Result<SnapshotList> {
        self.require_full_key("reading snapshots")?;
        let listed = self.list_objects(ObjectKind::Snapshot)?;
        // The registry is read before the parallel part, so its errors stop
        // the listing rather than rejecting every host's snapshots.
        let trust = self.trust()?;
        let judged = crate::parallel::map(
            listed,
            crate::parallel::io_threads(self.backend()),
            |(id, info)| {
                (
                    id,
                    info.modified,
                    self.judge_snapshot_object(&id, info.size, &trust),
                )
            },
        );
        let mut list = SnapshotList::default();
        for (id, modified, verdict) in judged {
            match verdict {
                Ok((snapshot, trust)) => {
                    let written: chrono::DateTime<chrono::Utc> = modified.into();
                    list.snapshots.push(Listed {
                        future: snapshot.time > written + FUTURE_MARGIN,
                        id,
                        snapshot,
                        trust,
                        written,
                    });
                }
                Err((reason, tree)) => {
                    list.untrusted_trees.extend(tree);
                    list.rejected.push(Rejected {
                        object: ObjectKind::Snapshot.key(&id),
                        reason,
                    });
                }
            }
        }
        list.snapshots
            .sort_by(|a, b| a.snapshot.time.cmp(&b.snapshot.time).then(a.id.cmp(&b.id)));
        list.rejected.sort_by(|a, b| a.object.cmp(&b.object));
        Ok(list)
    }

    /// Resolves `latest` (within `sel`) or an ID prefix to a verified
    /// snapshot; see [`SnapshotList::find`].
    pub fn find_snapshot(&self, spec: &str, sel: &Selector) -> Result<(Id, Snapshot)> {
        let list = self.snapshots()?;
        for w in list.warnings() {
            log::warn!("{w}");
        }
        list.find(spec, sel).map(|l| (l.id, l.snapshot.clone()))
    }

    /// Reads one snapshot object and judges it: the snapshot and why it is
    /// believed, or why not (with its root tree when it could be read).
    fn judge_snapshot_object(
        &self,
        id: &Id,
        size: u64,
        trust: &crate::provenance::TrustStore,
    ) -> std::result::Result<(Snapshot, SnapshotTrust), (String, Option<Id>)> {
        let raw = self
            .read_object(ObjectKind::Snapshot, id, Some(size))
            .map_err(|e| (e.to_string(), None))?;
        let snapshot: Snapshot = raw.parse().map_err(|e| (e.to_string(), None))?;
        if self.config().version < 3 {
            return Ok((snapshot, SnapshotTrust::Legacy));
        }
        match crate::provenance::judge_snapshot(
            &snapshot.host,
            self.signer_of(&raw),
            trust.is_adopted(id),
        ) {
            Ok(t) => Ok((snapshot, t)),
            Err(why) => Err((why, Some(snapshot.tree))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(id: u8, host: &str, minutes: i64, future: bool) -> Listed {
        let time = chrono::DateTime::from_timestamp(1_700_000_000 + minutes * 60, 0).unwrap();
        Listed {
            id: Id([id; 32]),
            snapshot: Snapshot {
                version: 1,
                time,
                host: host.into(),
                user: "u".into(),
                paths: vec!["/srv".into()],
                tags: vec!["source:files".into()],
                tree: Id::default(),
                incomplete: false,
                summary: Default::default(),
                program: "t".into(),
                locked_until: None,
            },
            trust: SnapshotTrust::Legacy,
            written: time,
            future,
        }
    }

    #[test]
    fn latest_is_the_newest_of_the_selection_and_never_a_future_one() {
        let list = SnapshotList {
            snapshots: vec![
                listed(1, "db1", 0, false),
                listed(2, "web1", 10, false),
                listed(3, "db1", 20, false),
                listed(4, "db1", 30, true),
            ],
            ..SnapshotList::default()
        };
        assert_eq!(list.latest(&Selector::default()).unwrap().id, Id([3; 32]));
        assert_eq!(
            list.latest(&Selector::host("web1")).unwrap().id,
            Id([2; 32])
        );
        let paths = Selector {
            paths: vec!["/srv/".into()],
            ..Selector::default()
        };
        assert_eq!(list.latest(&paths).unwrap().id, Id([3; 32]));
        let other = Selector {
            paths: vec!["/etc".into()],
            ..Selector::default()
        };
        assert!(list.find("latest", &other).is_err());
        assert_eq!(
            list.find(&Id([4; 32]).to_hex()[..8], &Selector::default())
                .unwrap()
                .id,
            Id([4; 32]),
            "a future-dated snapshot is still found by its ID"
        );
    }

    #[test]
    fn an_id_of_a_rejected_object_is_refused_with_its_reason() {
        let list = SnapshotList {
            snapshots: vec![listed(1, "db1", 0, false)],
            rejected: vec![Rejected {
                object: ObjectKind::Snapshot.key(&Id([9; 32])),
                reason: "it is not signed".into(),
            }],
            untrusted_trees: vec![],
        };
        let err = list.find("0909", &Selector::default()).unwrap_err();
        assert!(
            matches!(&err, Error::Untrusted { reason, .. } if reason == "it is not signed"),
            "{err}"
        );
        assert!(list.find("0101", &Selector::default()).is_ok());
    }
}
