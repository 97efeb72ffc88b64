//! Tests of what `packaging/` ships: the systemd unit passes
//! `systemd-analyze verify` and keeps its exposure score low, and the
//! Prometheus alert rules load and pass their unit tests in `promtool`. (The
//! Grafana dashboard is checked against a live `/metrics` scrape in the
//! agent test; the .deb is built and inspected by `.ci/run`.)

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::lifeboat_bin;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e} (is it installed? see .ci/run)"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed:\n{text}");
    text
}

#[test]
fn the_systemd_unit_verifies_and_its_exposure_stays_low() {
    let tmp = tempfile::tempdir().unwrap();
    // verify checks that ExecStart exists: point it at the built binary.
    let unit = std::fs::read_to_string(repo_root().join("packaging/lifeboat.service")).unwrap();
    let unit = unit.replace("/usr/bin/lifeboat", lifeboat_bin().to_str().unwrap());
    let path = tmp.path().join("lifeboat.service");
    std::fs::write(&path, unit).unwrap();
    run(
        Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&path),
        "systemd-analyze verify",
    );
    let text = run(
        Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager"])
            .arg(&path),
        "systemd-analyze security",
    );
    let score: f64 = text
        .lines()
        .find_map(|l| l.split("exposure level for lifeboat.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure score in:\n{text}"));
    eprintln!("systemd-analyze security: exposure {score}");
    assert!(score <= 2.5, "exposure {score} rose above 2.5:\n{text}");
}

#[test]
fn the_prometheus_rules_load_and_every_alert_passes_its_unit_test() {
    let dir = repo_root().join("packaging/prometheus");
    run(
        Command::new("promtool")
            .args(["check", "rules", "lifeboat-rules.yml"])
            .current_dir(&dir),
        "promtool check rules",
    );
    run(
        Command::new("promtool")
            .args(["test", "rules", "lifeboat-rules.test.yml"])
            .current_dir(&dir),
        "promtool test rules",
    );
}
