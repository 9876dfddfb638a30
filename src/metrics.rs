//! Process metrics for `GET /metrics`, on [`prometheus_client`] (the Prometheus project's own
//! Rust client), written in the Prometheus text exposition format 0.0.4. One process-wide
//! registry ([`global`]) holds what the HTTP layer records (one middleware and the error
//! mapping) and the connection figures ([`connections`]). Knows nothing of HTTP frameworks, the
//! engine or the store: figures that live elsewhere (gallery size, engine queue, the streams'
//! registry) are handed to [`Metrics::encode`] by the caller at scrape time, as
//! [`Registry`]s of their own (a [`Collector`] for values read just then).
//!
//! Why `prometheus-client` rather than `metrics` + `metrics-exporter-prometheus`: it is
//! per-registry, with typed handles (no global recorder behind macros, no name lookup per
//! record), so a test builds its own [`Metrics`]; [`Collector`]s and [`EncodeMetric`] take
//! figures read at scrape time, also a histogram counted elsewhere ([`ConstHistogram`], the
//! engine's batch sizes), which the exporter cannot render; bucket bounds are per histogram;
//! label values are escaped by the encoder; and its `prometheus_text` encoder (0.26) writes the
//! 0.0.4 format, so metric names, `# TYPE` lines and the Content-Type stay as they were.
//!
//! Counters are registered without their `_total`: the encoder appends it to the samples and
//! to `# TYPE` (a name ending in `_total` is refused). The registry appends a full stop to help
//! texts, so [`register`] takes them off ours. Families without any series are left out of a
//! scrape, as the Go client does.
//!
//! Recording costs a few relaxed atomic adds; a labelled series is found under its family's read
//! lock (a new label set takes the write lock once), and a histogram observation holds that
//! histogram's own mutex for a few adds.

pub mod connections;

use std::time::{Duration, SystemTime};

use prometheus_client::encoding::{EncodeLabelSet, MetricEncoder, NoLabelSet, prometheus_text};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Metric;

pub use prometheus_client::collector::Collector;
pub use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
pub use prometheus_client::registry::Registry;

/// Upper bounds (seconds) of the request latency buckets.
pub const LATENCY_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// Upper bounds (seconds) of the engine queue-time and inference-time buckets.
pub const ENGINE_TIME_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Method labels; anything else is `other` (bounded label values).
const METHODS: [&str; 8] = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "other"];

/// The label of a request that matched no route (its raw path is never a label).
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// The content type of the text exposition format (0.0.4).
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// A histogram with these bucket bounds (`+Inf` is added).
pub fn histogram(bounds: &[f64]) -> Histogram {
    Histogram::new(bounds.iter().copied())
}

/// Registers `metric` with `help` as written here (the registry appends a full stop itself).
pub fn register(registry: &mut Registry, name: &str, help: &str, metric: impl Metric) {
    registry.register(name, help.strip_suffix('.').unwrap_or(help), metric);
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: &'static str,
    /// The matched route template (`/users/{username}`), or [`UNMATCHED_ROUTE`].
    route: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
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

/// The kind of a store failure, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreFailure {
    /// Unreachable, busy, full or read-only: nothing changed.
    Unavailable,
    /// A bug or corrupt data.
    Internal,
}

/// Every counter and histogram of the process, and the registry that writes them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<(RouteLabels, StatusLabel), Counter>,
    latency: Family<RouteLabels, Histogram, fn() -> Histogram>,
    in_flight: Gauge,
    body_bytes: Gauge,
    queue_time: Histogram,
    inference_time: Histogram,
    error_codes: Family<CodeLabel, Counter>,
    /// Series of `store_errors` (by kind), held to count without a map look-up.
    store_unavailable: Counter,
    store_internal: Counter,
    image_orphans: Counter,
    connections: connections::ConnectionMetrics,
}

