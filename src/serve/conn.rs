//! Client connections: the accept loop and what one connection may hold. Each connection is
//! HTTP/1.1 (hyper, upgrades kept for `/api/stream`) with a watchdog that closes it when the
//! client takes longer than HEADER_READ_TIMEOUT to send a request's line and headers (counted
//! from the connection's opening, or from the first byte after the previous answer) or stays
//! silent between requests longer than KEEPALIVE_TIMEOUT; at most MAX_CONNECTIONS are open
//! (fitted under the process's open-file limit), a connection beyond it is answered 503 and
//! closed at once. On stop, connections with no request in flight (idle, or half-sent headers)
//! are closed at once; the others finish their request and close.
//!
//! hyper's own `header_read_timeout` is not used: it also runs while a keep-alive connection is
//! idle, so the two timeouts could not differ. hyper's automatic answers to unparsable requests
//! (400, 414, 431, empty bodies) are rewritten on the way out into the catalogue's JSON shape.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tower::ServiceExt as _;
use tower_http::timeout::TimeoutBody;

use crate::config::parse_duration;
use crate::metrics::connections::{self as conn_metrics, Closed};

/// Limits on client connections (see the module's first lines).
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectionConfig {
    /// Most client connections open at once; one more is answered 503 and closed. Lowered at
    /// start (with a warning) to fit the open-file limit (`ulimit -n`) less a reserve of 64.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,

    /// Longest a client may take to send a request's line and headers, counted from the
    /// connection's opening or from its first byte after the previous answer; past it the
    /// connection is closed (slowloris).
    #[arg(long, env = "HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,

    /// A kept-alive connection silent this long after an answer is closed.
    #[arg(long, env = "KEEPALIVE_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub keepalive_timeout: Duration,

    /// Longest wait for the next piece of a request body being received; past it the request is
    /// answered 408 `request_timeout` and the connection closed.
    #[arg(long, env = "BODY_READ_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub body_read_timeout: Duration,

    /// With no credentials configured (no JWT_SECRET_KEY, no API_KEYS) the service listens on
    /// the loopback only, whatever HOST says; true listens on HOST all the same, open to anyone
    /// who can reach it (a loud warning at start).
    #[arg(long, env = "ALLOW_OPEN_ACCESS", default_value_t = false, action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub allow_open_access: bool,
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        ConnectionConfig {
            max_connections: 4096,
            header_read_timeout: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(30),
            body_read_timeout: Duration::from_secs(30),
            allow_open_access: false,
        }
    }
}

/// Open files kept free for everything else the process opens (database, logs, crops, models).
const FILE_RESERVE: u64 = 64;

/// hyper's read and write buffer per connection.
const MAX_BUF_BYTES: usize = 128 * 1024;

/// Largest request line and headers together (larger: 431 `header_too_large`, or 414
/// `uri_too_long` when the URI alone is).
const MAX_HEADER_BYTES: usize = 96 * 1024;

/// How many connections may be open: `wanted`, lowered to fit the open-file limit (raising the
/// soft limit to the hard one first, as far as needed).
pub fn fit_to_file_limit(wanted: usize) -> usize {
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit and setrlimit only read and write the struct passed.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
            return wanted;
        }
        let need = wanted as u64 + FILE_RESERVE;
        if lim.rlim_cur < need && lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit { rlim_cur: need.min(lim.rlim_max), rlim_max: lim.rlim_max };
            // SAFETY: as above.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
                lim.rlim_cur = raised.rlim_cur;
            }
        }
        let room = lim.rlim_cur.saturating_sub(FILE_RESERVE).max(1);
        if (wanted as u64) > room {
            tracing::warn!(
                max_connections = wanted,
                open_file_limit = lim.rlim_cur,
                lowered_to = room,
                "MAX_CONNECTIONS does not fit the open-file limit (ulimit -n) less {FILE_RESERVE}: lowered"
            );
            return room as usize;
        }
        wanted
    }
    #[cfg(not(unix))]
    wanted
}

/// Serves `router` on `listener` until `stop` resolves, then closes the connections with no
/// request in flight at once and returns when the others have finished theirs.
pub async fn serve(listener: TcpListener, router: Router, cfg: ConnectionConfig, stop: impl Future<Output = ()>) {
    let max = fit_to_file_limit(cfg.max_connections as usize);
    let permits = Arc::new(Semaphore::new(max));
    let (stopping, stopped) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let mut stop = std::pin::pin!(stop);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(None)
        .keep_alive(true)
        .max_buf_size(MAX_BUF_BYTES)
        .max_header_size(MAX_HEADER_BYTES)
        .writev(false);
    tracing::info!(
        max_connections = max,
        header_read_timeout = ?cfg.header_read_timeout,
        keepalive_timeout = ?cfg.keepalive_timeout,
        body_read_timeout = ?cfg.body_read_timeout,
        "connection limits"
    );
    loop {
        let accepted = tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => accepted,
        };
        while tasks.try_join_next().is_some() {}
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and friends: back off a little instead of spinning; the cap keeps this rare.
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            refuse(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        conn_metrics::global().opened();
        tasks.spawn(connection(stream, permit, router.clone(), http.clone(), cfg.clone(), stopped.clone()));
    }
    let _ = stopping.send(true);
    drop(listener);
    while tasks.join_next().await.is_some() {}
}

