//! The agent's configuration file: one TOML file, parsed and validated
//! into a typed [`Config`] before the daemon does anything.
//!
//! A daemon that meets a mistake in its configuration at three in the
//! morning cannot ask anyone, so every check happens here, at start-up, and
//! every mistake is reported at once with its line and dotted key
//! (`agent.toml:14: source[1].rpo: ...`) rather than one per restart. That
//! is why this module does not derive `serde::Deserialize`: serde stops at
//! the first error and knows neither lines nor which keys a table allows.
//! Instead the file is parsed into the `toml` crate's spanned document tree
//! ([`toml::de::DeTable`]) and walked by hand; each value keeps its byte
//! span, which becomes a line number.
//!
//! Secrets (the S3 secret key, and webhook URLs, which often embed a token)
//! never appear in error messages or `Debug` output; the repository
//! passphrase is not read here at all, only where to find it
//! ([`PassphraseSource`]), so it is read when needed and never stored.
//!
//! # The file
//!
//! ```toml
//! [repository]
//! location = "s3://backups/web1"          # or an absolute directory path
//! s3_endpoint = "http://127.0.0.1:3900"   # the s3_* keys apply only to s3: locations
//! s3_region = "garage"
//! s3_path_style = true
//! s3_access_key_id = "GK31c2f218a2e44f485b94239e"
//! s3_secret_access_key_file = "/etc/lifeboat/s3-secret"
//! connections = 8
//! cache_dir = "/var/cache/lifeboat"
//!
//! [passphrase]
//! file = "/etc/lifeboat/passphrase"       # or env = "VARIABLE", or credential = "NAME"
//!
//! [agent]
//! state_dir = "/var/lib/lifeboat"
//! control_socket = "/run/lifeboat/agent.sock"
//! metrics_listen = "127.0.0.1:9876"
//! max_backups = 1
//! max_maintenance = 1
//! splay = "5m"
//! webhook = "https://alerts.example/hook"
//! shutdown_grace = "30s"
//!
//! [[source]]
//! name = "etc"
//! paths = ["/etc"]
//! exclude = ["*.tmp"]
//! one_file_system = false
//! schedule = "0 */6 * * *"
//! rpo = "7h"
//! rto = "1h"
//! timeout = "2h"
//! tags = ["prod"]
//!
//! [[source]]
//! name = "db"
//! command = ["pg_dump", "mydb"]
//! stdin_filename = "mydb.sql"
//! before = "systemctl stop foo"
//! after = "systemctl start foo"
//! schedule = "@daily"
//! rpo = "26h"
//!
//! [retention]
//! schedule = "@daily"
//! keep_last = 3
//! keep_daily = 7
//! keep_weekly = 4
//! keep_within = "7d"
//! prune = true
//! timeout = "6h"
//!
//! [check]
//! schedule = "@weekly"
//! read_data_subset = 10
//! timeout = "6h"
//!
//! [[drill]]
//! name = "etc-weekly"
//! source = "etc"
//! schedule = "0 4 * * sun"
//! sample = 10
//! timeout = "2h"
//! ```
//!
//! # Keys
//!
//! `[repository]` (required): `location` (required) is an absolute directory
//! path or `s3://BUCKET/PREFIX` (also restic's `s3:http://HOST:PORT/BUCKET`).
//! `s3_endpoint`, `s3_region`, `s3_path_style`, `s3_access_key_id` and the
//! secret key apply only to S3 locations; the key pair is given together or
//! not at all (then the standard AWS chain applies). The secret comes from
//! `s3_secret_access_key_file` (preferred: read at load time, one trailing
//! newline trimmed) or inline `s3_secret_access_key`, never both.
//! `connections` (1 to 1024) and `cache_dir` are optional. `writer_key =
//! "/path"` makes a write-only backup host: the agent opens the repository
//! with that credential (from `lifeboat key export-writer --host NAME`; its
//! snapshots carry that host name, whatever the machine is called) and has
//! no `[passphrase]`; `[retention]`, `[check]` and `[[drill]]`, which need the
//! full key, are refused there and belong on a drill host.
//!
//! `[passphrase]` (required unless `writer_key` is given): exactly one of
//! `file = "/path"`, `env = "VARIABLE"` or `credential = "NAME"` (a systemd
//! credential, read from `$CREDENTIALS_DIRECTORY/NAME`; see
//! `LoadCredential=`).
//!
//! `[agent]` (optional): `state_dir` (default `/var/lib/lifeboat`: catalog
//! and agent state), `control_socket` (default `/run/lifeboat/agent.sock`),
//! `metrics_listen` (no default: no metrics; a loopback address unless
//! `allow_remote_metrics = true`, since `/metrics` has no authentication),
//! `max_backups` and `max_maintenance` (concurrent jobs, default 1 each, so
//! drills and checks cannot starve backups), `splay` (the longest random
//! delay added to each scheduled time, default `"0s"`), `webhook` (an
//! `http://` or `https://` URL for alerts) and `shutdown_grace` (how long
//! running jobs get after SIGTERM, default `"30s"`).
//!
//! `[[source]]` (any number): `name` (required, unique, `[a-z0-9_-]`, at
//! most 64 characters; snapshots are tagged `source:NAME`); either `paths`
//! (absolute) with optional `exclude` patterns and `one_file_system`, or
//! `command`, an argument vector whose standard output is backed up under
//! `stdin_filename` (default: the source's name); `before` and `after`
//! hooks, run with `/bin/sh -c` (`after` runs even when the backup failed);
//! `schedule` and `rpo` (required); `rto` (optional); `timeout` (default
//! `"24h"`); `tags`. The `rpo` must be at least the longest gap between two
//! runs of the schedule, or it would be breached even when every backup
//! succeeds.
//!
//! `[retention]` (optional): `schedule` (required), the keep rules of
//! `lifeboat forget` (`keep_last`, `keep_hourly`, `keep_daily`,
//! `keep_weekly`, `keep_monthly`, `keep_yearly`, `keep_within`, `keep_tag`;
//! at least one, since no rule would forget every snapshot), `prune`
//! (default true), `timeout` (default `"24h"`) and `hosts` (other hosts
//! whose agent-made snapshots this policy also forgets, grouped per host:
//! how a drill host manages write-only hosts, which cannot forget).
//!
//! `[check]` (optional): `schedule` (required), `read_data_subset` (percent
//! of pack data to read, 0 to 100, default 0: structure only) and `timeout`.
//!
//! `[[drill]]` (any number): `name` (required, unique), `source` (required,
//! a source's name), `schedule` (required), `sample` (a percentage from 1 to
//! 100, or `"full"`, the default), `paths` (restore only these absolute
//! paths of the snapshot), `snapshot` (`"latest"`, the default, or
//! `"random"`, drawn from the last `random_within`, default `7d`),
//! `scratch_dir` (where sandboxes go, default `<state_dir>/drills/sandbox`),
//! `max_disk` (refuse to start above this size, e.g. `"20G"`), `validate`
//! (commands run against the restored tree, `{restore_dir}` substituted),
//! `validate_timeout` (per command, default `10m`) and `timeout`. On a
//! drill host that drills other hosts' snapshots (write-only backup hosts
//! cannot drill their own), `host = "web1"` restricts the drill to that
//! host's snapshots and lets `source` name one of *its* sources; `rto` then
//! gives the RTO target, which otherwise comes from the local source.
//!
//! # Durations and schedules
//!
//! Durations are a number and a unit, combined freely: `90s`, `15m`, `7h`,
//! `2d`, `1w`, `1h30m` (`m` is minutes). The one exception is
//! `keep_within`, which follows `lifeboat forget --keep-within` exactly
//! (units `y`, `m` = months, `d`, `h`) so a rule can be copied between them.
//!
//! Schedules are a classic 5-field crontab line (minute, hour, day of month,
//! month, day of week, where 0 and 7 are Sunday), `@hourly`, `@daily`,
//! `@weekly`, `@monthly` or `@yearly`, or the `cron` crate's own 6- or
//! 7-field form with seconds first (and its day of week 1 = Sunday to
//! 7 = Saturday). Times are local. Classic cron runs a job when *either* a
//! restricted day of month or a restricted day of week matches, the `cron`
//! crate only when both do, so a crontab line restricting both is refused
//! rather than silently run on fewer days.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Local, TimeDelta};
use lifeboat_core::backend::S3Options;
use lifeboat_core::retention::{self, KeepPolicy};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// Where the catalog and agent state live unless `agent.state_dir` says otherwise.
const DEFAULT_STATE_DIR: &str = "/var/lib/lifeboat";
/// Where the control socket lives unless `agent.control_socket` says otherwise.
const DEFAULT_CONTROL_SOCKET: &str = "/run/lifeboat/agent.sock";
/// How long a backup, retention, check or drill job may run by default.
const DEFAULT_JOB_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);
/// How long running jobs get after SIGTERM by default.
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// How far ahead [`Schedule::longest_gap`] looks, in days and in runs.
const GAP_HORIZON_DAYS: i64 = 400;
const GAP_MAX_RUNS: usize = 400;

/// The keys each table allows; anything else is reported as unknown.
const TOP_KEYS: &[&str] = &[
    "repository",
    "passphrase",
    "agent",
    "source",
    "retention",
    "check",
    "drill",
];
const REPOSITORY_KEYS: &[&str] = &[
    "location",
    "s3_endpoint",
    "s3_region",
    "s3_path_style",
    "s3_access_key_id",
    "s3_secret_access_key",
    "s3_secret_access_key_file",
    "connections",
    "cache_dir",
    "writer_key",
];
/// The repository keys that mean nothing for a directory repository.
const S3_ONLY_KEYS: &[&str] = &[
    "s3_endpoint",
    "s3_region",
    "s3_path_style",
    "s3_access_key_id",
    "s3_secret_access_key",
    "s3_secret_access_key_file",
];
const PASSPHRASE_KEYS: &[&str] = &["file", "env", "credential"];
const AGENT_KEYS: &[&str] = &[
    "state_dir",
    "control_socket",
    "metrics_listen",
    "allow_remote_metrics",
    "max_backups",
    "max_maintenance",
    "splay",
    "webhook",
    "shutdown_grace",
];
const SOURCE_KEYS: &[&str] = &[
    "name",
    "paths",
    "exclude",
    "one_file_system",
    "command",
    "stdin_filename",
    "before",
    "after",
    "schedule",
    "rpo",
    "rto",
    "timeout",
    "tags",
];
const RETENTION_KEYS: &[&str] = &[
    "schedule",
    "keep_last",
    "keep_hourly",
    "keep_daily",
    "keep_weekly",
    "keep_monthly",
    "keep_yearly",
    "keep_within",
    "keep_tag",
    "prune",
    "timeout",
    "hosts",
];
const CHECK_KEYS: &[&str] = &["schedule", "read_data_subset", "timeout"];
const DRILL_KEYS: &[&str] = &[
    "name",
    "source",
    "schedule",
    "sample",
    "timeout",
    "snapshot",
    "random_within",
    "paths",
    "scratch_dir",
    "max_disk",
    "validate",
    "validate_timeout",
    "host",
    "rto",
];

/// What a type error says a schedule or a duration should look like.
const SCHEDULE_EXPECTED: &str = "a schedule string such as \"0 */6 * * *\" or \"@daily\"";
const DURATION_EXPECTED: &str = "a duration string such as \"90s\", \"7h\" or \"1h30m\"";
/// The schedule forms accepted, for error messages.
const SCHEDULE_FORMS: &str = "use a 5-field crontab line such as \"0 */6 * * *\", \
    @hourly, @daily, @weekly, @monthly or @yearly, \
    or 6 or 7 fields with seconds first such as \"0 0 */6 * * *\"";
/// The duration units accepted, for error messages.
const DURATION_FORMS: &str =
    "use a number and a unit (s, m, h, d or w), e.g. 90s, 15m, 7h, 2d or 1h30m";

/// The agent's whole configuration, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the repository is and how to reach it.
    pub repository: RepositoryConfig,
    /// Where the repository passphrase comes from; it is read when needed.
    /// `None` on a write-only host (`repository.writer_key`).
    pub passphrase: Option<PassphraseSource>,
    /// The daemon's own settings.
    pub agent: AgentSettings,
    /// What to back up, in file order.
    pub sources: Vec<SourceConfig>,
    /// The scheduled `forget` (and prune), if any.
    pub retention: Option<RetentionConfig>,
    /// The scheduled repository check, if any.
    pub check: Option<CheckConfig>,
    /// Scheduled restore drills, in file order.
    pub drills: Vec<DrillConfig>,
    /// The file the configuration was read from, for messages.
    pub path: PathBuf,
}

/// Where the repository is and how to reach it (`[repository]`).
#[derive(Debug, Clone)]
pub struct RepositoryConfig {
    /// An absolute directory path, or an `s3:` URL as `lifeboat --repo` takes.
    pub location: String,
    /// A custom S3 endpoint such as `http://127.0.0.1:3900`.
    pub s3_endpoint: Option<String>,
    /// The S3 region.
    pub s3_region: Option<String>,
    /// Path-style S3 addressing; `None` leaves the choice to the backend.
    pub s3_path_style: Option<bool>,
    /// The S3 access key ID; always given together with the secret.
    pub s3_access_key_id: Option<String>,
    /// The S3 secret access key, read from its file at load time.
    pub s3_secret_access_key: Option<Secret>,
    /// Requests kept in flight to the store.
    pub connections: Option<u16>,
    /// The local cache directory.
    pub cache_dir: Option<PathBuf>,
    /// A write-only credential (`lifeboat key export-writer`) used instead
    /// of a passphrase: the host can back up and nothing else.
    pub writer_key: Option<PathBuf>,
}

