//! The Prometheus text exposition format (version 0.0.4), written by hand: the server's
//! counters are plain atomics read once per scrape, so a small writer is all it takes.

use std::fmt::Write;

use crate::metrics::HistogramSnapshot;

/// The `Content-Type` of a scrape's answer.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A scrape's text, built one metric family at a time.
#[derive(Debug, Default)]
pub struct Exposition {
    /// The text so far.
    out: String,
}

impl Exposition {
    /// A counter without labels.
    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.header(name, help, "counter");
        self.sample(name, &[], value);
    }

    /// A gauge without labels.
    pub fn gauge(&mut self, name: &str, help: &str, value: u64) {
        self.header(name, help, "gauge");
        self.sample(name, &[], value);
    }

    /// A counter with one label, one sample per label value.
    pub fn counter_by(&mut self, name: &str, help: &str, label: &str, values: &[(&str, u64)]) {
        self.header(name, help, "counter");
        for (v, n) in values {
            self.sample(name, &[(label, v)], n);
        }
    }

    /// A histogram: cumulative `_bucket{le=…}`, `_sum` and `_count`.
    pub fn histogram(&mut self, name: &str, help: &str, h: &HistogramSnapshot) {
        self.header(name, help, "histogram");
        let bucket = format!("{name}_bucket");
        for (le, n) in &h.buckets {
            let le = if le.is_infinite() {
                "+Inf".to_string()
            } else {
                le.to_string()
            };
            self.sample(&bucket, &[("le", &le)], n);
        }
        self.sample(&format!("{name}_sum"), &[], h.sum_seconds);
        self.sample(&format!("{name}_count"), &[], h.count());
    }

    /// The finished text.
    pub fn finish(self) -> String {
        self.out
    }

    fn header(&mut self, name: &str, help: &str, kind: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            let labels: Vec<String> = labels
                .iter()
                .map(|(k, v)| {
                    let v = v
                        .replace('\\', "\\\\")
                        .replace('"', "\\\"")
                        .replace('\n', "\\n");
                    format!("{k}=\"{v}\"")
                })
                .collect();
            let _ = write!(self.out, "{{{}}}", labels.join(","));
        }
        let _ = writeln!(self.out, " {value}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_text_format() {
        let mut e = Exposition::default();
        e.counter("x_total", "Things.\nMore", 3);
        e.counter_by("calls_total", "Calls.", "outcome", &[("a\"b", 1), ("c", 0)]);
        e.histogram(
            "lat_seconds",
            "Latency.",
            &HistogramSnapshot {
                buckets: vec![(0.0005, 1), (1.0, 2), (f64::INFINITY, 3)],
                sum_seconds: 2.5,
            },
        );
        assert_eq!(
            e.finish(),
            "# HELP x_total Things.\\nMore\n# TYPE x_total counter\nx_total 3\n\
             # HELP calls_total Calls.\n# TYPE calls_total counter\n\
             calls_total{outcome=\"a\\\"b\"} 1\ncalls_total{outcome=\"c\"} 0\n\
             # HELP lat_seconds Latency.\n# TYPE lat_seconds histogram\n\
             lat_seconds_bucket{le=\"0.0005\"} 1\nlat_seconds_bucket{le=\"1\"} 2\n\
             lat_seconds_bucket{le=\"+Inf\"} 3\nlat_seconds_sum 2.5\nlat_seconds_count 3\n"
        );
    }
}
