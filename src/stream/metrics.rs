//! The streams' figures for `/metrics`: streams open, opened and refused, frames in, processed
//! and dropped, identifications (recognizer runs for tracks) and the per-frame latency (from the
//! frame's arrival to its answer being handed to the socket). One registry per process, handed
//! to [`crate::metrics::Metrics::encode`] at scrape time.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

use crate::metrics::{LATENCY_BUCKETS, Registry, histogram, register};

#[derive(Debug)]
pub struct StreamMetrics {
    registry: Registry,
    open: Gauge,
    opened: Counter,
    refused: Counter,
    frames_in: Counter,
    processed: Counter,
    dropped: Counter,
    failed: Counter,
    faces: Counter,
    identified: Counter,
    latency: Histogram,
}

/// The process's stream figures.
pub fn global() -> &'static StreamMetrics {
    static M: OnceLock<StreamMetrics> = OnceLock::new();
    M.get_or_init(StreamMetrics::new)
}

/// Counts a stream open until dropped.
#[derive(Debug)]
pub struct OpenStream(&'static StreamMetrics);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.open.dec();
    }
}

impl StreamMetrics {
    fn new() -> StreamMetrics {
        let mut r = Registry::default();
        let open = Gauge::default();
        register(&mut r, "facerec_stream_open", "WebSocket streams (/api/stream) open now.", open.clone());
        let counter = |r: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            register(r, name, help, c.clone());
            c
        };
        let opened = counter(&mut r, "facerec_stream_opened", "WebSocket streams accepted.");
        let refused = counter(
            &mut r,
            "facerec_stream_refused",
            "WebSocket streams closed for a limit (streams, frame size, frame rate) or bad credentials.",
        );
        let frames_in = counter(&mut r, "facerec_stream_frames_in", "Frames received on streams.");
        let processed = counter(&mut r, "facerec_stream_frames_processed", "Frames detected and answered.");
        let dropped = counter(
            &mut r,
            "facerec_stream_frames_dropped",
            "Frames replaced by a newer one before they were processed (slow consumer or slow engine).",
        );
        let failed = counter(&mut r, "facerec_stream_frames_failed", "Frames answered with an error.");
        let faces = counter(&mut r, "facerec_stream_faces", "Faces found in stream frames.");
        let identified = counter(
            &mut r,
            "facerec_stream_identifications",
            "Faces of stream frames embedded and compared (new track, refresh or better face).",
        );
        let latency = histogram(LATENCY_BUCKETS);
        register(&mut r, "facerec_stream_frame_seconds", "Per-frame latency on streams: arrival to answer sent.", latency.clone());
        StreamMetrics { registry: r, open, opened, refused, frames_in, processed, dropped, failed, faces, identified, latency }
    }

    /// The registry of these figures, for the exposition.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn opened(&'static self) -> OpenStream {
        self.opened.inc();
        self.open.inc();
        OpenStream(self)
    }

    /// A stream closed because of a limit or bad credentials.
    pub fn refused(&self) {
        self.refused.inc();
    }

    pub fn frame_in(&self) {
        self.frames_in.inc();
    }

    pub fn dropped(&self, n: u64) {
        self.dropped.inc_by(n);
    }

    /// A frame answered: its latency, faces and identifications.
    pub fn processed(&self, latency: Duration, faces: usize, identified: usize) {
        self.processed.inc();
        self.faces.inc_by(faces as u64);
        self.identified.inc_by(identified as u64);
        self.latency.observe(latency.as_secs_f64());
    }

    /// A frame answered with an error (not an image, engine overloaded).
    pub fn failed(&self) {
        self.failed.inc();
    }
}