impl RepositoryConfig {
    /// How to reach the store, as the core's [`open_store`] takes it.
    ///
    /// [`open_store`]: lifeboat_core::backend::open_store
    pub fn store_options(&self) -> lifeboat_core::backend::StoreOptions {
        lifeboat_core::backend::StoreOptions {
            s3_endpoint: self.s3_endpoint.clone(),
            s3_region: self.s3_region.clone(),
            s3_path_style: self.s3_path_style,
            s3_credentials: match (&self.s3_access_key_id, &self.s3_secret_access_key) {
                (Some(id), Some(secret)) => Some(lifeboat_core::backend::S3Credentials {
                    access_key_id: id.clone(),
                    secret_access_key: secret.expose().to_string(),
                }),
                _ => None,
            },
            connections: self.connections.map(usize::from),
            retry_for: None,
            create_bucket: false,
            bucket_object_lock: false,
        }
    }
}

/// A secret string whose `Debug` output is `<redacted>`.
///
/// It deliberately has no `Display`, so it cannot end up in a message by
/// accident; [`Secret::expose`] makes every use visible in the code.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub(crate) fn new(value: String) -> Secret {
        Secret(value)
    }

    /// Returns the secret itself, for handing to the code that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Where the repository passphrase comes from (`[passphrase]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PassphraseSource {
    /// A file holding the passphrase (one trailing newline is ignored).
    File(PathBuf),
    /// An environment variable of the agent's process.
    Env(String),
    /// A systemd credential: the file `$CREDENTIALS_DIRECTORY/NAME`.
    Credential(String),
}

impl PassphraseSource {
    /// Reads the passphrase.
    ///
    /// One trailing newline is trimmed, because files written with `echo`
    /// or an editor end in one; an empty passphrase is refused. Errors name
    /// the source and the fix, and never contain the passphrase.
    pub fn read(&self) -> Result<String, String> {
        self.read_with(&|name| std::env::var_os(name))
    }

    /// Reads the passphrase, looking environment variables up with `env`.
    ///
    /// Taking the environment as a function lets tests supply
    /// `CREDENTIALS_DIRECTORY` and variables without changing the process
    /// environment, which other tests running in parallel share.
    fn read_with(&self, env: &dyn Fn(&str) -> Option<OsString>) -> Result<String, String> {
        let mut passphrase = match self {
            PassphraseSource::File(path) => read_secret_file(path).map_err(|problem| {
                format!(
                    "passphrase file: {problem}; create it (readable only by the agent's user) \
                     or change passphrase.file in the configuration"
                )
            })?,
            PassphraseSource::Env(name) => env(name)
                .ok_or_else(|| {
                    format!(
                        "environment variable {name} (passphrase.env) is not set; set it in the \
                         agent's environment (systemd: Environment= or EnvironmentFile=) \
                         or use passphrase.file"
                    )
                })?
                .into_string()
                .map_err(|_| format!("environment variable {name} is not valid UTF-8"))?,
            PassphraseSource::Credential(name) => {
                let directory = env("CREDENTIALS_DIRECTORY").ok_or_else(|| {
                    format!(
                        "passphrase.credential = \"{name}\" needs $CREDENTIALS_DIRECTORY, which is \
                         not set: run the agent under systemd with \
                         LoadCredential={name}:/path/to/passphrase, or use passphrase.file"
                    )
                })?;
                read_secret_file(&Path::new(&directory).join(name)).map_err(|problem| {
                    format!(
                        "credential {name}: {problem}; check LoadCredential={name}:... \
                         in the agent's systemd unit"
                    )
                })?
            }
        };
        trim_one_newline(&mut passphrase);
        if passphrase.is_empty() {
            return Err(format!(
                "the passphrase from {} is empty; it must hold the repository passphrase",
                self.describe()
            ));
        }
        Ok(passphrase)
    }

    /// Names the source for messages, e.g. "passphrase file /etc/lifeboat/passphrase".
    fn describe(&self) -> String {
        match self {
            PassphraseSource::File(path) => format!("passphrase file {}", path.display()),
            PassphraseSource::Env(name) => format!("environment variable {name}"),
            PassphraseSource::Credential(name) => format!("systemd credential {name}"),
        }
    }
}

/// The daemon's own settings (`[agent]`).
#[derive(Clone)]
pub struct AgentSettings {
    /// Where the catalog and the agent's state live.
    pub state_dir: PathBuf,
    /// The Unix socket `lifeboat status` and friends talk to.
    pub control_socket: PathBuf,
    /// Where to serve `/metrics` and health checks; `None` serves nothing.
    pub metrics_listen: Option<SocketAddr>,
    /// How many backup jobs may run at once.
    pub max_backups: usize,
    /// How many retention, check and drill jobs may run at once.
    pub max_maintenance: usize,
    /// The longest random delay added to each scheduled time, so that many
    /// hosts with the same schedule do not hit the store at the same second.
    pub splay: Duration,
    /// Where to POST alerts; its `Debug` output hides everything after the host.
    pub webhook: Option<String>,
    /// How long running jobs get to finish after SIGTERM.
    pub shutdown_grace: Duration,
}

impl Default for AgentSettings {
    fn default() -> Self {
        AgentSettings {
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            control_socket: PathBuf::from(DEFAULT_CONTROL_SOCKET),
            metrics_listen: None,
            max_backups: 1,
            max_maintenance: 1,
            splay: Duration::ZERO,
            webhook: None,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }
}

impl fmt::Debug for AgentSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Webhook URLs (Slack, Teams, ntfy...) usually carry their token in
        // the path, so only the scheme and host are shown.
        f.debug_struct("AgentSettings")
            .field("state_dir", &self.state_dir)
            .field("control_socket", &self.control_socket)
            .field("metrics_listen", &self.metrics_listen)
            .field("max_backups", &self.max_backups)
            .field("max_maintenance", &self.max_maintenance)
            .field("splay", &self.splay)
            .field("webhook", &self.webhook.as_deref().map(redact_url))
            .field("shutdown_grace", &self.shutdown_grace)
            .finish()
    }
}

/// What a source backs up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceInput {
    /// Files and directories.
    Paths {
        /// Absolute paths to back up.
        paths: Vec<PathBuf>,
        /// Exclude patterns, as `lifeboat backup --exclude` takes them.
        exclude: Vec<String>,
        /// Stay on the file system of each path.
        one_file_system: bool,
    },
    /// The standard output of a command, such as a database dump.
    Command {
        /// The program and its arguments; run directly, not through a shell.
        argv: Vec<String>,
        /// The file name the output is stored under in the snapshot.
        stdin_filename: String,
    },
}

/// One thing to back up on a schedule (`[[source]]`).
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// The source's unique name; snapshots are tagged `source:NAME`.
    pub name: String,
    /// What is backed up.
    pub input: SourceInput,
    /// A shell command run before the backup (`/bin/sh -c`).
    pub before: Option<String>,
    /// A shell command run after the backup, even when it failed.
    pub after: Option<String>,
    /// When to back up.
    pub schedule: Schedule,
    /// Recovery point objective: the oldest the newest good snapshot may be.
    pub rpo: Duration,
    /// Recovery time objective: how long a restore may take, if a target is set.
    pub rto: Option<Duration>,
    /// How long one backup may run before it is stopped.
    pub timeout: Duration,
    /// Extra snapshot tags (the agent adds `source:NAME` itself).
    pub tags: Vec<String>,
}

/// The scheduled `forget` (`[retention]`).
#[derive(Debug, Clone)]
pub struct RetentionConfig {
    /// When to apply the policy.
    pub schedule: Schedule,
    /// The keep rules, as `lifeboat forget` takes them; never empty.
    pub policy: KeepPolicy,
    /// Prune unreferenced data after forgetting.
    pub prune: bool,
    /// How long one run may take.
    pub timeout: Duration,
    /// Other hosts whose agent-made snapshots this host's retention also
    /// manages (a drill host for write-only hosts, which cannot forget).
    pub hosts: Vec<String>,
}

/// The scheduled repository check (`[check]`).
#[derive(Debug, Clone)]
pub struct CheckConfig {
    /// When to check.
    pub schedule: Schedule,
    /// The percentage of pack data to read and verify (0: structure only).
    pub read_data_subset: u8,
    /// How long one check may take.
    pub timeout: Duration,
}

/// A scheduled restore drill (`[[drill]]`).
///
/// Only parsed and validated here; the drills themselves live elsewhere.
#[derive(Debug, Clone)]
pub struct DrillConfig {
    /// The drill's unique name.
    pub name: String,
    /// The name of the source whose snapshots are restored.
    pub source: String,
    /// When to run the drill.
    pub schedule: Schedule,
    /// The percentage of the snapshot to restore; `None` restores all of it.
    pub sample_percent: Option<u8>,
    /// How long one drill may take.
    pub timeout: Duration,
    /// `snapshot = "random"`: a random snapshot from this window instead
    /// of the latest (`random_within`, default 7 days).
    pub random_within: Option<Duration>,
    /// Restore only these paths (absolute paths inside the snapshot).
    pub paths: Vec<String>,
    /// Where sandboxes are created (default `<state_dir>/drills`).
    pub scratch_dir: Option<PathBuf>,
    /// Refuse to start when the restore needs more bytes than this.
    pub max_disk: Option<u64>,
    /// Commands run against the restored tree (`{restore_dir}` is replaced).
    pub validate: Vec<String>,
    /// How long each validation command may run (default 10 minutes).
    pub validate_timeout: Duration,
    /// Drill only snapshots taken on this host. With it, `source` may name
    /// another host's source (a drill host drilling write-only hosts).
    pub host: Option<String>,
    /// The RTO target when `source` is not one of this host's sources.
    pub rto: Option<Duration>,
}

/// Parses a size such as `"500M"`, `"20G"` or `"1T"` (binary units) or a
/// plain byte count.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (digits, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = digits.parse().map_err(|_| {
        format!("`{t}` is not a size: write a number with an optional K, M, G or T")
    })?;
    let shift = match unit
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        other => {
            return Err(format!(
                "unknown size unit `{other}` in `{t}`: use K, M, G or T"
            ))
        }
    };
    n.checked_mul(1u64 << shift)
        .filter(|&v| v > 0)
        .ok_or_else(|| format!("`{t}` is not a usable size (zero or too large)"))
}

/// A cron schedule in the local time zone, keeping the text it was written as.
#[derive(Clone)]
pub struct Schedule {
    text: String,
    cron: cron::Schedule,
}

impl Schedule {
    /// Parses a schedule.
    ///
    /// Accepts a 5-field crontab line (a seconds field of `0` is prepended
    /// and the day of week is translated from crontab's 0-7, Sunday = 0 or 7,
    /// to the `cron` crate's 1 = Sunday), the shorthands `@hourly`, `@daily`,
    /// `@weekly`, `@monthly` and `@yearly` (and crontab's `@annually` and
    /// `@midnight`), or the `cron` crate's 6- or 7-field form as it stands.
    /// A schedule that never fires is refused.
    pub fn parse(text: &str) -> Result<Schedule, String> {
        let shown = text.trim();
        let fields: Vec<&str> = text.split_whitespace().collect();
        let expression = match fields.as_slice() {
            [] => return Err(format!("empty schedule; {SCHEDULE_FORMS}")),
            [word] if word.starts_with('@') => shorthand(word)?.to_string(),
            [minute, hour, day_of_month, month, day_of_week] => {
                crontab_expression(minute, hour, day_of_month, month, day_of_week)?
            }
            [_, _, _, _, _, _] | [_, _, _, _, _, _, _] => fields.join(" "),
            _ => {
                return Err(format!(
                    "`{shown}` has {} fields, not 5, 6 or 7; {SCHEDULE_FORMS}",
                    fields.len()
                ))
            }
        };
        let cron = cron::Schedule::from_str(&expression).map_err(|err| {
            let detail = summarize_cron_error(&err.to_string(), &expression);
            if detail.is_empty() {
                format!("`{shown}` is not a valid schedule; {SCHEDULE_FORMS}")
            } else {
                format!("`{shown}` is not a valid schedule ({detail}); {SCHEDULE_FORMS}")
            }
        })?;
        if cron.upcoming(Local).next().is_none() {
            return Err(format!(
                "`{shown}` never fires (no date from now until 2100 matches it)"
            ));
        }
        Ok(Schedule {
            text: shown.to_string(),
            cron,
        })
    }

    /// The first run strictly after `t`, in local time; `None` if there is none.
    pub fn next_after(&self, t: DateTime<Local>) -> Option<DateTime<Local>> {
        self.cron.after(&t).next()
    }