/// A connection beyond MAX_CONNECTIONS: a short 503 if the socket takes it now, then closed.
fn refuse(stream: TcpStream) {
    conn_metrics::global().refused();
    let _ = stream.try_write(&error_response(
        503,
        "Service Unavailable",
        "overloaded",
        "too many open connections (MAX_CONNECTIONS): retry shortly",
    ));
}

/// Serves one connection until it ends, its watchdog closes it, or the service stops.
async fn connection(
    stream: TcpStream,
    permit: OwnedSemaphorePermit,
    router: Router,
    http: hyper::server::conn::http1::Builder,
    cfg: ConnectionConfig,
    mut stopped: watch::Receiver<bool>,
) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Tracked::new(stream, Arc::clone(&activity), permit));
    let body_timeout = cfg.body_read_timeout;
    let svc = {
        let activity = Arc::clone(&activity);
        hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let guard = activity.request_started();
            let router = router.clone();
            async move {
                let req = req.map(|body| axum::body::Body::new(TimeoutBody::new(body_timeout, body)));
                let resp = router.oneshot(req).await;
                drop(guard);
                resp
            }
        })
    };
    let conn = http.serve_connection(io, svc).with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let closed = tokio::select! {
        served = conn.as_mut() => {
            if let Err(e) = served {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            Closed::ByClient
        }
        kind = activity.watchdog(&cfg) => kind,
        () = async { drop(stopped.wait_for(|s| *s).await) } => {
            if activity.in_flight() == 0 {
                Closed::Stopping
            } else {
                conn.as_mut().graceful_shutdown();
                let _ = conn.as_mut().await;
                Closed::ByClient
            }
        }
    };
    conn_metrics::global().closed(closed);
}

/// What one connection's watchdog knows: when it last moved bytes, whether a request's head is
/// being received, and how many requests are being answered.
struct Activity {
    epoch: Instant,
    /// Milliseconds since `epoch` of the last byte read or written.
    last_io_ms: AtomicU64,
    /// Milliseconds since `epoch`, plus one, of the first byte of a request head not yet
    /// complete (0: none is being received).
    head_since_ms: AtomicU64,
    in_flight: AtomicUsize,
    changed: Notify,
}

