//! A tiny registry that renders the Prometheus text exposition format,
//! version 0.0.4, for the agent's `/metrics` endpoint.
//!
//! The agent keeps no global, mutable counters. Everything worth exporting
//! (last success per schedule, RPO, bytes added, drill results) already lives
//! in the agent's state and its catalog, so each scrape builds a fresh
//! [`Registry`], fills it from that state and renders it. A snapshot built this
//! way cannot drift from what the catalog says, survives restarts for free,
//! and needs no locking beyond what reading the state already takes.
//!
//! The output follows the format's specification
//! (<https://prometheus.io/docs/instrumenting/exposition_formats/#text-based-format>):
//! every family prints `# HELP` and `# TYPE` once, followed by all of its
//! samples, so a family's samples are always contiguous and no name appears
//! twice. Metric names must match `[a-zA-Z_:][a-zA-Z0-9_:]*` and label names
//! `[a-zA-Z_][a-zA-Z0-9_]*` (names starting with `__` are reserved). Names are
//! constants in the agent's code, so a bad one is a programming error and
//! panics; label *values* come from configuration and the catalog, so they are
//! escaped instead (backslash, double quote and line feed). Counter names end
//! in `_total`, following the Prometheus naming conventions.

use std::fmt::Write as _;

/// The `# TYPE` of a metric family. Only the two kinds the agent exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricType {
    /// A value that can go up and down (an age in seconds, a size, a flag).
    Gauge,
    /// A value that only increases (except on restart), named `…_total`.
    Counter,
}

impl MetricType {
    fn as_str(self) -> &'static str {
        match self {
            MetricType::Gauge => "gauge",
            MetricType::Counter => "counter",
        }
    }
}

/// A set of metric families, rendered in the order they were declared.
#[derive(Debug, Default)]
pub struct Registry {
    families: Vec<Family>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Declares a family (name must match `[a-zA-Z_:][a-zA-Z0-9_:]*`; panics
    /// otherwise — names are compile-time constants) with its HELP text and
    /// TYPE.
    ///
    /// Declaring a name again returns the existing family, so that samples
    /// gathered in one loop over several families still render contiguously
    /// under a single `# HELP`/`# TYPE` pair; the first declaration's help
    /// text is kept. Re-declaring it with another type panics.
    pub fn family(&mut self, name: &str, help: &str, kind: MetricType) -> &mut Family {
        assert!(
            is_metric_name(name),
            "invalid Prometheus metric name {name:?}"
        );
        debug_assert!(
            kind != MetricType::Counter || name.ends_with("_total"),
            "counter {name:?} must be named `…_total`"
        );
        if let Some(index) = self.families.iter().position(|family| family.name == name) {
            let family = &mut self.families[index];
            assert_eq!(
                family.kind, kind,
                "metric {name:?} declared as both {:?} and {kind:?}",
                family.kind
            );
            return family;
        }
        self.families.push(Family {
            name: name.to_string(),
            help: help.to_string(),
            kind,
            samples: String::new(),
        });
        let last = self.families.len() - 1;
        &mut self.families[last]
    }

    /// Renders every family: `# HELP`, `# TYPE`, then samples
    /// `name{label="value",...} value` (no labels, no braces). Families with
    /// no samples still print HELP and TYPE, so a scrape shows what the agent
    /// exports even before there is anything to count. Values: integers
    /// without `.0`, other floats in Rust's shortest round-trip form, and
    /// `NaN`, `+Inf`, `-Inf` as the specification spells them.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for family in &self.families {
            out.push_str("# HELP ");
            out.push_str(&family.name);
            out.push(' ');
            escape_help(&mut out, &family.help);
            out.push('\n');
            out.push_str("# TYPE ");
            out.push_str(&family.name);
            out.push(' ');
            out.push_str(family.kind.as_str());
            out.push('\n');
            out.push_str(&family.samples);
        }
        out
    }
}