    /// The longest interval between two consecutive runs from `from` on.
    ///
    /// Looks at the next 400 runs or 400 days, whichever comes first, so the
    /// loop is bounded even for a per-second schedule, while monthly and
    /// yearly schedules and daylight-saving changes are still seen (a daily
    /// run across the autumn change is 25 hours from the one before). A
    /// schedule with fewer than two runs in that window reports the whole
    /// window, a lower bound for its real gap.
    pub fn longest_gap(&self, from: DateTime<Local>) -> Duration {
        let horizon = from
            .checked_add_signed(TimeDelta::days(GAP_HORIZON_DAYS))
            .unwrap_or(from);
        let mut longest = TimeDelta::zero();
        let mut previous: Option<DateTime<Local>> = None;
        let mut runs = 0;
        for run in self.cron.after(&from).take(GAP_MAX_RUNS) {
            if let Some(previous) = previous {
                longest = longest.max(run.signed_duration_since(previous));
            }
            runs += 1;
            previous = Some(run);
            // The first run past the horizon still counts, so the gap that
            // straddles it is measured (a yearly schedule has exactly one).
            if run > horizon {
                break;
            }
        }
        if runs < 2 {
            return Duration::from_secs(GAP_HORIZON_DAYS.unsigned_abs() * 24 * 60 * 60);
        }
        longest.to_std().unwrap_or(Duration::ZERO)
    }

    /// The schedule as written in the configuration.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Schedule").field(&self.text).finish()
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Parses a duration such as `90s`, `15m`, `7h`, `2d`, `1w` or `1h30m`.
///
/// Components may be separated by spaces (`1h 30m`). Zero (`0s`) is a valid
/// duration; callers that need a positive one check for it.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(format!("empty duration; {DURATION_FORMS}"));
    }
    let too_long = || format!("`{trimmed}` is too long a duration");
    let mut total: u64 = 0;
    let mut rest = trimmed;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!(
                "`{trimmed}`: expected a number at `{rest}`; {DURATION_FORMS}"
            ));
        }
        let number: u64 = rest[..digits].parse().map_err(|_| too_long())?;
        rest = &rest[digits..];
        if rest.starts_with('.') || rest.starts_with(',') {
            return Err(format!(
                "`{trimmed}`: fractions are not supported; combine units instead, e.g. 1h30m"
            ));
        }
        let letters = rest
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        let seconds_per_unit: u64 = match &rest[..letters] {
            "s" => 1,
            "m" => 60,
            "h" => 60 * 60,
            "d" => 24 * 60 * 60,
            "w" => 7 * 24 * 60 * 60,
            "" => {
                return Err(format!(
                    "`{trimmed}`: the number {number} has no unit; {DURATION_FORMS}"
                ))
            }
            unit => {
                return Err(format!(
                    "`{trimmed}`: unknown unit `{unit}`; {DURATION_FORMS}"
                ))
            }
        };
        total = number
            .checked_mul(seconds_per_unit)
            .and_then(|seconds| total.checked_add(seconds))
            .ok_or_else(too_long)?;
        rest = rest[letters..].trim_start();
    }
    Ok(Duration::from_secs(total))
}

/// Formats a duration the way [`parse_duration`] reads it, largest units
/// first (`1d1h`, `1h30m`, `0s`); fractions of a second are dropped.
pub(crate) fn format_duration(duration: Duration) -> String {
    let mut seconds = duration.as_secs();
    if seconds == 0 {
        return "0s".to_string();
    }
    let mut text = String::new();
    for (unit, size) in [("d", 24 * 60 * 60), ("h", 60 * 60), ("m", 60), ("s", 1)] {
        if seconds >= size {
            let _ = write!(text, "{}{unit}", seconds / size);
            seconds %= size;
        }
    }
    text
}

/// One problem in a configuration file.
#[derive(Debug)]
pub struct ConfigError {
    /// The 1-based line the problem is on, when it is on one.
    pub line: Option<usize>,
    /// The dotted key path, such as `source[1].rpo`; empty for problems
    /// with the file as a whole (syntax errors, an unreadable file).
    pub key: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// Every problem found in a configuration file.
#[derive(Debug)]
pub struct ConfigErrors {
    /// The configuration file.
    pub path: PathBuf,
    /// The problems, ordered by line (problems without a line last).
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    /// One line per problem: `PATH:LINE: KEY: MESSAGE`, leaving out the line
    /// or the key when there is none.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, error) in self.errors.iter().enumerate() {
            if index > 0 {
                writeln!(f)?;
            }
            write!(f, "{}", self.path.display())?;
            if let Some(line) = error.line {
                write!(f, ":{line}")?;
            }
            if !error.key.is_empty() {
                write!(f, ": {}", error.key)?;
            }
            write!(f, ": {}", error.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl Config {
    /// Reads and validates the configuration file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(&text, path),
            Err(err) => Err(ConfigErrors {
                path: path.to_path_buf(),
                errors: vec![ConfigError {
                    line: None,
                    key: String::new(),
                    message: format!(
                        "cannot read the configuration file: {err}; create it, or pass --config"
                    ),
                }],
            }),
        }
    }

    /// Parses and validates configuration text; `path` is used in messages.
    ///
    /// Reports every problem found, not just the first. The one file read
    /// here is `s3_secret_access_key_file`, so that a missing secret shows
    /// up at start-up with its line rather than at the first backup.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigErrors> {
        Config::parse_at(text, path, Local::now())
    }

    /// Like [`Config::parse`], with the time the rpo checks measure schedules from.
    fn parse_at(text: &str, path: &Path, now: DateTime<Local>) -> Result<Config, ConfigErrors> {
        let mut report = Report::new(text);
        let (document, syntax_errors) = DeTable::parse_recoverable(text);
        if !syntax_errors.is_empty() {
            // A document that does not parse leaves a partial tree; checking
            // it would add complaints about keys that are really there, so
            // only the syntax errors are reported.
            for error in &syntax_errors {
                report.push(error.span(), String::new(), error.message().to_string());
            }
            return Err(report.finish(path));
        }
        let config = read_config(&mut report, document.get_ref(), path, now);
        match config {
            Some(config) if report.is_empty() => Ok(config),
            _ => {
                // Every reader reports an error before giving up, so this is
                // only a guard against a reader that forgot to.
                if report.is_empty() {
                    report.push(None, String::new(), "invalid configuration".to_string());
                }
                Err(report.finish(path))
            }
        }
    }

    /// The source called `name`, if there is one.
    pub fn source(&self, name: &str) -> Option<&SourceConfig> {
        self.sources.iter().find(|source| source.name == name)
    }
}

/// A byte range in the configuration text.
type Span = Range<usize>;

/// Collects problems, turning byte spans into line numbers.
struct Report {
    /// The byte offset at which each line starts.
    line_starts: Vec<usize>,
    errors: Vec<ConfigError>,
}

impl Report {
    fn new(text: &str) -> Report {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(index, _)| index + 1))
            .collect();
        Report {
            line_starts,
            errors: Vec::new(),
        }
    }

    /// The 1-based line holding the start of `span`.
    fn line(&self, span: &Span) -> usize {
        self.line_starts
            .partition_point(|&start| start <= span.start)
    }

    fn push(&mut self, span: Option<Span>, key: String, message: String) {
        let line = span.map(|span| self.line(&span));
        self.errors.push(ConfigError { line, key, message });
    }

    fn len(&self) -> usize {
        self.errors.len()
    }

    fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    fn finish(mut self, path: &Path) -> ConfigErrors {
        // A stable sort keeps problems on one line in the order found.
        self.errors
            .sort_by_key(|error| (error.line.is_none(), error.line));
        ConfigErrors {
            path: path.to_path_buf(),
            errors: self.errors,
        }
    }
}

/// One table of the document being read, with its dotted path and position.
///
/// The getters return `None` both when a key is absent and when its value is
/// wrong; in the second case they have already reported the problem, so
/// callers only decide what absence means (a default, or [`Section::missing`]).
struct Section<'a, 'i> {
    table: &'a DeTable<'i>,
    /// The dotted path of this table, such as `source[0]`; empty for the root.
    path: String,
    /// The table's header (or inline table), where missing keys are reported.
    span: Option<Span>,
}

impl<'a, 'i> Section<'a, 'i> {
    /// Opens a table and reports the keys it does not allow.
    fn open(
        e: &mut Report,
        table: &'a DeTable<'i>,
        path: String,
        span: Option<Span>,
        allowed: &[&str],
    ) -> Section<'a, 'i> {
        let section = Section { table, path, span };
        for (key, _) in section.table.iter() {
            let name: &str = key.get_ref();
            if allowed.contains(&name) {
                continue;
            }
            let hint = closest(name, allowed)
                .map(|near| format!(" (did you mean `{near}`?)"))
                .unwrap_or_default();
            e.push(
                Some(key.span()),
                section.key(name),
                format!("unknown key{hint}; allowed here: {}", allowed.join(", ")),
            );
        }
        section
    }

    /// The dotted path of a key in this table.
    fn key(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.path)
        }
    }

    fn item(&self, name: &str) -> Option<&'a Spanned<DeValue<'i>>> {
        let table: &'a DeTable<'i> = self.table;
        table.get(name)
    }

    /// Reports a problem with the value of `name`, on the line it is given
    /// (or on the table's line when it is absent).
    fn error(&self, e: &mut Report, name: &str, message: impl Into<String>) {
        let span = self
            .item(name)
            .map(|item| item.span())
            .or_else(|| self.span.clone());
        e.push(span, self.key(name), message.into());
    }

    /// Reports a problem with the table as a whole.
    fn error_here(&self, e: &mut Report, message: impl Into<String>) {
        e.push(self.span.clone(), self.path.clone(), message.into());
    }

    /// Reports `name` as missing when it is absent; always returns `None`,
    /// so it chains after a getter: `s.string(e, k).or_else(|| s.missing(e, k, hint))`.
    fn missing<T>(&self, e: &mut Report, name: &str, hint: &str) -> Option<T> {
        if self.item(name).is_none() {
            e.push(
                self.span.clone(),
                self.key(name),
                format!("missing: {hint}"),
            );
        }
        None
    }

    fn wrong_type(&self, e: &mut Report, name: &str, found: &DeValue<'_>, expected: &str) {
        self.error(
            e,
            name,
            format!("expected {expected}, found {}", describe(found)),
        );
    }

    /// A non-empty string; the type error says `expected`.
    ///
    /// The value itself never appears in the errors reported here, which is
    /// what lets secrets go through this getter.
    fn string_as(&self, e: &mut Report, name: &str, expected: &str) -> Option<&'a str> {
        let item = self.item(name)?;
        match item.get_ref() {
            DeValue::String(text) if text.is_empty() => {
                self.error(e, name, "must not be empty");
                None
            }
            DeValue::String(text) => Some(&**text),
            other => {
                self.wrong_type(e, name, other, expected);
                None
            }
        }
    }

    fn string(&self, e: &mut Report, name: &str) -> Option<&'a str> {
        self.string_as(e, name, "a string")
    }

    /// A string turned into a `T` by `parse`, whose error message is reported.
    fn parsed<T>(
        &self,
        e: &mut Report,
        name: &str,
        expected: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let text = self.string_as(e, name, expected)?;
        match parse(text) {
            Ok(value) => Some(value),
            Err(message) => {
                self.error(e, name, message);
                None
            }
        }
    }

    fn bool(&self, e: &mut Report, name: &str) -> Option<bool> {
        let item = self.item(name)?;
        match item.get_ref() {
            DeValue::Boolean(value) => Some(*value),
            other => {
                self.wrong_type(e, name, other, "true or false");
                None
            }
        }
    }

    /// A whole number from `min` to `max`.
    fn integer(&self, e: &mut Report, name: &str, min: i64, max: i64) -> Option<i64> {
        let item = self.item(name)?;
        let DeValue::Integer(number) = item.get_ref() else {
            self.wrong_type(e, name, item.get_ref(), "a whole number");
            return None;
        };
        match i64::from_str_radix(number.as_str(), number.radix()) {
            Ok(value) if (min..=max).contains(&value) => Some(value),
            _ => {
                self.error(
                    e,
                    name,
                    format!("must be a whole number from {min} to {max}"),
                );
                None
            }
        }
    }

    /// An array of non-empty strings, each also passing `check`; problems
    /// are reported per element (`paths[1]`), on the element's own line.
    fn strings(
        &self,
        e: &mut Report,
        name: &str,
        check: impl Fn(&str) -> Result<(), String>,
    ) -> Option<Vec<&'a str>> {
        let item = self.item(name)?;
        let DeValue::Array(array) = item.get_ref() else {
            self.wrong_type(e, name, item.get_ref(), "an array of strings");
            return None;
        };
        let mut values = Vec::with_capacity(array.len());
        let mut valid = true;
        for (index, element) in array.iter().enumerate() {
            let checked = match element.get_ref() {
                DeValue::String(text) if text.is_empty() => Err("must not be empty".to_string()),
                DeValue::String(text) => {
                    let text: &'a str = text;
                    check(text).map(|()| text)
                }
                other => Err(format!("expected a string, found {}", describe(other))),
            };
            match checked {
                Ok(text) => values.push(text),
                Err(message) => {
                    valid = false;
                    e.push(
                        Some(element.span()),
                        format!("{}[{index}]", self.key(name)),
                        message,
                    );
                }
            }
        }
        valid.then_some(values)
    }

    fn absolute_path(&self, e: &mut Report, name: &str) -> Option<PathBuf> {
        self.parsed(e, name, "a path string", |text| {
            check_absolute(text).map(|()| PathBuf::from(text))
        })
    }

    fn duration(&self, e: &mut Report, name: &str) -> Option<Duration> {
        self.parsed(e, name, DURATION_EXPECTED, parse_duration)
    }

    fn nonzero_duration(&self, e: &mut Report, name: &str) -> Option<Duration> {
        self.parsed(e, name, DURATION_EXPECTED, |text| {
            parse_duration(text).and_then(|duration| {
                if duration.is_zero() {
                    Err(format!(
                        "`{}` is zero; it must be longer than that",
                        text.trim()
                    ))
                } else {
                    Ok(duration)
                }
            })
        })
    }

    /// A job timeout, 24 hours unless given.
    fn timeout(&self, e: &mut Report) -> Duration {
        self.nonzero_duration(e, "timeout")
            .unwrap_or(DEFAULT_JOB_TIMEOUT)
    }

    fn schedule(&self, e: &mut Report, name: &str) -> Option<Schedule> {
        self.parsed(e, name, SCHEDULE_EXPECTED, Schedule::parse)
    }

    /// A required `schedule` key; `what` says what it schedules.
    fn required_schedule(&self, e: &mut Report, what: &str) -> Option<Schedule> {
        self.schedule(e, "schedule").or_else(|| {
            self.missing(
                e,
                "schedule",
                &format!("give when to {what}, e.g. \"@daily\" or \"0 3 * * *\""),
            )
        })
    }

    /// A sub-table, opened with its allowed keys.
    fn table(&self, e: &mut Report, name: &str, allowed: &[&str]) -> Option<Section<'a, 'i>> {
        let item = self.item(name)?;
        match item.get_ref() {
            DeValue::Table(table) => Some(Section::open(
                e,
                table,
                self.key(name),
                Some(item.span()),
                allowed,
            )),
            other => {
                self.wrong_type(e, name, other, &format!("a table ([{name}])"));
                None
            }
        }
    }

    /// An array of tables (`[[name]]`), each opened with its allowed keys.
    fn tables(&self, e: &mut Report, name: &str, allowed: &[&str]) -> Vec<Section<'a, 'i>> {
        let Some(item) = self.item(name) else {
            return Vec::new();
        };
        let DeValue::Array(array) = item.get_ref() else {
            self.wrong_type(
                e,
                name,
                item.get_ref(),
                &format!("an array of tables ([[{name}]])"),
            );
            return Vec::new();
        };
        let mut sections = Vec::with_capacity(array.len());
        for (index, element) in array.iter().enumerate() {
            let path = format!("{}[{index}]", self.key(name));
            match element.get_ref() {
                DeValue::Table(table) => {
                    sections.push(Section::open(e, table, path, Some(element.span()), allowed))
                }
                other => e.push(
                    Some(element.span()),
                    path,
                    format!("expected a table, found {}", describe(other)),
                ),
            }
        }
        sections
    }

    /// The raw string value of `name`, without reporting anything; used
    /// where a second look at a value must not repeat its errors.
    fn raw_str(&self, name: &str) -> Option<(&'a str, Span)> {
        let item = self.item(name)?;
        match item.get_ref() {
            DeValue::String(text) => Some((&**text, item.span())),
            _ => None,
        }
    }
}

