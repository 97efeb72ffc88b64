//! Renders a [`DrillReport`] for people: Markdown for a terminal, a
//! self-contained HTML page to mail or archive, and an HTML index over many
//! reports for `lifeboat drill report --out DIR`.
//!
//! Both renderings put the outcome first, because that is the one thing a
//! reader must not miss, and then follow the same order: what was drilled,
//! the objectives (RPO and RTO against their targets), where the time went,
//! what broke, what the validation commands said, how the RTO was estimated,
//! and how earlier drills went. The HTML page has no external assets at all
//! (no scripts, fonts, images or links to elsewhere), so it shows the same
//! thing offline, in a mail client or years later from an archive.
//!
//! Every string in a report may come from outside Lifeboat's control: paths
//! from the backed-up machine, output of validation commands. So every one is
//! escaped for HTML, and control characters (which could move a terminal's
//! cursor or are invalid in HTML) are shown as Unicode control pictures
//! (`␛` for ESC) instead of being passed through.

use std::fmt::{self, Write};

use chrono::{DateTime, SecondsFormat, Utc};

use crate::report::{DrillOutcome, DrillReport, FileProblem, RtoEstimate};

/// File problems listed in the Markdown rendering; the rest are counted.
const MARKDOWN_PROBLEM_LIMIT: usize = 50;

/// File problems listed in the HTML page. Higher than for a terminal, since
/// the page is the record people search, but bounded so that a drill of a
/// badly damaged repository still yields a page a browser can open.
const HTML_PROBLEM_LIMIT: usize = 1000;

/// Width in characters of the longest phase's bar in the Markdown table.
const TEXT_BAR_WIDTH: usize = 20;

const MIB: f64 = 1024.0 * 1024.0;

/// The report as Markdown for a terminal: outcome first (PASSED / FAILED /
/// TIMED OUT / REFUSED with the summary), then source, snapshot (short ID 8
/// chars + time + how chosen), scope, RPO and RTO against targets (human
/// durations like 4m12s, 1h05m), a phase timing table, throughput (MiB/s),
/// counts, file problems (cap the list at 50 with "and N more"), validation
/// commands with exit code and their output in fenced blocks, the RTO method
/// sentence, and the history table.
pub fn markdown(r: &DrillReport) -> String {
    let mut out = String::new();
    write_markdown(&mut out, r).expect("writing to a String cannot fail");
    out
}

/// A self-contained HTML page: no external assets at all (inline `<style>`,
/// no scripts, no web fonts, no images), valid HTML5, titled
/// "Lifeboat drill: SOURCE — OUTCOME". The outcome is at the top in a large
/// coloured banner (green passed, red failed or timed out, amber refused) in
/// the element `id="outcome"`, whose text is exactly PASSED, FAILED,
/// TIMED OUT or REFUSED. Then the same sections as [`markdown`], with a CSS
/// bar per phase proportional to its seconds. Every string from the report is
/// escaped for HTML. Print-friendly.
pub fn html(r: &DrillReport) -> String {
    let mut out = String::new();
    write_html(&mut out, r).expect("writing to a String cannot fail");
    out
}

/// An index page for `lifeboat drill report --out DIR`: one row per report
/// (source, drill, time, outcome, RTO estimate against its target), in the
/// order given, linking to the `href` given with each report. Self-contained
/// like [`html`].
pub fn html_index(reports: &[(DrillReport, String)]) -> String {
    let mut out = String::new();
    write_html_index(&mut out, reports).expect("writing to a String cannot fail");
    out
}

/// Human duration, precise enough to compare with a target and short enough
/// for a table cell: "0.4s" below ten seconds, then "12s", "4m12s", "1h05m",
/// "2d03h" (each rounded to its smallest unit). Negative durations get a
/// leading "-"; NaN is "?" and infinity "∞".
pub fn human_duration(secs: f64) -> String {
    if secs.is_nan() {
        return "?".to_string();
    }
    if secs < 0.0 {
        return format!("-{}", human_duration(-secs));
    }
    if secs.is_infinite() {
        return "∞".to_string();
    }
    // Sub-second phases of small drills read better in milliseconds than
    // as "0.0s", which looks like nothing happened.
    if secs > 0.0 && secs < 0.095 {
        return format!("{}ms", ((secs * 1000.0).round() as u64).max(1));
    }
    // Below 9.95 one decimal still rounds to less than ten seconds. `abs`
    // turns -0.0 into 0.0, which would otherwise print as "-0.0s".
    if secs < 9.95 {
        return format!("{:.1}s", secs.abs());
    }
    // Each unit is rounded on its own, so 3599.6 s becomes "1h00m" rather
    // than "59m60s". The float-to-int casts saturate, which only matters for
    // absurd values.
    let s = secs.round() as u64;
    if s < 60 {
        return format!("{s}s");
    }
    if s < 3600 {
        return format!("{}m{:02}s", s / 60, s % 60);
    }
    let m = (secs / 60.0).round() as u64;
    if m < 24 * 60 {
        return format!("{}h{:02}m", m / 60, m % 60);
    }
    let h = (secs / 3600.0).round() as u64;
    format!("{}d{:02}h", h / 24, h % 24)
}

// ---------------------------------------------------------------------------
// What both renderings share.

/// The outcome as shown to people.
fn outcome_label(o: DrillOutcome) -> &'static str {
    match o {
        DrillOutcome::Passed => "PASSED",
        DrillOutcome::Failed => "FAILED",
        DrillOutcome::TimedOut => "TIMED OUT",
        DrillOutcome::Refused => "REFUSED",
    }
}

