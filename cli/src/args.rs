//! Command-line arguments as clap parses them. Validation and resolution
//! into settings happen in `commands`, so this file is only the shape of the
//! command line and its help text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

const EXIT_CODES: &str = "\
EXIT CODES:
    0    success
    1    error (the message says what and how to fix it)
    2    invalid command line
    3    incomplete: a backup was saved but some files could not be read, or
         a restore finished but some entries failed or were left as conflicts
    4    `status`: a source's RPO or RTO target is breached
    10   no repository at the given location
    12   wrong passphrase
    13   corruption found (check found problems, data read was damaged, or an
         object asked for does not verify: unsigned, or signed by another host)
    14   needs the full key: the command reads or deletes what a write-only
         credential (--writer-key) cannot; run it with a passphrase
    130  interrupted (Ctrl-C); the repository stays valid
    141  standard output was closed by its reader (e.g. `| head`); nothing
         else went wrong

ENVIRONMENT:
    LIFEBOAT_REPOSITORY       repository location (instead of --repo)
    LIFEBOAT_S3_ENDPOINT, LIFEBOAT_S3_REGION, LIFEBOAT_S3_PATH_STYLE,
    LIFEBOAT_CONNECTIONS, LIFEBOAT_RETRY_SECS
                              the options of the same names
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE,
    AWS_REGION                S3 credentials and region, as every AWS tool reads
                              them (also ~/.aws/credentials and instance roles)
    LIFEBOAT_PASSPHRASE       the passphrase (instead of a prompt)
    LIFEBOAT_PASSPHRASE_FILE  file holding the passphrase (instead of --passphrase-file)
    LIFEBOAT_NEW_PASSPHRASE   new passphrase for `key add` and `key passwd`
    LIFEBOAT_WRITER_KEY       write-only credential file (instead of --writer-key)
    LIFEBOAT_CACHE_DIR        local cache directory (default ~/.cache/lifeboat)
    LIFEBOAT_CONFIG           the agent's configuration file (default /etc/lifeboat/lifeboat.toml)
    LIFEBOAT_KDF_WORK_FACTOR  scrypt work factor (log2 N, 10-22, default 16) for keys
                              created by `init`, `key add` and `key passwd`";

