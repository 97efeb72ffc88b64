//! Retention policy: the pure decision logic behind `lifeboat forget`.
//!
//! Given snapshot metadata and a set of keep rules, this module decides which
//! snapshots to keep and which to remove, and records a human-readable reason
//! for every kept snapshot. It follows restic's `forget` policy closely
//! (keep-last, keep-hourly/daily/weekly/monthly/yearly, keep-within and
//! keep-tag, judged separately per host+paths group) so that users moving from
//! restic get the same answers. It touches no repository and reads no clock:
//! callers pass the snapshots, the current time and the time zone in, which
//! keeps the logic deterministic and easy to test before anything is deleted.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use chrono::{DateTime, Datelike, Duration, NaiveDateTime, TimeZone, Timelike, Utc};

/// One snapshot as retention sees it.
#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    /// The snapshot's identifier, used for tie-breaking and reporting.
    pub id: String,
    /// When the snapshot was taken.
    pub time: DateTime<Utc>,
    /// The host the snapshot was taken on.
    pub host: String,
    /// The paths that were backed up, in any order.
    pub paths: Vec<String>,
    /// The snapshot's tags, in any order.
    pub tags: Vec<String>,
    /// End of the snapshot's Object Lock retention: until then it is kept
    /// whatever the rules say (the store would refuse to delete it).
    pub locked_until: Option<DateTime<Utc>>,
}

/// Keep rules. All `None`/empty means "no rules" (see [`apply_policy`]).
#[derive(Debug, Clone, Default)]
pub struct KeepPolicy {
    /// Keep the N newest snapshots.
    pub last: Option<u32>,
    /// Keep the newest snapshot of each of the N newest hours.
    pub hourly: Option<u32>,
    /// Keep the newest snapshot of each of the N newest days.
    pub daily: Option<u32>,
    /// Keep the newest snapshot of each of the N newest ISO weeks.
    pub weekly: Option<u32>,
    /// Keep the newest snapshot of each of the N newest months.
    pub monthly: Option<u32>,
    /// Keep the newest snapshot of each of the N newest years.
    pub yearly: Option<u32>,
    /// Keep every snapshot taken within this span before the group's newest.
    pub within: Option<Duration>,
    /// Keep every snapshot carrying any of these tags.
    pub tags: Vec<String>,
}

impl KeepPolicy {
    /// Returns true when no rule could keep anything.
    ///
    /// Like restic, a count of zero, a non-positive `within` and empty tag
    /// names count as absent, so `--keep-last 0` cannot slip past the guard
    /// against forgetting every snapshot.
    pub fn is_empty(&self) -> bool {
        let counts = [
            self.last,
            self.hourly,
            self.daily,
            self.weekly,
            self.monthly,
            self.yearly,
        ];
        counts.iter().all(|c| c.unwrap_or(0) == 0)
            && self.within.is_none_or(|d| d <= Duration::zero())
            && self.tags.iter().all(|t| t.is_empty())
    }
}

/// How snapshots are grouped before rules apply (each group is judged on its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GroupBy {
    /// Separate snapshots by host.
    pub host: bool,
    /// Separate snapshots by their (sorted) path list.
    pub paths: bool,
    /// Separate snapshots by their (sorted) tag list.
    pub tags: bool,
}

impl GroupBy {
    /// Groups by host and paths, restic's default and the CLI's default.
    pub const fn host_and_paths() -> Self {
        Self {
            host: true,
            paths: true,
            tags: false,
        }
    }
}

/// The verdict on one snapshot.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Decision {
    /// The snapshot's identifier.
    pub id: String,
    /// When the snapshot was taken, serialised as RFC 3339.
    #[serde(serialize_with = "serialize_rfc3339")]
    pub time: DateTime<Utc>,
    /// True when at least one rule keeps the snapshot.
    pub keep: bool,
    /// Every rule that keeps the snapshot, such as "daily snapshot".
    pub reasons: Vec<String>,
}

/// The verdicts for one group; key fields are `None` when not grouped on.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GroupDecision {
    /// The group's host, when grouping by host.
    pub host: Option<String>,
    /// The group's sorted paths, when grouping by paths.
    pub paths: Option<Vec<String>>,
    /// The group's sorted tags, when grouping by tags.
    pub tags: Option<Vec<String>>,
    /// One decision per snapshot in the group, newest first.
    pub decisions: Vec<Decision>,
}

