//! Real S3 servers on loopback for the end-to-end tests: [`Garage`] (one
//! node, or a cluster of several replicating nodes whose members a test can
//! kill and restart) and [`Moto`] (moto's S3 emulation, for features Garage
//! lacks, such as Object Lock and enforced `If-None-Match: *`). Tests hand
//! the [`S3Target`] they return to the `lifeboat` binary through its
//! environment, exactly as an operator would point it at a store.
//!
//! These are real servers, never mocks: a mock only reproduces what its author
//! already believed about S3, while the point of these tests is to find out
//! what real stores do (quorum errors, checksum validation, a node dying
//! mid-backup). A missing server binary is therefore a failure with an
//! install hint, never a silently skipped test. Every server listens on
//! 127.0.0.1 only, on ports the kernel picked as free, and keeps its data and
//! its log in a fresh temporary directory removed on drop. Every wait is
//! bounded, and every failure message carries the tail of the server's log and
//! the output of the command that failed, so a CI failure can be diagnosed
//! from its log alone.

#![allow(dead_code)]

use std::collections::hash_map::RandomState;
use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a server may take to start answering, and a cluster to connect.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between two polls of a server that is not ready yet.
const POLL: Duration = Duration::from_millis(100);
/// Upper bound on the polls of one wait (with `POLL`, a bit over the timeout).
const MAX_POLLS: u32 = 400;
/// How long one `garage` CLI command may run before it is killed.
const CLI_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a running CLI command is checked for completion.
const CLI_POLL: Duration = Duration::from_millis(10);
/// Connect, read and write timeout of the harness's own HTTP requests.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// How many times a server that lost the race for its ports is restarted on new ones.
const MAX_REBINDS: u32 = 5;
/// Lines from the end of a server log quoted in failure messages.
const LOG_TAIL_LINES: usize = 40;

/// The region Garage is configured with (`s3_region`).
pub const GARAGE_REGION: &str = "garage";
/// The bucket [`Garage::start`] and [`Garage::start_cluster`] create.
pub const GARAGE_BUCKET: &str = "lifeboat";
/// The region [`Moto`] targets use.
pub const MOTO_REGION: &str = "us-east-1";

const GARAGE_MISSING: &str =
    "garage is not installed: run `cargo install garage --locked` (or .ci/run, which installs it)";
const MOTO_MISSING: &str = "moto server is not installed: run `pip install \"moto[server]\"`";

/// Credentials and location tests pass to lifeboat through the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Target {
    /// The S3 endpoint, `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// The region requests are signed for.
    pub region: String,
    /// Access key ID.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: String,
    /// The bucket, which exists and which the key may read, write and own.
    pub bucket: String,
}

impl S3Target {
    /// `s3://BUCKET/PREFIX` repository URL (`s3://BUCKET` for an empty prefix).
    pub fn url(&self, prefix: &str) -> String {
        let prefix = prefix.trim_matches('/');
        if prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, prefix)
        }
    }

    /// Environment for the lifeboat binary: the credentials, region and
    /// endpoint, and settings that keep the developer's own AWS configuration
    /// (profiles, credentials files, instance metadata) out of the test.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", self.access_key_id.as_str()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_access_key.as_str()),
            ("AWS_REGION", self.region.as_str()),
            ("LIFEBOAT_S3_ENDPOINT", self.endpoint.as_str()),
            ("AWS_CONFIG_FILE", "/dev/null"),
            ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect()
    }
}

// ---------------------------------------------------------------------------
// Garage
// ---------------------------------------------------------------------------

/// A Garage cluster (possibly of one node) running on loopback, with the
/// bucket [`GARAGE_BUCKET`] and a key that may read, write and own it. Dropping
/// it kills every node and removes all their data.
pub struct Garage {
    bin: PathBuf,
    nodes: Vec<GarageNode>,
    replication_factor: usize,
    rpc_secret: String,
    key_id: String,
    secret_key: String,
    /// Removed when the fields drop, after `Drop::drop` killed the nodes.
    dir: TempDir,
}

/// One `garage server` process with its own configuration, data and log.
struct GarageNode {
    /// Holds `garage.toml`, `meta/`, `data/` and `garage.log`.
    dir: PathBuf,
    config: PathBuf,
    log: PathBuf,
    /// Length of the log when the current process was started, so that a
    /// restart's failure is judged on its own output.
    log_offset: u64,
    rpc_port: u16,
    s3_port: u16,
    /// Full hexadecimal node ID (public key), known once the node first ran.
    id: String,
    child: Option<Child>,
}

impl GarageNode {
    fn rpc_addr(&self) -> String {
        format!("127.0.0.1:{}", self.rpc_port)
    }

    /// `ID@127.0.0.1:PORT`, as `garage node connect` takes it.
    fn peer(&self) -> String {
        format!("{}@{}", self.id, self.rpc_addr())
    }
}

