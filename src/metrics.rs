//! Process metrics in the Prometheus text exposition format (0.0.4): counters and histograms
//! on atomics in one process-wide registry ([`global`]), written by the HTTP layer (one
//! middleware and the error mapping) and read by `GET /metrics`. Knows nothing of HTTP
//! frameworks, the engine or the store: figures that live elsewhere (gallery size, engine
//! queue) are handed to the renderer by the caller as [`Exposition`] calls.
//!
//! One registry per process, like the `metrics` crate's global recorder: the request
//! counters must be reachable from places that hold no state (the error mapping), and a
//! process serves one router. Recording costs a read lock on a map (new label sets only
//! take the write lock once) and a few relaxed atomic adds.

pub mod connections;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, SystemTime};

/// Upper bounds (seconds) of the request latency buckets.
pub const LATENCY_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// Upper bounds (seconds) of the engine queue-time and inference-time buckets.
pub const ENGINE_TIME_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Method labels; anything else is `other` (bounded label values).
const METHODS: [&str; 8] = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "other"];

/// The label of a request that matched no route (its raw path is never a label).
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// A histogram with fixed bucket bounds, on atomics.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative); the last one is `+Inf`.
    buckets: Box<[AtomicU64]>,
    /// Sum of observations, as `f64` bits.
    sum: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram { bounds, buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(), sum: AtomicU64::new(0f64.to_bits()) }
    }

    /// Records one value (non-finite values are ignored).
    pub fn observe(&self, v: f64) {
        if !v.is_finite() {
            return;
        }
        let i = self.bounds.iter().position(|&b| v <= b).unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let _ = self.sum.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| Some((f64::from_bits(bits) + v).to_bits()));
    }

    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }

    /// Cumulative counts, for rendering.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut acc = 0;
        let cumulative = self
            .buckets
            .iter()
            .map(|b| {
                acc += b.load(Ordering::Relaxed);
                acc
            })
            .collect();
        HistogramSnapshot { bounds: self.bounds.to_vec(), cumulative, sum: f64::from_bits(self.sum.load(Ordering::Relaxed)) }
    }
}

/// A histogram's state as rendered: `cumulative[i]` observations were at most `bounds[i]`;
/// the extra last entry counts everything (`+Inf`, the `_count`).
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    pub bounds: Vec<f64>,
    pub cumulative: Vec<u64>,
    pub sum: f64,
}

impl HistogramSnapshot {
    pub fn count(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }
}

/// One route's figures.
#[derive(Debug)]
struct RouteSeries {
    /// Latency per method (indexed like [`METHODS`]).
    latency: [Histogram; METHODS.len()],
    /// Requests per (method index, status).
    statuses: RwLock<HashMap<(u8, u16), AtomicU64>>,
}

impl RouteSeries {
    fn new() -> RouteSeries {
        RouteSeries { latency: std::array::from_fn(|_| Histogram::new(LATENCY_BUCKETS)), statuses: RwLock::new(HashMap::new()) }
    }
}

/// What the HTTP layer saw of one finished request.
#[derive(Debug, Clone, Copy)]
pub struct RequestOutcome<'a> {
    pub method: &'a str,
    /// The matched route template (`/users/{username}`), or [`UNMATCHED_ROUTE`].
    pub route: &'a str,
    pub status: u16,
    pub latency: Duration,
    /// The catalogue code of an error answer.
    pub error_code: Option<&'static str>,
}

/// Every counter and histogram of the process.
#[derive(Debug)]
pub struct Metrics {
    started: SystemTime,
    routes: RwLock<HashMap<String, Arc<RouteSeries>>>,
    in_flight: AtomicI64,
    body_bytes: AtomicI64,
    queue_time: Histogram,
    inference_time: Histogram,
    error_codes: RwLock<BTreeMap<&'static str, AtomicU64>>,
    store_unavailable: AtomicU64,
    store_internal: AtomicU64,
    image_orphans: AtomicU64,
}

/// The kind of a store failure, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreFailure {
    /// Unreachable, busy, full or read-only: nothing changed.
    Unavailable,
    /// A bug or corrupt data.
    Internal,
}