/// CSS class of an outcome, for the banner and the index's badges.
fn outcome_class(o: DrillOutcome) -> &'static str {
    match o {
        DrillOutcome::Passed => "passed",
        DrillOutcome::Failed => "failed",
        DrillOutcome::TimedOut => "timed-out",
        DrillOutcome::Refused => "refused",
    }
}

/// A history entry's outcome (stored as a string, normally the serde name
/// such as `timed_out`) in the same words as [`outcome_label`].
fn history_label(outcome: &str) -> String {
    outcome.replace('_', " ").to_uppercase()
}

/// CSS class for a history entry's outcome string.
fn history_class(outcome: &str) -> &'static str {
    match outcome.to_lowercase().replace(' ', "_").as_str() {
        "passed" => "passed",
        "failed" => "failed",
        "timed_out" => "timed-out",
        "refused" => "refused",
        _ => "unknown",
    }
}

/// Where the RPO stands against its target, by the rule the agent uses for
/// its objectives (`catalog::assess`, which this crate cannot depend on): OK
/// below 80 % of the target, AT RISK up to it, BREACHED past it, UNKNOWN
/// without a measurement. `None` when there is no target to compare with.
fn rpo_status(r: &DrillReport) -> Option<&'static str> {
    let target = r.rpo_target_seconds?;
    Some(match r.rpo_seconds {
        None => "UNKNOWN",
        Some(actual) if actual * 5.0 < target * 4.0 => "OK",
        Some(actual) if actual <= target => "AT RISK",
        Some(_) => "BREACHED",
    })
}

/// The measured/target/status cells of the RTO row.
fn rto_cells(rto: Option<&RtoEstimate>) -> (String, String, String) {
    match rto {
        None => ("not measured".into(), "—".into(), "UNKNOWN".into()),
        Some(e) => (
            human_duration(e.full_restore_seconds),
            e.target_seconds
                .map_or_else(|| "none".to_string(), human_duration),
            e.status.clone(),
        ),
    }
}

/// The measured/target/status cells of the RPO row.
fn rpo_cells(r: &DrillReport) -> (String, String, String) {
    (
        r.rpo_seconds
            .map_or_else(|| "unknown".to_string(), human_duration),
        r.rpo_target_seconds
            .map_or_else(|| "none".to_string(), human_duration),
        rpo_status(r).unwrap_or("—").to_string(),
    )
}

/// Bytes in binary units, as the throughput is in MiB/s.
pub(crate) fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

fn mib_per_sec(bytes_per_sec: f64) -> String {
    format!("{:.1} MiB/s", bytes_per_sec / MIB)
}

