//! Client connection figures (written by `serve::conn`, registered in the process registry of
//! [`super::Metrics`]): open now, refused at MAX_CONNECTIONS, and closed by kind.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use super::{KindLabel, Registry, register};

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
#[derive(Debug)]
pub struct ConnectionMetrics {
    open: Gauge,
    refused: Counter,
    /// Series of `timed_out` (by kind), held to count without a map look-up.
    header_timeout: Counter,
    idle_timeout: Counter,
}

/// The process's connection counters.
pub fn global() -> &'static ConnectionMetrics {
    super::global().connections()
}

impl ConnectionMetrics {
    /// The counters, registered in `registry`.
    pub(super) fn new(registry: &mut Registry) -> ConnectionMetrics {
        let open = Gauge::default();
        register(registry, "facerec_connections_open", "Client connections open now.", open.clone());
        let refused = Counter::default();
        register(
            registry,
            "facerec_connections_refused",
            "Connections answered 503 and closed at once because MAX_CONNECTIONS were open.",
            refused.clone(),
        );
        let timed_out = Family::<KindLabel, Counter>::default();
        let header_timeout = timed_out.get_or_create_owned(&KindLabel { kind: "header" });
        let idle_timeout = timed_out.get_or_create_owned(&KindLabel { kind: "idle" });
        register(
            registry,
            "facerec_connections_timed_out",
            "Connections closed by a timeout, by kind (header: HEADER_READ_TIMEOUT; idle: KEEPALIVE_TIMEOUT).",
            timed_out,
        );
        ConnectionMetrics { open, refused, header_timeout, idle_timeout }
    }

    pub fn opened(&self) {
        self.open.inc();
    }

    pub fn refused(&self) {
        self.refused.inc();
    }

    pub fn closed(&self, how: Closed) {
        self.open.dec();
        let counter = match how {
            Closed::HeaderTimeout => &self.header_timeout,
            Closed::IdleTimeout => &self.idle_timeout,
            Closed::ByClient | Closed::Stopping => return,
        };
        counter.inc();
    }
}