/// Errors from retention policy evaluation and parsing.
#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    /// The policy has no rule, so applying it would remove every snapshot.
    #[error("no keep rule given; refusing to forget every snapshot (give --keep-last, --keep-daily, ...)")]
    EmptyPolicy,
    /// A `--keep-within` duration could not be parsed.
    #[error("invalid duration {input:?}: {reason}")]
    BadDuration {
        /// The text as given.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Parses a restic-style duration such as `2y5m7d3h`.
///
/// Units are `y` (365 days), `m` (30 days, months not minutes, as in restic),
/// `d` (days) and `h` (hours). Restic adds years and months on the calendar;
/// a fixed-length approximation keeps `within` a plain [`Duration`] and is off
/// by at most a few days per year, which is acceptable for retention.
pub fn parse_within(s: &str) -> Result<Duration, RetentionError> {
    let bad = |reason: String| RetentionError::BadDuration {
        input: s.to_string(),
        reason,
    };
    if s.is_empty() {
        return Err(bad("empty duration (expected e.g. 7d, 12h or 1y6m)".into()));
    }
    let overflow = || bad("duration is too large".into());
    let mut total_hours: i64 = 0;
    let mut number: Option<i64> = None;
    for c in s.chars() {
        if let Some(digit) = c.to_digit(10) {
            let n = number.unwrap_or(0);
            let n = n
                .checked_mul(10)
                .and_then(|n| n.checked_add(i64::from(digit)))
                .ok_or_else(overflow)?;
            number = Some(n);
            continue;
        }
        let hours_per_unit = match c {
            'y' => 365 * 24,
            'm' => 30 * 24,
            'd' => 24,
            'h' => 1,
            _ => return Err(bad(format!("unknown unit {c:?} (use y, m, d or h)"))),
        };
        let n = number
            .take()
            .ok_or_else(|| bad(format!("unit {c:?} has no number before it")))?;
        total_hours = n
            .checked_mul(hours_per_unit)
            .and_then(|h| total_hours.checked_add(h))
            .ok_or_else(overflow)?;
    }
    if let Some(n) = number {
        return Err(bad(format!("number {n} has no unit (use y, m, d or h)")));
    }
    Duration::try_hours(total_hours).ok_or_else(overflow)
}

/// Decides, per group, which snapshots the policy keeps.
///
/// Groups come back sorted by host, paths and tags; decisions within a group
/// come newest first, ties broken by id. `tz` decides where hour, day, week,
/// month and year boundaries fall. `within` is measured from `now` (restic
/// measures it from each group's newest snapshot, which a snapshot dated in
/// the future could move: callers leave such snapshots out, and `within`
/// counting from now keeps them from mattering even if they did not).
/// Locks are judged by `now` too.
///
/// Bucket rules follow restic's classic walk. Restic 0.16 and later (PR #4366)
/// also keep a group's oldest snapshot while a rule still has unused buckets;
/// that refinement is deliberately left out for now and would be a local
/// change in `decide_group`.
pub fn apply_policy<Tz: TimeZone>(
    snapshots: &[SnapshotInfo],
    policy: &KeepPolicy,
    group_by: GroupBy,
    now: DateTime<Utc>,
    tz: &Tz,
) -> Result<Vec<GroupDecision>, RetentionError> {
    if policy.is_empty() {
        return Err(RetentionError::EmptyPolicy);
    }
    let mut groups: BTreeMap<GroupKey, Vec<&SnapshotInfo>> = BTreeMap::new();
    for snap in snapshots {
        groups
            .entry(GroupKey::of(snap, group_by))
            .or_default()
            .push(snap);
    }
    Ok(groups
        .into_iter()
        .map(|(key, members)| decide_group(key, members, policy, now, tz))
        .collect())
}

/// A group's identity; the derived ordering sorts by host, then paths, then tags.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct GroupKey {
    host: Option<String>,
    paths: Option<Vec<String>>,
    tags: Option<Vec<String>>,
}

impl GroupKey {
    fn of(snap: &SnapshotInfo, group_by: GroupBy) -> Self {
        // Lists are sorted so that the same set in a different order lands in
        // the same group, as in restic.
        let sorted = |list: &[String]| {
            let mut list = list.to_vec();
            list.sort();
            list
        };
        Self {
            host: group_by.host.then(|| snap.host.clone()),
            paths: group_by.paths.then(|| sorted(&snap.paths)),
            tags: group_by.tags.then(|| sorted(&snap.tags)),
        }
    }
}