fn time(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// Machine-readable time for `<time datetime=...>`.
fn rfc3339(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// The first eight characters of a snapshot ID, as `lifeboat snapshots` shows it.
fn short_id(id: &str) -> &str {
    id.char_indices().nth(8).map_or(id, |(i, _)| &id[..i])
}

/// A phase's share of the longest phase, in percent (0 to 100). The
/// pipelined restore sub-phases overlap, so shares of the total would mislead.
fn bar_percent(seconds: f64, longest: f64) -> f64 {
    if !(seconds.is_finite() && longest.is_finite()) || longest <= 0.0 || seconds <= 0.0 {
        return 0.0;
    }
    (seconds / longest * 100.0).clamp(0.0, 100.0)
}

fn longest_phase(r: &DrillReport) -> f64 {
    r.phases
        .iter()
        .map(|p| p.seconds)
        .filter(|s| s.is_finite())
        .fold(0.0, f64::max)
}

/// What became of the sandbox after the drill.
fn sandbox_fate(r: &DrillReport) -> &'static str {
    if r.kept {
        "kept"
    } else {
        "removed"
    }
}

/// The control picture standing for a control character, or `None` for an
/// ordinary character. C0 controls map to U+2400..U+241F, DEL to U+2421 and
/// C1 controls (which have no pictures) to U+FFFD.
fn control_picture(c: char) -> Option<char> {
    match c {
        '\0'..='\x1f' => char::from_u32(0x2400 + c as u32),
        '\x7f' => Some('\u{2421}'),
        '\u{80}'..='\u{9f}' => Some('\u{fffd}'),
        _ => None,
    }
}

/// `s` with every control character, newlines and tabs included, shown as
/// its control picture: for text that must stay on one line.
fn one_line(s: &str) -> String {
    s.chars().map(|c| control_picture(c).unwrap_or(c)).collect()
}

/// `s` for a block of preformatted text: newlines and tabs kept, carriage
/// returns (progress output, CRLF) turned into newlines, other control
/// characters (terminal escapes) shown as their control pictures.
fn block(s: &str) -> String {
    let s = s.replace("\r\n", "\n");
    s.chars()
        .map(|c| match c {
            '\n' | '\t' => c,
            '\r' => '\n',
            _ => control_picture(c).unwrap_or(c),
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Markdown.

/// The longest run of `c` in `s`.
fn longest_run(s: &str, c: char) -> usize {
    let (mut longest, mut run) = (0, 0);
    for x in s.chars() {
        run = if x == c { run + 1 } else { 0 };
        longest = longest.max(run);
    }
    longest
}

/// `s` as a Markdown code span on one line, delimited by more backticks than
/// it contains in a row (CommonMark's rule), so any string survives.
fn md_code(s: &str) -> String {
    let s = one_line(s);
    if s.is_empty() {
        return "(empty)".to_string();
    }
    let ticks = "`".repeat(longest_run(&s, '`') + 1);
    // A space inside the delimiters keeps a leading or trailing backtick
    // from joining them; CommonMark strips one such space on each side.
    if s.starts_with('`') || s.ends_with('`') {
        format!("{ticks} {s} {ticks}")
    } else {
        format!("{ticks}{s}{ticks}")
    }
}

/// Text for a table cell: on one line, with `|` escaped so that it does not
/// end the cell (GFM honours `\|` inside code spans in tables too).
fn md_cell(s: &str) -> String {
    one_line(s).replace('|', "\\|")
}

fn write_markdown(out: &mut String, r: &DrillReport) -> fmt::Result {
    let label = outcome_label(r.outcome);
    match &r.summary {
        Some(summary) => writeln!(out, "# {label} — {}", one_line(summary))?,
        None => writeln!(out, "# {label}")?,
    }
    writeln!(out)?;
    writeln!(
        out,
        "Drill {} of source {} on {}: {} to {} ({}).",
        md_code(&r.name),
        md_code(&r.source),
        md_code(&r.host),
        time(&r.started),
        time(&r.finished),
        human_duration(drill_seconds(r)),
    )?;
    writeln!(out)?;
    match &r.snapshot_id {
        Some(id) => {
            let when = r.snapshot_time.as_ref().map_or_else(
                || "of unknown time".to_string(),
                |t| format!("of {}", time(t)),
            );
            writeln!(
                out,
                "- **Snapshot:** {} {when}, chosen as {}",
                md_code(short_id(id)),
                one_line(&r.snapshot_choice),
            )?;
        }
        None => writeln!(
            out,
            "- **Snapshot:** none (to be chosen as {})",
            one_line(&r.snapshot_choice)
        )?,
    }
    writeln!(out, "- **Scope:** {}", one_line(&r.scope))?;
    writeln!(
        out,
        "- **Sandbox:** {} ({})",
        md_code(&r.sandbox),
        sandbox_fate(r)
    )?;
    writeln!(out)?;

    writeln!(out, "## Objectives")?;
    writeln!(out)?;
    writeln!(out, "| Objective | Measured | Target | Status |")?;
    writeln!(out, "|---|---:|---:|---|")?;
    let (measured, target, status) = rpo_cells(r);
    writeln!(
        out,
        "| RPO (age of the last snapshot) | {measured} | {target} | {status} |"
    )?;
    let (measured, target, status) = rto_cells(r.rto.as_ref());
    writeln!(
        out,
        "| RTO (full restore) | {measured} | {target} | {} |",
        md_cell(&status)
    )?;
    writeln!(out)?;

    writeln!(out, "## Phases")?;
    writeln!(out)?;
    if r.phases.is_empty() {
        writeln!(out, "No phases were timed.")?;
    } else {
        let longest = longest_phase(r);
        writeln!(out, "| Phase | Time | | Note |")?;
        writeln!(out, "|---|---:|---|---|")?;
        for p in &r.phases {
            let width = (bar_percent(p.seconds, longest) / 100.0 * TEXT_BAR_WIDTH as f64).round();
            writeln!(
                out,
                "| {} | {} | {} | {} |",
                md_cell(&p.name),
                human_duration(p.seconds),
                "█".repeat(width as usize),
                p.note.as_deref().map(md_cell).unwrap_or_default(),
            )?;
        }
    }
    writeln!(out)?;

    writeln!(out, "## Restore")?;
    writeln!(out)?;
    writeln!(
        out,
        "- **Throughput:** {}",
        mib_per_sec(r.throughput_bytes_per_sec)
    )?;
    writeln!(
        out,
        "- **Restored:** {} files, {}",
        r.files_restored,
        human_bytes(r.bytes_restored)
    )?;
    writeln!(out, "- **Verified:** {} files", r.files_verified)?;
    writeln!(
        out,
        "- **Other entries checked:** {} (type, mode, link target)",
        r.entries_checked
    )?;
    writeln!(out)?;

    writeln!(out, "## File problems ({})", r.problems.len())?;
    writeln!(out)?;
    if r.problems.is_empty() {
        writeln!(out, "None.")?;
    } else {
        for FileProblem { path, reason } in r.problems.iter().take(MARKDOWN_PROBLEM_LIMIT) {
            writeln!(out, "- {}: {}", md_code(path), one_line(reason))?;
        }
        if r.problems.len() > MARKDOWN_PROBLEM_LIMIT {
            writeln!(
                out,
                "- … and {} more",
                r.problems.len() - MARKDOWN_PROBLEM_LIMIT
            )?;
        }
    }
    writeln!(out)?;

    writeln!(out, "## Validation")?;
    writeln!(out)?;
    if r.validations.is_empty() {
        writeln!(out, "No validation commands.")?;
        writeln!(out)?;
    }
    for v in &r.validations {
        let verdict = if v.passed { "passed" } else { "FAILED" };
        let exit = v
            .exit_code
            .map_or_else(|| "no exit code".to_string(), |c| format!("exit code {c}"));
        writeln!(
            out,
            "### {verdict}: {} ({exit}, {})",
            md_code(&v.command),
            human_duration(v.seconds)
        )?;
        writeln!(out)?;
        if let Some(error) = v.error.as_deref().filter(|e| *e != exit) {
            writeln!(out, "{}", one_line(error))?;
            writeln!(out)?;
        }
        if v.output.is_empty() {
            writeln!(out, "(no output)")?;
        } else {
            let text = block(&v.output);
            let fence = "`".repeat(longest_run(&text, '`').max(2) + 1);
            writeln!(out, "{fence}text")?;
            out.push_str(&text);
            if !text.ends_with('\n') {
                out.push('\n');
            }
            writeln!(out, "{fence}")?;
        }
        writeln!(out)?;
    }

    writeln!(out, "## RTO estimate")?;
    writeln!(out)?;
    match &r.rto {
        Some(e) => {
            writeln!(
                out,
                "Restored {} of {} in {}; a full restore would take {}.",
                human_bytes(e.restored_bytes),
                human_bytes(e.snapshot_bytes),
                human_duration(e.measured_restore_seconds),
                human_duration(e.full_restore_seconds),
            )?;
            writeln!(out)?;
            writeln!(out, "{}", one_line(&e.method))?;
        }
        None => writeln!(out, "Not measured: the drill did not restore anything.")?,
    }
    writeln!(out)?;

    writeln!(out, "## History")?;
    writeln!(out)?;
    if r.history.is_empty() {
        writeln!(out, "No earlier drills of this source.")?;
    } else {
        writeln!(out, "| Time | Outcome | Full restore |")?;
        writeln!(out, "|---|---|---:|")?;
        for h in &r.history {
            writeln!(
                out,
                "| {} | {} | {} |",
                time(&h.time),
                md_cell(&history_label(&h.outcome)),
                h.full_restore_seconds
                    .map_or_else(|| "—".to_string(), human_duration),
            )?;
        }
    }
    writeln!(out)?;
    writeln!(out, "Report {} (format {}).", md_code(&r.id), r.version)
}

/// Seconds from the drill's start to its end (0 if the clock went backwards).
fn drill_seconds(r: &DrillReport) -> f64 {
    let d = r.finished - r.started;
    (d.num_milliseconds() as f64 / 1000.0).max(0.0)
}

// ---------------------------------------------------------------------------
// HTML.

/// `s` escaped for HTML text or a quoted attribute value, on one line.
fn esc(s: &str) -> String {
    escape_into(&one_line(s))
}

/// `s` escaped for HTML inside `<pre>`, keeping its lines.
fn esc_block(s: &str) -> String {
    escape_into(&block(s))
}

/// Escapes the five characters with a meaning in HTML text and attributes.
/// Control characters are already gone (see [`one_line`] and [`block`]).
fn escape_into(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// CSS class of an objective's status (`OK`, `AT RISK`, ...).
fn status_class(status: &str) -> &'static str {
    match status {
        "OK" => "ok",
        "AT RISK" => "at-risk",
        "BREACHED" => "breached",
        _ => "unknown",
    }
}

/// The style sheet of every page. Colours are forced in print (banner and
/// bars are information, not decoration), and no font is fetched: the stacks
/// name fonts the reader's system has.
const STYLE: &str = r#"
*{box-sizing:border-box;-webkit-print-color-adjust:exact;print-color-adjust:exact}
body{margin:0 auto;max-width:1100px;padding:24px;color:#1f2328;background:#fff;
 font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
h1,h2,h3{line-height:1.2}
h2{margin:28px 0 8px;padding-bottom:4px;border-bottom:1px solid #d0d7de;font-size:20px}
h3{margin:16px 0 6px;font-size:16px}
code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,"Liberation Mono",monospace}
code{font-size:.9em;overflow-wrap:anywhere}
pre{font-size:13px;margin:6px 0 12px;padding:8px 12px;background:#f6f8fa;border:1px solid #d0d7de;border-radius:6px;
 white-space:pre-wrap;overflow-wrap:anywhere}
table{border-collapse:collapse;width:100%;margin:8px 0 12px}
th,td{padding:4px 8px;text-align:left;vertical-align:top;border-bottom:1px solid #d0d7de}
th{background:#f6f8fa}
.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
.banner{margin:0 0 20px;padding:20px 24px;border-radius:8px;color:#fff}
.banner h1{margin:0;font-size:44px;letter-spacing:.04em}
.banner p{margin:8px 0 0;font-size:18px}
.banner.passed{background:#1a7f37}
.banner.failed,.banner.timed-out{background:#cf222e}
.banner.refused{background:#e3b341;color:#1f2328}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:4px 16px;margin:0}
dl.facts dt{font-weight:600;color:#59636e}
dl.facts dd{margin:0;overflow-wrap:anywhere}
.bar{min-width:160px;height:12px;background:#eaeef2;border-radius:3px}
.bar span{display:block;height:100%;background:#0969da;border-radius:3px}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-weight:600;font-size:13px;white-space:nowrap}
.badge.ok,.badge.passed{background:#dafbe1;color:#116329}
.badge.at-risk,.badge.refused{background:#fff8c5;color:#7d4e00}
.badge.breached,.badge.failed,.badge.timed-out{background:#ffebe9;color:#a40e26}
.badge.unknown{background:#eaeef2;color:#59636e}
.muted{color:#59636e}
footer{margin-top:28px;font-size:13px;color:#59636e}
@media print{body{max-width:none;padding:0;font-size:11pt}h2,h3{break-after:avoid}tr{break-inside:avoid}
 a{color:inherit;text-decoration:none}}
"#;

/// Everything up to and including `<body>`.
fn write_head(out: &mut String, title: &str) -> fmt::Result {
    writeln!(out, "<!DOCTYPE html>")?;
    writeln!(out, "<html lang=\"en\">")?;
    writeln!(out, "<head>")?;
    writeln!(out, "<meta charset=\"utf-8\">")?;
    writeln!(
        out,
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
    )?;
    writeln!(out, "<meta name=\"generator\" content=\"Lifeboat\">")?;
    writeln!(out, "<title>{}</title>", esc(title))?;
    writeln!(out, "<style>{STYLE}</style>")?;
    writeln!(out, "</head>")?;
    writeln!(out, "<body>")
}

fn write_time(out: &mut String, t: &DateTime<Utc>) -> fmt::Result {
    write!(
        out,
        "<time datetime=\"{}\">{}</time>",
        rfc3339(t),
        esc(&time(t))
    )
}

fn write_html(out: &mut String, r: &DrillReport) -> fmt::Result {
    let label = outcome_label(r.outcome);
    write_head(out, &format!("Lifeboat drill: {} — {label}", r.source))?;

    writeln!(
        out,
        "<header class=\"banner {}\">",
        outcome_class(r.outcome)
    )?;
    writeln!(out, "<h1 id=\"outcome\">{label}</h1>")?;
    if let Some(summary) = &r.summary {
        writeln!(out, "<p id=\"summary\">{}</p>", esc(summary))?;
    }
    writeln!(
        out,
        "<p>Drill <code>{}</code> of source <code>{}</code></p>",
        esc(&r.name),
        esc(&r.source)
    )?;
    writeln!(out, "</header>")?;
    writeln!(out, "<main>")?;

    writeln!(out, "<section id=\"drill\">")?;
    writeln!(out, "<h2>Drill</h2>")?;
    writeln!(out, "<dl class=\"facts\">")?;
    writeln!(
        out,
        "<dt>Source</dt><dd><code>{}</code></dd>",
        esc(&r.source)
    )?;
    writeln!(out, "<dt>Host</dt><dd><code>{}</code></dd>", esc(&r.host))?;
    write!(out, "<dt>Ran</dt><dd>")?;
    write_time(out, &r.started)?;
    write!(out, " to ")?;
    write_time(out, &r.finished)?;
    writeln!(out, " ({})</dd>", human_duration(drill_seconds(r)))?;
    write!(out, "<dt>Snapshot</dt><dd>")?;
    match &r.snapshot_id {
        Some(id) => {
            write!(
                out,
                "<code title=\"{}\">{}</code>",
                esc(id),
                esc(short_id(id))
            )?;
            if let Some(t) = &r.snapshot_time {
                write!(out, " of ")?;
                write_time(out, t)?;
            }
            write!(out, ", chosen as {}", esc(&r.snapshot_choice))?;
        }
        None => write!(out, "none (to be chosen as {})", esc(&r.snapshot_choice))?,
    }
    writeln!(out, "</dd>")?;
    writeln!(out, "<dt>Scope</dt><dd>{}</dd>", esc(&r.scope))?;
    writeln!(
        out,
        "<dt>Sandbox</dt><dd><code>{}</code> ({})</dd>",
        esc(&r.sandbox),
        sandbox_fate(r)
    )?;
    writeln!(out, "</dl>")?;
    writeln!(out, "</section>")?;

    writeln!(out, "<section id=\"objectives\">")?;
    writeln!(out, "<h2>Objectives</h2>")?;
    writeln!(out, "<table>")?;
    writeln!(
        out,
        "<thead><tr><th>Objective</th><th class=\"num\">Measured</th><th class=\"num\">Target</th><th>Status</th></tr></thead>"
    )?;
    writeln!(out, "<tbody>")?;
    let (measured, target, status) = rpo_cells(r);
    write_objective_row(
        out,
        "RPO (age of the last snapshot)",
        &measured,
        &target,
        &status,
    )?;
    let (measured, target, status) = rto_cells(r.rto.as_ref());
    write_objective_row(out, "RTO (full restore)", &measured, &target, &status)?;
    writeln!(out, "</tbody>")?;
    writeln!(out, "</table>")?;
    writeln!(out, "</section>")?;

    writeln!(out, "<section id=\"phases\">")?;
    writeln!(out, "<h2>Phases</h2>")?;
    if r.phases.is_empty() {
        writeln!(out, "<p class=\"muted\">No phases were timed.</p>")?;
    } else {
        let longest = longest_phase(r);
        writeln!(out, "<table>")?;
        writeln!(
            out,
            "<thead><tr><th>Phase</th><th class=\"num\">Time</th><th style=\"width:40%\">Share of the longest</th><th>Note</th></tr></thead>"
        )?;
        writeln!(out, "<tbody>")?;
        for p in &r.phases {
            writeln!(
                out,
                "<tr><td>{}</td><td class=\"num\">{}</td><td><div class=\"bar\"><span style=\"width:{:.1}%\"></span></div></td><td>{}</td></tr>",
                esc(&p.name),
                human_duration(p.seconds),
                bar_percent(p.seconds, longest),
                p.note.as_deref().map(esc).unwrap_or_default(),
            )?;
        }
        writeln!(out, "</tbody>")?;
        writeln!(out, "</table>")?;
    }
    writeln!(out, "</section>")?;

    writeln!(out, "<section id=\"restore\">")?;
    writeln!(out, "<h2>Restore</h2>")?;
    writeln!(out, "<dl class=\"facts\">")?;
    writeln!(
        out,
        "<dt>Throughput</dt><dd>{}</dd>",
        mib_per_sec(r.throughput_bytes_per_sec)
    )?;
    writeln!(
        out,
        "<dt>Restored</dt><dd>{} files, {}</dd>",
        r.files_restored,
        human_bytes(r.bytes_restored)
    )?;
    writeln!(out, "<dt>Verified</dt><dd>{} files</dd>", r.files_verified)?;
    writeln!(
        out,
        "<dt>Other entries checked</dt><dd>{} (type, mode, link target)</dd>",
        r.entries_checked
    )?;
    writeln!(out, "</dl>")?;
    writeln!(out, "</section>")?;

    writeln!(out, "<section id=\"problems\">")?;
    writeln!(out, "<h2>File problems ({})</h2>", r.problems.len())?;
    if r.problems.is_empty() {
        writeln!(out, "<p class=\"muted\">None.</p>")?;
    } else {
        writeln!(out, "<table>")?;
        writeln!(out, "<thead><tr><th>Path</th><th>Problem</th></tr></thead>")?;
        writeln!(out, "<tbody>")?;
        for p in r.problems.iter().take(HTML_PROBLEM_LIMIT) {
            writeln!(
                out,
                "<tr><td><code>{}</code></td><td>{}</td></tr>",
                esc(&p.path),
                esc(&p.reason)
            )?;
        }
        writeln!(out, "</tbody>")?;
        writeln!(out, "</table>")?;
        if r.problems.len() > HTML_PROBLEM_LIMIT {
            writeln!(
                out,
                "<p>… and {} more (the JSON report lists them all).</p>",
                r.problems.len() - HTML_PROBLEM_LIMIT
            )?;
        }
    }
    writeln!(out, "</section>")?;

    writeln!(out, "<section id=\"validation\">")?;
    writeln!(out, "<h2>Validation</h2>")?;
    if r.validations.is_empty() {
        writeln!(out, "<p class=\"muted\">No validation commands.</p>")?;
    }
    for v in &r.validations {
        let (class, verdict) = if v.passed {
            ("passed", "passed")
        } else {
            ("failed", "FAILED")
        };
        let exit = v
            .exit_code
            .map_or_else(|| "no exit code".to_string(), |c| format!("exit code {c}"));
        writeln!(
            out,
            "<h3><span class=\"badge {class}\">{verdict}</span> <code>{}</code></h3>",
            esc(&v.command)
        )?;
        writeln!(
            out,
            "<p>{exit}, ran {}{}</p>",
            human_duration(v.seconds),
            v.error
                .as_deref()
                .filter(|e| *e != exit)
                .map(|e| format!(": {}", esc(e)))
                .unwrap_or_default()
        )?;
        if v.output.is_empty() {
            writeln!(out, "<p class=\"muted\">(no output)</p>")?;
        } else {
            writeln!(out, "<pre>{}</pre>", esc_block(&v.output))?;
        }
    }
    writeln!(out, "</section>")?;

    writeln!(out, "<section id=\"rto\">")?;
    writeln!(out, "<h2>RTO estimate</h2>")?;
    match &r.rto {
        Some(e) => {
            writeln!(
                out,
                "<p>Restored {} of {} in {}; a full restore would take {}.</p>",
                human_bytes(e.restored_bytes),
                human_bytes(e.snapshot_bytes),
                human_duration(e.measured_restore_seconds),
                human_duration(e.full_restore_seconds),
            )?;
            writeln!(out, "<p id=\"rto-method\">{}</p>", esc(&e.method))?;
        }
        None => writeln!(
            out,
            "<p class=\"muted\">Not measured: the drill did not restore anything.</p>"
        )?,
    }
    writeln!(out, "</section>")?;

    writeln!(out, "<section id=\"history\">")?;
    writeln!(out, "<h2>History</h2>")?;
    if r.history.is_empty() {
        writeln!(
            out,
            "<p class=\"muted\">No earlier drills of this source.</p>"
        )?;
    } else {
        writeln!(out, "<table>")?;
        writeln!(
            out,
            "<thead><tr><th>Time</th><th>Outcome</th><th class=\"num\">Full restore</th></tr></thead>"
        )?;
        writeln!(out, "<tbody>")?;
        for h in &r.history {
            write!(out, "<tr><td>")?;
            write_time(out, &h.time)?;
            writeln!(
                out,
                "</td><td><span class=\"badge {}\">{}</span></td><td class=\"num\">{}</td></tr>",
                history_class(&h.outcome),
                esc(&history_label(&h.outcome)),
                h.full_restore_seconds
                    .map_or_else(|| "—".to_string(), human_duration),
            )?;
        }
        writeln!(out, "</tbody>")?;
        writeln!(out, "</table>")?;
    }
    writeln!(out, "</section>")?;
    writeln!(out, "</main>")?;

    writeln!(
        out,
        "<footer>Lifeboat drill report <code>{}</code>, format {}.</footer>",
        esc(&r.id),
        r.version
    )?;
    writeln!(out, "</body>")?;
    writeln!(out, "</html>")
}

fn write_objective_row(
    out: &mut String,
    objective: &str,
    measured: &str,
    target: &str,
    status: &str,
) -> fmt::Result {
    writeln!(
        out,
        "<tr><td>{objective}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td><span class=\"badge {}\">{}</span></td></tr>",
        esc(measured),
        esc(target),
        status_class(status),
        esc(status)
    )
}

fn write_html_index(out: &mut String, reports: &[(DrillReport, String)]) -> fmt::Result {
    write_head(out, "Lifeboat drill reports")?;
    writeln!(out, "<main>")?;
    writeln!(out, "<h1>Lifeboat drill reports</h1>")?;
    if reports.is_empty() {
        writeln!(out, "<p class=\"muted\">No drill reports.</p>")?;
    } else {
        writeln!(out, "<table>")?;
        writeln!(
            out,
            "<thead><tr><th>Source</th><th>Drill</th><th>Time</th><th>Outcome</th><th class=\"num\">RTO estimate</th><th class=\"num\">Target</th><th>Status</th></tr></thead>"
        )?;
        writeln!(out, "<tbody>")?;
        for (r, href) in reports {
            let (estimate, target, status) = rto_cells(r.rto.as_ref());
            write!(
                out,
                "<tr><td><code>{}</code></td><td><code>{}</code></td><td><a href=\"{}\">",
                esc(&r.source),
                esc(&r.name),
                esc(href)
            )?;
            write_time(out, &r.started)?;
            writeln!(
                out,
                "</a></td><td><span class=\"badge {}\">{}</span></td><td class=\"num\">{}</td><td class=\"num\">{}</td><td><span class=\"badge {}\">{}</span></td></tr>",
                outcome_class(r.outcome),
                outcome_label(r.outcome),
                esc(&estimate),
                esc(&target),
                status_class(&status),
                esc(&status),
            )?;
        }
        writeln!(out, "</tbody>")?;
        writeln!(out, "</table>")?;
    }
    writeln!(out, "</main>")?;
    writeln!(out, "</body>")?;
    writeln!(out, "</html>")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{HistoryEntry, Phase, ValidationResult, REPORT_VERSION};
    use chrono::TimeZone;

    fn at(h: u32, m: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2024, 5, 1, h, m, s).unwrap()
    }

    /// A passed drill with every section filled in, including a failing
    /// validation whose output tries to inject markup.
    fn sample() -> DrillReport {
        DrillReport {
            version: REPORT_VERSION,
            id: "a1b2c3d4e5f60718".into(),
            name: "nightly".into(),
            source: "web".into(),
            host: "db1.example".into(),
            started: at(3, 0, 0),
            finished: at(3, 4, 12),
            outcome: DrillOutcome::Passed,
            summary: None,
            snapshot_id: Some("3fa2b4c1d5e6f708192a3b4c5d6e7f80".into()),
            snapshot_time: Some(at(1, 0, 0)),
            snapshot_choice: "latest".into(),
            scope: "full".into(),
            sandbox: "/var/tmp/lifeboat-drill-<x>".into(),
            kept: false,
            files_restored: 1200,
            files_verified: 1200,
            entries_checked: 80,
            bytes_restored: 3 << 30,
            throughput_bytes_per_sec: 12.5 * MIB,
            phases: vec![
                Phase {
                    name: "list".into(),
                    seconds: 0.4,
                    note: None,
                },
                Phase {
                    name: "restore".into(),
                    seconds: 240.0,
                    note: Some("wall clock".into()),
                },
                Phase {
                    name: "verify".into(),
                    seconds: 12.0,
                    note: None,
                },
            ],
            problems: vec![FileProblem {
                path: "/srv/a|b.txt".into(),
                reason: "pack 3fa2b4c1 is damaged".into(),
            }],
            validations: vec![ValidationResult {
                command: "psql -c 'select 1' \"db\"".into(),
                exit_code: Some(2),
                passed: false,
                seconds: 1.5,
                output: "error near <script>alert(1)</script> & \"quoted\" 'single'\n".into(),
                error: Some("exit code 2".into()),
            }],
            rto: Some(RtoEstimate {
                measured_restore_seconds: 252.0,
                restored_bytes: 3 << 30,
                snapshot_bytes: 3 << 30,
                full_restore_seconds: 252.0,
                method: "Measured: the drill restored the whole snapshot.".into(),
                target_seconds: Some(3600.0),
                status: "OK".into(),
            }),
            rpo_seconds: Some(7200.0),
            rpo_target_seconds: Some(86400.0),
            history: vec![
                HistoryEntry {
                    time: at(2, 0, 0) - chrono::Duration::days(1),
                    outcome: "passed".into(),
                    full_restore_seconds: Some(250.0),
                },
                HistoryEntry {
                    time: at(2, 0, 0) - chrono::Duration::days(2),
                    outcome: "timed_out".into(),
                    full_restore_seconds: None,
                },
            ],
        }
    }

    #[test]
    fn markdown_starts_with_the_outcome_and_has_every_section() {
        let md = markdown(&sample());
        assert!(md.starts_with("# PASSED\n"), "{md}");
        for expected in [
            "`3fa2b4c1` of 2024-05-01 01:00:00 UTC, chosen as latest",
            "| RPO (age of the last snapshot) | 2h00m | 1d00h | OK |",
            "| RTO (full restore) | 4m12s | 1h00m | OK |",
            "| restore | 4m00s |",
            "12.5 MiB/s",
            "- `/srv/a|b.txt`: pack 3fa2b4c1 is damaged",
            "### FAILED: `psql -c 'select 1' \"db\"` (exit code 2, 1.5s)",
            "```text\nerror near <script>",
            "Measured: the drill restored the whole snapshot.",
            "| TIMED OUT | — |",
        ] {
            assert!(md.contains(expected), "missing {expected:?} in:\n{md}");
        }
    }

    #[test]
    fn markdown_shows_the_summary_and_caps_the_problem_list() {
        let mut r = sample();
        r.outcome = DrillOutcome::Failed;
        r.summary = Some("2 files failed verification".into());
        r.problems = (0..60)
            .map(|i| FileProblem {
                path: format!("/f{i}"),
                reason: "checksum mismatch".into(),
            })
            .collect();
        r.validations[0].exit_code = None;
        r.validations[0].error = Some("killed after its timeout of 5m00s".into());
        let md = markdown(&r);
        assert!(
            md.contains("(no exit code, 1.5s)\n\nkilled after its timeout of 5m00s\n"),
            "{md}"
        );
        assert!(
            md.starts_with("# FAILED — 2 files failed verification\n"),
            "{md}"
        );
        assert!(md.contains("`/f49`") && !md.contains("`/f50`"), "{md}");
        assert!(md.contains("and 10 more"), "{md}");
    }

    #[test]
    fn markdown_neutralises_terminal_escapes_and_backticks() {
        let mut r = sample();
        r.problems[0].path = "/evil\x1b[2J``name\n".into();
        r.validations[0].output = "```\n\x1b[31mred\r\n".into();
        r.phases[0].name = "li|st".into();
        let md = markdown(&r);
        assert!(!md.contains('\x1b'), "{md:?}");
        assert!(md.contains("- ```/evil␛[2J``name␊```: pack"), "{md}");
        assert!(md.contains("````text\n```\n␛[31mred\n````\n"), "{md}");
        assert!(
            md.contains("| li\\|st | 0.4s |"),
            "a pipe does not split a cell: {md}"
        );
    }

    #[test]
    fn html_is_self_contained_and_escapes_everything() {
        let page = html(&sample());
        assert!(page.starts_with("<!DOCTYPE html>\n"), "{page}");
        assert!(page.contains("<meta charset=\"utf-8\">"));
        assert!(page.contains("<title>Lifeboat drill: web — PASSED</title>"));
        assert!(page.contains("<h1 id=\"outcome\">PASSED</h1>"), "{page}");
        assert!(page.contains("class=\"banner passed\""));
        assert!(
            !page.contains("http://") && !page.contains("https://"),
            "no external references: {page}"
        );
        assert!(!page.contains("<script"), "{page}");
        assert!(!page.contains("<img") && !page.contains("<link"), "{page}");
        assert!(page.contains(
            "error near &lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;quoted&quot; &#39;single&#39;"
        ));
        assert!(page.contains("<code>psql -c &#39;select 1&#39; &quot;db&quot;</code>"));
        assert!(page.contains("/var/tmp/lifeboat-drill-&lt;x&gt;"));
        // Bars are proportional to the longest phase.
        assert!(page.contains("style=\"width:100.0%\""), "{page}");
        assert!(page.contains("style=\"width:5.0%\""), "{page}");
        assert!(page.contains("<span class=\"badge timed-out\">TIMED OUT</span>"));
        assert!(page.trim_end().ends_with("</html>"));
    }

    #[test]
    fn html_banner_and_title_follow_the_outcome() {
        for (outcome, label, class) in [
            (DrillOutcome::Failed, "FAILED", "failed"),
            (DrillOutcome::TimedOut, "TIMED OUT", "timed-out"),
            (DrillOutcome::Refused, "REFUSED", "refused"),
        ] {
            let mut r = sample();
            r.outcome = outcome;
            r.source = "a<b".into();
            r.summary = Some("disk cap of 10 GiB < snapshot".into());
            r.rto = None;
            let page = html(&r);
            assert!(page.contains(&format!("<h1 id=\"outcome\">{label}</h1>")));
            assert!(page.contains(&format!("class=\"banner {class}\"")));
            assert!(page.contains(&format!("<title>Lifeboat drill: a&lt;b — {label}</title>")));
            assert!(page.contains("disk cap of 10 GiB &lt; snapshot"));
        }
    }

    #[test]
    fn index_links_every_report() {
        let mut second = sample();
        second.source = "mail".into();
        second.outcome = DrillOutcome::Refused;
        second.rto = None;
        let page = html_index(&[
            (sample(), "web-2024-05-01.html".into()),
            (second, "mail&co.html".into()),
        ]);
        assert!(page.starts_with("<!DOCTYPE html>"));
        assert!(page.contains("<a href=\"web-2024-05-01.html\">"), "{page}");
        assert!(page.contains("<a href=\"mail&amp;co.html\">"), "{page}");
        assert!(page.contains("<code>mail</code>"));
        assert!(page.contains(">REFUSED</span>") && page.contains(">PASSED</span>"));
        assert!(
            page.contains(">4m12s</td><td class=\"num\">1h00m</td>"),
            "{page}"
        );
        assert!(!page.contains("http://") && !page.contains("https://"));
        assert!(html_index(&[]).contains("No drill reports."));
    }

    #[test]
    fn human_durations() {
        for (secs, expected) in [
            (0.0, "0.0s"),
            (-0.0, "0.0s"),
            (0.0004, "1ms"),
            (0.035, "35ms"),
            (0.4, "0.4s"),
            (9.9, "9.9s"),
            (9.96, "10s"),
            (12.0, "12s"),
            (59.4, "59s"),
            (59.6, "1m00s"),
            (252.0, "4m12s"),
            (3599.6, "1h00m"),
            (3900.0, "1h05m"),
            (86_399.0, "1d00h"),
            (183_600.0, "2d03h"),
            (-12.0, "-12s"),
            (f64::NAN, "?"),
            (f64::INFINITY, "∞"),
        ] {
            assert_eq!(human_duration(secs), expected, "{secs}");
        }
    }

    #[test]
    fn rpo_status_uses_the_agents_thresholds() {
        let mut r = sample();
        r.rpo_target_seconds = Some(100.0);
        for (actual, expected) in [
            (Some(79.0), Some("OK")),
            (Some(80.0), Some("AT RISK")),
            (Some(100.0), Some("AT RISK")),
            (Some(101.0), Some("BREACHED")),
            (None, Some("UNKNOWN")),
        ] {
            r.rpo_seconds = actual;
            assert_eq!(rpo_status(&r), expected, "{actual:?}");
        }
        r.rpo_target_seconds = None;
        assert_eq!(rpo_status(&r), None);
    }

    #[test]
    fn short_ids_and_sizes() {
        assert_eq!(short_id("3fa2b4c1d5e6"), "3fa2b4c1");
        assert_eq!(short_id("3fa2"), "3fa2");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}