impl Activity {
    fn new() -> Activity {
        // A fresh connection is a request not yet sent: the header timeout runs from now.
        Activity {
            epoch: Instant::now(),
            last_io_ms: AtomicU64::new(0),
            head_since_ms: AtomicU64::new(1),
            in_flight: AtomicUsize::new(0),
            changed: Notify::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    fn bytes_read(&self) {
        let now = self.now_ms();
        self.last_io_ms.store(now, Ordering::Relaxed);
        if self.in_flight() == 0 && self.head_since_ms.compare_exchange(0, now + 1, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            self.changed.notify_one();
        }
    }

    fn bytes_written(&self) {
        self.last_io_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// A request's head is complete and handed to the router.
    fn request_started(self: &Arc<Self>) -> RequestGuard {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_since_ms.store(0, Ordering::Release);
        RequestGuard(Arc::clone(self))
    }

    /// Resolves when the connection has outstayed a timeout, with the one it outstayed.
    async fn watchdog(&self, cfg: &ConnectionConfig) -> Closed {
        let header_ms = cfg.header_read_timeout.as_millis() as u64;
        let idle_ms = cfg.keepalive_timeout.as_millis() as u64;
        loop {
            let changed = self.changed.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            let (deadline, kind) = if self.in_flight() > 0 {
                (None, Closed::ByClient)
            } else {
                match self.head_since_ms.load(Ordering::Acquire) {
                    0 => (Some(self.last_io_ms.load(Ordering::Relaxed) + idle_ms), Closed::IdleTimeout),
                    since => (Some(since - 1 + header_ms), Closed::HeaderTimeout),
                }
            };
            match deadline {
                Some(at) if at <= self.now_ms() => return kind,
                Some(at) => {
                    let wait = Duration::from_millis(at - self.now_ms().min(at));
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = changed => {}
                    }
                }
                None => changed.await,
            }
        }
    }
}

/// Counts a request in flight on its connection until the router has answered it.
struct RequestGuard(Arc<Activity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.bytes_written();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_one();
    }
}

/// The client's socket, telling [`Activity`] what moves through it, holding the connection's
/// place under MAX_CONNECTIONS (until the socket closes, after an upgrade too), and rewriting
/// hyper's own empty error answers into JSON.
struct Tracked {
    stream: TcpStream,
    activity: Arc<Activity>,
    _permit: OwnedSemaphorePermit,
    /// A JSON answer replacing hyper's, and how much of it is written.
    replacement: Option<(Vec<u8>, usize)>,
}

impl Tracked {
    fn new(stream: TcpStream, activity: Arc<Activity>, permit: OwnedSemaphorePermit) -> Tracked {
        Tracked { stream, activity, _permit: permit, replacement: None }
    }
}

impl AsyncRead for Tracked {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.stream).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            self.activity.bytes_read();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.replacement.is_none()
            && let Some(json) = replace_hyper_error(buf)
        {
            self.replacement = Some((json, 0));
        }
        let this = &mut *self;
        if let Some((bytes, written)) = &mut this.replacement {
            while *written < bytes.len() {
                let n = ready!(Pin::new(&mut this.stream).poll_write(cx, &bytes[*written..]))?;
                if n == 0 {
                    return Poll::Ready(Ok(0));
                }
                *written += n;
                this.activity.bytes_written();
            }
            // hyper's answer counts as written: it was, in JSON.
            return Poll::Ready(Ok(buf.len()));
        }
        let n = ready!(Pin::new(&mut this.stream).poll_write(cx, buf))?;
        if n > 0 {
            this.activity.bytes_written();
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// hyper's automatic answer to a request it could not parse (a 4xx head with no body and none
/// of the router's headers) replaced by the same status with a catalogue JSON body; `None` for
/// anything else.
fn replace_hyper_error(buf: &[u8]) -> Option<Vec<u8>> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    if head_end != buf.len() {
        return None;
    }
    let head = std::str::from_utf8(buf).ok()?.to_ascii_lowercase();
    let status_line = head.lines().next()?;
    if !status_line.starts_with("http/1.1 4") || head.contains("\r\nx-request-id:") || !head.contains("\r\ncontent-length: 0\r\n") {
        return None;
    }
    let (status, reason, code, message) = match status_line.get(9..12)? {
        "414" => (414, "URI Too Long", "uri_too_long", "the request's URI is too long"),
        "431" => (
            431,
            "Request Header Fields Too Large",
            "header_too_large",
            "the request's headers are too large (at most 96 KiB and 100 fields)",
        ),
        "400" => (400, "Bad Request", "invalid_request", "the request could not be parsed as HTTP/1.1"),
        _ => return None,
    };
    Some(error_response(status, reason, code, message))
}

/// A whole HTTP/1.1 answer in the catalogue's shape, closing the connection.
fn error_response(status: u16, reason: &str, code: &str, message: &str) -> Vec<u8> {
    let body = serde_json::json!({"status": "error", "code": code, "message": message}).to_string();
    format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\
x-content-type-options: nosniff\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hyper_s_own_empty_error_answers_are_rewritten() {
        let hyper_431 = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: Wed, 02 Dec 2026 12:00:00 GMT\r\n\r\n";
        let out = String::from_utf8(replace_hyper_error(hyper_431).expect("rewritten")).expect("utf8");
        assert!(out.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"), "{out}");
        let body = out.split_once("\r\n\r\n").expect("head").1;
        let v: serde_json::Value = serde_json::from_str(body).expect("json");
        assert_eq!(v["code"], "header_too_large");
        assert!(out.contains(&format!("content-length: {}\r\n", body.len())));
        let hyper_414 = b"HTTP/1.1 414 URI Too Long\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        assert!(String::from_utf8_lossy(&replace_hyper_error(hyper_414).expect("414")).contains("\"uri_too_long\""));
        // The router's answers carry x-request-id, or a body: left alone.
        let ours = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nx-request-id: abc\r\n\r\n";
        assert!(replace_hyper_error(ours).is_none());
        let with_body = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\n\r\n{}";
        assert!(replace_hyper_error(with_body).is_none());
        assert!(replace_hyper_error(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_none());
        assert!(replace_hyper_error(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n").is_none());
    }

    #[test]
    fn the_connection_cap_fits_the_file_limit() {
        assert_eq!(fit_to_file_limit(1), 1);
        let fitted = fit_to_file_limit(usize::MAX / 4);
        assert!((1..usize::MAX / 4).contains(&fitted), "{fitted}");
    }
}