/// Lifeboat: deduplicated, compressed, encrypted backups you can prove restore.
#[derive(Debug, Parser)]
#[command(name = "lifeboat", version, after_help = EXIT_CODES)]
pub struct Cli {
    /// Options for every command.
    #[command(flatten)]
    pub global: Global,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Options shared by all commands.
#[derive(Debug, Args)]
pub struct Global {
    /// Repository location: a local directory, `s3://BUCKET/PREFIX` (AWS,
    /// or the endpoint from --s3-endpoint), or
    /// `s3:http://HOST:PORT/BUCKET/PREFIX` (an S3-compatible store).
    #[arg(short = 'r', long, global = true, env = "LIFEBOAT_REPOSITORY")]
    pub repo: Option<PathBuf>,
    /// S3 endpoint URL for S3-compatible stores (Garage, MinIO, Ceph, R2...);
    /// implies path-style addressing unless --s3-path-style=false.
    #[arg(long, global = true, env = "LIFEBOAT_S3_ENDPOINT", value_name = "URL")]
    pub s3_endpoint: Option<String>,
    /// S3 region (default: AWS_REGION or the AWS profile, else us-east-1).
    #[arg(long, global = true, env = "LIFEBOAT_S3_REGION", value_name = "REGION")]
    pub s3_region: Option<String>,
    /// Address buckets as ENDPOINT/BUCKET (path style) instead of BUCKET.ENDPOINT.
    #[arg(
        long,
        global = true,
        env = "LIFEBOAT_S3_PATH_STYLE",
        value_name = "BOOL"
    )]
    pub s3_path_style: Option<bool>,
    /// Requests kept in flight to the store at once (default: 8 for S3, 2 for a directory).
    #[arg(long, global = true, env = "LIFEBOAT_CONNECTIONS", value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=256))]
    pub connections: Option<u16>,
    /// How long to keep retrying a failing request before giving up, in seconds.
    #[arg(long, global = true, env = "LIFEBOAT_RETRY_SECS", value_name = "SECS", default_value_t = 120,
          value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub retry_secs: u64,
    /// Log more: -v shows retries and store capabilities, -vv every decision.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Read the passphrase from this file (first line).
    #[arg(long, global = true, env = "LIFEBOAT_PASSPHRASE_FILE")]
    pub passphrase_file: Option<PathBuf>,
    /// Open the repository with a write-only credential (from `key
    /// export-writer`) instead of a passphrase: `backup` works, with full
    /// dedup; every command that reads or deletes snapshots fails (exit 14).
    #[arg(long, global = true, env = "LIFEBOAT_WRITER_KEY", value_name = "FILE")]
    pub writer_key: Option<PathBuf>,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// Print nothing but errors and the result.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Directory for the local cache: what files held at the last backup,
    /// and a copy of the repository's blob index that backups (and
    /// restores, where it exists) map instead of loading (only a cache:
    /// safe to delete).
    #[arg(long, global = true, env = "LIFEBOAT_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a new repository.
    Init(InitArgs),
    /// Back up files and directories (or standard input) into a new snapshot.
    Backup(BackupArgs),
    /// List snapshots.
    Snapshots(FilterArgs),
    /// List the contents of a snapshot.
    Ls(LsArgs),
    /// Show what changed between two snapshots.
    Diff(DiffArgs),
    /// Restore a snapshot (or part of it) into a directory.
    Restore(RestoreArgs),
    /// Write one file of a snapshot to standard output.
    Dump(DumpArgs),
    /// Verify the repository; with --read-data also every byte of data.
    Check(CheckArgs),
    /// Remove snapshots by ID or by retention rules.
    Forget(ForgetArgs),
    /// Delete data no snapshot needs (two-phase, safe with concurrent backups).
    Prune(PruneArgs),
    /// Manage the passphrases that open the repository.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Move a format-2 repository to format 3 (signed provenance): check
    /// and vouch for its data, adopt its snapshots, register its hosts.
    /// Safe to interrupt and run again; write-only hosts need new
    /// credentials afterwards (`key export-writer --host NAME`).
    Upgrade(UpgradeArgs),
    /// Run the agent: the daemon that backs up every configured source on
    /// schedule and keeps it within its RPO.
    Agent(AgentArgs),
    /// Show every configured source against its RPO and RTO targets
    /// (exit code 4 when any target is breached).
    Status(ConfigArgs),
    /// Ask the running agent to run a job now and follow it (or run it here
    /// when no agent runs): backup:SOURCE, retention or check.
    Run(RunArgs),
    /// Work with the agent's configuration file.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Work with the agent's catalog (its local history of runs and snapshots).
    #[command(subcommand)]
    Catalog(CatalogCommand),
    /// Restore drills: restore for real into a sandbox, verify, validate,
    /// time it, and report (the reports are kept in the repository).
    #[command(subcommand)]
    Drill(DrillCommand),
    /// Write man pages and shell completions (for packaging).
    #[command(hide = true)]
    GenerateAssets {
        /// Directory to write `man/` and `completions/` into.
        #[arg(long)]
        out: PathBuf,
    },
}

/// `drill` subcommands.
#[derive(Debug, Subcommand)]
pub enum DrillCommand {
    /// Run a drill now against --repo.
    Run(Box<DrillRunArgs>),
    /// List the drills recorded in the repository.
    List,
    /// Show one drill's report (the latest by default).
    Show(DrillShowArgs),
    /// Write every source's latest drill report as HTML, with an index page.
    Report(DrillReportArgs),
}

/// `drill run`.
#[derive(Debug, Args)]
pub struct DrillRunArgs {
    /// Drill this source's snapshots (those tagged source:NAME by the agent);
    /// without it, any snapshot.
    #[arg(long)]
    pub source: Option<String>,
    /// Drill only snapshots taken on this host (e.g. a write-only backup
    /// host, drilled from a host that holds the passphrase).
    #[arg(long)]
    pub host: Option<String>,
    /// Restore this snapshot (ID prefix) instead of the latest.
    #[arg(long, conflicts_with = "random_within")]
    pub snapshot: Option<String>,
    /// Restore a random snapshot from this recent window (e.g. 7d).
    #[arg(long, value_name = "DURATION")]
    pub random_within: Option<String>,
    /// Restore a random sample of files holding about this percentage of the bytes.
    #[arg(long, value_name = "PERCENT", conflicts_with = "path")]
    pub sample: Option<f64>,
    /// Restore only this path inside the snapshot (repeatable).
    #[arg(long)]
    pub path: Vec<String>,
    /// Directory in which the sandbox is created (default: the system's temp dir).
    #[arg(long)]
    pub scratch: Option<PathBuf>,
    /// Refuse to start when the restore needs more than this (e.g. 20G).
    #[arg(long, value_name = "SIZE")]
    pub max_disk: Option<String>,
    /// Stop the drill after this long (e.g. 30m).
    #[arg(long, value_name = "DURATION", default_value = "24h")]
    pub time_limit: String,
    /// A command to run against the restored tree; `{restore_dir}` is
    /// replaced by the sandbox (repeatable).
    #[arg(long, value_name = "COMMAND")]
    pub validate: Vec<String>,
    /// How long each validation command may run.
    #[arg(long, value_name = "DURATION", default_value = "10m")]
    pub validate_timeout: String,
    /// The RTO target to judge the measured restore time against (e.g. 1h).
    #[arg(long, value_name = "DURATION")]
    pub rto: Option<String>,
    /// Keep the sandbox afterwards.
    #[arg(long)]
    pub keep: bool,
    /// Report format printed at the end.
    #[arg(long, default_value = "md", value_parser = ["md", "json"])]
    pub format: String,
}

