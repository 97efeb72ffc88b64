//! The drill report: what a drill did, found and measured, as one JSON
//! document (schema in `docs/drill-report.md`), rendered for people as
//! Markdown (terminal) and as a self-contained HTML page (no external
//! assets, so it can be mailed or archived as one file).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Format version of [`DrillReport`]; bumped on incompatible changes.
pub const REPORT_VERSION: u32 = 1;

/// How a drill ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DrillOutcome {
    /// Everything restored, verified and validated.
    Passed,
    /// Something failed: files, verification or a validation command.
    Failed,
    /// The drill hit its time limit and was stopped.
    TimedOut,
    /// The drill did not start (disk cap, no snapshot, repository error).
    Refused,
}

/// One timed phase.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Phase {
    /// `list`, `restore`, `download+decrypt`, `decompress+hash`, `write`, `verify`, `validate`, `cleanup`.
    pub name: String,
    /// Wall-clock seconds (for the pipelined restore sub-phases: seconds of
    /// worker-thread time, which overlap; see `note`).
    pub seconds: f64,
    /// How to read the number.
    pub note: Option<String>,
}

/// One file (or other entry) that failed to restore or verify.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileProblem {
    /// Path inside the snapshot.
    pub path: String,
    /// What is wrong (names the pack for damaged data).
    pub reason: String,
}

/// One validation command's run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ValidationResult {
    /// The command as configured (before `{restore_dir}` substitution).
    pub command: String,
    /// Exit code (`None` if killed or not started).
    pub exit_code: Option<i32>,
    /// Whether it passed (exit code 0 within its timeout).
    pub passed: bool,
    /// Seconds it ran.
    pub seconds: f64,
    /// The end of its stdout and stderr (at most 8 KiB).
    pub output: String,
    /// Why it failed, if it did (timeout, could not start, exit code).
    pub error: Option<String>,
}

/// The RTO measurement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RtoEstimate {
    /// Seconds the drill's restore took.
    pub measured_restore_seconds: f64,
    /// Bytes restored.
    pub restored_bytes: u64,
    /// Size of the whole snapshot's data.
    pub snapshot_bytes: u64,
    /// Estimated full-restore seconds (equal to measured for a full drill).
    pub full_restore_seconds: f64,
    /// How the estimate was made, in a sentence.
    pub method: String,
    /// The source's RTO target in seconds, if set.
    pub target_seconds: Option<f64>,
    /// `OK`, `AT RISK`, `BREACHED` or `UNKNOWN` against the target.
    pub status: String,
}

/// A past drill, for the history table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// When it ran.
    pub time: DateTime<Utc>,
    /// How it ended.
    pub outcome: String,
    /// Estimated full-restore seconds.
    pub full_restore_seconds: Option<f64>,
}

/// Everything about one drill.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrillReport {
    /// [`REPORT_VERSION`].
    pub version: u32,
    /// Random ID (hex).
    pub id: String,
    /// The drill's name (from the configuration, or `adhoc`).
    pub name: String,
    /// The source drilled.
    pub source: String,
    /// Host that ran the drill.
    pub host: String,
    /// Start and end.
    pub started: DateTime<Utc>,
    /// End.
    pub finished: DateTime<Utc>,
    /// How it ended.
    pub outcome: DrillOutcome,
    /// One sentence: why it failed or was refused; `None` when it passed.
    pub summary: Option<String>,
    /// Snapshot restored (ID), its time and how it was chosen.
    pub snapshot_id: Option<String>,
    /// The snapshot's time.
    pub snapshot_time: Option<DateTime<Utc>>,
    /// `latest`, `random within 7 days`, or `given`.
    pub snapshot_choice: String,
    /// `full`, `sample 10%` or `paths: ...`.
    pub scope: String,
    /// Where it restored to (removed afterwards unless kept).
    pub sandbox: String,
    /// Whether the sandbox was kept.
    pub kept: bool,
    /// Files restored and verified, bytes restored.
    pub files_restored: u64,
    /// Files verified against the snapshot.
    pub files_verified: u64,
    /// Entries (dirs, links, ...) checked for type, mode and target.
    pub entries_checked: u64,
    /// Bytes restored.
    pub bytes_restored: u64,
    /// Restore throughput in bytes per second.
    pub throughput_bytes_per_sec: f64,
    /// Timed phases, in order.
    pub phases: Vec<Phase>,
    /// Files that failed, with reasons.
    pub problems: Vec<FileProblem>,
    /// Validation commands.
    pub validations: Vec<ValidationResult>,
    /// The RTO measurement (absent when the drill was refused).
    pub rto: Option<RtoEstimate>,
    /// RPO at the time of the drill: age of the source's last snapshot, and target.
    pub rpo_seconds: Option<f64>,
    /// RPO target.
    pub rpo_target_seconds: Option<f64>,
    /// Recent drills of this source (newest first), filled in when rendering.
    pub history: Vec<HistoryEntry>,
}
