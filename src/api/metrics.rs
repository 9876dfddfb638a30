//! `GET /metrics`: the process metrics ([`crate::metrics`]) plus what other parts hold (the
//! engine's queue and batches, the gallery and face-record counts, audit write failures, the
//! streams' figures), in the Prometheus text exposition format. Public, like `/health`: it names
//! no user.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::{EncodeCounterValue, EncodeGaugeValue};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::{ApiError, AppState};
use crate::engine::EngineStats;
use crate::metrics::{self, Collector, ConstHistogram, DescriptorEncoder, EncodeMetric, Registry};

/// Prometheus metrics.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "Prometheus text exposition format 0.0.4 (request counts and latencies by route, engine queue and batches, gallery size, store errors); metric names in the README", content_type = "text/plain", body = String))
)]
pub async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let svc = &st.service;
    let info = svc.engine().info();
    let figures = Figures {
        build: [
            ("version", env!("CARGO_PKG_VERSION").to_owned()),
            ("model_pack", svc.options().model_pack.clone()),
            ("model_id", info.model_id.clone()),
            ("inference_backend", info.backend.to_string()),
            ("execution_provider", info.provider.to_string()),
            ("store", format!("{:?}", svc.store_kind()).to_lowercase()),
        ],
        gallery_users: svc.gallery().len(),
        face_records: svc.face_index().len(),
        audit_failures: svc.audit().failures(),
        engine: svc.engine().stats(),
    };
    let mut scrape = Registry::default();
    scrape.register_collector(Box::new(figures));
    match metrics::global().encode(&[&scrape, crate::stream::metrics::global().registry()]) {
        Ok(text) => {
            let mut resp = text.into_response();
            resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(metrics::CONTENT_TYPE));
            resp
        }
        Err(e) => ApiError::internal(format!("encoding the metrics: {e}")).into_response(),
    }
}

/// What other parts hold, read at scrape time.
#[derive(Debug)]
struct Figures {
    build: [(&'static str, String); 6],
    gallery_users: usize,
    face_records: usize,
    audit_failures: u64,
    engine: EngineStats,
}

/// Counter names go without `_total`: the encoder appends it.
impl Collector for Figures {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut m = enc.encode_descriptor(
            "facerec_build_info",
            "Version, model pack, recognizer, inference backend, execution provider and store of this process (value 1).",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(1i64).encode(m.encode_family(&self.build)?)?;
        gauge(&mut enc, "facerec_gallery_users", "Users with a template, compared by /recognize.", self.gallery_users)?;
        gauge(&mut enc, "facerec_face_records", "Face records of the second API, searched by /api/face/search.", self.face_records)?;
        counter(
            &mut enc,
            "facerec_audit_write_failures",
            "Audit records (logs.txt line and crops) that could not be written; recognition was still answered.",
            self.audit_failures,
        )?;
        encode_engine(&mut enc, &self.engine)
    }
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: impl EncodeGaugeValue) -> Result<(), std::fmt::Error> {
    ConstGauge::new(v).encode(enc.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: impl EncodeCounterValue) -> Result<(), std::fmt::Error> {
    ConstCounter::new(v).encode(enc.encode_descriptor(name, help, None, MetricType::Counter)?)
}

/// The engine's counters (cumulative since start) and gauges.
fn encode_engine(enc: &mut DescriptorEncoder, s: &EngineStats) -> Result<(), std::fmt::Error> {
    gauge(enc, "facerec_engine_queue_depth", "Images waiting for an inference worker now.", s.queue_depth)?;
    gauge(enc, "facerec_engine_queue_capacity", "Images that may wait at most; beyond it requests get 429 overloaded.", s.queue_capacity)?;
    gauge(enc, "facerec_engine_workers", "Inference workers running.", s.live_workers)?;
    gauge(enc, "facerec_engine_busy_workers", "Inference workers computing a batch now.", s.busy_workers)?;
    gauge(
        enc,
        "facerec_engine_serving_workers",
        "Inference workers able to take work: running and not busy past INFERENCE_TIMEOUT.",
        s.serving_workers,
    )?;
    counter(enc, "facerec_engine_worker_restarts", "Inference workers replaced after a panic.", s.worker_restarts)?;
    counter(
        enc,
        "facerec_engine_jobs_timed_out",
        "Images whose caller stopped waiting at INFERENCE_TIMEOUT (503 inference_timeout).",
        s.jobs_timed_out,
    )?;
    counter(enc, "facerec_engine_jobs_accepted", "Images admitted to the inference queue.", s.jobs_accepted)?;
    counter(enc, "facerec_engine_jobs_rejected", "Images refused because the queue was full (429 overloaded).", s.jobs_rejected)?;
    let mut jobs = enc.encode_descriptor(
        "facerec_engine_jobs",
        "Images the engine finished, by result (done, failed, cancelled: the caller went away).",
        None,
        MetricType::Counter,
    )?;
    for (result, n) in [("done", s.jobs_done), ("failed", s.jobs_failed), ("cancelled", s.jobs_cancelled)] {
        ConstCounter::new(n).encode(jobs.encode_family(&[("result", result)])?)?;
    }
    counter(enc, "facerec_engine_batches", "Recognizer runs (micro-batches).", s.batches)?;
    counter(enc, "facerec_engine_faces", "Faces embedded.", s.faces)?;
    let sizes = batch_sizes(&s.batch_histogram);
    sizes.encode(enc.encode_descriptor("facerec_engine_batch_size", "Images per micro-batch.", None, MetricType::Histogram)?)?;
    let secs = |d: std::time::Duration| d.as_secs_f64();
    for (name, help, v) in [
        ("facerec_engine_queue_seconds", "Sum over images of their time in the queue.", secs(s.queue_time)),
        ("facerec_engine_busy_seconds", "Sum over batches of their wall time: the workers' busy time.", secs(s.inference_time)),
        ("facerec_engine_detector_seconds", "Time inside the detector sessions.", secs(s.detector_time)),
        ("facerec_engine_recognizer_seconds", "Time inside the recognizer sessions.", secs(s.recognizer_time)),
    ] {
        counter(enc, name, help, v)?;
    }
    Ok(())
}

/// The engine's per-size batch counts (`counts[i]`: batches of `i + 1` images, the last one
/// "that many or more") as a histogram with bounds 1, 2, ... and the last size in `+Inf`.
fn batch_sizes(counts: &[u64]) -> ConstHistogram {
    let last = counts.len().saturating_sub(1);
    let buckets = counts.iter().enumerate().map(|(i, &n)| (if i == last { f64::INFINITY } else { i as f64 + 1.0 }, n)).collect();
    let sum = counts.iter().enumerate().map(|(i, &n)| (i as f64 + 1.0) * n as f64).sum();
    ConstHistogram { buckets, sum }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_counts_become_a_histogram_with_the_last_size_in_inf() {
        let h = batch_sizes(&[5, 0, 2, 1]);
        assert_eq!(h.buckets, vec![(1.0, 5), (2.0, 0), (3.0, 2), (f64::INFINITY, 1)]);
        assert_eq!(h.count(), 8);
        assert_eq!(h.sum, 5.0 + 6.0 + 4.0);
        assert_eq!(batch_sizes(&[]).count(), 0);
    }
}