/// One metric family: a name, its help text and type, and its samples.
///
/// Samples are rendered into text as they are added, since nothing reads
/// them back. The caller gives each sample of a family a distinct label set;
/// the format does not allow the same series twice in one scrape.
#[derive(Debug)]
pub struct Family {
    name: String,
    help: String,
    kind: MetricType,
    /// Rendered sample lines, each ending in `\n`.
    samples: String,
}

impl Family {
    /// Adds one sample with the given labels, in the given order. Panics if a
    /// label name is invalid, reserved (`__…`) or repeated: label names, like
    /// metric names, are constants in the agent's code.
    pub fn sample(&mut self, labels: &[(&str, &str)], value: f64) -> &mut Family {
        debug_assert!(
            self.kind != MetricType::Counter || value >= 0.0 || value.is_nan(),
            "counter {:?} given a negative value {value}",
            self.name
        );
        self.samples.push_str(&self.name);
        if !labels.is_empty() {
            self.samples.push('{');
            for (position, &(name, label_value)) in labels.iter().enumerate() {
                assert!(
                    is_label_name(name),
                    "invalid Prometheus label name {name:?} on {:?}",
                    self.name
                );
                assert!(
                    labels[..position]
                        .iter()
                        .all(|&(earlier, _)| earlier != name),
                    "label {name:?} repeated on {:?}",
                    self.name
                );
                if position > 0 {
                    self.samples.push(',');
                }
                self.samples.push_str(name);
                self.samples.push_str("=\"");
                escape_label_value(&mut self.samples, label_value);
                self.samples.push('"');
            }
            self.samples.push('}');
        }
        self.samples.push(' ');
        write_value(&mut self.samples, value);
        self.samples.push('\n');
        self
    }
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`
fn is_metric_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    match bytes.next() {
        Some(first) if first.is_ascii_alphabetic() || first == b'_' || first == b':' => {}
        _ => return false,
    }
    bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
}

/// `[a-zA-Z_][a-zA-Z0-9_]*`, not starting with the reserved `__`.
fn is_label_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    match bytes.next() {
        Some(first) if first.is_ascii_alphabetic() || first == b'_' => {}
        _ => return false,
    }
    !name.starts_with("__") && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// HELP text escapes backslash and line feed (but not the double quote).
fn escape_help(out: &mut String, help: &str) {
    for c in help.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Label values escape backslash, double quote and line feed.
fn escape_label_value(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Writes a sample value the way Prometheus parses it (Go's `ParseFloat`).
///
/// Rust's `Display` for `f64` already prints the shortest string that reads
/// back to the same value and drops a zero fraction (`1.0` prints `1`). It
/// never uses an exponent, though, so `f64::MAX` would print 309 digits;
/// magnitudes outside `[1e-6, 1e16)` use the equally exact `1e16` form
/// instead. Every integer below 1e16 (ten petabytes, as a byte count) still
/// prints as plain digits.
fn write_value(out: &mut String, value: f64) {
    if value.is_nan() {
        out.push_str("NaN");
    } else if value == f64::INFINITY {
        out.push_str("+Inf");
    } else if value == f64::NEG_INFINITY {
        out.push_str("-Inf");
    } else {
        let magnitude = value.abs();
        // Writing to a String cannot fail.
        let _ = if magnitude != 0.0 && !(1e-6..1e16).contains(&magnitude) {
            write!(out, "{value:e}")
        } else {
            write!(out, "{value}")
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauge_without_labels_has_no_braces() {
        let mut registry = Registry::new();
        registry
            .family(
                "lifeboat_up",
                "Whether the agent is running.",
                MetricType::Gauge,
            )
            .sample(&[], 1.0);
        assert_eq!(
            registry.render(),
            "# HELP lifeboat_up Whether the agent is running.\n\
             # TYPE lifeboat_up gauge\n\
             lifeboat_up 1\n"
        );
    }

    #[test]
    fn gauge_with_labels_keeps_label_order_and_sample_order() {
        let mut registry = Registry::new();
        registry
            .family(
                "lifeboat_last_success_timestamp_seconds",
                "When the schedule last succeeded.",
                MetricType::Gauge,
            )
            .sample(
                &[("schedule", "home"), ("repository", "s3")],
                1_700_000_000.0,
            )
            .sample(
                &[("schedule", "db"), ("repository", "local")],
                1_700_000_123.5,
            );
        assert_eq!(
            registry.render(),
            "# HELP lifeboat_last_success_timestamp_seconds When the schedule last succeeded.\n\
             # TYPE lifeboat_last_success_timestamp_seconds gauge\n\
             lifeboat_last_success_timestamp_seconds{schedule=\"home\",repository=\"s3\"} 1700000000\n\
             lifeboat_last_success_timestamp_seconds{schedule=\"db\",repository=\"local\"} 1700000123.5\n"
        );
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        let mut registry = Registry::new();
        registry
            .family(
                "lifeboat_info",
                "Path C:\\backup\nsecond line \"quoted\".",
                MetricType::Gauge,
            )
            .sample(&[("path", "C:\\dir \"x\"\nnext")], 1.0);
        assert_eq!(
            registry.render(),
            "# HELP lifeboat_info Path C:\\\\backup\\nsecond line \"quoted\".\n\
             # TYPE lifeboat_info gauge\n\
             lifeboat_info{path=\"C:\\\\dir \\\"x\\\"\\nnext\"} 1\n"
        );
    }

    #[test]
    fn unicode_label_values_pass_through() {
        let mut registry = Registry::new();
        registry
            .family("lifeboat_info", "Info.", MetricType::Gauge)
            .sample(&[("host", "bücher")], 1.0);
        assert!(registry
            .render()
            .ends_with("lifeboat_info{host=\"bücher\"} 1\n"));
    }

    #[test]
    fn counters_render_with_counter_type() {
        let mut registry = Registry::new();
        registry
            .family(
                "lifeboat_backups_total",
                "Backups run, by outcome.",
                MetricType::Counter,
            )
            .sample(&[("outcome", "success")], 12.0)
            .sample(&[("outcome", "failure")], 0.0);
        assert_eq!(
            registry.render(),
            "# HELP lifeboat_backups_total Backups run, by outcome.\n\
             # TYPE lifeboat_backups_total counter\n\
             lifeboat_backups_total{outcome=\"success\"} 12\n\
             lifeboat_backups_total{outcome=\"failure\"} 0\n"
        );
    }

    #[test]
    fn families_without_samples_still_print_help_and_type_in_declaration_order() {
        let mut registry = Registry::new();
        registry.family(
            "b_metric",
            "Second letter, declared first.",
            MetricType::Gauge,
        );
        registry
            .family(
                "a_metric",
                "First letter, declared second.",
                MetricType::Gauge,
            )
            .sample(&[], 2.0);
        assert_eq!(
            registry.render(),
            "# HELP b_metric Second letter, declared first.\n\
             # TYPE b_metric gauge\n\
             # HELP a_metric First letter, declared second.\n\
             # TYPE a_metric gauge\n\
             a_metric 2\n"
        );
    }

    #[test]
    fn redeclaring_a_family_adds_to_it_instead_of_repeating_it() {
        let mut registry = Registry::new();
        for (schedule, age) in [("home", 60.0), ("db", 3600.0)] {
            registry
                .family("x_age_seconds", "Age.", MetricType::Gauge)
                .sample(&[("schedule", schedule)], age);
            registry
                .family("x_ok", "OK.", MetricType::Gauge)
                .sample(&[("schedule", schedule)], 1.0);
        }
        assert_eq!(
            registry.render(),
            "# HELP x_age_seconds Age.\n# TYPE x_age_seconds gauge\n\
             x_age_seconds{schedule=\"home\"} 60\nx_age_seconds{schedule=\"db\"} 3600\n\
             # HELP x_ok OK.\n# TYPE x_ok gauge\n\
             x_ok{schedule=\"home\"} 1\nx_ok{schedule=\"db\"} 1\n"
        );
    }

    #[test]
    fn empty_registry_renders_nothing() {
        assert_eq!(Registry::new().render(), "");
    }

    fn value(v: f64) -> String {
        let mut out = String::new();
        write_value(&mut out, v);
        out
    }

    #[test]
    fn integers_print_without_a_fraction() {
        assert_eq!(value(0.0), "0");
        assert_eq!(value(1.0), "1");
        assert_eq!(value(-3.0), "-3");
        assert_eq!(value(4_294_967_296.0), "4294967296");
        assert_eq!(value(9_007_199_254_740_992.0), "9007199254740992");
    }

    #[test]
    fn floats_print_in_shortest_round_trip_form() {
        assert_eq!(value(0.1), "0.1");
        assert_eq!(value(42.5), "42.5");
        assert_eq!(value(-0.25), "-0.25");
        assert_eq!(value(1.0 / 3.0), "0.3333333333333333");
        assert_eq!(value(0.000_001), "0.000001");
        assert_eq!(value(1e16), "1e16");
        assert_eq!(value(1.5e-7), "1.5e-7");
        assert_eq!(value(f64::MAX), "1.7976931348623157e308");
        for v in [
            0.1,
            1.0 / 3.0,
            1.5e-7,
            1e300,
            f64::MIN_POSITIVE,
            123_456.789,
        ] {
            assert_eq!(value(v).parse::<f64>().unwrap(), v, "{v} round-trips");
        }
    }

    #[test]
    fn nan_and_infinities_are_spelled_as_the_spec_says() {
        assert_eq!(value(f64::NAN), "NaN");
        assert_eq!(value(f64::INFINITY), "+Inf");
        assert_eq!(value(f64::NEG_INFINITY), "-Inf");
        let mut registry = Registry::new();
        registry
            .family("x", "X.", MetricType::Gauge)
            .sample(&[("v", "nan")], f64::NAN)
            .sample(&[("v", "inf")], f64::INFINITY);
        assert!(registry
            .render()
            .ends_with("x{v=\"nan\"} NaN\nx{v=\"inf\"} +Inf\n"));
    }

    #[test]
    fn name_validation() {
        for good in ["a", "_", ":", "lifeboat_up", "a:b_c9", "Z"] {
            assert!(is_metric_name(good), "{good}");
        }
        for bad in ["", "9a", "a-b", "a b", "é", "a.b"] {
            assert!(!is_metric_name(bad), "{bad}");
        }
        for good in ["a", "_a", "schedule", "a9_b"] {
            assert!(is_label_name(good), "{good}");
        }
        for bad in ["", "9a", "a:b", "__name__", "__x", "a-b"] {
            assert!(!is_label_name(bad), "{bad}");
        }
    }

    #[test]
    #[should_panic(expected = "invalid Prometheus metric name")]
    fn invalid_metric_name_panics() {
        Registry::new().family("lifeboat-up", "Dash.", MetricType::Gauge);
    }

    #[test]
    #[should_panic(expected = "invalid Prometheus label name")]
    fn invalid_label_name_panics() {
        Registry::new()
            .family("x", "X.", MetricType::Gauge)
            .sample(&[("a-b", "v")], 1.0);
    }

    #[test]
    #[should_panic(expected = "repeated")]
    fn repeated_label_name_panics() {
        Registry::new()
            .family("x", "X.", MetricType::Gauge)
            .sample(&[("a", "1"), ("a", "2")], 1.0);
    }

    #[test]
    #[should_panic(expected = "declared as both")]
    fn redeclaring_with_another_type_panics() {
        let mut registry = Registry::new();
        registry.family("x_total", "X.", MetricType::Counter);
        registry.family("x_total", "X.", MetricType::Gauge);
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "_total")]
    fn counter_without_total_suffix_panics_in_debug_builds() {
        Registry::new().family("lifeboat_backups", "No suffix.", MetricType::Counter);
    }
}