/// Reads the whole document. Returns `None` only after reporting why.
fn read_config(
    e: &mut Report,
    root: &DeTable<'_>,
    path: &Path,
    now: DateTime<Local>,
) -> Option<Config> {
    let top = Section::open(e, root, String::new(), None, TOP_KEYS);

    let repository = top
        .table(e, "repository", REPOSITORY_KEYS)
        .or_else(|| {
            top.missing(
                e,
                "repository",
                "add a [repository] table with location = \"/path\" or \"s3://BUCKET/PREFIX\"",
            )
        })
        .and_then(|section| read_repository(e, &section));
    let write_only = repository.as_ref().is_some_and(|r| r.writer_key.is_some());
    let passphrase_section = top.table(e, "passphrase", PASSPHRASE_KEYS);
    let passphrase = match (&passphrase_section, write_only) {
        (Some(section), true) => {
            section.error_here(
                e,
                "a write-only host has no passphrase: give either [passphrase] (the full key) \
                 or repository.writer_key (write-only), not both",
            );
            None
        }
        (Some(section), false) => read_passphrase(e, section).map(Some),
        (None, true) => Some(None),
        (None, false) => top.missing(
            e,
            "passphrase",
            "add a [passphrase] table with file = \"/path\", env = \"VARIABLE\" \
             or credential = \"NAME\" (or, on a write-only backup host, \
             repository.writer_key = \"/path\")",
        ),
    };
    let refuse_on_writer = |e: &mut Report, section: &Section<'_, '_>| {
        if write_only {
            section.error_here(
                e,
                "needs the repository's full key, and this host holds only a write-only \
                 credential (repository.writer_key): run retention, check and drills from a \
                 host with a [passphrase], such as a drill host",
            );
        }
    };
    // Every [agent] key has a default, so a missing table reads as an empty one.
    let empty = DeTable::new();
    let agent_section = top
        .table(e, "agent", AGENT_KEYS)
        .unwrap_or_else(|| Section {
            table: &empty,
            path: "agent".to_string(),
            span: None,
        });
    let agent = read_agent(e, &agent_section);

    // Names are checked for uniqueness on their raw text, so a source with
    // other mistakes still counts, and drills naming it are not flagged too.
    let mut source_names = Names::default();
    let mut sources = Vec::new();
    for section in top.tables(e, "source", SOURCE_KEYS) {
        source_names.note(e, &section, "source");
        if let Some(source) = read_source(e, &section, now) {
            sources.push(source);
        }
    }

    let retention = top
        .table(e, "retention", RETENTION_KEYS)
        .and_then(|section| {
            refuse_on_writer(e, &section);
            read_retention(e, &section)
        });
    let check = top.table(e, "check", CHECK_KEYS).and_then(|section| {
        refuse_on_writer(e, &section);
        read_check(e, &section)
    });

    let mut drill_names = Names::default();
    let mut drills = Vec::new();
    for section in top.tables(e, "drill", DRILL_KEYS) {
        drill_names.note(e, &section, "drill");
        refuse_on_writer(e, &section);
        if let Some(drill) = read_drill(e, &section, &source_names) {
            drills.push(drill);
        }
    }

    Some(Config {
        repository: repository?,
        passphrase: passphrase?,
        agent,
        sources,
        retention,
        check,
        drills,
        path: path.to_path_buf(),
    })
}

/// The names seen so far in an array of tables, with the line of each.
#[derive(Default)]
struct Names(HashMap<String, usize>);

