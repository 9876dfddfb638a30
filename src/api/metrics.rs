//! `GET /metrics`: the process metrics ([`crate::metrics`]) plus what other parts hold (the
//! engine's queue and batches, the gallery and face-record counts, audit write failures), in the Prometheus text
//! exposition format. Public, like `/health`: it names no user.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::engine::EngineStats;
use crate::metrics::{self, Exposition, HistogramSnapshot};

/// Prometheus metrics.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "Prometheus text exposition format 0.0.4 (request counts and latencies by route, engine queue and batches, gallery size, store errors); metric names in the README", content_type = "text/plain", body = String))
)]
pub async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let mut out = Exposition::new();
    metrics::global().render(&mut out);
    let svc = &st.service;
    let info = svc.engine().info();
    out.header(
        "facerec_build_info",
        "Version, model pack, recognizer, inference backend, execution provider and store of this process (value 1).",
        "gauge",
    );
    let (version, provider, backend, store) =
        (env!("CARGO_PKG_VERSION"), info.provider.to_string(), info.backend.to_string(), format!("{:?}", svc.store_kind()).to_lowercase());
    out.sample(
        "facerec_build_info",
        &[
            ("version", version),
            ("model_pack", &svc.options().model_pack),
            ("model_id", &info.model_id),
            ("inference_backend", &backend),
            ("execution_provider", &provider),
            ("store", &store),
        ],
        1.0,
    );
    out.gauge("facerec_gallery_users", "Users with a template, compared by /recognize.", svc.gallery().len() as f64);
    out.gauge("facerec_face_records", "Face records of the second API, searched by /api/face/search.", svc.face_index().len() as f64);
    out.counter(
        "facerec_audit_write_failures_total",
        "Audit records (logs.txt line and crops) that could not be written; recognition was still answered.",
        svc.audit().failures(),
    );
    render_engine(&mut out, &svc.engine().stats());
    crate::stream::metrics::global().render(&mut out);
    let mut resp = out.finish().into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(metrics::CONTENT_TYPE));
    resp
}

/// The engine's counters (cumulative since start) and gauges.
fn render_engine(out: &mut Exposition, s: &EngineStats) {
    out.gauge("facerec_engine_queue_depth", "Images waiting for an inference worker now.", s.queue_depth as f64);
    out.gauge(
        "facerec_engine_queue_capacity",
        "Images that may wait at most; beyond it requests get 429 overloaded.",
        s.queue_capacity as f64,
    );
    out.gauge("facerec_engine_workers", "Inference workers running.", s.live_workers as f64);
    out.gauge("facerec_engine_busy_workers", "Inference workers computing a batch now.", s.busy_workers as f64);
    out.gauge(
        "facerec_engine_serving_workers",
        "Inference workers able to take work: running and not busy past INFERENCE_TIMEOUT.",
        s.serving_workers as f64,
    );
    out.counter("facerec_engine_worker_restarts_total", "Inference workers replaced after a panic.", s.worker_restarts);
    out.counter(
        "facerec_engine_jobs_timed_out_total",
        "Images whose caller stopped waiting at INFERENCE_TIMEOUT (503 inference_timeout).",
        s.jobs_timed_out,
    );
    out.counter("facerec_engine_jobs_accepted_total", "Images admitted to the inference queue.", s.jobs_accepted);
    out.counter("facerec_engine_jobs_rejected_total", "Images refused because the queue was full (429 overloaded).", s.jobs_rejected);
    out.header(
        "facerec_engine_jobs_total",
        "Images the engine finished, by result (done, failed, cancelled: the caller went away).",
        "counter",
    );
    for (result, n) in [("done", s.jobs_done), ("failed", s.jobs_failed), ("cancelled", s.jobs_cancelled)] {
        out.sample("facerec_engine_jobs_total", &[("result", result)], n as f64);
    }
    out.counter("facerec_engine_batches_total", "Recognizer runs (micro-batches).", s.batches);
    out.counter("facerec_engine_faces_total", "Faces embedded.", s.faces);
    out.histogram("facerec_engine_batch_size", "Images per micro-batch.", &batch_sizes(&s.batch_histogram));
    let secs = |d: std::time::Duration| d.as_secs_f64();
    for (name, help, v) in [
        ("facerec_engine_queue_seconds_total", "Sum over images of their time in the queue.", secs(s.queue_time)),
        ("facerec_engine_busy_seconds_total", "Sum over batches of their wall time: the workers' busy time.", secs(s.inference_time)),
        ("facerec_engine_detector_seconds_total", "Time inside the detector sessions.", secs(s.detector_time)),
        ("facerec_engine_recognizer_seconds_total", "Time inside the recognizer sessions.", secs(s.recognizer_time)),
    ] {
        out.header(name, help, "counter");
        out.sample(name, &[], v);
    }
}

/// The engine's per-size batch counts (`counts[i]`: batches of `i + 1` images, the last one
/// "that many or more") as a histogram with bounds 1, 2, ... and the last size in `+Inf`.
fn batch_sizes(counts: &[u64]) -> HistogramSnapshot {
    let mut acc = 0;
    let mut cumulative: Vec<u64> = counts
        .iter()
        .map(|n| {
            acc += n;
            acc
        })
        .collect();
    if cumulative.is_empty() {
        cumulative.push(0);
    }
    let bounds = (1..cumulative.len()).map(|b| b as f64).collect();
    let sum = counts.iter().enumerate().map(|(i, &n)| (i as f64 + 1.0) * n as f64).sum();
    HistogramSnapshot { bounds, cumulative, sum }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_counts_become_a_cumulative_histogram() {
        let h = batch_sizes(&[5, 0, 2, 1]);
        assert_eq!(h.bounds, vec![1.0, 2.0, 3.0]);
        assert_eq!(h.cumulative, vec![5, 5, 7, 8]);
        assert_eq!(h.count(), 8);
        assert_eq!(h.sum, 5.0 + 6.0 + 4.0);
        assert_eq!(batch_sizes(&[]).count(), 0);
    }
}