/// `drill show`.
#[derive(Debug, Args)]
pub struct DrillShowArgs {
    /// Report ID prefix; the latest drill by default.
    pub id: Option<String>,
    /// Output format.
    #[arg(long, default_value = "md", value_parser = ["md", "html", "json"])]
    pub format: String,
}

/// `drill report`.
#[derive(Debug, Args)]
pub struct DrillReportArgs {
    /// Directory for the HTML pages (created if missing).
    #[arg(long)]
    pub out: PathBuf,
}

/// Where the agent's configuration file is.
#[derive(Debug, Args, Clone)]
pub struct ConfigArgs {
    /// The agent's configuration file.
    #[arg(
        long,
        env = "LIFEBOAT_CONFIG",
        default_value = "/etc/lifeboat/lifeboat.toml"
    )]
    pub config: PathBuf,
}

/// `agent`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The configuration file.
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Run every job that is due now once (a backup that never ran is due),
    /// then exit; for trying a configuration out.
    #[arg(long)]
    pub once: bool,
    /// Log line format on stderr: text (journald adds the time) or json.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

/// `run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The job: backup:SOURCE, retention or check.
    pub job: String,
    /// The configuration file.
    #[command(flatten)]
    pub config: ConfigArgs,
}

/// `config` subcommands.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a configuration file and report every error with its line.
    Check(ConfigArgs),
}

/// `catalog` subcommands.
#[derive(Debug, Subcommand)]
pub enum CatalogCommand {
    /// Recreate the catalog's snapshot list from the repository (after
    /// losing the state directory, or moving to a new host).
    Rebuild(ConfigArgs),
}

/// `init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// zstd compression level for new data (0 = none, 1-22; 3 is fast and good).
    #[arg(long, default_value_t = 3)]
    pub compression: i32,
    /// Target pack size in MiB (1-512). Larger packs mean fewer objects;
    /// smaller ones less memory per worker.
    #[arg(long, default_value_t = 8)]
    pub pack_size: u32,
    /// Succeed without changing anything when a repository already exists
    /// there (for scripts that set up a host idempotently).
    #[arg(long)]
    pub exists_ok: bool,
    /// Keep every snapshot immutable for this many days with S3 Object Lock
    /// (packs and index objects 1.5 times as long; backups extend the locks
    /// of older packs they reuse). Recorded in the repository, so every
    /// host honours it. Needs a bucket with Object Lock; a missing bucket
    /// is created with it.
    #[arg(long, value_name = "DAYS", value_parser = clap::value_parser!(u32).range(1..=36_500))]
    pub lock_days: Option<u32>,
    /// Object Lock mode: `governance` (users with s3:BypassGovernanceRetention
    /// may still delete) or `compliance` (nobody can, not even the account root).
    #[arg(long, value_name = "MODE", default_value = "governance", requires = "lock_days",
          value_parser = ["governance", "compliance"])]
    pub lock_mode: String,
}

