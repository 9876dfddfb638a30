//! Client connection figures (written by `serve::conn`, rendered with the rest by
//! [`super::Metrics::render`]): open now, refused at MAX_CONNECTIONS, and closed by kind.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use super::Exposition;

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// The client closed it, or it ended after its last answer (the usual end).
    ByClient,
    /// Its request line and headers took longer than HEADER_READ_TIMEOUT.
    HeaderTimeout,
    /// It stayed silent after an answer longer than KEEPALIVE_TIMEOUT.
    IdleTimeout,
    /// The service stopped while it had no request in flight.
    Stopping,
}

/// The connection counters of the process.
#[derive(Debug, Default)]
pub struct ConnectionMetrics {
    open: AtomicI64,
    refused: AtomicU64,
    header_timeout: AtomicU64,
    idle_timeout: AtomicU64,
}

/// The process's connection counters.
pub fn global() -> &'static ConnectionMetrics {
    static CONNECTIONS: OnceLock<ConnectionMetrics> = OnceLock::new();
    CONNECTIONS.get_or_init(ConnectionMetrics::default)
}

impl ConnectionMetrics {
    pub fn opened(&self) {
        self.open.fetch_add(1, Ordering::Relaxed);
    }

    pub fn refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }

    pub fn closed(&self, how: Closed) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        match how {
            Closed::HeaderTimeout => &self.header_timeout,
            Closed::IdleTimeout => &self.idle_timeout,
            Closed::ByClient | Closed::Stopping => return,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self, out: &mut Exposition) {
        out.gauge("facerec_connections_open", "Client connections open now.", self.open.load(Ordering::Relaxed) as f64);
        out.counter(
            "facerec_connections_refused_total",
            "Connections answered 503 and closed at once because MAX_CONNECTIONS were open.",
            self.refused.load(Ordering::Relaxed),
        );
        out.header(
            "facerec_connections_timed_out_total",
            "Connections closed by a timeout, by kind (header: HEADER_READ_TIMEOUT; idle: KEEPALIVE_TIMEOUT).",
            "counter",
        );
        out.sample("facerec_connections_timed_out_total", &[("kind", "header")], self.header_timeout.load(Ordering::Relaxed) as f64);
        out.sample("facerec_connections_timed_out_total", &[("kind", "idle")], self.idle_timeout.load(Ordering::Relaxed) as f64);
    }
}
