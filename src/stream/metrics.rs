//! The streams' figures for `/metrics`: streams open, opened and refused, frames in, processed
//! and dropped, identifications (recognizer runs for tracks) and the per-frame latency (from the
//! frame's arrival to its answer being handed to the socket). One registry per process, like
//! [`crate::metrics::global`].

use std::sync::OnceLock;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::metrics::{Exposition, Histogram, LATENCY_BUCKETS};

#[derive(Debug)]
pub struct StreamMetrics {
    open: AtomicI64,
    opened: AtomicU64,
    refused: AtomicU64,
    frames_in: AtomicU64,
    processed: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
    faces: AtomicU64,
    identified: AtomicU64,
    latency: Histogram,
}

/// The process's stream figures.
pub fn global() -> &'static StreamMetrics {
    static M: OnceLock<StreamMetrics> = OnceLock::new();
    M.get_or_init(|| StreamMetrics {
        open: AtomicI64::new(0),
        opened: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        frames_in: AtomicU64::new(0),
        processed: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        faces: AtomicU64::new(0),
        identified: AtomicU64::new(0),
        latency: Histogram::new(LATENCY_BUCKETS),
    })
}

/// Counts a stream open until dropped.
#[derive(Debug)]
pub struct OpenStream(&'static StreamMetrics);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl StreamMetrics {
    pub fn opened(&'static self) -> OpenStream {
        self.opened.fetch_add(1, Ordering::Relaxed);
        self.open.fetch_add(1, Ordering::Relaxed);
        OpenStream(self)
    }

    /// A stream closed because of a limit or bad credentials.
    pub fn refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }

    pub fn frame_in(&self) {
        self.frames_in.fetch_add(1, Ordering::Relaxed);
    }

    pub fn dropped(&self, n: u64) {
        self.dropped.fetch_add(n, Ordering::Relaxed);
    }

    /// A frame answered: its latency, faces and identifications.
    pub fn processed(&self, latency: Duration, faces: usize, identified: usize) {
        self.processed.fetch_add(1, Ordering::Relaxed);
        self.faces.fetch_add(faces as u64, Ordering::Relaxed);
        self.identified.fetch_add(identified as u64, Ordering::Relaxed);
        self.latency.observe_duration(latency);
    }

    /// A frame answered with an error (not an image, engine overloaded).
    pub fn failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self, out: &mut Exposition) {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        out.gauge("facerec_stream_open", "WebSocket streams (/api/stream) open now.", self.open.load(Ordering::Relaxed) as f64);
        out.counter("facerec_stream_opened_total", "WebSocket streams accepted.", get(&self.opened));
        out.counter(
            "facerec_stream_refused_total",
            "WebSocket streams closed for a limit (streams, frame size, frame rate) or bad credentials.",
            get(&self.refused),
        );
        out.counter("facerec_stream_frames_in_total", "Frames received on streams.", get(&self.frames_in));
        out.counter("facerec_stream_frames_processed_total", "Frames detected and answered.", get(&self.processed));
        out.counter(
            "facerec_stream_frames_dropped_total",
            "Frames replaced by a newer one before they were processed (slow consumer or slow engine).",
            get(&self.dropped),
        );
        out.counter("facerec_stream_frames_failed_total", "Frames answered with an error.", get(&self.failed));
        out.counter("facerec_stream_faces_total", "Faces found in stream frames.", get(&self.faces));
        out.counter(
            "facerec_stream_identifications_total",
            "Faces of stream frames embedded and compared (new track, refresh or better face).",
            get(&self.identified),
        );
        out.histogram("facerec_stream_frame_seconds", "Per-frame latency on streams: arrival to answer sent.", &self.latency.snapshot());
    }
}