/// What one `garage` CLI command did.
struct CliRun {
    /// The command line, for messages.
    command: String,
    /// `None` if the command was killed for running too long.
    status: Option<ExitStatus>,
    stdout: String,
    stderr: String,
}

impl CliRun {
    fn success(&self) -> bool {
        self.status.is_some_and(|status| status.success())
    }

    /// The command, how it ended and its output, for a failure message.
    fn describe(&self) -> String {
        let ended = match self.status {
            Some(status) => status.to_string(),
            None => format!("killed after {CLI_TIMEOUT:?}"),
        };
        format!(
            "`{}` ({ended})\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command,
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

impl Garage {
    /// One node, replication factor 1, a bucket "lifeboat" and a key allowed
    /// to read/write/own it.
    pub fn start() -> Garage {
        Garage::launch(1, 1)
    }

    /// `n` nodes on loopback, replication factor 3 (requires `n >= 3`),
    /// consistency mode "consistent" (read and write quorums of 2): all
    /// connected, layout applied, bucket and key created. The S3 endpoint in
    /// [`Garage::target`] is node 0's.
    pub fn start_cluster(n: usize) -> Garage {
        assert!(
            n >= 3,
            "a Garage cluster with replication factor 3 needs at least 3 nodes, not {n}"
        );
        Garage::launch(n, 3)
    }

    /// The bucket [`GARAGE_BUCKET`] through node 0's S3 endpoint.
    pub fn target(&self) -> S3Target {
        self.target_node(0)
    }

    /// The bucket [`GARAGE_BUCKET`] through node `i`'s S3 endpoint (every
    /// node serves the whole cluster's data), e.g. to keep using the cluster
    /// while node 0 is stopped.
    pub fn target_node(&self, i: usize) -> S3Target {
        self.check_index(i);
        S3Target {
            endpoint: format!("http://127.0.0.1:{}", self.nodes[i].s3_port),
            region: GARAGE_REGION.to_owned(),
            access_key_id: self.key_id.clone(),
            secret_access_key: self.secret_key.clone(),
            bucket: GARAGE_BUCKET.to_owned(),
        }
    }

    /// Number of nodes, running or stopped.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Whether node `i` is running (it is unless [`Garage::stop_node`] stopped it).
    pub fn is_running(&self, i: usize) -> bool {
        self.check_index(i);
        self.nodes[i].child.is_some()
    }

    /// Errors, panics and the last lines of node `i`'s log, for a test's own
    /// failure messages.
    pub fn log_excerpt(&self, i: usize) -> String {
        self.check_index(i);
        log_excerpt(&self.nodes[i].log, 0)
    }

    /// Creates another bucket (the key gets read/write/owner on it). Bucket
    /// names are global to the cluster: creating one twice fails.
    pub fn create_bucket(&self, name: &str) {
        let node = self.admin_node();
        self.cli_retry(
            node,
            &["bucket", "create", name],
            Some("BucketAlreadyExists"),
        );
        self.cli_retry(
            node,
            &[
                "bucket",
                "allow",
                "--read",
                "--write",
                "--owner",
                name,
                "--key",
                self.key_id.as_str(),
            ],
            None,
        );
    }

    /// Kills node `i` (SIGKILL) — a node failing. Its data stays for
    /// [`Garage::restart_node`]. The other nodes find out only seconds later
    /// (see [`Garage::wait_node_down`]).
    pub fn stop_node(&mut self, i: usize) {
        self.check_index(i);
        let mut child = self.nodes[i]
            .child
            .take()
            .unwrap_or_else(|| panic!("garage node {i} is not running"));
        // The node may already have died on its own; waiting reaps it either way.
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Waits until every running node counts the stopped node `i` as failed.
    /// Garage notices a killed peer only by its pings (7 to 15 s measured
    /// with garage 2.5 on loopback); until then, requests that involve the
    /// dead node can stall for seconds. [`Garage::stop_node`] does not wait, as a real failure
    /// would not either; a test that needs the cluster to know calls this.
    pub fn wait_node_down(&self, i: usize) {
        self.check_index(i);
        assert!(self.nodes[i].child.is_none(), "garage node {i} is running");
        let id = self.nodes[i].id.clone();
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let mut last: Option<(usize, CliRun)> = None;
        for _ in 0..MAX_POLLS {
            let mut all = true;
            for j in 0..self.nodes.len() {
                if self.nodes[j].child.is_none() {
                    continue;
                }
                let run = self.cli(j, &["status"]);
                let still_up = !run.success()
                    || healthy_ids(&run.stdout)
                        .iter()
                        .any(|prefix| id.starts_with(prefix.as_str()));
                if still_up {
                    all = false;
                    last = Some((j, run));
                    break;
                }
            }
            if all {
                return;
            }
            if Instant::now() >= deadline {
                break;
            }
            sleep(POLL);
        }
        let (j, run) = last.expect("a failed poll was recorded");
        panic!(
            "garage node {j} still counts stopped node {i} as up after {STARTUP_TIMEOUT:?}: {}\n{}",
            run.describe(),
            self.log_excerpt(j)
        );
    }

    /// Restarts node `i` with the same configuration, ports and data, and
    /// waits until it and every other running node see each other again.
    pub fn restart_node(&mut self, i: usize) {
        self.check_index(i);
        assert!(
            self.nodes[i].child.is_none(),
            "garage node {i} is running: stop_node({i}) before restarting it"
        );
        self.spawn_node(i);
        // The ports are already known to the other nodes: no moving now.
        self.wait_up(i, false);
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|&j| self.nodes[j].child.is_some())
            .collect();
        // Each pair of garage nodes talks over two connections, one opened
        // by each side, and a node counts a peer as up only once its own
        // connection to it is back. Left alone, the others redial a dead
        // node only every 30 s or so (garage 2.5), so the connections are
        // made explicitly, in both directions; that takes milliseconds.
        for &j in &running {
            if j != i {
                self.connect(i, j);
                self.connect(j, i);
            }
        }
        self.wait_connected(&running);
    }

    /// Starts `n` nodes with `replication_factor` and sets up layout, key and
    /// bucket. The `Garage` exists from the start so that a panic anywhere
    /// kills the nodes already running.
    fn launch(n: usize, replication_factor: usize) -> Garage {
        let bin = garage_bin();
        let dir = TempDir::new("garage");
        let mut garage = Garage {
            bin,
            nodes: Vec::with_capacity(n),
            replication_factor,
            rpc_secret: random_hex(32),
            key_id: format!("GK{}", random_hex(12)),
            secret_key: random_hex(32),
            dir,
        };
        let ports = free_ports(2 * n);
        for i in 0..n {
            let node_dir = garage.dir.path().join(format!("node{i}"));
            for sub in ["meta", "data"] {
                let path = node_dir.join(sub);
                fs::create_dir_all(&path)
                    .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
            }
            garage.nodes.push(GarageNode {
                config: node_dir.join("garage.toml"),
                log: node_dir.join("garage.log"),
                dir: node_dir,
                log_offset: 0,
                rpc_port: ports[2 * i],
                s3_port: ports[2 * i + 1],
                id: String::new(),
                child: None,
            });
            garage.write_config(i);
        }
        // Start every node before waiting for any, so they boot in parallel.
        for i in 0..n {
            garage.spawn_node(i);
        }
        for i in 0..n {
            garage.wait_up(i, true);
        }
        for i in 0..n {
            garage.nodes[i].id = garage.read_node_id(i);
        }
        for j in 1..n {
            garage.connect(0, j);
        }
        let all: Vec<usize> = (0..n).collect();
        garage.wait_connected(&all);

        let ids: Vec<String> = garage.nodes.iter().map(|node| node.id.clone()).collect();
        let mut assign = vec!["layout", "assign", "-z", "dc1", "-c", "1G"];
        assign.extend(ids.iter().map(String::as_str));
        garage.cli_ok(0, &assign);
        garage.cli_ok(0, &["layout", "apply", "--version", "1"]);
        garage.wait_healthy();

        let key_id = garage.key_id.clone();
        let secret_key = garage.secret_key.clone();
        garage.cli_retry(
            0,
            &[
                "key",
                "import",
                "--yes",
                "-n",
                "lifeboat-e2e",
                key_id.as_str(),
                secret_key.as_str(),
            ],
            Some("KeyAlreadyExists"),
        );
        garage.create_bucket(GARAGE_BUCKET);
        for i in 0..n {
            let addr = SocketAddr::from(([127, 0, 0, 1], garage.nodes[i].s3_port));
            if let Err(e) = wait_for_tcp(addr, STARTUP_TIMEOUT) {
                panic!(
                    "garage node {i}'s S3 API at {addr} does not accept connections: {e}\n{}",
                    log_excerpt(&garage.nodes[i].log, 0)
                );
            }
        }
        garage
    }

    fn check_index(&self, i: usize) {
        assert!(
            i < self.nodes.len(),
            "no garage node {i}: this cluster has {} node(s)",
            self.nodes.len()
        );
    }

    /// A running node to send administrative commands to.
    fn admin_node(&self) -> usize {
        (0..self.nodes.len())
            .find(|&i| self.nodes[i].child.is_some())
            .unwrap_or_else(|| panic!("every garage node is stopped"))
    }

    /// Writes node `i`'s `garage.toml` for its current ports.
    fn write_config(&self, i: usize) {
        let node = &self.nodes[i];
        let meta = toml_string(&node.dir.join("meta"));
        let data = toml_string(&node.dir.join("data"));
        let rf = self.replication_factor;
        let secret = &self.rpc_secret;
        let (rpc, s3) = (node.rpc_port, node.s3_port);
        // fsync is off: the tests kill processes, never the machine, and a
        // killed process loses nothing the kernel already has. Compression
        // is off because lifeboat only stores encrypted (incompressible)
        // data. No [admin] section: the CLI talks to the node over RPC.
        let text = format!(
            "# Written by lifeboat's end-to-end test harness (tests/e2e/servers.rs).\n\
             metadata_dir = {meta}\n\
             data_dir = {data}\n\
             db_engine = \"sqlite\"\n\
             metadata_fsync = false\n\
             data_fsync = false\n\
             disable_scrub = true\n\
             compression_level = \"none\"\n\
             replication_factor = {rf}\n\
             consistency_mode = \"consistent\"\n\
             rpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
             rpc_public_addr = \"127.0.0.1:{rpc}\"\n\
             rpc_secret = \"{secret}\"\n\
             \n\
             [s3_api]\n\
             api_bind_addr = \"127.0.0.1:{s3}\"\n\
             s3_region = \"{GARAGE_REGION}\"\n\
             root_domain = \".s3.garage.localhost\"\n"
        );
        fs::write(&node.config, text)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", node.config.display()));
    }

    /// Starts `garage server` for node `i`, appending its output to its log.
    fn spawn_node(&mut self, i: usize) {
        let bin = self.bin.clone();
        let node = &mut self.nodes[i];
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", node.log.display()));
        node.log_offset = log.metadata().map(|m| m.len()).unwrap_or(0);
        let log_err = log
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot duplicate {}: {e}", node.log.display()));
        let mut cmd = Command::new(&bin);
        cmd.arg("-c")
            .arg(&node.config)
            .arg("server")
            .current_dir(&node.dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        garage_env(&mut cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{} server`: {e}", bin.display()));
        node.child = Some(child);
    }

    /// Waits until node `i` answers `garage status`. If it died because one
    /// of its ports was taken meanwhile (the window between `free_ports` and
    /// the server's bind) and `may_move` allows it, it is restarted on new
    /// ports.
    fn wait_up(&mut self, i: usize, may_move: bool) {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let mut moves = 0;
        let mut last: Option<CliRun> = None;
        for _ in 0..MAX_POLLS {
            let exited = match self.nodes[i].child.as_mut() {
                Some(child) => child
                    .try_wait()
                    .unwrap_or_else(|e| panic!("cannot check on garage node {i}: {e}")),
                None => panic!("garage node {i} is not running"),
            };
            if let Some(status) = exited {
                self.nodes[i].child = None;
                let log = self.nodes[i].log.clone();
                let offset = self.nodes[i].log_offset;
                let output = read_lossy(&log, offset);
                let port_taken =
                    output.contains("AddrInUse") || output.contains("Address already in use");
                if may_move && port_taken && moves < MAX_REBINDS {
                    moves += 1;
                    let ports = free_ports(2);
                    self.nodes[i].rpc_port = ports[0];
                    self.nodes[i].s3_port = ports[1];
                    self.write_config(i);
                    self.spawn_node(i);
                    continue;
                }
                panic!(
                    "garage node {i} exited ({status}) while starting\n{}",
                    log_excerpt(&log, offset)
                );
            }
            let run = self.cli(i, &["status"]);
            if run.success() {
                return;
            }
            last = Some(run);
            if Instant::now() >= deadline {
                break;
            }
            sleep(POLL);
        }
        panic!(
            "garage node {i} did not answer `garage status` within {STARTUP_TIMEOUT:?}\n\
             last attempt: {}\n{}",
            last.map_or_else(|| "(none)".to_owned(), |run| run.describe()),
            self.log_excerpt(i)
        );
    }

    /// Node `i`'s full ID, from `garage node id -q` (`ID@127.0.0.1:PORT`).
    fn read_node_id(&self, i: usize) -> String {
        let run = self.cli_ok(i, &["node", "id", "-q"]);
        let line = run.stdout.trim();
        let id = line.split('@').next().unwrap_or("");
        if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            panic!(
                "cannot find garage node {i}'s ID in the output of {}",
                run.describe()
            );
        }
        id.to_ascii_lowercase()
    }

    /// Makes node `from` connect to node `to` (bounded retries).
    fn connect(&self, from: usize, to: usize) {
        let peer = self.nodes[to].peer();
        self.cli_retry(from, &["node", "connect", peer.as_str()], None);
    }

    /// Waits until each of `nodes` lists all of `nodes` among its healthy
    /// (connected) nodes in `garage status`.
    fn wait_connected(&self, nodes: &[usize]) {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let mut last: Option<(usize, CliRun)> = None;
        for _ in 0..MAX_POLLS {
            let mut all = true;
            for &i in nodes {
                let run = self.cli(i, &["status"]);
                let healthy = if run.success() {
                    healthy_ids(&run.stdout)
                } else {
                    Vec::new()
                };
                let sees_all = nodes.iter().all(|&j| {
                    let id = &self.nodes[j].id;
                    healthy.iter().any(|prefix| id.starts_with(prefix.as_str()))
                });
                if !sees_all {
                    all = false;
                    last = Some((i, run));
                    break;
                }
            }
            if all {
                return;
            }
            if Instant::now() >= deadline {
                break;
            }
            sleep(POLL);
        }
        let (i, run) = last.expect("a failed poll was recorded");
        let ids: Vec<&str> = nodes.iter().map(|&j| &self.nodes[j].id[..16]).collect();
        panic!(
            "garage nodes {nodes:?} (IDs {ids:?}) did not all connect to each other within \
             {STARTUP_TIMEOUT:?}; node {i} said: {}\n{}",
            run.describe(),
            self.log_excerpt(i)
        );
    }

    /// Waits until every running node reports `Cluster health: HEALTHY`
    /// (all partitions have their replicas, the layout has propagated).
    fn wait_healthy(&self) {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let mut last: Option<(usize, CliRun)> = None;
        for _ in 0..MAX_POLLS {
            let mut all = true;
            for i in 0..self.nodes.len() {
                if self.nodes[i].child.is_none() {
                    continue;
                }
                let run = self.cli(i, &["health"]);
                if !(run.success() && cluster_health(&run.stdout) == Some("HEALTHY")) {
                    all = false;
                    last = Some((i, run));
                    break;
                }
            }
            if all {
                return;
            }
            if Instant::now() >= deadline {
                break;
            }
            sleep(POLL);
        }
        let (i, run) = last.expect("a failed poll was recorded");
        panic!(
            "the garage cluster did not become healthy within {STARTUP_TIMEOUT:?}; node {i} said: {}\n{}",
            run.describe(),
            self.log_excerpt(i)
        );
    }

    /// Runs `garage -c <node i's config> ARGS`, killing it after `CLI_TIMEOUT`.
    fn cli(&self, i: usize, args: &[&str]) -> CliRun {
        let node = &self.nodes[i];
        let mut command = format!("{} -c {}", self.bin.display(), node.config.display());
        for arg in args {
            command.push(' ');
            command.push_str(arg);
        }
        // Outputs go to files rather than pipes, so that waiting with a
        // timeout needs no reader threads.
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let out_path = self.dir.path().join(format!("cli-{n}.out"));
        let err_path = self.dir.path().join(format!("cli-{n}.err"));
        let create = |path: &Path| {
            File::create(path).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()))
        };
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-c")
            .arg(&node.config)
            .args(args)
            .stdin(Stdio::null())
            .stdout(create(&out_path))
            .stderr(create(&err_path));
        garage_env(&mut cmd);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run `{command}`: {e}"));
        let deadline = Instant::now() + CLI_TIMEOUT;
        let max_polls = CLI_TIMEOUT.as_millis() / CLI_POLL.as_millis() + 100;
        let mut status = None;
        for _ in 0..max_polls {
            match child.try_wait() {
                Ok(Some(s)) => {
                    status = Some(s);
                    break;
                }
                Ok(None) if Instant::now() < deadline => sleep(CLI_POLL),
                Ok(None) => break,
                Err(e) => panic!("cannot wait for `{command}`: {e}"),
            }
        }
        if status.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let stdout = read_lossy(&out_path, 0);
        let stderr = read_lossy(&err_path, 0);
        let _ = fs::remove_file(&out_path);
        let _ = fs::remove_file(&err_path);
        CliRun {
            command,
            status,
            stdout,
            stderr,
        }
    }

    /// Runs a CLI command that must succeed at once.
    fn cli_ok(&self, i: usize, args: &[&str]) -> CliRun {
        let run = self.cli(i, args);
        if !run.success() {
            panic!(
                "garage command failed: {}\n{}",
                run.describe(),
                self.log_excerpt(i)
            );
        }
        run
    }

    /// Runs a CLI command until it succeeds (bounded), for steps that can
    /// fail while the cluster settles. `done_marker` is an error that means
    /// an earlier attempt took effect after all (e.g. `BucketAlreadyExists`);
    /// on the first attempt it is a real failure.
    fn cli_retry(&self, i: usize, args: &[&str], done_marker: Option<&str>) -> CliRun {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let mut last = None;
        for attempt in 0..MAX_POLLS {
            let run = self.cli(i, args);
            if run.success() {
                return run;
            }
            if let Some(marker) = done_marker {
                if attempt > 0 && (run.stderr.contains(marker) || run.stdout.contains(marker)) {
                    return run;
                }
                if attempt == 0 && run.stderr.contains(marker) {
                    last = Some(run);
                    break;
                }
            }
            last = Some(run);
            if Instant::now() >= deadline {
                break;
            }
            sleep(POLL);
        }
        panic!(
            "garage command kept failing: {}\n{}",
            last.map_or_else(|| "(never ran)".to_owned(), |run| run.describe()),
            self.log_excerpt(i)
        );
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // `self.dir` is removed when the fields drop, after this.
    }
}

/// The garage binary: `GARAGE_BIN`, else `garage` on `PATH`, else
/// `~/.cargo/bin/garage`; panics with an install hint if there is none.
fn garage_bin() -> PathBuf {
    let home_bin = home_dir().map(|home| home.join(".cargo/bin"));
    find_binary("GARAGE_BIN", "garage", home_bin.as_slice(), GARAGE_MISSING)
}

/// Environment for every garage process: none of the developer's `GARAGE_*`
/// overrides (RPC host, secret, config file...), garage's own log filter,
/// and logs without colour escapes.
fn garage_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.as_bytes().starts_with(b"GARAGE_") {
            cmd.env_remove(key);
        }
    }
    cmd.env_remove("RUST_LOG").env("NO_COLOR", "1");
}

/// The 16-hex-digit node ID prefixes `garage status` lists under
/// `==== HEALTHY NODES ====` (as opposed to `==== FAILED NODES ====`).
fn healthy_ids(status: &str) -> Vec<String> {
    let mut in_healthy = false;
    let mut ids = Vec::new();
    for line in status.lines() {
        let line = line.trim();
        if line.starts_with("====") {
            in_healthy = line.contains("HEALTHY NODES");
            continue;
        }
        if !in_healthy {
            continue;
        }
        if let Some(first) = line.split_whitespace().next() {
            if first.len() >= 8 && first.bytes().all(|b| b.is_ascii_hexdigit()) {
                ids.push(first.to_ascii_lowercase());
            }
        }
    }
    ids
}

/// The value of `Cluster health:` in `garage health`'s output (`HEALTHY`,
/// `DEGRADED` or `UNAVAILABLE`).
fn cluster_health(output: &str) -> Option<&str> {
    output
        .lines()
        .find_map(|line| line.trim().strip_prefix("Cluster health:"))
        .map(str::trim)
}

/// A path as a TOML basic string.
fn toml_string(path: &Path) -> String {
    let text = path
        .to_str()
        .unwrap_or_else(|| panic!("temporary path {} is not UTF-8", path.display()));
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

// ---------------------------------------------------------------------------
// Moto
// ---------------------------------------------------------------------------

/// moto's S3 emulation (`moto_server`) on loopback. It does not check request
/// signatures, so any credentials work. Unlike Garage it supports Object Lock
/// and rejects `If-None-Match: *` on an existing key (412). Dropping it kills
/// the server.
pub struct Moto {
    child: Option<Child>,
    addr: SocketAddr,
    endpoint: String,
    log: PathBuf,
    /// Removed when the fields drop, after `Drop::drop` killed the server.
    dir: TempDir,
}

impl Moto {
    /// Starts moto_server on a free loopback port and waits until it answers.
    pub fn start() -> Moto {
        let bin = moto_bin();
        let dir = TempDir::new("moto");
        let log = dir.path().join("moto.log");
        let mut port = free_ports(1)[0];
        let mut moto = Moto {
            child: Some(spawn_moto(&bin, port, &log, dir.path())),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            endpoint: format!("http://127.0.0.1:{port}"),
            log,
            dir,
        };
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let mut moves = 0;
        let mut last_error = String::from("(not tried)");
        for _ in 0..MAX_POLLS {
            let exited = match moto.child.as_mut() {
                Some(child) => child
                    .try_wait()
                    .unwrap_or_else(|e| panic!("cannot check on moto_server: {e}")),
                None => unreachable!("moto_server is started above"),
            };
            if let Some(status) = exited {
                moto.child = None;
                let output = read_lossy(&moto.log, 0);
                if output.contains("Address already in use") && moves < MAX_REBINDS {
                    moves += 1;
                    port = free_ports(1)[0];
                    moto.addr = SocketAddr::from(([127, 0, 0, 1], port));
                    moto.endpoint = format!("http://127.0.0.1:{port}");
                    // Fresh log, so the next failure is judged on its own.
                    let _ = fs::remove_file(&moto.log);
                    moto.child = Some(spawn_moto(&bin, port, &moto.log, moto.dir.path()));
                    continue;
                }
                panic!(
                    "moto_server exited ({status}) while starting\n{}",
                    log_excerpt(&moto.log, 0)
                );
            }
            match http_request(moto.addr, "GET", "/", &[]) {
                Ok((200, _)) => return moto,
                Ok((status, response)) => {
                    last_error = format!("GET / answered {status}:\n{response}")
                }
                Err(e) => last_error = format!("GET / failed: {e}"),
            }
            if Instant::now() >= deadline {
                break;
            }
            sleep(POLL);
        }
        panic!(
            "moto_server at {} did not answer within {STARTUP_TIMEOUT:?}; last: {last_error}\n{}",
            moto.endpoint,
            log_excerpt(&moto.log, 0)
        );
    }

    /// The endpoint, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// A target with a fresh bucket `name` (3 to 63 characters among `a-z`,
    /// `0-9`, `.` and `-`), dummy credentials "test"/"test", region
    /// us-east-1. The bucket has neither versioning nor Object Lock.
    pub fn target(&self, bucket: &str) -> S3Target {
        self.create_bucket(bucket, &[]);
        self.target_for(bucket)
    }

    /// Same as [`Moto::target`], but the bucket is created with Object Lock
    /// enabled (which also enables versioning).
    pub fn target_with_object_lock(&self, bucket: &str) -> S3Target {
        self.create_bucket(bucket, &[("x-amz-bucket-object-lock-enabled", "true")]);
        let path = format!("/{bucket}?object-lock");
        match http_request(self.addr, "GET", &path, &[]) {
            Ok((200, response))
                if response.contains("<ObjectLockEnabled>Enabled</ObjectLockEnabled>") => {}
            Ok((status, response)) => panic!(
                "bucket {bucket:?} was created without Object Lock: GET {path} answered {status}:\n{response}\n{}",
                log_excerpt(&self.log, 0)
            ),
            Err(e) => panic!(
                "GET {path} on moto_server at {} failed: {e}\n{}",
                self.endpoint,
                log_excerpt(&self.log, 0)
            ),
        }
        self.target_for(bucket)
    }

    fn target_for(&self, bucket: &str) -> S3Target {
        S3Target {
            endpoint: self.endpoint.clone(),
            region: MOTO_REGION.to_owned(),
            access_key_id: "test".to_owned(),
            secret_access_key: "test".to_owned(),
            bucket: bucket.to_owned(),
        }
    }

    /// `PUT /BUCKET` (path style, unsigned: moto does not check signatures).
    fn create_bucket(&self, bucket: &str, headers: &[(&str, &str)]) {
        assert!(
            (3..=63).contains(&bucket.len())
                && bucket.bytes().all(|b| b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || b == b'.'
                    || b == b'-'),
            "{bucket:?} is not a valid S3 bucket name (3-63 of a-z, 0-9, '.', '-')"
        );
        let path = format!("/{bucket}");
        match http_request(self.addr, "PUT", &path, headers) {
            Ok((200, _)) => {}
            Ok((status, response)) => panic!(
                "creating bucket {bucket:?} on moto_server at {}: PUT {path} answered {status}:\n{response}\n{}",
                self.endpoint,
                log_excerpt(&self.log, 0)
            ),
            Err(e) => panic!(
                "creating bucket {bucket:?} on moto_server at {}: PUT {path} failed: {e}\n{}",
                self.endpoint,
                log_excerpt(&self.log, 0)
            ),
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The moto server: `MOTO_SERVER_BIN`, else `moto_server` on `PATH`, else
/// `~/.local/bin/moto_server`; panics with an install hint if there is none.
fn moto_bin() -> PathBuf {
    let local_bin = home_dir().map(|home| home.join(".local/bin"));
    find_binary(
        "MOTO_SERVER_BIN",
        "moto_server",
        local_bin.as_slice(),
        MOTO_MISSING,
    )
}

/// Starts `moto_server -H 127.0.0.1 -p PORT` with its output in `log`.
fn spawn_moto(bin: &Path, port: u16, log: &Path, dir: &Path) -> Child {
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
    let err = out
        .try_clone()
        .unwrap_or_else(|e| panic!("cannot duplicate {}: {e}", log.display()));
    let port = port.to_string();
    let mut cmd = Command::new(bin);
    cmd.args(["-H", "127.0.0.1", "-p", port.as_str()])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        // Unbuffered, so the log is complete even when the server is killed.
        .env("PYTHONUNBUFFERED", "1")
        // Would make moto enforce IAM authentication after N requests.
        .env_remove("INITIAL_NO_AUTH_ACTION_COUNT");
    for (key, _) in std::env::vars_os() {
        if key.as_bytes().starts_with(b"MOTO_") {
            cmd.env_remove(key);
        }
    }
    cmd.spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()))
}

// ---------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A directory under the system temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    /// `lifeboat-e2e-KIND-PID-COUNTER-NANOS`, unique within and across runs.
    fn new(kind: &str) -> TempDir {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let name = format!(
            "lifeboat-e2e-{kind}-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let path = std::env::temp_dir().join(name);
        fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `n` distinct ports that were free on 127.0.0.1 a moment ago. The
/// listeners are held until all are chosen so that no port comes twice.
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| {
            TcpListener::bind("127.0.0.1:0")
                .unwrap_or_else(|e| panic!("cannot bind a free port on 127.0.0.1: {e}"))
        })
        .collect();
    listeners
        .iter()
        .map(|listener| {
            listener
                .local_addr()
                .unwrap_or_else(|e| panic!("cannot read a bound port: {e}"))
                .port()
        })
        .collect()
}

/// `bytes` random bytes as lowercase hex (from the standard library's
/// randomly keyed hasher: good enough for throw-away test secrets).
fn random_hex(bytes: usize) -> String {
    let mut out = String::with_capacity(bytes * 2 + 16);
    while out.len() < bytes * 2 {
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        hasher.write_u32(std::process::id());
        if let Ok(d) = SystemTime::now().duration_since(UNIX_EPOCH) {
            hasher.write_u128(d.as_nanos());
        }
        out.push_str(&format!("{:016x}", hasher.finish()));
    }
    out.truncate(bytes * 2);
    out
}

fn home_dir() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|home| !home.is_empty())
        .map(PathBuf::from)
}

/// `$env_var` if set, else `name` in a `PATH` directory, else in one of
/// `extra_dirs`; panics with `hint` when none is an executable file.
fn find_binary(env_var: &str, name: &str, extra_dirs: &[PathBuf], hint: &str) -> PathBuf {
    if let Some(value) = std::env::var_os(env_var).filter(|v| !v.is_empty()) {
        let path = PathBuf::from(&value);
        if is_executable(&path) {
            return path;
        }
        panic!(
            "{env_var}={} is not an executable file; {hint}",
            path.display()
        );
    }
    let path_dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect())
        .unwrap_or_default();
    path_dirs
        .iter()
        .chain(extra_dirs)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
        .unwrap_or_else(|| panic!("{hint}"))
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Waits until something accepts TCP connections at `addr`.
fn wait_for_tcp(addr: SocketAddr, timeout: Duration) -> std::io::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    for _ in 0..MAX_POLLS {
        match TcpStream::connect_timeout(&addr, HTTP_TIMEOUT) {
            Ok(_) => return Ok(()),
            Err(e) => last = Some(e),
        }
        if Instant::now() >= deadline {
            break;
        }
        sleep(POLL);
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("never tried")))
}