/// Maps a local time to its bucket (hour, day, ISO week, month or year).
type BucketKeyFn = fn(&NaiveDateTime) -> i64;

/// A "one per time bucket" rule and its progress through the group.
struct BucketRule {
    remaining: u32,
    reason: &'static str,
    key: BucketKeyFn,
    last_key: Option<i64>,
}

/// Judges one group: sorts it newest first, then asks every rule about every snapshot.
fn decide_group<Tz: TimeZone>(
    key: GroupKey,
    mut members: Vec<&SnapshotInfo>,
    policy: &KeepPolicy,
    now: DateTime<Utc>,
    tz: &Tz,
) -> GroupDecision {
    members.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| a.id.cmp(&b.id)));
    let table: [(Option<u32>, &'static str, BucketKeyFn); 5] = [
        (policy.hourly, "hourly snapshot", hour_key),
        (policy.daily, "daily snapshot", day_key),
        (policy.weekly, "weekly snapshot", week_key),
        (policy.monthly, "monthly snapshot", month_key),
        (policy.yearly, "yearly snapshot", year_key),
    ];
    let mut rules: Vec<BucketRule> = table
        .into_iter()
        .filter_map(|(count, reason, key)| {
            count.filter(|&n| n > 0).map(|remaining| BucketRule {
                remaining,
                reason,
                key,
                last_key: None,
            })
        })
        .collect();
    // Counted from now, not from the group's newest snapshot: a snapshot
    // dated in the future (a forgery, or a clock far ahead) must not move
    // the window. A cutoff that underflows the calendar keeps everything.
    let within = match policy.within {
        Some(d) if d > Duration::zero() => Some((
            now.checked_sub_signed(d)
                .unwrap_or(DateTime::<Utc>::MIN_UTC),
            format!("within {}", format_duration(d)),
        )),
        _ => None,
    };
    let keep_last = policy
        .last
        .map_or(0, |n| usize::try_from(n).unwrap_or(usize::MAX));

    let mut decisions = Vec::with_capacity(members.len());
    for (index, snap) in members.iter().enumerate() {
        let mut reasons = Vec::new();
        if index < keep_last {
            reasons.push("last snapshot".to_string());
        }
        let local = snap.time.with_timezone(tz).naive_local();
        for rule in rules.iter_mut().filter(|r| r.remaining > 0) {
            // Each rule remembers only its own last kept bucket, so rules do
            // not interfere with one another, matching restic.
            let bucket = (rule.key)(&local);
            if rule.last_key != Some(bucket) {
                rule.last_key = Some(bucket);
                rule.remaining -= 1;
                reasons.push(rule.reason.to_string());
            }
        }
        if let Some((_, reason)) = within.as_ref().filter(|(cutoff, _)| snap.time >= *cutoff) {
            reasons.push(reason.clone());
        }
        for tag in policy.tags.iter().filter(|t| !t.is_empty()) {
            if snap.tags.contains(tag) {
                reasons.push(format!("tag {tag}"));
            }
        }
        if let Some(until) = snap.locked_until.filter(|u| *u > now) {
            reasons.push(format!(
                "locked until {}",
                until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ));
        }
        decisions.push(Decision {
            id: snap.id.clone(),
            time: snap.time,
            keep: !reasons.is_empty(),
            reasons,
        });
    }
    GroupDecision {
        host: key.host,
        paths: key.paths,
        tags: key.tags,
        decisions,
    }
}

// Bucket keys pack the local calendar fields into one integer, as restic does;
// the lower fields are bounded, so distinct buckets never collide.
fn hour_key(t: &NaiveDateTime) -> i64 {
    day_key(t) * 100 + i64::from(t.hour())
}

fn day_key(t: &NaiveDateTime) -> i64 {
    month_key(t) * 100 + i64::from(t.day())
}

fn week_key(t: &NaiveDateTime) -> i64 {
    // The ISO week year, not the calendar year, so the days around New Year
    // that belong to the same ISO week share a bucket.
    let week = t.iso_week();
    i64::from(week.year()) * 100 + i64::from(week.week())
}