/// `backup`.
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// Paths to back up.
    #[arg(required_unless_present_any = ["stdin", "source"])]
    pub paths: Vec<PathBuf>,
    /// Tag the snapshot (repeatable).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Host name to record (default: this machine's).
    #[arg(long)]
    pub host: Option<String>,
    /// Exclude entries matching a glob; without '/' it matches names anywhere,
    /// with '/' the absolute path (repeatable).
    #[arg(long = "exclude", short = 'e')]
    pub excludes: Vec<String>,
    /// Read exclude patterns from a file, one per line ('#' starts a comment).
    #[arg(long)]
    pub exclude_file: Vec<PathBuf>,
    /// Stay on the file system of each path given.
    #[arg(short = 'x', long)]
    pub one_file_system: bool,
    /// Back up standard input as one file (e.g. `pg_dump db | lifeboat backup --stdin`).
    #[arg(long, conflicts_with = "paths")]
    pub stdin: bool,
    /// File name for --stdin.
    #[arg(long, default_value = "stdin", requires = "stdin")]
    pub stdin_filename: String,
    /// Ignore the local cache: read every file, and load the blob index
    /// from the repository into memory.
    #[arg(long)]
    pub no_cache: bool,
    /// Back up a source of the agent's configuration (through the running
    /// agent when there is one), instead of paths.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["paths", "stdin"])]
    pub source: Option<String>,
    /// The agent's configuration file, for --source.
    #[arg(
        long,
        env = "LIFEBOAT_CONFIG",
        default_value = "/etc/lifeboat/lifeboat.toml"
    )]
    pub config: PathBuf,
}

/// Snapshot filters.
#[derive(Debug, Args, Clone)]
pub struct FilterArgs {
    /// Only snapshots of this host (and `latest` is this host's newest).
    #[arg(long)]
    pub host: Option<String>,
    /// Only snapshots with this tag (repeatable: all of them).
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,
    /// Only snapshots that include this path (repeatable: all of them).
    #[arg(long = "path", value_name = "PATH")]
    pub paths: Vec<String>,
}

impl FilterArgs {
    /// The core's selector.
    pub fn selector(&self) -> lifeboat_core::Selector {
        lifeboat_core::Selector {
            host: self.host.clone(),
            paths: self.paths.clone(),
            tags: self.tags.clone(),
        }
    }
}

/// `ls`.
#[derive(Debug, Args)]
pub struct LsArgs {
    /// Snapshot ID prefix, or `latest` (the newest of --host, --path, --tag).
    pub snapshot: String,
    /// Which snapshots `latest` chooses among.
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Only entries at or below this path.
    pub path: Option<String>,
    /// Show mode, owner, size and time.
    #[arg(short, long)]
    pub long: bool,
}

/// `diff`.
#[derive(Debug, Args)]
pub struct DiffArgs {
    /// The older snapshot.
    pub from: String,
    /// The newer snapshot.
    pub to: String,
    /// Which snapshots `latest` chooses among.
    #[command(flatten)]
    pub filter: FilterArgs,
}

/// `restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Snapshot ID prefix, or `latest` (the newest of --host, --path, --tag).
    pub snapshot: String,
    /// Which snapshots `latest` chooses among.
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Directory to restore into.
    #[arg(long, short = 't')]
    pub target: PathBuf,
    /// Restore only paths matching this glob, and what is below them (repeatable).
    #[arg(long = "include", short = 'i')]
    pub includes: Vec<String>,
    /// Skip paths matching this glob, and what is below them (repeatable).
    #[arg(long = "exclude", short = 'e')]
    pub excludes: Vec<String>,
    /// Show what would be restored without writing anything.
    #[arg(long)]
    pub dry_run: bool,
    /// Re-read every restored file and compare it with the snapshot.
    #[arg(long)]
    pub verify: bool,
    /// Replace existing files that differ from the snapshot.
    #[arg(long)]
    pub overwrite: bool,
    /// Entries planned and written at a time. Restore memory is a few
    /// batches, whatever the snapshot's size; a larger batch rereads fewer
    /// packs whose blobs straddle batches.
    #[arg(long, value_name = "ENTRIES", default_value_t = lifeboat_core::restore::DEFAULT_BATCH as u32,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub batch: u32,
    /// Load the blob index from the repository even where the local cache
    /// holds a copy of it (a restore maps that copy instead of loading
    /// every index object, and never writes one).
    #[arg(long)]
    pub no_cache: bool,
}

/// `dump`.
#[derive(Debug, Args)]
pub struct DumpArgs {
    /// Snapshot ID prefix, or `latest` (the newest of --host, --path, --tag).
    pub snapshot: String,
    /// Which snapshots `latest` chooses among.
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Path of the file in the snapshot, e.g. /var/backups/db.dump.
    pub path: String,
}

