//! End-to-end tests of the agent: a real `lifeboat agent` process with a
//! per-second schedule, watched from outside the way an operator (and
//! Prometheus) would: `lifeboat status`, `lifeboat run`, `/metrics` checked
//! by `promtool`, `/readyz`, SIGHUP with a broken file, SIGTERM.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::stderr;
use crate::util::{lifeboat_bin, Lb};

const PASSPHRASE: &str = "agent test passphrase";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `lifeboat` with the test's passphrase and nothing inherited.
fn lifeboat(config: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(lifeboat_bin());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("LIFEBOAT_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("LIFEBOAT_PASSPHRASE", PASSPHRASE)
        .env("LIFEBOAT_CONFIG", config)
        .args(args)
        .stdin(Stdio::null());
    cmd
}

/// A plain HTTP GET on loopback; returns (status code, body).
fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (code, body.to_string())
}

fn status_json(config: &Path) -> (i32, Value) {
    let out = lifeboat(config, &["status", "--json"]).output().unwrap();
    let v = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status --json: {e}: {}", stderr(&out)));
    (out.status.code().unwrap_or(-1), v)
}

/// Polls `cond` every 200 ms until it holds or `limit` passes.
fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

struct AgentProcess {
    child: Option<Child>,
    log: PathBuf,
}

impl AgentProcess {
    fn start(config: &Path, log: PathBuf) -> AgentProcess {
        let file = std::fs::File::create(&log).unwrap();
        let child = lifeboat(config, &["agent"])
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        AgentProcess {
            child: Some(child),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = self.child.as_ref().unwrap().id() as libc::pid_t;
        // SAFETY: sending a signal to our own child.
        unsafe { libc::kill(pid, sig) };
    }

    fn running(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }

    /// Waits for exit at most `limit`; returns the exit code.
    fn wait(&mut self, limit: Duration) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return status.code();
            }
            if start.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn write_config(path: &Path, repo: &Path, state: &Path, src: &Path, stop: &Path, port: u16) {
    std::fs::write(
        path,
        format!(
            r#"# Written by the agent end-to-end test.
[repository]
location = "{repo}"

[passphrase]
env = "LIFEBOAT_PASSPHRASE"

[agent]
state_dir = "{state}"
control_socket = "{state}/agent.sock"
metrics_listen = "127.0.0.1:{port}"
shutdown_grace = "5s"

[[source]]
name = "demo"
paths = ["{src}"]
# Backups fail while the stop file exists: the source then ages.
before = "test ! -e {stop}"
schedule = "*/2 * * * * *"
# AT RISK lasts from 16 s to 20 s after the last snapshot: wide enough for
# the test to see it on a loaded machine.
rpo = "20s"
rto = "1h"
timeout = "1m"

[[drill]]
name = "demo-drill"
source = "demo"
schedule = "*/3 * * * * *"
sample = 50
validate = ["test -d {{restore_dir}}"]

[check]
schedule = "*/30 * * * * *"
read_data_subset = 10
"#,
            repo = repo.display(),
            state = state.display(),
            src = src.display(),
            stop = stop.display(),
        ),
    )
    .unwrap();
}

#[test]
fn the_agent_keeps_a_source_within_its_rpo_and_says_when_it_no_longer_does() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    let state = tmp.path().join("state");
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a.txt"), "hello\n".repeat(1000)).unwrap();
    let lb = Lb::new(tmp.path(), Some(PASSPHRASE));
    lb.ok(&["init"]);
    let stop = tmp.path().join("stop");
    let port = free_port();
    let config = tmp.path().join("lifeboat.toml");
    write_config(&config, &repo, &state, &src, &stop, port);
    let out = lifeboat(&config, &["config", "check"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));

    let mut agent = AgentProcess::start(&config, tmp.path().join("agent.log"));
    // Snapshots appear on schedule and the source is within its RPO.
    wait_until(Duration::from_secs(60), "a snapshot within the RPO", || {
        let (code, v) = status_json(&config);
        code == 0 && v["sources"][0]["state"] == "OK"
    });
    let (_, v) = status_json(&config);
    assert!(v["sources"][0]["last_snapshot"]["id"].is_string(), "{v}");
    // A drill ran, passed, and its RTO estimate is within target.
    assert_eq!(v["sources"][0]["rto"], "OK", "{v}");
    assert!(
        v["sources"][0]["rto_seconds"].as_f64().unwrap() > 0.0,
        "{v}"
    );
    assert!(
        v["sources"][0]["last_drill"]["verified"].as_bool().unwrap(),
        "{v}"
    );
    let drills = lb.ok(&["drill", "list"]);
    assert!(drills.contains("demo-drill"), "{drills}");
    let snaps: Value = serde_json::from_str(&lb.ok(&["snapshots", "--json"])).unwrap();
    assert!(
        snaps[0]["tags"]
            .as_array()
            .unwrap()
            .contains(&Value::from("source:demo")),
        "{snaps}"
    );