impl Names {
    /// Records a table's `name`, reporting it if an earlier table has it.
    fn note(&mut self, e: &mut Report, section: &Section<'_, '_>, what: &str) {
        let Some((name, span)) = section.raw_str("name") else {
            return;
        };
        if let Some(first) = self.0.get(name).copied() {
            section.error(
                e,
                "name",
                format!(
                    "{what} name `{name}` is already used on line {first}; names must be unique"
                ),
            );
        } else {
            self.0.insert(name.to_string(), e.line(&span));
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    /// The names, sorted, for messages.
    fn list(&self) -> String {
        let mut names: Vec<&str> = self.0.keys().map(String::as_str).collect();
        names.sort_unstable();
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    }
}

fn read_repository(e: &mut Report, s: &Section<'_, '_>) -> Option<RepositoryConfig> {
    let location = s.string(e, "location").or_else(|| {
        s.missing(
            e,
            "location",
            "give the repository's absolute directory path or its s3://BUCKET/PREFIX URL",
        )
    });
    if let Some(location) = location {
        if location.starts_with("s3:") {
            if let Err(message) = S3Options::from_url(location) {
                s.error(e, "location", message);
            }
        } else {
            if !Path::new(location).is_absolute() {
                s.error(
                    e,
                    "location",
                    format!(
                        "`{location}` is neither an absolute directory path nor an \
                         s3://BUCKET/PREFIX URL"
                    ),
                );
            }
            for &key in S3_ONLY_KEYS {
                if s.item(key).is_some() {
                    s.error(
                        e,
                        key,
                        "only applies to s3:// repository locations, and location is a \
                         directory; remove it or change location",
                    );
                }
            }
        }
    }

    let s3_endpoint = s.parsed(e, "s3_endpoint", "a URL string", |text| {
        if is_http_url(text) {
            Ok(text.to_string())
        } else {
            Err(format!(
                "`{text}` is not an http:// or https:// URL such as \"http://127.0.0.1:3900\""
            ))
        }
    });
    let s3_region = s.string(e, "s3_region").map(str::to_string);
    let s3_path_style = s.bool(e, "s3_path_style");
    let s3_access_key_id = s.string(e, "s3_access_key_id").map(str::to_string);
    let s3_secret_access_key = read_s3_secret(e, s);

    // The S3 backend takes explicit credentials as a pair; half a pair would
    // silently fall back to the AWS chain for the other half.
    let secret_key = ["s3_secret_access_key", "s3_secret_access_key_file"]
        .into_iter()
        .find(|key| s.item(key).is_some());
    match (s.item("s3_access_key_id").is_some(), secret_key) {
        (true, None) => s.error(
            e,
            "s3_access_key_id",
            "needs s3_secret_access_key_file (or s3_secret_access_key) too; give both, \
             or neither to use the standard AWS credential chain",
        ),
        (false, Some(key)) => s.error(
            e,
            key,
            "needs s3_access_key_id too; give both, or neither to use the standard AWS \
             credential chain",
        ),
        _ => {}
    }

    let connections = s
        .integer(e, "connections", 1, 1024)
        .and_then(|n| u16::try_from(n).ok());
    let cache_dir = s.absolute_path(e, "cache_dir");
    let writer_key = s.absolute_path(e, "writer_key");

    Some(RepositoryConfig {
        location: location?.to_string(),
        s3_endpoint,
        s3_region,
        s3_path_style,
        s3_access_key_id,
        s3_secret_access_key,
        connections,
        cache_dir,
        writer_key,
    })
}

/// The S3 secret, inline or read from its file. Nothing reported here
/// contains the secret: the inline value only goes through
/// [`Section::string_as`], and file errors name the path, not the content.
fn read_s3_secret(e: &mut Report, s: &Section<'_, '_>) -> Option<Secret> {
    let inline = s.string(e, "s3_secret_access_key");
    let file = s.absolute_path(e, "s3_secret_access_key_file");
    if s.item("s3_secret_access_key").is_some() && s.item("s3_secret_access_key_file").is_some() {
        s.error(
            e,
            "s3_secret_access_key_file",
            "give s3_secret_access_key_file or s3_secret_access_key, not both",
        );
        return None;
    }
    if let Some(secret) = inline {
        return Some(Secret::new(secret.to_string()));
    }
    let file = file?;
    let checked = read_secret_file(&file).and_then(|mut secret| {
        trim_one_newline(&mut secret);
        if secret.is_empty() {
            Err(format!("{} is empty", file.display()))
        } else {
            Ok(secret)
        }
    });
    match checked {
        Ok(secret) => Some(Secret::new(secret)),
        Err(problem) => {
            s.error(
                e,
                "s3_secret_access_key_file",
                format!("{problem}; put the S3 secret access key in it, or fix the path"),
            );
            None
        }
    }
}

fn read_passphrase(e: &mut Report, s: &Section<'_, '_>) -> Option<PassphraseSource> {
    let given: Vec<&str> = PASSPHRASE_KEYS
        .iter()
        .copied()
        .filter(|key| s.item(key).is_some())
        .collect();
    match given.as_slice() {
        [] => {
            s.error_here(
                e,
                "give exactly one of file = \"/path\", env = \"VARIABLE\" or credential = \"NAME\"",
            );
            None
        }
        ["file"] => s.absolute_path(e, "file").map(PassphraseSource::File),
        ["env"] => s.parsed(e, "env", "a variable name", |name| {
            if name.contains(['=', '\0']) {
                Err(format!(
                    "`{name}` is not a usable environment variable name"
                ))
            } else {
                Ok(PassphraseSource::Env(name.to_string()))
            }
        }),
        [_] => s.parsed(e, "credential", "a credential name", |name| {
            check_file_name(name).map(|()| PassphraseSource::Credential(name.to_string()))
        }),
        [first, second, ..] => {
            s.error(
                e,
                second,
                format!("give only one of file, env or credential; {first} is given too"),
            );
            None
        }
    }
}

fn read_agent(e: &mut Report, s: &Section<'_, '_>) -> AgentSettings {
    let defaults = AgentSettings::default();
    let allow_remote_metrics = s.bool(e, "allow_remote_metrics").unwrap_or(false);
    let metrics_listen = s.parsed(e, "metrics_listen", "an address string", |text| {
        parse_metrics_listen(text, allow_remote_metrics)
    });
    let webhook = s.parsed(e, "webhook", "a URL string", |text| {
        // The URL is not repeated: webhook URLs often carry a token.
        if is_http_url(text) {
            Ok(text.to_string())
        } else {
            Err("must be an http:// or https:// URL".to_string())
        }
    });
    let concurrency = |e: &mut Report, name: &str, default: usize| {
        s.integer(e, name, 1, 64)
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(default)
    };
    AgentSettings {
        state_dir: s
            .absolute_path(e, "state_dir")
            .unwrap_or(defaults.state_dir),
        control_socket: s
            .absolute_path(e, "control_socket")
            .unwrap_or(defaults.control_socket),
        metrics_listen,
        max_backups: concurrency(e, "max_backups", defaults.max_backups),
        max_maintenance: concurrency(e, "max_maintenance", defaults.max_maintenance),
        splay: s.duration(e, "splay").unwrap_or(defaults.splay),
        webhook,
        shutdown_grace: s
            .duration(e, "shutdown_grace")
            .unwrap_or(defaults.shutdown_grace),
    }
}

fn read_source(e: &mut Report, s: &Section<'_, '_>, now: DateTime<Local>) -> Option<SourceConfig> {
    let name = s
        .parsed(e, "name", "a name string", |name| {
            check_name(name).map(|()| name.to_string())
        })
        .or_else(|| {
            s.missing(
                e,
                "name",
                "give the source a unique name such as \"etc\" (snapshots are tagged source:NAME)",
            )
        });
    let input = read_input(e, s, name.as_deref());
    let before = s.string(e, "before").map(str::to_string);
    let after = s.string(e, "after").map(str::to_string);
    let schedule = s.required_schedule(e, "back up");
    let rpo = s.nonzero_duration(e, "rpo").or_else(|| {
        s.missing(
            e,
            "rpo",
            "give the recovery point objective, the oldest the newest snapshot may be, e.g. \"7h\"",
        )
    });
    let rto = s.nonzero_duration(e, "rto");
    let timeout = s.timeout(e);
    let tags: Vec<String> = s
        .strings(e, "tags", check_tag)
        .unwrap_or_default()
        .into_iter()
        .map(str::to_string)
        .collect();

    if let (Some(schedule), Some(rpo)) = (&schedule, rpo) {
        let gap = schedule.longest_gap(now);
        if rpo < gap {
            s.error(
                e,
                "rpo",
                format!(
                    "rpo {} is shorter than the schedule's longest gap between runs ({}): the \
                     target would be breached between runs even when every backup succeeds; \
                     lengthen rpo or run more often",
                    format_duration(rpo),
                    format_duration(gap)
                ),
            );
        }
    }

    Some(SourceConfig {
        name: name?,
        input: input?,
        before,
        after,
        schedule: schedule?,
        rpo: rpo?,
        rto,
        timeout,
        tags,
    })
}

/// Reads what a source backs up: `paths` (with `exclude` and
/// `one_file_system`) or `command` (with `stdin_filename`), never both.
fn read_input(e: &mut Report, s: &Section<'_, '_>, name: Option<&str>) -> Option<SourceInput> {
    match (s.item("paths").is_some(), s.item("command").is_some()) {
        (true, true) => {
            s.error(e, "command", "give either paths or command, not both");
            None
        }
        (false, false) => {
            s.error_here(
                e,
                "give either paths = [\"/dir\", ...] to back up files, or \
                 command = [\"program\", \"arg\", ...] to back up a program's output",
            );
            None
        }
        (true, false) => {
            if s.item("stdin_filename").is_some() {
                s.error(e, "stdin_filename", "only applies with command; remove it");
            }
            let paths = s.strings(e, "paths", check_absolute);
            let exclude: Vec<String> = s
                .strings(e, "exclude", |_| Ok(()))
                .unwrap_or_default()
                .into_iter()
                .map(str::to_string)
                .collect();
            let one_file_system = s.bool(e, "one_file_system").unwrap_or(false);
            let paths = paths?;
            if paths.is_empty() {
                s.error(e, "paths", "must list at least one absolute path");
                return None;
            }
            Some(SourceInput::Paths {
                paths: paths.into_iter().map(PathBuf::from).collect(),
                exclude,
                one_file_system,
            })
        }
        (false, true) => {
            for key in ["exclude", "one_file_system"] {
                if s.item(key).is_some() {
                    s.error(e, key, "only applies with paths; remove it");
                }
            }
            let argv = s.strings(e, "command", |_| Ok(()));
            let stdin_filename = s
                .parsed(e, "stdin_filename", "a file name string", |text| {
                    check_file_name(text).map(|()| text.to_string())
                })
                .or_else(|| name.map(str::to_string));
            let argv = argv?;
            if argv.is_empty() {
                s.error(
                    e,
                    "command",
                    "must name a program to run and its arguments, e.g. [\"pg_dump\", \"mydb\"]",
                );
                return None;
            }
            Some(SourceInput::Command {
                argv: argv.into_iter().map(str::to_string).collect(),
                stdin_filename: stdin_filename?,
            })
        }
    }
}

fn read_retention(e: &mut Report, s: &Section<'_, '_>) -> Option<RetentionConfig> {
    let schedule = s.required_schedule(e, "apply the retention policy");
    let errors_before_rules = e.len();
    let count = |e: &mut Report, name: &str| {
        s.integer(e, name, 0, i64::from(u32::MAX))
            .and_then(|n| u32::try_from(n).ok())
    };
    let policy = KeepPolicy {
        last: count(e, "keep_last"),
        hourly: count(e, "keep_hourly"),
        daily: count(e, "keep_daily"),
        weekly: count(e, "keep_weekly"),
        monthly: count(e, "keep_monthly"),
        yearly: count(e, "keep_yearly"),
        // The same parser as `lifeboat forget --keep-within`, so rules can be
        // copied between the two (there `m` means months).
        within: s.parsed(
            e,
            "keep_within",
            "a duration string such as \"7d\" or \"1y6m\"",
            |text| retention::parse_within(text).map_err(|err| err.to_string()),
        ),
        tags: s
            .strings(e, "keep_tag", |_| Ok(()))
            .unwrap_or_default()
            .into_iter()
            .map(str::to_string)
            .collect(),
    };
    // A mistyped rule already has its own error; calling the policy empty
    // on top of that would only repeat it.
    if e.len() == errors_before_rules && policy.is_empty() {
        s.error_here(
            e,
            "no keep rule: a retention run would forget every snapshot; give at least one of \
             keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_yearly, \
             keep_within or keep_tag (counts of zero do not count)",
        );
    }
    let prune = s.bool(e, "prune").unwrap_or(true);
    let timeout = s.timeout(e);
    let hosts = s
        .strings(e, "hosts", |h| {
            if h.is_empty() {
                Err("an empty host name".to_string())
            } else {
                Ok(())
            }
        })
        .unwrap_or_default()
        .into_iter()
        .map(str::to_string)
        .collect();
    Some(RetentionConfig {
        schedule: schedule?,
        policy,
        prune,
        timeout,
        hosts,
    })
}

fn read_check(e: &mut Report, s: &Section<'_, '_>) -> Option<CheckConfig> {
    let schedule = s.required_schedule(e, "check the repository");
    let read_data_subset = s
        .integer(e, "read_data_subset", 0, 100)
        .and_then(|n| u8::try_from(n).ok())
        .unwrap_or(0);
    let timeout = s.timeout(e);
    Some(CheckConfig {
        schedule: schedule?,
        read_data_subset,
        timeout,
    })
}

fn read_drill(e: &mut Report, s: &Section<'_, '_>, sources: &Names) -> Option<DrillConfig> {
    let name = s
        .parsed(e, "name", "a name string", |name| {
            check_name(name).map(|()| name.to_string())
        })
        .or_else(|| {
            s.missing(
                e,
                "name",
                "give the drill a unique name such as \"etc-weekly\"",
            )
        });
    let source = s.string(e, "source").or_else(|| {
        s.missing(
            e,
            "source",
            "name the [[source]] whose snapshots the drill restores",
        )
    });
    let host = s.string(e, "host").map(str::to_string);
    if let Some(source) = source {
        if !sources.contains(source) && host.is_none() {
            s.error(
                e,
                "source",
                format!(
                    "no [[source]] is named `{source}`; sources: {} (to drill another \
                     host's source from this drill host, add host = \"THAT-HOST\")",
                    sources.list()
                ),
            );
        }
    }
    let rto = s.nonzero_duration(e, "rto");
    let schedule = s.required_schedule(e, "run the drill");
    let sample_percent = read_sample(e, s);
    let timeout = s.timeout(e);
    let random_within = match s.string(e, "snapshot") {
        None | Some("latest") => None,
        Some("random") => Some(
            s.nonzero_duration(e, "random_within")
                .unwrap_or(Duration::from_secs(7 * 86400)),
        ),
        Some(other) => {
            s.error(
                e,
                "snapshot",
                format!("`{other}` is not a snapshot choice: use \"latest\" or \"random\""),
            );
            None
        }
    };
    let paths: Vec<String> = s
        .strings(e, "paths", |p| {
            if p.starts_with('/') {
                Ok(())
            } else {
                Err(format!(
                    "`{p}` must be an absolute path inside the snapshot"
                ))
            }
        })
        .unwrap_or_default()
        .into_iter()
        .map(str::to_string)
        .collect();
    let scratch_dir = s.absolute_path(e, "scratch_dir");
    let max_disk = s.parsed(e, "max_disk", "a size string such as \"20G\"", parse_size);
    let validate: Vec<String> = s
        .strings(e, "validate", |_| Ok(()))
        .unwrap_or_default()
        .into_iter()
        .map(str::to_string)
        .collect();
    let validate_timeout = s
        .nonzero_duration(e, "validate_timeout")
        .unwrap_or(Duration::from_secs(600));
    Some(DrillConfig {
        name: name?,
        source: source?.to_string(),
        schedule: schedule?,
        sample_percent: sample_percent?,
        timeout,
        random_within,
        paths,
        scratch_dir,
        max_disk,
        validate,
        validate_timeout,
        host,
        rto,
    })
}

/// A drill's `sample`: `Some(None)` for a full restore (also the default),
/// `Some(Some(percent))` for a sample, `None` when the value is wrong.
fn read_sample(e: &mut Report, s: &Section<'_, '_>) -> Option<Option<u8>> {
    const EXPECTED: &str = "must be a percentage from 1 to 100, or \"full\"";
    let Some(item) = s.item("sample") else {
        return Some(None);
    };
    match item.get_ref() {
        DeValue::String(text) if *text == "full" => Some(None),
        DeValue::Integer(_) => s
            .integer(e, "sample", 1, 100)
            .and_then(|n| u8::try_from(n).ok())
            .map(Some),
        _ => {
            s.error(e, "sample", EXPECTED);
            None
        }
    }
}

/// Translates a 5-field crontab line into the `cron` crate's 6-field form.
fn crontab_expression(
    minute: &str,
    hour: &str,
    day_of_month: &str,
    month: &str,
    day_of_week: &str,
) -> Result<String, String> {
    // Vixie cron treats a day field as unrestricted when it starts with `*`;
    // when neither is, it runs on days matching either, where the cron crate
    // requires both. Refusing the combination avoids a silent difference.
    let restricted = |field: &str| !field.starts_with(['*', '?']);
    if restricted(day_of_month) && restricted(day_of_week) {
        return Err(format!(
            "`{minute} {hour} {day_of_month} {month} {day_of_week}` restricts both the day of \
             month and the day of week: classic cron runs when either matches, this scheduler \
             only when both do; restrict only one of them"
        ));
    }
    let day_of_week = crontab_days_of_week(day_of_week)?;
    Ok(format!(
        "0 {minute} {hour} {day_of_month} {month} {day_of_week}"
    ))
}

/// Translates crontab's day-of-week field (0-7, Sunday = 0 or 7, names,
/// ranges, steps and lists) into the cron crate's numbering (1 = Sunday to
/// 7 = Saturday), as an explicit list so ranges ending on 7 cannot go wrong.
fn crontab_days_of_week(field: &str) -> Result<String, String> {
    if field == "*" || field == "?" {
        return Ok("*".to_string());
    }
    let bad = |item: &str| {
        format!(
            "`{item}` is not a crontab day of week (0-7 where 0 and 7 are Sunday, or sun-sat; \
             ranges such as 1-5, steps such as */2, lists such as 1,3)"
        )
    };
    let mut days = [false; 7];
    for item in field.split(',') {
        let (base, step) = match item.split_once('/') {
            Some((base, step)) => match step.parse::<u32>() {
                Ok(step) if step > 0 => (base, step),
                _ => return Err(bad(item)),
            },
            None => (item, 1),
        };
        let (first, last) = if base == "*" || base == "?" {
            (0, 6)
        } else if let Some((from, to)) = base.split_once('-') {
            let (from, to) = (weekday(from), weekday(to));
            match (from, to) {
                (Some(from), Some(to)) if from <= to => (from, to),
                _ => return Err(bad(item)),
            }
        } else {
            let day = weekday(base).ok_or_else(|| bad(item))?;
            // `N/step` runs from N to the end of the week.
            if item.contains('/') {
                (day, day.max(6))
            } else {
                (day, day)
            }
        };
        let mut day = first;
        while day <= last {
            days[(day % 7) as usize] = true;
            day += step;
        }
    }
    let list: Vec<String> = (0..7u32)
        .filter(|&day| days[day as usize])
        .map(|day| (day + 1).to_string())
        .collect();
    Ok(list.join(","))
}

/// A crontab day of week: 0-7 (0 and 7 are Sunday) or a three-letter name.
fn weekday(text: &str) -> Option<u32> {
    const NAMES: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];
    if let Ok(number) = text.parse::<u32>() {
        return (number <= 7).then_some(number);
    }
    let lower = text.to_ascii_lowercase();
    (0u32..)
        .zip(NAMES)
        .find(|(_, name)| *name == lower)
        .map(|(index, _)| index)
}

/// Maps a shorthand to the form the cron crate knows.
fn shorthand(word: &str) -> Result<&'static str, String> {
    match word.to_ascii_lowercase().as_str() {
        "@yearly" | "@annually" => Ok("@yearly"),
        "@monthly" => Ok("@monthly"),
        "@weekly" => Ok("@weekly"),
        "@daily" | "@midnight" => Ok("@daily"),
        "@hourly" => Ok("@hourly"),
        "@reboot" => Err(
            "@reboot is not supported: the agent runs jobs by the clock; use e.g. @daily"
                .to_string(),
        ),
        _ => Err(format!(
            "unknown shorthand `{word}`; use @hourly, @daily, @weekly, @monthly or @yearly"
        )),
    }
}