/// The process's registry.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics {
            started: SystemTime::now(),
            routes: RwLock::new(HashMap::new()),
            in_flight: AtomicI64::new(0),
            body_bytes: AtomicI64::new(0),
            queue_time: Histogram::new(ENGINE_TIME_BUCKETS),
            inference_time: Histogram::new(ENGINE_TIME_BUCKETS),
            error_codes: RwLock::new(BTreeMap::new()),
            store_unavailable: AtomicU64::new(0),
            store_internal: AtomicU64::new(0),
            image_orphans: AtomicU64::new(0),
        }
    }

    /// Counts a request in flight until the guard is dropped (also when the client goes away).
    pub fn in_flight(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(&self.in_flight)
    }

    /// Counts `bytes` of request bodies held in the budget until the guard is dropped.
    pub fn body_bytes_held(&self, bytes: u64) -> BodyBytes<'_> {
        let n = i64::try_from(bytes).unwrap_or(i64::MAX);
        self.body_bytes.fetch_add(n, Ordering::Relaxed);
        BodyBytes(&self.body_bytes, n)
    }

    /// Records the engine's share of one request that used it (the longest queue wait and the
    /// longest inference of its images), where the engine measures them.
    pub fn engine_request(&self, queue: Duration, inference: Duration) {
        self.queue_time.observe_duration(queue);
        self.inference_time.observe_duration(inference);
    }

    /// Records a finished request.
    pub fn record(&self, r: &RequestOutcome<'_>) {
        let series = self.route(r.route);
        let m = METHODS.iter().position(|&m| m == r.method).unwrap_or(METHODS.len() - 1);
        series.latency[m].observe_duration(r.latency);
        bump(&series.statuses, (m as u8, r.status));
        if let Some(code) = r.error_code {
            bump(&self.error_codes, code);
        }
    }

    /// Counts a store failure that reached a request.
    pub fn store_failure(&self, kind: StoreFailure) {
        match kind {
            StoreFailure::Unavailable => &self.store_unavailable,
            StoreFailure::Internal => &self.store_internal,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an image object left in the image store without a record (its delete failed).
    pub fn image_orphan(&self) {
        self.image_orphans.fetch_add(1, Ordering::Relaxed);
    }

    fn route(&self, route: &str) -> Arc<RouteSeries> {
        if let Some(s) = read(&self.routes).get(route) {
            return Arc::clone(s);
        }
        let mut w = self.routes.write().unwrap_or_else(|p| p.into_inner());
        Arc::clone(w.entry(route.to_owned()).or_insert_with(|| Arc::new(RouteSeries::new())))
    }

    /// Renders every figure this registry holds into `out`.
    pub fn render(&self, out: &mut Exposition) {
        let started = self.started.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        out.gauge("facerec_process_start_time_seconds", "Start time of the process since the Unix epoch, in seconds.", started);
        out.gauge("facerec_http_requests_in_flight", "Requests being answered now.", self.in_flight.load(Ordering::Relaxed) as f64);
        out.gauge(
            "facerec_http_request_body_bytes_in_flight",
            "Bytes of request bodies held in the REQUEST_BYTES_IN_FLIGHT budget now.",
            self.body_bytes.load(Ordering::Relaxed) as f64,
        );

        let routes: Vec<(String, Arc<RouteSeries>)> = {
            let mut v: Vec<_> = read(&self.routes).iter().map(|(k, s)| (k.clone(), Arc::clone(s))).collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        out.header("facerec_http_requests_total", "HTTP requests answered, by method, matched route and status.", "counter");
        for (route, s) in &routes {
            let mut rows: Vec<((u8, u16), u64)> = read(&s.statuses).iter().map(|(k, v)| (*k, v.load(Ordering::Relaxed))).collect();
            rows.sort_unstable();
            for ((m, status), n) in rows {
                let status = status.to_string();
                let labels = [("method", METHODS[usize::from(m)]), ("route", route.as_str()), ("status", status.as_str())];
                out.sample("facerec_http_requests_total", &labels, n as f64);
            }
        }
        out.header(
            "facerec_http_request_duration_seconds",
            "Time from the request's arrival to its answer, by method and matched route.",
            "histogram",
        );
        for (route, s) in &routes {
            for (m, h) in s.latency.iter().enumerate() {
                let snap = h.snapshot();
                if snap.count() > 0 {
                    out.histogram_series(
                        "facerec_http_request_duration_seconds",
                        &[("method", METHODS[m]), ("route", route.as_str())],
                        &snap,
                    );
                }
            }
        }
        out.histogram(
            "facerec_queue_time_seconds",
            "Per request that used the engine: the longest wait of its images in the inference queue (as x-queue-time).",
            &self.queue_time.snapshot(),
        );
        out.histogram(
            "facerec_inference_time_seconds",
            "Per request that used the engine: the longest inference of its images (as x-inference-time).",
            &self.inference_time.snapshot(),
        );
        out.header("facerec_http_errors_total", "Error answers, by catalogue code.", "counter");
        for (code, n) in read(&self.error_codes).iter() {
            out.sample("facerec_http_errors_total", &[("code", code)], n.load(Ordering::Relaxed) as f64);
        }
        out.header(
            "facerec_store_errors_total",
            "Store failures met by requests, by kind (unavailable: nothing changed; internal: a bug or corrupt data).",
            "counter",
        );
        out.sample("facerec_store_errors_total", &[("kind", "unavailable")], self.store_unavailable.load(Ordering::Relaxed) as f64);
        out.sample("facerec_store_errors_total", &[("kind", "internal")], self.store_internal.load(Ordering::Relaxed) as f64);
        out.counter(
            "facerec_image_orphans_total",
            "Image objects left in the image store (IMAGE_STORE) without a record: their delete failed (logged with the key).",
            self.image_orphans.load(Ordering::Relaxed),
        );
        connections::global().render(out);
    }
}

/// Decrements the in-flight gauge when dropped.
#[derive(Debug)]
pub struct InFlight<'a>(&'a AtomicI64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Bytes of request bodies held, given back on drop.
#[derive(Debug)]
pub struct BodyBytes<'a>(&'a AtomicI64, i64);

impl Drop for BodyBytes<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::Relaxed);
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