fn month_key(t: &NaiveDateTime) -> i64 {
    year_key(t) * 100 + i64::from(t.month())
}

fn year_key(t: &NaiveDateTime) -> i64 {
    i64::from(t.year())
}

/// Renders a positive duration compactly, e.g. `7d` or `1d12h`.
fn format_duration(d: Duration) -> String {
    let secs = d.num_seconds();
    let parts = [
        (secs / 86_400, "d"),
        (secs % 86_400 / 3_600, "h"),
        (secs % 3_600 / 60, "min"),
        (secs % 60, "s"),
    ];
    let mut out = String::new();
    for (n, unit) in parts.into_iter().filter(|(n, _)| *n != 0) {
        // Writing to a String cannot fail.
        let _ = write!(out, "{n}{unit}");
    }
    if out.is_empty() {
        out.push_str("0s");
    }
    out
}

fn serialize_rfc3339<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::FixedOffset;
    use proptest::prelude::*;

    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
    }

    fn snap(id: &str, time: DateTime<Utc>) -> SnapshotInfo {
        SnapshotInfo {
            id: id.into(),
            time,
            host: "h1".into(),
            paths: vec!["/data".into()],
            tags: vec![],
            locked_until: None,
        }
    }

    fn row(id: &str, reasons: &[&str]) -> (String, Vec<String>) {
        (id.into(), reasons.iter().map(|r| r.to_string()).collect())
    }

    fn rules(set: impl FnOnce(&mut KeepPolicy)) -> KeepPolicy {
        let mut policy = KeepPolicy::default();
        set(&mut policy);
        policy
    }

    /// Runs the policy grouped by host+paths and lists (id, reasons) of every snapshot.
    fn run<Tz: TimeZone>(
        snaps: &[SnapshotInfo],
        policy: &KeepPolicy,
        tz: &Tz,
    ) -> Vec<(String, Vec<String>)> {
        let groups =
            apply_policy(snaps, policy, GroupBy::host_and_paths(), Utc::now(), tz).unwrap();
        let decisions = groups.into_iter().flat_map(|g| g.decisions);
        decisions.map(|d| (d.id, d.reasons)).collect()
    }

    fn kept<Tz: TimeZone>(snaps: &[SnapshotInfo], policy: &KeepPolicy, tz: &Tz) -> Vec<String> {
        let all = run(snaps, policy, tz).into_iter();
        all.filter(|(_, reasons)| !reasons.is_empty())
            .map(|(id, _)| id)
            .collect()
    }

    #[test]
    fn a_snapshot_under_object_lock_is_kept_whatever_the_rules_say_until_its_lock_ends() {
        let now = at(2024, 6, 1, 0, 0);
        let mut locked = snap("locked", at(2024, 5, 30, 0, 0));
        locked.locked_until = Some(at(2024, 6, 20, 0, 0));
        let mut expired = snap("expired", at(2024, 5, 1, 0, 0));
        expired.locked_until = Some(at(2024, 5, 20, 0, 0));
        let snaps = [snap("newest", at(2024, 5, 31, 0, 0)), locked, expired];
        let policy = rules(|p| p.last = Some(1));
        let groups = apply_policy(&snaps, &policy, GroupBy::host_and_paths(), now, &Utc).unwrap();
        let reasons: Vec<(String, Vec<String>)> = groups
            .into_iter()
            .flat_map(|g| g.decisions)
            .map(|d| (d.id, d.reasons))
            .collect();
        assert_eq!(
            reasons,
            [
                row("newest", &["last snapshot"]),
                row("locked", &["locked until 2024-06-20T00:00:00Z"]),
                row("expired", &[]),
            ]
        );
    }

    #[test]
    fn keep_last_keeps_the_newest_n_with_ids_breaking_ties() {
        let snaps = [
            snap("a", at(2024, 1, 1, 0, 0)),
            snap("c", at(2024, 1, 3, 0, 0)),
            snap("b", at(2024, 1, 3, 0, 0)),
            snap("d", at(2024, 1, 2, 0, 0)),
        ];
        let policy = rules(|p| p.last = Some(2));
        assert_eq!(kept(&snaps, &policy, &Utc), ["b", "c"]);
        assert_eq!(run(&snaps, &policy, &Utc)[0].1, ["last snapshot"]);
    }

    #[test]
    fn daily_buckets_follow_the_given_time_zone_across_midnight() {
        // 18:30 and 19:30 UTC are 23:30 and 00:30 at +05:00: one UTC day, two local days.
        let snaps = [
            snap("noon", at(2024, 3, 1, 10, 0)),
            snap("late", at(2024, 3, 1, 18, 30)),
            snap("after", at(2024, 3, 1, 19, 30)),
        ];
        let policy = rules(|p| p.daily = Some(5));
        let plus5 = FixedOffset::east_opt(5 * 3600).unwrap();
        assert_eq!(kept(&snaps, &policy, &plus5), ["after", "late"]);
        assert_eq!(kept(&snaps, &policy, &Utc), ["after"]);
    }

    #[test]
    fn hourly_keeps_one_per_local_hour() {
        let snaps = [
            snap("a", at(2024, 3, 1, 10, 5)),
            snap("b", at(2024, 3, 1, 10, 55)),
            snap("c", at(2024, 3, 1, 11, 0)),
        ];
        let policy = rules(|p| p.hourly = Some(2));
        assert_eq!(kept(&snaps, &policy, &Utc), ["c", "b"]);
    }

    #[test]
    fn weekly_uses_iso_weeks_across_new_year() {
        // Monday 2024-12-30 starts ISO week 2025-W01; Sunday the 29th is 2024-W52.
        let snaps = [
            snap("sun", at(2024, 12, 29, 10, 0)),
            snap("mon", at(2024, 12, 30, 10, 0)),
            snap("tue", at(2024, 12, 31, 10, 0)),
            snap("wed", at(2025, 1, 1, 10, 0)),
        ];
        let policy = rules(|p| p.weekly = Some(3));
        assert_eq!(kept(&snaps, &policy, &Utc), ["wed", "sun"]);
    }

    #[test]
    fn monthly_and_yearly_keep_newest_per_bucket_with_both_reasons() {
        let snaps = [
            snap("2023-12", at(2023, 12, 20, 0, 0)),
            snap("2024-01a", at(2024, 1, 5, 0, 0)),
            snap("2024-01b", at(2024, 1, 25, 0, 0)),
            snap("2024-02", at(2024, 2, 10, 0, 0)),
        ];
        let policy = rules(|p| (p.monthly, p.yearly) = (Some(2), Some(2)));
        let expected = [
            row("2024-02", &["monthly snapshot", "yearly snapshot"]),
            row("2024-01b", &["monthly snapshot"]),
            row("2024-01a", &[]),
            row("2023-12", &["yearly snapshot"]),
        ];
        assert_eq!(run(&snaps, &policy, &Utc), expected);
    }

    #[test]
    fn within_counts_from_now_so_a_future_dated_snapshot_cannot_move_the_window() {
        let now = at(2020, 6, 10, 0, 0);
        let snaps = [
            snap("forged", at(2099, 1, 1, 0, 0)),
            snap("3d", at(2020, 6, 7, 0, 0)),
            snap("7d", at(2020, 6, 3, 0, 0)),
            snap("8d", at(2020, 6, 2, 0, 0)),
        ];
        let policy = rules(|p| p.within = Some(parse_within("7d").unwrap()));
        let groups = apply_policy(&snaps, &policy, GroupBy::host_and_paths(), now, &Utc).unwrap();
        let kept: Vec<&str> = groups[0]
            .decisions
            .iter()
            .filter(|d| d.keep)
            .map(|d| d.id.as_str())
            .collect();
        // Counted from the 2099 snapshot, the window would keep nothing real.
        assert_eq!(kept, ["forged", "3d", "7d"]);
    }

    #[test]
    fn tags_keep_any_snapshot_carrying_one_of_them() {
        let mut prod = snap("prod", at(2024, 1, 1, 0, 0));
        prod.tags = vec!["nightly".into(), "prod".into()];
        let snaps = [prod, snap("plain", at(2024, 1, 2, 0, 0))];
        let policy = rules(|p| p.tags = vec!["prod".into()]);
        let expected = [row("plain", &[]), row("prod", &["tag prod"])];
        assert_eq!(run(&snaps, &policy, &Utc), expected);
    }

    #[test]
    fn grouping_by_host_and_paths_judges_groups_separately_and_in_order() {
        let mut b = snap("b", at(2024, 1, 2, 0, 0));
        b.host = "beta".into();
        let mut a2 = snap("a2", at(2024, 1, 3, 0, 0));
        a2.paths = vec!["/z".into(), "/data".into()];
        let mut a3 = snap("a3", at(2024, 1, 4, 0, 0));
        a3.paths = vec!["/data".into(), "/z".into()];
        let snaps = [b, snap("a1", at(2024, 1, 1, 0, 0)), a2, a3];
        let policy = rules(|p| p.last = Some(1));
        let groups = apply_policy(&snaps, &policy, GroupBy::host_and_paths(), Utc::now(), &Utc);
        let keys: Vec<_> = groups
            .unwrap()
            .into_iter()
            .map(|g| {
                (
                    g.host.unwrap(),
                    g.paths.unwrap().join(","),
                    g.decisions.len(),
                )
            })
            .collect();
        let expected: [(&str, &str, usize); 3] = [
            ("beta", "/data", 1),
            ("h1", "/data", 1),
            ("h1", "/data,/z", 2),
        ];
        assert_eq!(
            keys,
            expected.map(|(h, p, n)| (h.to_string(), p.to_string(), n))
        );
        assert_eq!(kept(&snaps, &policy, &Utc), ["b", "a1", "a3"]);
    }

    #[test]
    fn empty_or_zero_policy_is_refused() {
        let snaps = [snap("a", at(2024, 1, 1, 0, 0))];
        let zero = rules(|p| {
            (p.last, p.within, p.tags) = (Some(0), Some(Duration::zero()), vec![String::new()])
        });
        for policy in [KeepPolicy::default(), zero] {
            let result = apply_policy(&snaps, &policy, GroupBy::default(), Utc::now(), &Utc);
            let err = result.unwrap_err();
            assert!(matches!(err, RetentionError::EmptyPolicy));
            assert!(err
                .to_string()
                .contains("refusing to forget every snapshot"));
        }
    }

    #[test]
    fn parse_within_accepts_restic_units() {
        assert_eq!(parse_within("7d").unwrap(), Duration::days(7));
        assert_eq!(parse_within("12h").unwrap(), Duration::hours(12));
        let combined = Duration::days(2 * 365 + 5 * 30 + 7) + Duration::hours(3);
        assert_eq!(parse_within("2y5m7d3h").unwrap(), combined);
        assert_eq!(format_duration(combined), "887d3h");
    }

    #[test]
    fn parse_within_rejects_malformed_input_with_reasons() {
        for (input, reason) in [
            ("", "empty"),
            ("5", "has no unit"),
            ("7x", "unknown unit"),
            ("d", "no number"),
            ("-1d", "unknown unit"),
            ("99999999999999999999d", "too large"),
            ("9223372036854775807h", "too large"),
        ] {
            let err = parse_within(input).unwrap_err().to_string();
            assert!(err.contains(reason), "{input:?} gave {err}");
        }
    }

    proptest! {
        #[test]
        fn keep_last_keeps_min_n_per_group_and_covers_every_snapshot(
            raw in prop::collection::vec((0u8..3, 0u8..2, 0i64..100_000), 0..40),
            n in 1u32..8,
        ) {
            let base = at(2024, 1, 1, 0, 0);
            let snaps: Vec<SnapshotInfo> = raw
                .iter()
                .enumerate()
                .map(|(i, &(h, p, secs))| SnapshotInfo {
                    host: format!("host{h}"),
                    paths: vec![format!("/p{p}")],
                    ..snap(&format!("s{i:03}"), base + Duration::seconds(secs))
                })
                .collect();
            let policy = rules(|p| p.last = Some(n));
            let groups =
                apply_policy(&snaps, &policy, GroupBy::host_and_paths(), base, &Utc).unwrap();
            let mut seen: Vec<&str> =
                groups.iter().flat_map(|g| &g.decisions).map(|d| d.id.as_str()).collect();
            seen.sort_unstable();
            let expected: Vec<&str> = snaps.iter().map(|s| s.id.as_str()).collect();
            prop_assert_eq!(seen, expected);
            for g in &groups {
                let kept_count = g.decisions.iter().filter(|d| d.keep).count();
                prop_assert_eq!(kept_count, g.decisions.len().min(n as usize));
                prop_assert!(g.decisions.windows(2).all(|w| w[0].time >= w[1].time));
            }
        }
    }
}