/// `check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Read and verify all data.
    #[arg(long)]
    pub read_data: bool,
    /// Read and verify this percentage of packs, chosen at random.
    #[arg(long, value_name = "PERCENT", conflicts_with = "read_data")]
    pub read_data_subset: Option<String>,
}

/// `forget`.
#[derive(Debug, Args)]
pub struct ForgetArgs {
    /// Snapshots to forget (ID prefixes); without them, the --keep rules decide.
    pub snapshots: Vec<String>,
    /// Keep the N most recent snapshots.
    #[arg(long, value_name = "N")]
    pub keep_last: Option<u32>,
    /// Keep the most recent snapshot of each of the last N hours.
    #[arg(long, value_name = "N")]
    pub keep_hourly: Option<u32>,
    /// Keep the most recent snapshot of each of the last N days.
    #[arg(long, value_name = "N")]
    pub keep_daily: Option<u32>,
    /// Keep the most recent snapshot of each of the last N weeks.
    #[arg(long, value_name = "N")]
    pub keep_weekly: Option<u32>,
    /// Keep the most recent snapshot of each of the last N months.
    #[arg(long, value_name = "N")]
    pub keep_monthly: Option<u32>,
    /// Keep the most recent snapshot of each of the last N years.
    #[arg(long, value_name = "N")]
    pub keep_yearly: Option<u32>,
    /// Keep every snapshot taken within this duration before now (e.g. 7d, 1y2m).
    #[arg(long, value_name = "DURATION")]
    pub keep_within: Option<String>,
    /// Keep snapshots with this tag (repeatable).
    #[arg(long, value_name = "TAG")]
    pub keep_tag: Vec<String>,
    /// Group snapshots by these fields before applying rules: host, paths, tags.
    #[arg(long, default_value = "host,paths")]
    pub group_by: String,
    /// Only consider snapshots matching these filters.
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Show what would be kept and removed, and why, without removing.
    #[arg(short = 'n', long)]
    pub dry_run: bool,
    /// Run prune afterwards.
    #[arg(long)]
    pub prune: bool,
}

/// `upgrade`.
#[derive(Debug, Args)]
pub struct UpgradeArgs {
    /// Say what would be done, and change nothing.
    #[arg(short = 'n', long)]
    pub dry_run: bool,
    /// Vouch for the existing index without reading the packs (quicker,
    /// but only for a repository no writer credential could have been
    /// stolen from: a forged listing would be vouched for too).
    #[arg(long)]
    pub trust_existing: bool,
}

/// `prune`.
#[derive(Debug, Args)]
pub struct PruneArgs {
    /// How long condemned data waits before deletion (e.g. 1h, 30m, 0s).
    /// Zero is safe only when no other backup runs against the repository.
    #[arg(long, default_value = "1h")]
    pub grace: String,
    /// Repack packs with more than this percentage of unused data.
    #[arg(long, default_value_t = 50.0)]
    pub max_unused: f64,
    /// Show what would happen without changing anything.
    #[arg(short = 'n', long)]
    pub dry_run: bool,
}

/// `key` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// List the keys (one per passphrase).
    List,
    /// Add a key for a new passphrase.
    Add {
        /// Read the new passphrase from this file.
        #[arg(long)]
        new_passphrase_file: Option<PathBuf>,
    },
    /// Remove a key (not the one in use, not the last one).
    Remove {
        /// Key ID (prefix).
        id: String,
    },
    /// Write the repository's age identity (the secret that decrypts every
    /// object) to a file, for the emergency path with the `age` and `zstd`
    /// tools. Store it offline, like the passphrase.
    ExportIdentity {
        /// File to create (mode 0600; never overwritten).
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a write-only credential for backup hosts: it can add
    /// snapshots (deduplicating against the whole repository) and read
    /// nothing already stored. Use it with --writer-key or the agent's
    /// repository.writer_key. See ARCHITECTURE.md for what it reveals.
    ExportWriter {
        /// File to create (mode 0600; never overwritten).
        #[arg(long)]
        out: PathBuf,
        /// The host it writes as: its snapshots carry this name, and no
        /// other. A signing key is made for it and recorded in the
        /// repository's host registry (format 3; required there).
        #[arg(long, value_name = "NAME")]
        host: Option<String>,
    },
    /// Change the passphrase of the key in use.
    Passwd {
        /// Read the new passphrase from this file.
        #[arg(long)]
        new_passphrase_file: Option<PathBuf>,
    },
}