/// Reduces the cron crate's error text to one line: its parser prints the
/// expression and a caret line above the actual complaint.
fn summarize_cron_error(message: &str, expression: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|line| {
            !line.is_empty()
                && *line != expression.trim()
                && !line.chars().all(|c| c == '^' || c == ' ')
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn parse_metrics_listen(text: &str, allow_remote: bool) -> Result<SocketAddr, String> {
    let address: SocketAddr = text.parse().map_err(|_| {
        format!("`{text}` is not a socket address; write e.g. \"127.0.0.1:9876\" or \"[::1]:9876\"")
    })?;
    if !allow_remote && !address.ip().is_loopback() {
        return Err(format!(
            "{address} is not a loopback address, and /metrics has no authentication; listen \
             on 127.0.0.1, or set allow_remote_metrics = true in [agent] to expose it"
        ));
    }
    Ok(address)
}

/// True for `http://HOST...` and `https://HOST...` without spaces.
fn is_http_url(text: &str) -> bool {
    let rest = text
        .strip_prefix("https://")
        .or_else(|| text.strip_prefix("http://"));
    rest.is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'))
        && !text.contains(char::is_whitespace)
}

/// Shows a URL's scheme and host only (no user information, path or query).
fn redact_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority.rsplit('@').next().unwrap_or("");
    format!("{scheme}://{host}/<redacted>")
}

/// Source and drill names: short, and safe in tags, metrics labels and paths.
fn check_name(name: &str) -> Result<(), String> {
    let valid = name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a valid name: use at most 64 lowercase letters, digits, `_` and `-`"
        ))
    }
}

/// A single file name: no directories, not `.` or `..`.
fn check_file_name(name: &str) -> Result<(), String> {
    if name.contains(['/', '\0']) || name == "." || name == ".." {
        Err(format!(
            "`{name}` is not a plain file name (no `/`, not `.` or `..`)"
        ))
    } else {
        Ok(())
    }
}

fn check_absolute(path: &str) -> Result<(), String> {
    if Path::new(path).is_absolute() {
        Ok(())
    } else {
        Err(format!(
            "`{path}` is relative; give an absolute path (the agent's working directory is \
             not meaningful)"
        ))
    }
}

fn check_tag(tag: &str) -> Result<(), String> {
    if tag.contains(',') {
        Err(format!(
            "`{tag}` contains a comma; give each tag as its own string"
        ))
    } else if tag.starts_with("source:") {
        Err(format!(
            "`{tag}`: tags starting with source: are reserved; the agent adds source:NAME itself"
        ))
    } else {
        Ok(())
    }
}

/// Reads a file holding one secret; errors name the file, never its content.
fn read_secret_file(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|err| format!("cannot read {}: {err}", path.display()))
}

/// Drops one trailing `\n` (or `\r\n`), as `echo` and editors leave one.
fn trim_one_newline(text: &mut String) {
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
}

/// How a value's type reads in an error message (never the value itself).
fn describe(value: &DeValue<'_>) -> &'static str {
    match value {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "a whole number",
        DeValue::Float(_) => "a number with a fraction",
        DeValue::Boolean(_) => "true or false",
        DeValue::Datetime(_) => "a date-time",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

/// The allowed key nearest to a mistyped one, if it is close enough to be
/// a likely typo (at most two edits, ignoring case).
fn closest<'k>(name: &str, allowed: &[&'k str]) -> Option<&'k str> {
    let name = name.to_ascii_lowercase();
    allowed
        .iter()
        .map(|&key| (edit_distance(&name, key), key))
        .filter(|&(distance, _)| distance <= 2)
        .min_by_key(|&(distance, _)| distance)
        .map(|(_, key)| key)
}

/// Levenshtein distance, one row at a time.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    /// The moment the tests validate at: Monday 15 January 2024, 10:00 local.
    fn now() -> DateTime<Local> {
        local(2024, 1, 15, 10, 0, 0)
    }

    fn local(
        year: i32,
        month: u32,
        day: u32,
        hour: u32,
        minute: u32,
        second: u32,
    ) -> DateTime<Local> {
        Local
            .with_ymd_and_hms(year, month, day, hour, minute, second)
            .single()
            .expect("an unambiguous local time")
    }

    fn parse(text: &str) -> Result<Config, ConfigErrors> {
        Config::parse_at(text, Path::new("/etc/lifeboat/agent.toml"), now())
    }

    fn parse_ok(text: &str) -> Config {
        parse(text).unwrap_or_else(|errors| panic!("unexpected errors:\n{errors}"))
    }

    fn parse_err(text: &str) -> ConfigErrors {
        match parse(text) {
            Ok(config) => panic!("expected errors, got {config:?}"),
            Err(errors) => errors,
        }
    }

    /// The 1-based numbers of the lines containing `needle`, in order.
    fn lines_of(text: &str, needle: &str) -> Vec<usize> {
        text.lines()
            .enumerate()
            .filter(|(_, line)| line.contains(needle))
            .map(|(index, _)| index + 1)
            .collect()
    }

    /// The example in this module's documentation, so the test below proves
    /// that what users copy from the docs is accepted.
    fn documented_example() -> String {
        let mut example = String::new();
        let mut inside = false;
        for line in include_str!("config.rs").lines() {
            let Some(doc) = line.strip_prefix("//!") else {
                break;
            };
            let doc = doc.strip_prefix(' ').unwrap_or(doc);
            if inside && doc == "```" {
                break;
            }
            if inside {
                example.push_str(doc);
                example.push('\n');
            }
            if doc == "```toml" {
                inside = true;
            }
        }
        example
    }

    const MINIMAL: &str = r#"
[repository]
location = "/srv/backup/repo"