/// Adds one to the counter at `key`, creating it on first use.
fn bump<K: std::hash::Hash + Ord + Eq + Copy, M: CounterMap<K>>(map: &RwLock<M>, key: K) {
    if let Some(c) = read(map).counter(&key) {
        c.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let mut w = map.write().unwrap_or_else(|p| p.into_inner());
    w.counter_or_insert(key).fetch_add(1, Ordering::Relaxed);
}

/// The two map types [`bump`] works on.
trait CounterMap<K> {
    fn counter(&self, key: &K) -> Option<&AtomicU64>;
    fn counter_or_insert(&mut self, key: K) -> &AtomicU64;
}

impl<K: std::hash::Hash + Eq> CounterMap<K> for HashMap<K, AtomicU64> {
    fn counter(&self, key: &K) -> Option<&AtomicU64> {
        self.get(key)
    }
    fn counter_or_insert(&mut self, key: K) -> &AtomicU64 {
        self.entry(key).or_insert_with(|| AtomicU64::new(0))
    }
}

impl<K: Ord> CounterMap<K> for BTreeMap<K, AtomicU64> {
    fn counter(&self, key: &K) -> Option<&AtomicU64> {
        self.get(key)
    }
    fn counter_or_insert(&mut self, key: K) -> &AtomicU64 {
        self.entry(key).or_insert_with(|| AtomicU64::new(0))
    }
}

/// A Prometheus text exposition being written: `# HELP` and `# TYPE` once per metric, then
/// its samples. Label values are escaped; numbers are written the way Prometheus reads them.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

/// The content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

impl Exposition {
    pub fn new() -> Exposition {
        Exposition::default()
    }

    pub fn finish(self) -> String {
        self.out
    }

    /// `# HELP` and `# TYPE` lines (`kind`: counter, gauge, histogram).
    pub fn header(&mut self, name: &str, help: &str, kind: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// One sample line.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"");
                escape_label(&mut self.out, v);
                self.out.push('"');
            }
            self.out.push('}');
        }
        self.out.push(' ');
        push_number(&mut self.out, value);
        self.out.push('\n');
    }

    /// A gauge without labels.
    pub fn gauge(&mut self, name: &str, help: &str, value: f64) {
        self.header(name, help, "gauge");
        self.sample(name, &[], value);
    }

    /// A counter without labels.
    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.header(name, help, "counter");
        self.sample(name, &[], value as f64);
    }

    /// A histogram without labels.
    pub fn histogram(&mut self, name: &str, help: &str, snap: &HistogramSnapshot) {
        self.header(name, help, "histogram");
        self.histogram_series(name, &[], snap);
    }

    /// One labelled series of a histogram whose header was written: `_bucket` lines, `_sum`, `_count`.
    pub fn histogram_series(&mut self, name: &str, labels: &[(&str, &str)], snap: &HistogramSnapshot) {
        let bucket = format!("{name}_bucket");
        let mut with_le: Vec<(&str, &str)> = labels.to_vec();
        let les: Vec<String> = snap.bounds.iter().map(|b| number(*b)).chain(std::iter::once("+Inf".to_string())).collect();
        for (le, n) in les.iter().zip(&snap.cumulative) {
            with_le.push(("le", le.as_str()));
            self.sample(&bucket, &with_le, *n as f64);
            with_le.pop();
        }
        self.sample(&format!("{name}_sum"), labels, snap.sum);
        self.sample(&format!("{name}_count"), labels, snap.count() as f64);
    }
}