/// The process's registry.
pub fn global() -> &'static Metrics {
    static METRICS: std::sync::OnceLock<Metrics> = std::sync::OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn latency_histogram() -> Histogram {
    histogram(LATENCY_BUCKETS)
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Registry::default();
        let started = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        register(
            &mut r,
            "facerec_process_start_time_seconds",
            "Start time of the process since the Unix epoch, in seconds.",
            ConstGauge::new(started),
        );
        let in_flight = Gauge::default();
        register(&mut r, "facerec_http_requests_in_flight", "Requests being answered now.", in_flight.clone());
        let body_bytes = Gauge::default();
        register(
            &mut r,
            "facerec_http_request_body_bytes_in_flight",
            "Bytes of request bodies held in the REQUEST_BYTES_IN_FLIGHT budget now.",
            body_bytes.clone(),
        );
        let requests: Family<(RouteLabels, StatusLabel), Counter> = Family::default();
        register(&mut r, "facerec_http_requests", "HTTP requests answered, by method, matched route and status.", requests.clone());
        let latency: Family<RouteLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        register(
            &mut r,
            "facerec_http_request_duration_seconds",
            "Time from the request's arrival to its answer, by method and matched route.",
            latency.clone(),
        );
        let queue_time = histogram(ENGINE_TIME_BUCKETS);
        register(
            &mut r,
            "facerec_queue_time_seconds",
            "Per request that used the engine: the longest wait of its images in the inference queue (as x-queue-time).",
            queue_time.clone(),
        );
        let inference_time = histogram(ENGINE_TIME_BUCKETS);
        register(
            &mut r,
            "facerec_inference_time_seconds",
            "Per request that used the engine: the longest inference of its images (as x-inference-time).",
            inference_time.clone(),
        );
        let error_codes: Family<CodeLabel, Counter> = Family::default();
        register(&mut r, "facerec_http_errors", "Error answers, by catalogue code.", error_codes.clone());
        let store_errors = Family::<KindLabel, Counter>::default();
        let store_unavailable = store_errors.get_or_create_owned(&KindLabel { kind: "unavailable" });
        let store_internal = store_errors.get_or_create_owned(&KindLabel { kind: "internal" });
        register(
            &mut r,
            "facerec_store_errors",
            "Store failures met by requests, by kind (unavailable: nothing changed; internal: a bug or corrupt data).",
            store_errors,
        );
        let image_orphans = Counter::default();
        register(
            &mut r,
            "facerec_image_orphans",
            "Image objects left in the image store (IMAGE_STORE) without a record: their delete failed (logged with the key).",
            image_orphans.clone(),
        );
        let connections = connections::ConnectionMetrics::new(&mut r);
        Metrics {
            registry: r,
            requests,
            latency,
            in_flight,
            body_bytes,
            queue_time,
            inference_time,
            error_codes,
            store_unavailable,
            store_internal,
            image_orphans,
            connections,
        }
    }

    /// The connection figures (written by `serve::conn`).
    pub fn connections(&self) -> &connections::ConnectionMetrics {
        &self.connections
    }

    /// Counts a request in flight until the guard is dropped (also when the client goes away).
    pub fn in_flight(&self) -> InFlight<'_> {
        self.in_flight.inc();
        InFlight(&self.in_flight)
    }

    /// Counts `bytes` of request bodies held in the budget until the guard is dropped.
    pub fn body_bytes_held(&self, bytes: u64) -> BodyBytes<'_> {
        let n = i64::try_from(bytes).unwrap_or(i64::MAX);
        self.body_bytes.inc_by(n);
        BodyBytes(&self.body_bytes, n)
    }

    /// Records the engine's share of one request that used it (the longest queue wait and the
    /// longest inference of its images), where the engine measures them.
    pub fn engine_request(&self, queue: Duration, inference: Duration) {
        self.queue_time.observe(queue.as_secs_f64());
        self.inference_time.observe(inference.as_secs_f64());
    }

    /// Records a finished request.
    pub fn record(&self, r: &RequestOutcome<'_>) {
        let method = METHODS.iter().copied().find(|&m| m == r.method).unwrap_or("other");
        let key = (RouteLabels { method, route: r.route.to_owned() }, StatusLabel { status: r.status });
        self.latency.get_or_create(&key.0).observe(r.latency.as_secs_f64());
        self.requests.get_or_create(&key).inc();
        if let Some(code) = r.error_code {
            self.error_codes.get_or_create(&CodeLabel { code }).inc();
        }
    }

    /// Counts a store failure that reached a request.
    pub fn store_failure(&self, kind: StoreFailure) {
        match kind {
            StoreFailure::Unavailable => &self.store_unavailable,
            StoreFailure::Internal => &self.store_internal,
        }
        .inc();
    }

    /// Counts an image object left in the image store without a record (its delete failed).
    pub fn image_orphan(&self) {
        self.image_orphans.inc();
    }

    /// The exposition: this registry's figures, then `others`' (the registries of other parts
    /// and the figures read at scrape time), in order.
    pub fn encode(&self, others: &[&Registry]) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_text::encode(&mut out, &self.registry)?;
        for r in others {
            prometheus_text::encode(&mut out, r)?;
        }
        Ok(out)
    }
}

/// Decrements the in-flight gauge when dropped.
#[derive(Debug)]
pub struct InFlight<'a>(&'a Gauge);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Bytes of request bodies held, given back on drop.
#[derive(Debug)]
pub struct BodyBytes<'a>(&'a Gauge, i64);

impl Drop for BodyBytes<'_> {
    fn drop(&mut self) {
        self.0.dec_by(self.1);
    }
}