[passphrase]
env = "LIFEBOAT_PASSPHRASE"
"#;

    fn with_minimal(extra: &str) -> String {
        format!("{MINIMAL}\n{extra}")
    }

    #[test]
    fn documented_example_parses_into_the_expected_values() {
        let dir = tempfile::tempdir().unwrap();
        let secret_file = dir.path().join("s3-secret");
        std::fs::write(&secret_file, "wJalrXUtnFEMI-example\n").unwrap();
        let text =
            documented_example().replace("/etc/lifeboat/s3-secret", secret_file.to_str().unwrap());
        assert!(text.contains("[[drill]]"), "example not found:\n{text}");

        let config = parse_ok(&text);

        let repository = &config.repository;
        assert_eq!(repository.location, "s3://backups/web1");
        assert_eq!(
            repository.s3_endpoint.as_deref(),
            Some("http://127.0.0.1:3900")
        );
        assert_eq!(repository.s3_region.as_deref(), Some("garage"));
        assert_eq!(repository.s3_path_style, Some(true));
        assert_eq!(
            repository.s3_access_key_id.as_deref(),
            Some("GK31c2f218a2e44f485b94239e")
        );
        assert_eq!(
            repository.s3_secret_access_key.as_ref().map(Secret::expose),
            Some("wJalrXUtnFEMI-example")
        );
        assert_eq!(repository.connections, Some(8));
        assert_eq!(
            repository.cache_dir,
            Some(PathBuf::from("/var/cache/lifeboat"))
        );

        assert_eq!(
            config.passphrase,
            Some(PassphraseSource::File(PathBuf::from(
                "/etc/lifeboat/passphrase"
            )))
        );

        let agent = &config.agent;
        assert_eq!(agent.state_dir, PathBuf::from("/var/lib/lifeboat"));
        assert_eq!(
            agent.control_socket,
            PathBuf::from("/run/lifeboat/agent.sock")
        );
        assert_eq!(
            agent.metrics_listen,
            Some("127.0.0.1:9876".parse::<SocketAddr>().unwrap())
        );
        assert_eq!(agent.max_backups, 1);
        assert_eq!(agent.max_maintenance, 1);
        assert_eq!(agent.splay, Duration::from_secs(300));
        assert_eq!(
            agent.webhook.as_deref(),
            Some("https://alerts.example/hook")
        );
        assert_eq!(agent.shutdown_grace, Duration::from_secs(30));

        assert_eq!(config.sources.len(), 2);
        let etc = config.source("etc").expect("source etc");
        assert_eq!(
            etc.input,
            SourceInput::Paths {
                paths: vec![PathBuf::from("/etc")],
                exclude: vec!["*.tmp".to_string()],
                one_file_system: false,
            }
        );
        assert_eq!(etc.schedule.as_str(), "0 */6 * * *");
        assert_eq!(etc.rpo, Duration::from_secs(7 * 3600));
        assert_eq!(etc.rto, Some(Duration::from_secs(3600)));
        assert_eq!(etc.timeout, Duration::from_secs(2 * 3600));
        assert_eq!(etc.tags, vec!["prod".to_string()]);
        assert_eq!(etc.before, None);

        let db = config.source("db").expect("source db");
        assert_eq!(
            db.input,
            SourceInput::Command {
                argv: vec!["pg_dump".to_string(), "mydb".to_string()],
                stdin_filename: "mydb.sql".to_string(),
            }
        );
        assert_eq!(db.before.as_deref(), Some("systemctl stop foo"));
        assert_eq!(db.after.as_deref(), Some("systemctl start foo"));
        assert_eq!(db.rto, None);
        assert_eq!(db.timeout, DEFAULT_JOB_TIMEOUT);
        assert!(config.source("nosuch").is_none());

        let retention = config.retention.as_ref().expect("retention");
        assert_eq!(retention.schedule.as_str(), "@daily");
        assert_eq!(retention.policy.last, Some(3));
        assert_eq!(retention.policy.daily, Some(7));
        assert_eq!(retention.policy.weekly, Some(4));
        assert_eq!(retention.policy.monthly, None);
        assert_eq!(retention.policy.within, Some(TimeDelta::days(7)));
        assert!(retention.prune);
        assert_eq!(retention.timeout, Duration::from_secs(6 * 3600));

        let check = config.check.as_ref().expect("check");
        assert_eq!(check.schedule.as_str(), "@weekly");
        assert_eq!(check.read_data_subset, 10);

        assert_eq!(config.drills.len(), 1);
        let drill = &config.drills[0];
        assert_eq!(drill.name, "etc-weekly");
        assert_eq!(drill.source, "etc");
        assert_eq!(drill.sample_percent, Some(10));
        assert_eq!(drill.timeout, Duration::from_secs(2 * 3600));
        // "sun" in crontab's day-of-week field: 21 January 2024 is the next Sunday.
        assert_eq!(
            drill.schedule.next_after(now()),
            Some(local(2024, 1, 21, 4, 0, 0))
        );

        assert_eq!(config.path, PathBuf::from("/etc/lifeboat/agent.toml"));
    }

    #[test]
    fn minimal_config_takes_the_documented_defaults() {
        let config = parse_ok(MINIMAL);
        assert_eq!(
            config.passphrase,
            Some(PassphraseSource::Env("LIFEBOAT_PASSPHRASE".to_string()))
        );
        let agent = &config.agent;
        assert_eq!(agent.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(agent.control_socket, PathBuf::from(DEFAULT_CONTROL_SOCKET));
        assert_eq!(agent.metrics_listen, None);
        assert_eq!((agent.max_backups, agent.max_maintenance), (1, 1));
        assert_eq!(agent.splay, Duration::ZERO);
        assert_eq!(agent.shutdown_grace, DEFAULT_SHUTDOWN_GRACE);
        assert!(config.sources.is_empty());
        assert!(config.retention.is_none() && config.check.is_none());
        assert!(config.drills.is_empty());
    }

    #[test]
    fn command_source_stores_its_output_under_its_name_by_default() {
        let config = parse_ok(&with_minimal(
            r#"
[[source]]
name = "mydb"
command = ["pg_dump", "mydb"]
schedule = "@hourly"
rpo = "2h"

[[drill]]
name = "db-full"
source = "mydb"
schedule = "@monthly"
sample = "full"
"#,
        ));
        assert_eq!(
            config.sources[0].input,
            SourceInput::Command {
                argv: vec!["pg_dump".to_string(), "mydb".to_string()],
                stdin_filename: "mydb".to_string(),
            }
        );
        assert_eq!(config.drills[0].sample_percent, None);
    }

    #[test]
    fn every_mistake_is_reported_with_its_line_and_key() {
        let text = r#"[repository]
location = "relative/repo"
s3_region = "garage"
connections = 0

[passphrase]
file = "/etc/lifeboat/passphrase"
env = "LIFEBOAT_PASSPHRASE"

[agent]
metrics_listen = "0.0.0.0:9876"
webhook = "ftp://alerts.example/hook"
max_backups = "two"
splay = "5 minutes"
colour = "blue"

[[source]]
name = "Etc Files"
paths = ["/etc", "var/lib"]
schedule = "0 */6 * *"
rpo = "0s"

[[source]]
name = "db"
command = ["pg_dump", "mydb"]
exclude = ["*.tmp"]
schedule = "@hourly"
rpo = "30m"

[[source]]
name = "db"
paths = ["/srv"]
rpo = "1d"

[retention]
schedule = "@daily"
prune = true

[check]
schedule = "@weekly"
read_data_subset = 150

[[drill]]
name = "nightly"
source = "nosuch"
schedule = "@daily"
sample = "half"
"#;
        let line = |needle: &str| {
            let lines = lines_of(text, needle);
            assert_eq!(lines.len(), 1, "needle {needle:?} is not unique");
            lines[0]
        };
        let db_lines = lines_of(text, "name = \"db\"");
        let duplicate = format!("source name `db` is already used on line {}", db_lines[0]);
        let expected: Vec<(usize, &str, &str)> = vec![
            (
                line("location"),
                "repository.location",
                "`relative/repo` is neither an absolute directory path",
            ),
            (
                line("s3_region"),
                "repository.s3_region",
                "only applies to s3:// repository locations",
            ),
            (
                line("connections"),
                "repository.connections",
                "must be a whole number from 1 to 1024",
            ),
            (
                line("env = "),
                "passphrase.env",
                "give only one of file, env or credential; file is given too",
            ),
            (
                line("metrics_listen"),
                "agent.metrics_listen",
                "0.0.0.0:9876 is not a loopback address",
            ),
            (
                line("webhook"),
                "agent.webhook",
                "must be an http:// or https:// URL",
            ),
            (
                line("max_backups"),
                "agent.max_backups",
                "expected a whole number, found a string",
            ),
            (line("splay"), "agent.splay", "the number 5 has no unit"),
            (
                line("colour"),
                "agent.colour",
                "unknown key; allowed here: state_dir,",
            ),
            (
                line("Etc Files"),
                "source[0].name",
                "`Etc Files` is not a valid name",
            ),
            (
                line("var/lib"),
                "source[0].paths[1]",
                "`var/lib` is relative",
            ),
            (
                line("0 */6 * *\""),
                "source[0].schedule",
                "has 4 fields, not 5, 6 or 7; use a 5-field crontab line",
            ),
            (line("rpo = \"0s\""), "source[0].rpo", "`0s` is zero"),
            (
                line("exclude"),
                "source[1].exclude",
                "only applies with paths",
            ),
            (
                line("rpo = \"30m\""),
                "source[1].rpo",
                "rpo 30m is shorter than the schedule's longest gap between runs (1h)",
            ),
            (db_lines[1], "source[2].name", &duplicate),
            (
                lines_of(text, "[[source]]")[2],
                "source[2].schedule",
                "missing: give when to back up",
            ),
            (
                line("[retention]"),
                "retention",
                "no keep rule: a retention run would forget every snapshot",
            ),
            (
                line("read_data_subset"),
                "check.read_data_subset",
                "must be a whole number from 0 to 100",
            ),
            (
                line("nosuch"),
                "drill[0].source",
                "no [[source]] is named `nosuch`; sources: Etc Files, db",
            ),
            (
                line("half"),
                "drill[0].sample",
                "must be a percentage from 1 to 100, or \"full\"",
            ),
        ];

        let errors = parse_err(text);
        for (line, key, fragment) in &expected {
            let found = errors
                .errors
                .iter()
                .find(|error| error.key == *key && error.line == Some(*line));
            let error = found
                .unwrap_or_else(|| panic!("no error for {key} on line {line}; got:\n{errors}"));
            assert!(
                error.message.contains(fragment),
                "{key}: {:?} does not contain {fragment:?}",
                error.message
            );
        }
        assert_eq!(
            errors.errors.len(),
            expected.len(),
            "unexpected extra errors:\n{errors}"
        );
        let lines: Vec<usize> = errors
            .errors
            .iter()
            .filter_map(|error| error.line)
            .collect();
        assert!(
            lines.windows(2).all(|pair| pair[0] <= pair[1]),
            "errors are not in line order"
        );
    }

    #[test]
    fn missing_tables_and_keys_are_reported() {
        let errors = parse_err("[[source]]\nname = \"etc\"\n");
        let keys: Vec<(Option<usize>, &str)> = errors
            .errors
            .iter()
            .map(|error| (error.line, error.key.as_str()))
            .collect();
        assert_eq!(
            keys,
            vec![
                (Some(1), "source[0]"),
                (Some(1), "source[0].schedule"),
                (Some(1), "source[0].rpo"),
                (None, "repository"),
                (None, "passphrase"),
            ]
        );
        assert!(errors.errors[0].message.contains("give either paths"));
        assert!(errors.errors[3]
            .message
            .starts_with("missing: add a [repository] table"));
    }

    #[test]
    fn a_write_only_host_has_a_writer_key_instead_of_a_passphrase_and_only_backs_up() {
        let base = "[repository]\nlocation = \"/repo\"\nwriter_key = \"/etc/lifeboat/writer.key\"\n\n\
                    [[source]]\nname = \"etc\"\npaths = [\"/etc\"]\nschedule = \"@daily\"\nrpo = \"2d\"\n";
        let config = parse_ok(base);
        assert_eq!(config.passphrase, None);
        assert_eq!(
            config.repository.writer_key.as_deref(),
            Some(Path::new("/etc/lifeboat/writer.key"))
        );

        let errors = parse_err(&format!("{base}\n[passphrase]\nenv = \"X\"\n"));
        assert_eq!(errors.errors.len(), 1, "{errors}");
        assert_eq!(errors.errors[0].key, "passphrase");
        assert!(errors.errors[0].message.contains("not both"));

        let errors = parse_err(&format!(
            "{base}\n[retention]\nschedule = \"@daily\"\nkeep_last = 3\n\n\
             [check]\nschedule = \"@weekly\"\n\n\
             [[drill]]\nname = \"d\"\nsource = \"etc\"\nschedule = \"@weekly\"\n"
        ));
        let keys: Vec<&str> = errors.errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["retention", "check", "drill[0]"], "{errors}");
        assert!(errors
            .errors
            .iter()
            .all(|e| e.message.contains("full key") && e.message.contains("drill host")));
    }

    #[test]
    fn a_drill_host_drills_another_hosts_source_by_naming_the_host() {
        let base = "[repository]\nlocation = \"/repo\"\n\n[passphrase]\nenv = \"X\"\n\n";
        let config = parse_ok(&format!(
            "{base}[[drill]]\nname = \"web1-etc\"\nsource = \"etc\"\nhost = \"web1\"\n\
             schedule = \"@weekly\"\nrto = \"4h\"\n\n\
             [retention]\nschedule = \"@daily\"\nkeep_daily = 7\nhosts = [\"web1\", \"web2\"]\n"
        ));
        assert_eq!(config.retention.as_ref().unwrap().hosts, ["web1", "web2"]);
        let drill = &config.drills[0];
        assert_eq!(drill.host.as_deref(), Some("web1"));
        assert_eq!(drill.rto, Some(Duration::from_secs(4 * 3600)));
        let errors = parse_err(&format!(
            "{base}[[drill]]\nname = \"web1-etc\"\nsource = \"etc\"\nschedule = \"@weekly\"\n"
        ));
        assert_eq!(errors.errors.len(), 1, "{errors}");
        assert_eq!(errors.errors[0].key, "drill[0].source");
        assert!(errors.errors[0].message.contains("host = "), "{errors}");
    }

    #[test]
    fn passphrase_needs_exactly_one_source() {
        let errors = parse_err("[repository]\nlocation = \"/repo\"\n\n[passphrase]\n");
        assert_eq!(errors.errors.len(), 1);
        assert_eq!(errors.errors[0].key, "passphrase");
        assert_eq!(errors.errors[0].line, Some(4));
        assert!(errors.errors[0]
            .message
            .contains("give exactly one of file"));
    }

    #[test]
    fn syntax_errors_are_reported_alone_with_their_lines() {
        let text = "[repository]\nlocation = \"/repo\"\nlocation = \"/other\"\n";
        let errors = parse_err(text);
        assert_eq!(errors.errors.len(), 1, "{errors}");
        assert_eq!(errors.errors[0].line, Some(3));
        assert_eq!(errors.errors[0].key, "");
        assert!(errors.errors[0].message.contains("duplicate key"));
        assert!(errors
            .to_string()
            .starts_with("/etc/lifeboat/agent.toml:3: duplicate key"));
    }

    #[test]
    fn unknown_keys_suggest_the_nearest_allowed_key() {
        let errors = parse_err(
            "[repository]\nlocaton = \"/repo\"\n\n[passphrase]\nenv = \"X\"\n\n[[sources]]\n",
        );
        let messages: Vec<String> = errors.to_string().lines().map(str::to_string).collect();
        assert!(
            messages.iter().any(|m| {
                m.starts_with(
            "/etc/lifeboat/agent.toml:2: repository.locaton: unknown key (did you mean `location`?)"
        )
            }),
            "{messages:?}"
        );
        assert!(
            messages.iter().any(|m| m.starts_with(
                "/etc/lifeboat/agent.toml:7: sources: unknown key (did you mean `source`?)"
            )),
            "{messages:?}"
        );
    }

    #[test]
    fn a_single_source_table_is_refused_with_the_array_syntax() {
        let errors = parse_err(&with_minimal("[source]\nname = \"etc\"\n"));
        assert_eq!(errors.errors.len(), 1, "{errors}");
        assert_eq!(errors.errors[0].key, "source");
        assert_eq!(
            errors.errors[0].message,
            "expected an array of tables ([[source]]), found a table"
        );
    }

    #[test]
    fn display_puts_one_error_on_each_line() {
        let errors = ConfigErrors {
            path: PathBuf::from("/etc/lifeboat/agent.toml"),
            errors: vec![
                ConfigError {
                    line: Some(3),
                    key: "source[0].rpo".to_string(),
                    message: "must be longer".to_string(),
                },
                ConfigError {
                    line: None,
                    key: "passphrase".to_string(),
                    message: "missing".to_string(),
                },
            ],
        };
        assert_eq!(
            errors.to_string(),
            "/etc/lifeboat/agent.toml:3: source[0].rpo: must be longer\n\
             /etc/lifeboat/agent.toml: passphrase: missing"
        );
    }

    #[test]
    fn load_of_a_missing_file_says_how_to_fix_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        let errors = Config::load(&path).unwrap_err();
        assert_eq!(errors.errors.len(), 1);
        assert_eq!(errors.errors[0].line, None);
        assert!(errors.to_string().starts_with(&format!(
            "{}: cannot read the configuration file: ",
            path.display()
        )));
        assert!(errors.to_string().ends_with("create it, or pass --config"));

        std::fs::write(&path, MINIMAL).unwrap();
        let config = Config::load(&path).unwrap();
        assert_eq!(config.path, path);
    }

    #[test]
    fn crontab_daily_and_per_second_schedules_fire_at_the_right_times() {
        let six_hourly = Schedule::parse("0 */6 * * *").unwrap();
        assert_eq!(
            six_hourly.next_after(now()),
            Some(local(2024, 1, 15, 12, 0, 0))
        );
        // Strictly after: a run at exactly `t` is not returned.
        assert_eq!(
            six_hourly.next_after(local(2024, 1, 15, 12, 0, 0)),
            Some(local(2024, 1, 15, 18, 0, 0))
        );

        let daily = Schedule::parse("@daily").unwrap();
        assert_eq!(daily.next_after(now()), Some(local(2024, 1, 16, 0, 0, 0)));
        assert_eq!(
            Schedule::parse("@midnight").unwrap().next_after(now()),
            daily.next_after(now())
        );

        let every_ten_seconds = Schedule::parse("*/10 * * * * *").unwrap();
        assert_eq!(
            every_ten_seconds.next_after(local(2024, 1, 15, 10, 0, 5)),
            Some(local(2024, 1, 15, 10, 0, 10))
        );
        assert_eq!(
            every_ten_seconds.longest_gap(now()),
            Duration::from_secs(10)
        );
        assert_eq!(
            format!("{every_ten_seconds:?}"),
            "Schedule(\"*/10 * * * * *\")"
        );
    }

    #[test]
    fn crontab_day_of_week_uses_crontab_numbering() {
        let next = |expression: &str, from: DateTime<Local>| {
            Schedule::parse(expression).unwrap().next_after(from)
        };
        // 14 January 2024 is a Sunday, 15 a Monday, 19 a Friday.
        let sunday = local(2024, 1, 14, 10, 0, 0);
        assert_eq!(next("0 9 * * 1", sunday), Some(local(2024, 1, 15, 9, 0, 0)));
        assert_eq!(next("0 9 * * 0", now()), Some(local(2024, 1, 21, 9, 0, 0)));
        assert_eq!(next("0 9 * * 7", now()), Some(local(2024, 1, 21, 9, 0, 0)));
        assert_eq!(
            next("0 9 * * 5-7", now()),
            Some(local(2024, 1, 19, 9, 0, 0))
        );
        assert_eq!(
            next("0 9 * * mon-fri", local(2024, 1, 19, 10, 0, 0)),
            Some(local(2024, 1, 22, 9, 0, 0))
        );
        assert_eq!(
            next("0 9 * * */2", now()),
            Some(local(2024, 1, 16, 9, 0, 0))
        );
    }

    #[test]
    fn bad_schedules_are_refused_with_the_accepted_forms() {
        for bad in [
            "",
            "daily",
            "0 */6 * *",
            "61 * * * *",
            "0 0 * * 8",
            "@reboot",
            "@often",
            "0 0 1 * 1",
        ] {
            let message = Schedule::parse(bad).unwrap_err();
            assert!(
                !message.contains('\n'),
                "{bad:?}: multi-line message {message:?}"
            );
            if bad.starts_with('@') {
                assert!(message.contains("@daily"), "{bad:?}: {message}");
            }
        }
        assert!(Schedule::parse("0 */6 * *")
            .unwrap_err()
            .contains(SCHEDULE_FORMS));
        assert!(Schedule::parse("0 0 1 * 1")
            .unwrap_err()
            .contains("restrict only one"));
        assert!(Schedule::parse("0 0 0 30 2 *")
            .unwrap_err()
            .contains("never fires"));
    }

    #[test]
    fn longest_gap_covers_uneven_schedules() {
        let weekdays = Schedule::parse("0 9 * * 1-5").unwrap();
        // Friday 09:00 to Monday 09:00: 72 hours, or up to 73 over a weekend
        // when the clocks go back, in a time zone with daylight saving time.
        let gap = weekdays.longest_gap(now());
        assert!(
            (Duration::from_secs(72 * 3600)..=Duration::from_secs(73 * 3600)).contains(&gap),
            "{gap:?}"
        );
        let yearly = Schedule::parse("@yearly").unwrap();
        assert!(yearly.longest_gap(now()) >= Duration::from_secs(365 * 24 * 3600));
    }

    #[test]
    fn rpo_shorter_than_the_schedule_interval_is_refused() {
        let source = |rpo: &str| {
            with_minimal(&format!(
                "[[source]]\nname = \"etc\"\npaths = [\"/etc\"]\nschedule = \"0 * * * *\"\nrpo = \"{rpo}\"\n"
            ))
        };
        let errors = parse_err(&source("30m"));
        assert_eq!(errors.errors.len(), 1, "{errors}");
        assert_eq!(errors.errors[0].key, "source[0].rpo");
        assert_eq!(
            errors.errors[0].message,
            "rpo 30m is shorter than the schedule's longest gap between runs (1h): the target \
             would be breached between runs even when every backup succeeds; lengthen rpo or \
             run more often"
        );
        assert_eq!(
            parse_ok(&source("1h")).sources[0].rpo,
            Duration::from_secs(3600)
        );
    }

    #[test]
    fn retention_without_a_keep_rule_is_refused() {
        for rules in ["", "keep_last = 0\n"] {
            let errors = parse_err(&with_minimal(&format!(
                "[retention]\nschedule = \"@daily\"\n{rules}"
            )));
            assert_eq!(errors.errors.len(), 1, "{errors}");
            assert_eq!(errors.errors[0].key, "retention");
            assert!(errors.errors[0]
                .message
                .contains("would forget every snapshot"));
        }
        let config = parse_ok(&with_minimal(
            "[retention]\nschedule = \"@daily\"\nkeep_tag = [\"keep\"]\n",
        ));
        let retention = config.retention.unwrap();
        assert_eq!(retention.policy.tags, vec!["keep".to_string()]);
        assert!(retention.prune);
    }

    #[test]
    fn s3_settings_for_a_directory_repository_are_refused() {
        let errors = parse_err(
            "[repository]\nlocation = \"/srv/repo\"\ns3_endpoint = \"http://127.0.0.1:3900\"\n\n\
             [passphrase]\nenv = \"X\"\n",
        );
        assert_eq!(errors.errors.len(), 1, "{errors}");
        assert_eq!(errors.errors[0].key, "repository.s3_endpoint");
        assert_eq!(errors.errors[0].line, Some(3));
        assert!(errors.errors[0]
            .message
            .contains("only applies to s3:// repository locations"));
    }

    #[test]
    fn remote_metrics_need_an_explicit_opt_in() {
        let config = parse_ok(&with_minimal(
            "[agent]\nmetrics_listen = \"0.0.0.0:9876\"\nallow_remote_metrics = true\n",
        ));
        assert_eq!(
            config.agent.metrics_listen,
            Some("0.0.0.0:9876".parse::<SocketAddr>().unwrap())
        );
        let errors = parse_err(&with_minimal("[agent]\nmetrics_listen = \"localhost\"\n"));
        assert!(errors.errors[0].message.contains("is not a socket address"));
    }

    #[test]
    fn secrets_never_show_in_debug_output_or_errors() {
        const SECRET: &str = "TOPSECRET-wJalrXUtnFEMI";
        const TOKEN: &str = "TOKEN-B00000000-XXXXXXXX";
        let valid = format!(
            "[repository]\nlocation = \"s3://bucket/prefix\"\ns3_access_key_id = \"GKID\"\n\
             s3_secret_access_key = \"{SECRET}\"\n\n[passphrase]\nenv = \"X\"\n\n\
             [agent]\nwebhook = \"https://user:pw@hooks.example/services/{TOKEN}?t={TOKEN}\"\n"
        );
        let config = parse_ok(&valid);
        assert_eq!(
            config
                .repository
                .s3_secret_access_key
                .as_ref()
                .map(Secret::expose),
            Some(SECRET)
        );
        let debug = format!("{config:?}");
        assert!(!debug.contains(SECRET), "{debug}");
        assert!(!debug.contains(TOKEN), "{debug}");
        assert!(!debug.contains("pw@"), "{debug}");
        assert!(
            debug.contains("https://hooks.example/<redacted>"),
            "{debug}"
        );

        // Both forms of the secret, a directory location and a broken webhook
        // all produce errors about the keys holding secrets.
        let invalid = format!(
            "[repository]\nlocation = \"/srv/repo\"\ns3_secret_access_key = \"{SECRET}\"\n\
             s3_secret_access_key_file = \"/nonexistent/secret\"\n\n[passphrase]\nenv = \"X\"\n\n\
             [agent]\nwebhook = \"ftp://hooks.example/{TOKEN}\"\n"
        );
        let errors = parse_err(&invalid);
        let shown = format!("{errors}\n{errors:?}");
        assert!(errors.errors.len() >= 4, "{shown}");
        assert!(!shown.contains(SECRET), "{shown}");
        assert!(!shown.contains(TOKEN), "{shown}");
    }

    #[test]
    fn s3_secret_is_read_from_its_file_and_must_not_be_empty() {
        let dir = tempfile::tempdir().unwrap();
        let secret_file = dir.path().join("secret");
        let text = format!(
            "[repository]\nlocation = \"s3://bucket\"\ns3_access_key_id = \"GKID\"\n\
             s3_secret_access_key_file = \"{}\"\n\n[passphrase]\nenv = \"X\"\n",
            secret_file.display()
        );
        let errors = parse_err(&text);
        assert_eq!(errors.errors[0].line, Some(4));
        assert!(errors.errors[0].message.contains("cannot read"), "{errors}");

        std::fs::write(&secret_file, "\n").unwrap();
        assert!(parse_err(&text).errors[0].message.contains("is empty"));

        std::fs::write(&secret_file, "s3cr3t\r\n").unwrap();
        let config = parse_ok(&text);
        assert_eq!(
            config
                .repository
                .s3_secret_access_key
                .as_ref()
                .map(Secret::expose),
            Some("s3cr3t")
        );
    }

    #[test]
    fn durations_round_trip_and_junk_is_refused() {
        let cases = [
            ("90s", 90),
            ("15m", 900),
            ("7h", 7 * 3600),
            ("2d", 2 * 86_400),
            ("1w", 7 * 86_400),
            ("1h30m", 5400),
            ("1h 30m", 5400),
            ("0s", 0),
        ];
        for (text, seconds) in cases {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_secs(seconds)),
                "{text}"
            );
        }
        for text in ["1h30m", "1d1h", "2w", "90s", "0s"] {
            let duration = parse_duration(text).unwrap();
            assert_eq!(parse_duration(&format_duration(duration)), Ok(duration));
        }
        assert_eq!(format_duration(Duration::from_secs(5400)), "1h30m");
        assert_eq!(format_duration(Duration::from_secs(90_000)), "1d1h");

        for junk in [
            "",
            "  ",
            "5",
            "h",
            "5x",
            "1.5h",
            "-1h",
            "1 h",
            "7 days",
            "99999999999999999999s",
            "3000000000000000w",
        ] {
            assert!(parse_duration(junk).is_err(), "{junk:?} was accepted");
        }
        assert!(parse_duration("1.5h").unwrap_err().contains("fractions"));
        assert!(parse_duration("5x")
            .unwrap_err()
            .contains("unknown unit `x`"));
    }

    #[test]
    fn zero_rpo_and_timeout_are_refused() {
        let errors = parse_err(&with_minimal(
            "[[source]]\nname = \"etc\"\npaths = [\"/etc\"]\nschedule = \"@daily\"\nrpo = \"0m\"\ntimeout = \"0s\"\n",
        ));
        let keys: Vec<&str> = errors
            .errors
            .iter()
            .map(|error| error.key.as_str())
            .collect();
        assert_eq!(keys, vec!["source[0].rpo", "source[0].timeout"]);
    }

    #[test]
    fn passphrase_is_read_from_a_file_the_environment_or_a_credential() {
        let dir = tempfile::tempdir().unwrap();
        let no_env = |_: &str| -> Option<OsString> { None };

        let file = dir.path().join("passphrase");
        std::fs::write(&file, "correct horse\n").unwrap();
        assert_eq!(
            PassphraseSource::File(file.clone()).read_with(&no_env),
            Ok("correct horse".to_string())
        );

        let env = |name: &str| (name == "LIFEBOAT_TEST_PW").then(|| OsString::from("from-env"));
        assert_eq!(
            PassphraseSource::Env("LIFEBOAT_TEST_PW".to_string()).read_with(&env),
            Ok("from-env".to_string())
        );
        let unset = PassphraseSource::Env("LIFEBOAT_UNSET".to_string())
            .read_with(&env)
            .unwrap_err();
        assert!(
            unset.contains("LIFEBOAT_UNSET") && unset.contains("not set"),
            "{unset}"
        );

        std::fs::write(dir.path().join("lifeboat-passphrase"), "from-credential").unwrap();
        let credentials = |name: &str| {
            (name == "CREDENTIALS_DIRECTORY").then(|| dir.path().as_os_str().to_os_string())
        };
        let credential = PassphraseSource::Credential("lifeboat-passphrase".to_string());
        assert_eq!(
            credential.read_with(&credentials),
            Ok("from-credential".to_string())
        );
        let outside_systemd = credential.read_with(&no_env).unwrap_err();
        assert!(
            outside_systemd.contains("LoadCredential=lifeboat-passphrase"),
            "{outside_systemd}"
        );

        std::fs::write(&file, "\n").unwrap();
        let empty = PassphraseSource::File(file.clone())
            .read_with(&no_env)
            .unwrap_err();
        assert!(empty.contains("is empty"), "{empty}");

        let missing = PassphraseSource::File(dir.path().join("nope"))
            .read_with(&no_env)
            .unwrap_err();
        assert!(missing.contains("create it"), "{missing}");
    }

    #[test]
    fn drill_keys_parse_and_bad_values_name_their_lines() {
        let ok = parse_ok(&with_minimal(
            r#"
[[source]]
name = "db"
command = ["pg_dump", "db"]
schedule = "@hourly"
rpo = "2h"

[[drill]]
name = "db-drill"
source = "db"
schedule = "@daily"
snapshot = "random"
random_within = "3d"
paths = ["/db"]
max_disk = "20G"
validate = ["pg_restore --list {restore_dir}/db"]
validate_timeout = "5m"
"#,
        ));
        let d = &ok.drills[0];
        assert_eq!(d.random_within, Some(Duration::from_secs(3 * 86400)));
        assert_eq!(d.paths, ["/db"]);
        assert_eq!(d.max_disk, Some(20 << 30));
        assert_eq!(d.validate.len(), 1);
        assert_eq!(d.validate_timeout, Duration::from_secs(300));
        let text = with_minimal(
            r#"
[[source]]
name = "db"
command = ["pg_dump", "db"]
schedule = "@hourly"
rpo = "2h"

[[drill]]
name = "db-drill"
source = "db"
schedule = "@daily"
snapshot = "oldest"
max_disk = "lots"
"#,
        );
        let err = parse_err(&text).to_string();
        assert!(err.contains("snapshot") && err.contains("latest"), "{err}");
        assert!(err.contains("max_disk"), "{err}");
    }

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(parse_size("500M").unwrap(), 500 << 20);
        assert_eq!(parse_size("20G").unwrap(), 20 << 30);
        assert_eq!(parse_size("1TiB").unwrap(), 1 << 40);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("0").is_err());
        assert!(parse_size("10X").unwrap_err().contains("unknown size unit"));
    }
}
