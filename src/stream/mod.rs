//! Live video over a WebSocket (`GET /api/stream`): the pieces that know no HTTP. `frame`
//! parses what a client sends; `tracker` follows faces across frames so that identities are
//! computed only when needed; `session` holds the one-slot mailbox (backpressure: the newest
//! frame wins), the frame-rate limit and the count of open streams; `metrics` the figures for
//! `/metrics`. The use case (detect, track, identify, audit) is `service::stream`; the socket is
//! `api::stream`.

pub mod frame;
pub mod metrics;
pub mod session;
pub mod tracker;

use clap::Args;

/// Limits and tracking of the streams (`facerec serve`).
#[derive(Debug, Clone, Args)]
pub struct StreamConfig {
    /// Streams open at once; one more is closed with 1013 (try again later).
    #[arg(long, env = "STREAM_MAX_STREAMS", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub stream_max_streams: u32,

    /// Largest frame (image bytes); a larger one closes the stream with 1009 (message too big).
    #[arg(long, env = "STREAM_MAX_FRAME_BYTES", default_value_t = 4 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1024..=256 * 1024 * 1024))]
    pub stream_max_frame_bytes: u64,

    /// Frames a second a client may send (bursts of one second's worth); faster closes the
    /// stream with 1008 (policy violation). Frames the server cannot keep up with are dropped,
    /// not refused: this bounds what a client may make the server read and decode.
    #[arg(long, env = "STREAM_MAX_FPS", default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub stream_max_fps: u32,

    /// A track's identity is computed again after this many frames (0: only for a new track or
    /// a clearly better face).
    #[arg(long, env = "STREAM_REFRESH_FRAMES", default_value_t = 30)]
    pub stream_refresh_frames: u64,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig { stream_max_streams: 16, stream_max_frame_bytes: 4 * 1024 * 1024, stream_max_fps: 60, stream_refresh_frames: 30 }
    }
}

/// The streams' shared state in the HTTP layer: the limits and the count of open streams.
#[derive(Debug)]
pub struct Streams {
    pub config: StreamConfig,
    pub hub: session::StreamHub,
}

impl Streams {
    pub fn new(config: StreamConfig) -> Streams {
        let hub = session::StreamHub::new(config.stream_max_streams as usize);
        Streams { config, hub }
    }

    pub fn max_frame_bytes(&self) -> usize {
        usize::try_from(self.config.stream_max_frame_bytes).unwrap_or(usize::MAX)
    }

    pub fn tracker_options(&self) -> tracker::TrackerOptions {
        tracker::TrackerOptions { refresh_frames: self.config.stream_refresh_frames, ..tracker::TrackerOptions::default() }
    }
}

impl Default for Streams {
    fn default() -> Self {
        Streams::new(StreamConfig::default())
    }
}