/// One bodiless HTTP/1.1 request on its own connection; returns the status
/// code and the whole response (head and body) as text.
fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT)?;
    stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
    stream.set_write_timeout(Some(HTTP_TIMEOUT))?;
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n"
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes())?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let response = String::from_utf8_lossy(&response).into_owned();
    // "HTTP/1.1 200 OK": the code is the second word.
    let status = response
        .strip_prefix("HTTP/")
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not an HTTP response: {response:?}"),
            )
        })?;
    Ok((status, response))
}

/// A file's contents from byte `offset` on, as lossy UTF-8 ("" if unreadable).
fn read_lossy(path: &Path, offset: u64) -> String {
    let mut bytes = Vec::new();
    if let Ok(mut file) = File::open(path) {
        use std::io::{Seek, SeekFrom};
        if file.seek(SeekFrom::Start(offset)).is_ok() {
            let _ = file.read_to_end(&mut bytes);
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// A server log for a failure message: its panics and errors (Garage prints
/// a panic's message above a long backtrace, so the tail alone could miss
/// it), then its last lines. Only the part from byte `offset` on is read.
fn log_excerpt(path: &Path, offset: u64) -> String {
    if !path.exists() {
        return format!("(no log at {})", path.display());
    }
    let text = read_lossy(path, offset);
    let lines: Vec<&str> = text.lines().collect();
    let clip = |line: &str| -> String {
        match line.char_indices().nth(400) {
            Some((cut, _)) => format!("{}…", &line[..cut]),
            None => line.to_owned(),
        }
    };
    let mut notable: Vec<String> = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        if line.contains("panicked at") || line.starts_with("Traceback") {
            for follow in lines.iter().skip(n).take(3) {
                notable.push(clip(follow));
            }
        } else if line.contains(" ERROR ") || line.starts_with("Error") {
            notable.push(clip(line));
        }
    }
    let skipped = notable.len().saturating_sub(20);
    // Every harness CLI command logs a connection and an admin request;
    // polling loops would otherwise fill the tail with them.
    let chatter = |line: &str| {
        line.contains("Accepted connection from")
            || (line.contains("Connection from") && line.ends_with(" closed"))
            || line.contains("Proxied admin API request")
    };
    let informative: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|&line| !chatter(line))
        .collect();
    let tail_start = informative.len().saturating_sub(LOG_TAIL_LINES);
    let mut out = format!("--- {} ({} lines) ---\n", path.display(), lines.len());
    if !notable.is_empty() {
        out.push_str("panics and errors:\n");
        for line in &notable[skipped..] {
            out.push_str(line);
            out.push('\n');
        }
    }
    if informative.len() < lines.len() {
        out.push_str(&format!(
            "last {} lines (without the CLI's connections and admin requests):\n",
            informative.len() - tail_start
        ));
    } else if !notable.is_empty() {
        out.push_str(&format!("last {} lines:\n", informative.len() - tail_start));
    }
    for line in &informative[tail_start..] {
        out.push_str(&clip(line));
        out.push('\n');
    }
    out.push_str("--- end of log ---");
    out
}