fn escape_label(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn number(v: f64) -> String {
    let mut s = String::new();
    push_number(&mut s, v);
    s
}

fn push_number(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        let _ = write!(out, "{}", v as i64);
    } else {
        let _ = write!(out, "{v}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_with_sum_and_count() {
        let h = Histogram::new(&[0.1, 1.0]);
        for v in [0.05, 0.1, 0.5, 3.0, f64::NAN] {
            h.observe(v);
        }
        let s = h.snapshot();
        assert_eq!(s.cumulative, vec![2, 3, 4]);
        assert_eq!(s.count(), 4);
        assert!((s.sum - 3.65).abs() < 1e-9);
        let mut e = Exposition::new();
        e.histogram("x_seconds", "help", &s);
        let text = e.finish();
        assert!(text.contains("# TYPE x_seconds histogram\n"), "{text}");
        assert!(text.contains("x_seconds_bucket{le=\"0.1\"} 2\n"), "{text}");
        assert!(text.contains("x_seconds_bucket{le=\"1\"} 3\n"), "{text}");
        assert!(text.contains("x_seconds_bucket{le=\"+Inf\"} 4\n"), "{text}");
        assert!(text.contains("x_seconds_count 4\n"), "{text}");
    }

    #[test]
    fn requests_are_counted_by_method_route_and_status() {
        let m = Metrics::new();
        let ok = RequestOutcome { method: "POST", route: "/recognize", status: 200, latency: Duration::from_millis(30), error_code: None };
        m.record(&ok);
        m.record(&ok);
        m.record(&RequestOutcome { status: 400, error_code: Some("invalid_json"), ..ok });
        for _ in 0..3 {
            m.engine_request(Duration::from_millis(2), Duration::from_millis(20));
        }
        m.record(&RequestOutcome { method: "BREW", route: UNMATCHED_ROUTE, status: 404, error_code: Some("not_found"), ..ok });
        m.store_failure(StoreFailure::Unavailable);
        let mut e = Exposition::new();
        m.render(&mut e);
        let text = e.finish();
        for line in [
            "facerec_http_requests_total{method=\"POST\",route=\"/recognize\",status=\"200\"} 2\n",
            "facerec_http_requests_total{method=\"POST\",route=\"/recognize\",status=\"400\"} 1\n",
            "facerec_http_requests_total{method=\"other\",route=\"unmatched\",status=\"404\"} 1\n",
            "facerec_http_request_duration_seconds_count{method=\"POST\",route=\"/recognize\"} 3\n",
            "facerec_http_request_duration_seconds_bucket{method=\"POST\",route=\"/recognize\",le=\"0.025\"} 0\n",
            "facerec_http_request_duration_seconds_bucket{method=\"POST\",route=\"/recognize\",le=\"0.05\"} 3\n",
            "facerec_queue_time_seconds_count 3\n",
            "facerec_inference_time_seconds_bucket{le=\"0.025\"} 3\n",
            "facerec_http_errors_total{code=\"invalid_json\"} 1\n",
            "facerec_store_errors_total{kind=\"unavailable\"} 1\n",
            "facerec_store_errors_total{kind=\"internal\"} 0\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        // Every metric has exactly one TYPE line.
        let types: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE ")).collect();
        let mut names: Vec<&str> = types.iter().map(|l| l.split(' ').nth(2).unwrap_or_default()).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len(), "{text}");
    }

    #[test]
    fn label_values_are_escaped() {
        let mut e = Exposition::new();
        e.sample("m", &[("route", "/a\"b\\c\nd")], 1.5);
        assert_eq!(e.finish(), "m{route=\"/a\\\"b\\\\c\\nd\"} 1.5\n");
    }

    #[test]
    fn in_flight_counts_until_dropped() {
        let m = Metrics::new();
        let g = m.in_flight();
        assert_eq!(m.in_flight.load(Ordering::Relaxed), 1);
        drop(g);
        assert_eq!(m.in_flight.load(Ordering::Relaxed), 0);
    }
}