/// A histogram counted elsewhere and handed in at scrape time (from a [`Collector`]):
/// `buckets[i]` is (upper bound, observations in that bucket alone, not cumulative); without a
/// last `+Inf` bound, the encoder adds one holding [`ConstHistogram::count`].
#[derive(Debug, Clone, PartialEq)]
pub struct ConstHistogram {
    pub buckets: Vec<(f64, u64)>,
    pub sum: f64,
}

impl ConstHistogram {
    /// Observations in all buckets.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|(_, n)| n).sum()
    }
}

impl EncodeMetric for ConstHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<NoLabelSet>(self.sum, self.count(), &self.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(m: &Metrics) -> String {
        m.encode(&[]).expect("encodes")
    }

    #[test]
    fn a_counter_an_escaped_label_and_cumulative_buckets_are_rendered() {
        let m = Metrics::new();
        m.image_orphan();
        let ok = RequestOutcome { method: "GET", route: "/a\"b\\c\nd", status: 200, latency: Duration::from_millis(30), error_code: None };
        // Binary fractions of a second, so that the sum is exact.
        for latency in
            [Duration::from_nanos(3_906_250), Duration::from_nanos(31_250_000), Duration::from_nanos(31_250_000), Duration::from_secs(64)]
        {
            m.record(&RequestOutcome { latency, ..ok });
        }
        let text = text(&m);
        for line in [
            // A counter: `_total` on the TYPE line and the sample, as in the 0.0.4 format.
            "# TYPE facerec_image_orphans_total counter\n",
            "facerec_image_orphans_total 1\n",
            // A labelled counter whose label value is escaped (\" \\ \n).
            "facerec_http_requests_total{method=\"GET\",route=\"/a\\\"b\\\\c\\nd\",status=\"200\"} 4\n",
            // A histogram's buckets are cumulative, up to +Inf and the count.
            "# TYPE facerec_http_request_duration_seconds histogram\n",
            "facerec_http_request_duration_seconds_bucket{method=\"GET\",route=\"/a\\\"b\\\\c\\nd\",le=\"0.005\"} 1\n",
            "facerec_http_request_duration_seconds_bucket{method=\"GET\",route=\"/a\\\"b\\\\c\\nd\",le=\"0.025\"} 1\n",
            "facerec_http_request_duration_seconds_bucket{method=\"GET\",route=\"/a\\\"b\\\\c\\nd\",le=\"0.05\"} 3\n",
            "facerec_http_request_duration_seconds_bucket{method=\"GET\",route=\"/a\\\"b\\\\c\\nd\",le=\"30\"} 3\n",
            "facerec_http_request_duration_seconds_bucket{method=\"GET\",route=\"/a\\\"b\\\\c\\nd\",le=\"+Inf\"} 4\n",
            "facerec_http_request_duration_seconds_count{method=\"GET\",route=\"/a\\\"b\\\\c\\nd\"} 4\n",
            "facerec_http_request_duration_seconds_sum{method=\"GET\",route=\"/a\\\"b\\\\c\\nd\"} 64.06640625\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
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
        let text = text(&m);
        for line in [
            "# HELP facerec_http_requests_total HTTP requests answered, by method, matched route and status.\n",
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
            "# TYPE facerec_connections_timed_out_total counter\n",
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
    fn a_histogram_counted_elsewhere_is_rendered_cumulatively() {
        #[derive(Debug)]
        struct Sizes;
        impl Collector for Sizes {
            fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
                let h = ConstHistogram { buckets: vec![(1.0, 5), (2.0, 0), (f64::INFINITY, 2)], sum: 9.0 };
                h.encode(encoder.encode_descriptor("sizes", "Sizes.", None, h.metric_type())?)
            }
        }
        let mut r = Registry::default();
        r.register_collector(Box::new(Sizes));
        let text = Metrics::new().encode(&[&r]).expect("encodes");
        let tail = &text[text.find("# HELP sizes").expect("sizes rendered")..];
        assert_eq!(
            tail,
            "# HELP sizes Sizes.\n# TYPE sizes histogram\nsizes_bucket{le=\"1\"} 5\nsizes_bucket{le=\"2\"} 5\n\
             sizes_bucket{le=\"+Inf\"} 7\nsizes_sum 9.0\nsizes_count 7\n"
        );
    }

    #[test]
    fn in_flight_counts_until_dropped() {
        let m = Metrics::new();
        let g = m.in_flight();
        assert_eq!(m.in_flight.get(), 1);
        drop(g);
        assert_eq!(m.in_flight.get(), 0);
        let held = m.body_bytes_held(10);
        assert_eq!(m.body_bytes.get(), 10);
        drop(held);
        assert_eq!(m.body_bytes.get(), 0);
    }
}
