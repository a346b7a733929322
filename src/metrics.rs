//! Prometheus text exposition (format 0.0.4): labelled counters, latency
//! histograms and gauges, rendered on the admin port's `/metrics`.
//!
//! Small on purpose: counters are atomics behind a map keyed by label
//! values, histograms have fixed buckets, gauges are computed at scrape
//! time by whoever renders them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A counter with a fixed set of label names.
#[derive(Debug)]
pub struct CounterVec {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    values: Mutex<BTreeMap<Vec<String>, u64>>,
}

impl CounterVec {
    /// A counter family `name` with these label names.
    pub const fn new(
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
    ) -> Self {
        Self {
            name,
            help,
            labels,
            values: Mutex::new(BTreeMap::new()),
        }
    }

    /// Adds one to the series with these label values (in label order).
    pub fn inc(&self, values: &[&str]) {
        debug_assert_eq!(values.len(), self.labels.len(), "{}", self.name);
        let mut series = self
            .values
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Families have a handful of series: a scan finds an existing one
        // without building a key (this is on every request's path).
        if let Some((_, count)) = series.iter_mut().find(|(k, _)| k.iter().eq(values.iter())) {
            *count += 1;
            return;
        }
        let key: Vec<String> = values.iter().map(|v| (*v).to_owned()).collect();
        series.insert(key, 1);
    }

    /// The value of one series (0 if never counted).
    pub fn get(&self, values: &[&str]) -> u64 {
        let key: Vec<String> = values.iter().map(|v| (*v).to_owned()).collect();
        self.values
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&key)
            .copied()
            .unwrap_or(0)
    }

    /// Appends the family in text format.
    pub fn render(&self, out: &mut String) {
        header(out, self.name, self.help, "counter");
        let values = self
            .values
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (key, value) in values.iter() {
            let _ = writeln!(out, "{}{} {value}", self.name, label_set(self.labels, key));
        }
    }
}

/// Latency buckets in seconds, 100 µs to 5 s.
const BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// A latency histogram (seconds) without labels.
#[derive(Debug)]
pub struct Histogram {
    name: &'static str,
    help: &'static str,
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    /// A histogram `name`.
    pub const fn new(name: &'static str, help: &'static str) -> Self {
        Self {
            name,
            help,
            counts: [const { AtomicU64::new(0) }; BUCKETS.len()],
            count: AtomicU64::new(0),
            sum_nanos: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, took: Duration) {
        let secs = took.as_secs_f64();
        // Only the first bucket that fits is counted; render accumulates.
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// How many observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Appends the histogram in text format.
    pub fn render(&self, out: &mut String) {
        header(out, self.name, self.help, "histogram");
        let mut cumulative = 0;
        for (bound, count) in BUCKETS.iter().zip(&self.counts) {
            cumulative += count.load(Ordering::Relaxed);
            let _ = writeln!(out, "{}_bucket{{le=\"{bound}\"}} {cumulative}", self.name);
        }
        let count = self.count();
        let _ = writeln!(out, "{}_bucket{{le=\"+Inf\"}} {count}", self.name);
        #[expect(
            clippy::cast_precision_loss,
            reason = "a sum of latencies in seconds; f64 is what Prometheus reads"
        )]
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{}_sum {sum}", self.name);
        let _ = writeln!(out, "{}_count {count}", self.name);
    }
}

/// Appends a gauge family with its series (label values, value).
pub fn render_gauge(
    out: &mut String,
    name: &str,
    help: &str,
    labels: &[&str],
    series: &[(Vec<String>, f64)],
) {
    header(out, name, help, "gauge");
    for (key, value) in series {
        let _ = writeln!(out, "{name}{} {value}", label_set(labels, key));
    }
}

/// Appends a counter family with its series (label values, value), for
/// counters kept elsewhere than a [`CounterVec`].
pub fn render_counter(
    out: &mut String,
    name: &str,
    help: &str,
    labels: &[&str],
    series: &[(Vec<String>, f64)],
) {
    header(out, name, help, "counter");
    for (key, value) in series {
        let _ = writeln!(out, "{name}{} {value}", label_set(labels, key));
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn label_set(names: &[&str], values: &[String]) -> String {
    if names.is_empty() {
        return String::new();
    }
    let mut s = String::from("{");
    let pairs = names.iter().copied().zip(values.iter().map(String::as_str));
    for (i, (name, value)) in pairs.enumerate() {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(s, "{name}=\"");
        // Escapes per the text format: backslash, quote, newline.
        for c in value.chars() {
            match c {
                '\\' => s.push_str("\\\\"),
                '"' => s.push_str("\\\""),
                '\n' => s.push_str("\\n"),
                c => s.push(c),
            }
        }
        s.push('"');
    }
    s.push('}');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_render_each_series_with_escaped_labels() {
        let c = CounterVec::new("t_total", "Things.", &["result", "why"]);
        c.inc(&["ok", "a\"b\\c\nd"]);
        c.inc(&["ok", "a\"b\\c\nd"]);
        c.inc(&["denied", "x"]);
        let mut out = String::new();
        c.render(&mut out);
        assert!(out.contains("# TYPE t_total counter\n"), "{out}");
        assert!(
            out.contains("t_total{result=\"ok\",why=\"a\\\"b\\\\c\\nd\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("t_total{result=\"denied\",why=\"x\"} 1\n"),
            "{out}"
        );
        assert_eq!(c.get(&["denied", "x"]), 1);
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new("lat_seconds", "Latency.");
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(10));
        let mut out = String::new();
        h.render(&mut out);
        assert!(
            out.contains("lat_seconds_bucket{le=\"0.0001\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("lat_seconds_bucket{le=\"0.0025\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("lat_seconds_bucket{le=\"0.005\"} 2\n"),
            "{out}"
        );
        assert!(out.contains("lat_seconds_bucket{le=\"5\"} 2\n"), "{out}");
        assert!(out.contains("lat_seconds_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("lat_seconds_count 3\n"), "{out}");
        assert!(out.contains("lat_seconds_sum 10.00305\n"), "{out}");
    }
}