    // Observability: metrics parse with promtool, readiness is deep.
    let (code, metrics) = http_get(port, "/metrics");
    assert_eq!(code, 200, "{metrics}");
    for family in [
        "lifeboat_source_rpo_seconds{source=\"demo\"}",
        "lifeboat_source_rpo_target_seconds{source=\"demo\"} 20",
        "lifeboat_job_runs_total{kind=\"backup\",source=\"demo\",outcome=\"success\"}",
        "lifeboat_repository_size_bytes ",
        "lifeboat_backend_retries_total ",
    ] {
        assert!(metrics.contains(family), "{family} in {metrics}");
    }
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (Debian package prometheus; .ci/run installs it)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    // Every query of the shipped Grafana dashboard uses metrics that exist.
    let scraped = tmp.path().join("metrics.txt");
    std::fs::write(&scraped, &metrics).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new("python3")
        .arg(root.join("packaging/check_dashboard.py"))
        .arg(root.join("packaging/grafana/lifeboat.json"))
        .arg(&scraped)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dashboard check: {}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
    let (code, ready) = http_get(port, "/readyz");
    assert_eq!(code, 200, "{ready}");
    assert_eq!(http_get(port, "/healthz").0, 200);

    // A job on demand goes through the control socket.
    let out = lifeboat(&config, &["run", "backup:demo"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        !stderr(&out).contains("no agent is running"),
        "went through the agent: {}",
        stderr(&out)
    );

    // A reload with a broken file keeps the agent on the old configuration.
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, "[repository\nlocation = 1\n").unwrap();
    agent.signal(libc::SIGHUP);
    wait_until(
        Duration::from_secs(10),
        "the refused reload in the log",
        || agent.log().contains("keeping the running configuration"),
    );
    assert!(agent.running(), "{}", agent.log());
    assert_eq!(http_get(port, "/healthz").0, 200);
    std::fs::write(&config, good).unwrap();

    // Backups stop succeeding: the source goes AT RISK, then BREACHED, and
    // status, readiness and metrics all say so.
    std::fs::write(&stop, "").unwrap();
    wait_until(Duration::from_secs(60), "AT RISK", || {
        status_json(&config).1["sources"][0]["state"] == "AT_RISK"
    });
    wait_until(Duration::from_secs(30), "BREACHED", || {
        status_json(&config).1["sources"][0]["state"] == "BREACHED"
    });
    let (code, _) = status_json(&config);
    assert_eq!(code, 4, "status exits 4 while a target is breached");
    let (code, ready) = http_get(port, "/readyz");
    assert_eq!(code, 503, "{ready}");
    assert!(ready.contains("breached: demo"), "{ready}");
    let (_, metrics) = http_get(port, "/metrics");
    assert!(
        metrics.contains(
            "lifeboat_source_objective_state{source=\"demo\",objective=\"rpo\",state=\"breached\"} 1"
        ),
        "{metrics}"
    );
    assert!(agent.log().contains("before hook"), "{}", agent.log());

    // SIGTERM: exit 0 within the grace period plus a margin.
    agent.signal(libc::SIGTERM);
    let code = agent.wait(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{}", agent.log());
    assert!(
        !state.join("agent.sock").exists(),
        "the control socket is removed"
    );

    // A lost state directory is rebuilt from the repository.
    let (_, before) = status_json(&config);
    std::fs::remove_dir_all(&state).unwrap();
    let out = lifeboat(&config, &["catalog", "rebuild"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let (_, after) = status_json(&config);
    assert_eq!(
        after["sources"][0]["last_snapshot"]["id"], before["sources"][0]["last_snapshot"]["id"],
        "{after}"
    );
}

#[test]
fn config_check_reports_every_error_with_its_line() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("bad.toml");
    std::fs::write(
        &config,
        r#"[repository]
location = "/srv/repo"
colour = "blue"

[passphrase]
env = "LIFEBOAT_PASSPHRASE"

[[source]]
name = "etc"
paths = ["/etc"]
schedule = "every day"
rpo = "1d"

[[source]]
name = "db"
paths = ["/var/lib/db"]
schedule = "@hourly"
rpo = "30m"
"#,
    )
    .unwrap();
    let out = lifeboat(&config, &["config", "check"]).output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    for (line, key) in [(3, "colour"), (11, "schedule"), (18, "rpo")] {
        assert!(
            err.contains(&format!(":{line}:")) && err.contains(key),
            "line {line} ({key}) is reported: {err}"
        );
    }
}
