//! End-to-end tests of `lifeboat drill`: a drill through the binary, its
//! reports read back from the repository, and the HTML report rendered in
//! a real headless browser (a screenshot is kept under `target/`).

use std::path::PathBuf;

use serde_json::Value;

use crate::browser;
use crate::util::{write_random_file, Lb};

#[test]
fn a_drill_report_renders_in_a_real_browser_and_shows_the_outcome() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    write_random_file(&src.join("data.bin"), 3 << 20, 5);
    std::fs::write(src.join("notes.txt"), "restore me\n".repeat(100)).unwrap();
    let lb = Lb::new(tmp.path(), Some("drill passphrase"));
    lb.ok(&["init"]);
    lb.ok(&["backup", src.to_str().unwrap()]);
    let scratch = tmp.path().join("scratch");
    let out = lb.ok(&[
        "drill",
        "run",
        "--scratch",
        scratch.to_str().unwrap(),
        "--validate",
        "grep -rq 'restore me' {restore_dir}",
        "--rto",
        "1h",
        "--format",
        "json",
    ]);
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["outcome"], "passed", "{report}");
    assert_eq!(report["files_verified"], 2, "{report}");
    assert_eq!(report["validations"][0]["passed"], true, "{report}");
    assert_eq!(report["rto"]["status"], "OK", "{report}");

    // A failing validation fails the drill (exit 1) and the report says why.
    let failed = lb.fails(&[
        "drill",
        "run",
        "--scratch",
        scratch.to_str().unwrap(),
        "--validate",
        "echo database refused to start; exit 2",
    ]);
    let text = String::from_utf8_lossy(&failed.stdout);
    assert!(
        text.contains("FAILED") && text.contains("database refused to start"),
        "{text}"
    );

    let list = lb.ok(&["drill", "list"]);
    assert!(list.contains("2 drill(s)"), "{list}");
    let html = lb.ok(&[
        "drill",
        "show",
        &report["id"].as_str().unwrap()[..8],
        "--format",
        "html",
    ]);
    let page = tmp.path().join("report.html");
    std::fs::write(&page, &html).unwrap();
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("drill-report.png");
    let dom = browser::render(&page, &shot);
    assert!(
        dom.contains("PASSED"),
        "the rendered page shows the outcome"
    );
    eprintln!("drill report screenshot: {}", shot.display());

    let dir = tmp.path().join("reports");
    lb.ok(&["drill", "report", "--out", dir.to_str().unwrap()]);
    assert!(dir.join("index.html").exists());
}
