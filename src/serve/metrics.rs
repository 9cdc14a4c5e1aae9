//! The server's counters in Prometheus' text format (`GET /metrics`): requests by route and
//! status, request latency and GPU batch size histograms, queue depth, failed batches.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

#[derive(Clone, Debug)]
struct Histogram {
    bounds: &'static [f64],
    /// counts[i]: observations <= bounds[i] and > bounds[i - 1]; the last is above all.
    counts: Vec<u64>,
    sum: f64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram { bounds, counts: vec![0; bounds.len() + 1], sum: 0.0 }
    }

    fn observe(&mut self, value: f64) {
        let slot = self.bounds.iter().position(|&b| value <= b).unwrap_or(self.bounds.len());
        self.counts[slot] += 1;
        self.sum += value;
    }

    /// `name_bucket{labels,le="…"}` lines (cumulative), then `_sum` and `_count`.
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, count) in self.counts.iter().enumerate() {
            cumulative += count;
            let le = self.bounds.get(i).map_or("+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}");
        }
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {cumulative}");
    }
}

pub struct Metrics {
    /// (route, status) → requests answered.
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    /// route → seconds from request to answer.
    latency: Mutex<BTreeMap<String, Histogram>>,
    batches: Mutex<Histogram>,
    queue_depth: AtomicUsize,
    failed_batches: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::default(),
            latency: Mutex::default(),
            batches: Mutex::new(Histogram::new(BATCH_BUCKETS)),
            queue_depth: AtomicUsize::new(0),
            failed_batches: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    pub fn request(&self, route: &str, status: u16, elapsed: Duration) {
        *self.requests.lock().unwrap().entry((route.to_string(), status)).or_default() += 1;
        let mut latency = self.latency.lock().unwrap();
        let histogram = latency.entry(route.to_string()).or_insert_with(|| Histogram::new(LATENCY_BUCKETS));
        histogram.observe(elapsed.as_secs_f64());
    }

    pub fn queued(&self, jobs: usize) {
        self.queue_depth.fetch_add(jobs, Ordering::SeqCst);
    }

    pub fn dequeued(&self, jobs: usize) {
        self.queue_depth.fetch_sub(jobs, Ordering::SeqCst);
    }

    pub fn queue_depth(&self) -> usize {
        self.queue_depth.load(Ordering::SeqCst)
    }

    /// A GPU batch of `inputs` inputs ran.
    pub fn batch(&self, inputs: usize) {
        self.batches.lock().unwrap().observe(inputs as f64);
    }

    pub fn failed_batch(&self) {
        self.failed_batches.fetch_add(1, Ordering::SeqCst);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        out += "# HELP pals_requests_total HTTP requests answered, by route and status.\n";
        out += "# TYPE pals_requests_total counter\n";
        for ((route, status), count) in self.requests.lock().unwrap().iter() {
            let _ = writeln!(out, "pals_requests_total{{route=\"{route}\",status=\"{status}\"}} {count}");
        }
        out += "# HELP pals_request_duration_seconds Time from request to answer, by route.\n";
        out += "# TYPE pals_request_duration_seconds histogram\n";
        for (route, histogram) in self.latency.lock().unwrap().iter() {
            histogram.render(&mut out, "pals_request_duration_seconds", &format!("route=\"{route}\""));
        }
        out += "# HELP pals_batch_size Inputs per GPU batch.\n";
        out += "# TYPE pals_batch_size histogram\n";
        self.batches.lock().unwrap().render(&mut out, "pals_batch_size", "");
        out += "# HELP pals_queue_depth Requests waiting for the GPU.\n";
        out += "# TYPE pals_queue_depth gauge\n";
        let _ = writeln!(out, "pals_queue_depth {}", self.queue_depth());
        out += "# HELP pals_failed_batches_total GPU batches that failed (their requests got 500).\n";
        out += "# TYPE pals_failed_batches_total counter\n";
        let _ = writeln!(out, "pals_failed_batches_total {}", self.failed_batches.load(Ordering::SeqCst));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_counted() {
        let metrics = Metrics::default();
        for inputs in [1, 3, 3, 200] {
            metrics.batch(inputs);
        }
        metrics.request("/v1/predict", 200, Duration::from_millis(3));
        let text = metrics.render();
        assert!(text.contains("pals_batch_size_bucket{le=\"1\"} 1\n"), "{text}");
        assert!(text.contains("pals_batch_size_bucket{le=\"4\"} 3\n"), "{text}");
        assert!(text.contains("pals_batch_size_bucket{le=\"+Inf\"} 4\n"), "{text}");
        assert!(text.contains("pals_batch_size_sum 207\n"), "{text}");
        assert!(text.contains("pals_requests_total{route=\"/v1/predict\",status=\"200\"} 1\n"), "{text}");
        let le = "pals_request_duration_seconds_bucket{route=\"/v1/predict\",le=\"0.005\"} 1\n";
        assert!(text.contains(le), "{text}");
    }
}
