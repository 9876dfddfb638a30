//! `GET /api/stream`: a WebSocket of video frames in, one JSON answer per processed frame out.
//! The socket's two halves run apart: the reader parses each message, applies the limits and
//! puts the frame in a one-slot mailbox (a newer frame replaces one not yet processed, counted
//! as dropped); the processor takes the newest frame, runs the use case
//! ([`Service::stream_frame`](crate::service::Service::stream_frame)) and sends the answer. A
//! slow consumer therefore blocks only the processor, never a queue. Close codes: 1008 (bad or
//! missing credentials, frame rate over STREAM_MAX_FPS), 1009 (frame over
//! STREAM_MAX_FRAME_BYTES), 1013 (STREAM_MAX_STREAMS open), 1011 (the engine stopped).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::response::Response;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Map, Value, json};
use tokio::sync::Mutex;

use super::AppState;
use crate::error::ErrorCode;
use crate::service::stream::{FrameResult, StreamState};
use crate::stream::frame::{self, Credential, FrameError, Incoming, PROTOCOL};
use crate::stream::metrics;
use crate::stream::session::{Mailbox, RateLimit, ms};

/// How long a client of a protected server has to send its credentials.
const AUTH_WAIT: Duration = Duration::from_secs(10);

pub const CLOSE_POLICY: u16 = 1008;
pub const CLOSE_TOO_BIG: u16 = 1009;
pub const CLOSE_INTERNAL: u16 = 1011;
pub const CLOSE_TRY_LATER: u16 = 1013;

/// Live recognition over a WebSocket.
#[utoipa::path(
    get,
    path = "/api/stream",
    tag = "recognition",
    description = "WebSocket upgrade (not plain HTTP). Send frames as binary messages (a JPEG, PNG or WebP) or as JSON text \
`{\"frame\": \"<base64 or data: URL>\", ...}` whose other fields are echoed. Each processed frame is answered with \
`{\"type\": \"frame\", \"frame_id\", \"faces\": [{\"bbox\", \"landmarks\", \"det_score\", \"track_id\", \"name\", \"similarity\", \"identified\"}], \
\"identified\", \"dropped\", \"timings\": {\"queue_ms\", \"detect_ms\", \"identify_ms\", \"total_ms\"}}`; `frame_id` counts the frames \
received (from 1), `dropped` the frames replaced by a newer one before processing. Faces are tracked across frames; a track is \
identified when new, every STREAM_REFRESH_FRAMES frames, or on a clearly better face. With authentication on, send \
`{\"api_key\": \"...\"}` or `{\"token\": \"<JWT>\"}` as the first message, or offer the subprotocols `facerec.v1, facerec.key.<key>` \
(or `facerec.bearer.<JWT>`) in `Sec-WebSocket-Protocol`. `{\"log\": true}` in the first message sends identifications to the audit \
trail. Close codes: 1008 credentials or frame rate (STREAM_MAX_FPS), 1009 frame size (STREAM_MAX_FRAME_BYTES), 1013 too many streams \
(STREAM_MAX_STREAMS).",
    responses((status = 101, description = "Switching protocols: the WebSocket is open; a `{\"type\": \"ready\"}` message follows once authenticated"))
)]
pub async fn stream(ws: WebSocketUpgrade, State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let credential = headers
        .get_all(axum::http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(frame::credentials_from_protocols);
    // The library's own cap is far above the limit, so that an oversized frame is answered with
    // 1009 and a reason by `reader` instead of a dropped connection.
    let cap = st.streams.max_frame_bytes().saturating_mul(2).saturating_add(64 * 1024);
    ws.protocols([PROTOCOL]).max_message_size(cap).max_frame_size(cap).on_upgrade(move |socket| run(socket, st, credential))
}

type Sink = Arc<Mutex<SplitSink<WebSocket, Message>>>;

/// A frame waiting for the processor.
struct Pending {
    frame_id: u64,
    bytes: Vec<u8>,
    extra: Map<String, Value>,
    arrived: Instant,
    /// The stream's `log` setting (from its first message).
    log: bool,
}

/// Figures one stream shares between its halves.
#[derive(Default)]
struct Counts {
    dropped: AtomicU64,
}

async fn close(sink: &Sink, code: u16, reason: impl Into<String>) {
    let mut reason: String = reason.into();
    // A close frame's reason is at most 123 bytes.
    while reason.len() > 123 {
        reason.pop();
    }
    let mut s = sink.lock().await;
    let _ = s.send(Message::Close(Some(CloseFrame { code, reason: reason.into() }))).await;
    let _ = s.close().await;
}

async fn send_json(sink: &Sink, v: &Value) -> bool {
    sink.lock().await.send(Message::Text(v.to_string().into())).await.is_ok()
}

async fn run(socket: WebSocket, st: Arc<AppState>, credential: Option<Credential>) {
    let (tx, rx) = socket.split();
    let sink: Sink = Arc::new(Mutex::new(tx));
    let m = metrics::global();
    let hub = &st.streams.hub;
    let outcome = match hub.enter() {
        // The slot is given back before the close frame goes out, so that a client that opens its
        // next stream as soon as this one is closed finds the place free.
        Some(slot) => {
            let outcome = session(rx, &sink, &st, credential).await;
            drop(slot);
            outcome
        }
        None => Some((CLOSE_TRY_LATER, format!("too many streams: {} open (STREAM_MAX_STREAMS)", hub.max()))),
    };
    match outcome {
        Some((code, why)) => {
            m.refused();
            close(&sink, code, why).await;
        }
        None => close(&sink, 1000, "").await,
    }
}

/// One admitted stream, from its credentials to its last answer: why it ends (`None`: the client
/// closed or the socket failed).
async fn session(mut rx: SplitStream<WebSocket>, sink: &Sink, st: &Arc<AppState>, credential: Option<Credential>) -> Option<(u16, String)> {
    let m = metrics::global();
    let _open = m.opened();
    let limit = st.streams.max_frame_bytes();
    // Credentials: from the subprotocols, else the first message (which may hold a frame too).
    let mut first: Option<Incoming> = None;
    if !st.auth.is_open() {
        let cred = match credential {
            Some(c) => Some(c),
            None => match tokio::time::timeout(AUTH_WAIT, next_message(&mut rx, limit)).await {
                Ok(Some(Ok(msg))) => {
                    let c = msg.credential.clone();
                    first = Some(msg);
                    c
                }
                Ok(Some(Err(Refusal::Close(code, why)))) => return Some((code, why)),
                _ => None,
            },
        };
        let verdict = match &cred {
            Some(c) => st.auth.check(&c.headers(), SystemTime::now()),
            None => Err("credentials required: send {\"api_key\": ...} or {\"token\": ...} first, or use Sec-WebSocket-Protocol"),
        };
        if let Err(why) = verdict {
            return Some((CLOSE_POLICY, format!("unauthorized: {why}")));
        }
    }
    let ready = json!({
        "type": "ready",
        "protocol": PROTOCOL,
        "max_frame_bytes": limit,
        "max_fps": st.streams.config.stream_max_fps,
    });
    if !send_json(sink, &ready).await {
        return None;
    }
    let state = StreamState::new(st.streams.tracker_options());
    let mailbox = Arc::new(Mailbox::<Pending>::new());
    let counts = Arc::new(Counts::default());
    let processor = tokio::spawn(process(Arc::clone(st), state, Arc::clone(&mailbox), Arc::clone(sink), Arc::clone(&counts)));
    let outcome = reader(&mut rx, first, &mailbox, &counts, limit, st.streams.config.stream_max_fps, sink).await;
    if mailbox.close() {
        counts.dropped.fetch_add(1, Ordering::Relaxed);
        m.dropped(1);
    }
    let _ = processor.await;
    outcome
}

/// Why the reader stopped taking messages.
enum Refusal {
    Close(u16, String),
}

/// The next data message, parsed; `None` when the client closed or the socket failed. Refusals
/// that end the stream come back as `Err`; a bad text message too (a client that cannot speak
/// the protocol is told so and closed: 1008).
async fn next_message(rx: &mut SplitStream<WebSocket>, limit: usize) -> Option<Result<Incoming, Refusal>> {
    loop {
        let msg = match rx.next().await? {
            Ok(m) => m,
            Err(e) => {
                // tungstenite's own size cap (far above the limit): "Space limit exceeded: Message too long".
                let text = e.to_string();
                if text.contains("Space limit exceeded") || text.contains("too long") {
                    return Some(Err(Refusal::Close(CLOSE_TOO_BIG, format!("frame over {limit} bytes (STREAM_MAX_FRAME_BYTES)"))));
                }
                return None;
            }
        };
        let parsed = match msg {
            Message::Binary(b) => frame::binary(b.to_vec(), limit),
            Message::Text(t) => frame::text(t.as_str(), limit),
            Message::Close(_) => return None,
            Message::Ping(_) | Message::Pong(_) => continue,
        };
        return Some(parsed.map_err(|e| match e {
            FrameError::TooBig { .. } => Refusal::Close(CLOSE_TOO_BIG, e.to_string()),
            other => Refusal::Close(CLOSE_POLICY, other.to_string()),
        }));
    }
}

/// Reads until the client closes or breaks a limit (returned as the close code and reason).
async fn reader(
    rx: &mut SplitStream<WebSocket>,
    first: Option<Incoming>,
    mailbox: &Mailbox<Pending>,
    counts: &Counts,
    limit: usize,
    max_fps: u32,
    sink: &Sink,
) -> Option<(u16, String)> {
    let m = metrics::global();
    let mut rate = RateLimit::new(max_fps);
    let mut frame_id = 0u64;
    let mut log: Option<bool> = None;
    let mut next = first.map(Ok);
    loop {
        let msg = match next.take() {
            Some(m) => m,
            None => match next_message(rx, limit).await {
                Some(m) => m,
                None => return None,
            },
        };
        let msg = match msg {
            Ok(msg) => msg,
            Err(Refusal::Close(code, why)) => return Some((code, why)),
        };
        let settled = log.is_some();
        let log = *log.get_or_insert(msg.log.unwrap_or(false));
        let Some(bytes) = msg.frame else {
            if settled && (msg.credential.is_some() || msg.log.is_some()) {
                // Settings after the first message change nothing; say so once per message.
                let note = json!({"type": "error", "code": ErrorCode::InvalidRequest, "message": "credentials and `log` are read from the first message only"});
                if !send_json(sink, &note).await {
                    return None;
                }
            }
            continue;
        };
        frame_id += 1;
        m.frame_in();
        if !rate.allow(Instant::now()) {
            return Some((CLOSE_POLICY, format!("frame rate over {max_fps} frames a second (STREAM_MAX_FPS)")));
        }
        if mailbox.put(Pending { frame_id, bytes, extra: msg.extra, arrived: Instant::now(), log }).is_some() {
            counts.dropped.fetch_add(1, Ordering::Relaxed);
            m.dropped(1);
        }
    }
}

/// Takes the newest frame, answers it, until the mailbox closes or the client is gone.
async fn process(st: Arc<AppState>, mut state: StreamState, mailbox: Arc<Mailbox<Pending>>, sink: Sink, counts: Arc<Counts>) {
    let m = metrics::global();
    while let Some(p) = mailbox.take().await {
        let started = Instant::now();
        state.log = p.log;
        let result = st.service.stream_frame(&mut state, p.frame_id, p.bytes, &p.extra).await;
        let dropped = counts.dropped.load(Ordering::Relaxed);
        let answer = match result {
            Ok(r) => {
                let a = answer(p.frame_id, &r, dropped, p.arrived, started, p.extra);
                m.processed(p.arrived.elapsed(), r.faces.len(), r.identified);
                a
            }
            Err(e) => {
                m.failed();
                if e.code == ErrorCode::Internal {
                    close(&sink, CLOSE_INTERNAL, "inference failed").await;
                    return;
                }
                let mut v = p.extra;
                v.insert("type".into(), json!("error"));
                v.insert("frame_id".into(), json!(p.frame_id));
                v.insert("code".into(), json!(e.code));
                v.insert("message".into(), json!(e.message));
                v.insert("dropped".into(), json!(dropped));
                Value::Object(v)
            }
        };
        if !send_json(&sink, &answer).await {
            return;
        }
    }
}

/// One frame's answer: the client's fields, then the server's (which win).
fn answer(frame_id: u64, r: &FrameResult, dropped: u64, arrived: Instant, started: Instant, mut v: Map<String, Value>) -> Value {
    v.insert("type".into(), json!("frame"));
    v.insert("frame_id".into(), json!(frame_id));
    v.insert("width".into(), json!(r.width));
    v.insert("height".into(), json!(r.height));
    v.insert("faces".into(), json!(r.faces));
    v.insert("identified".into(), json!(r.identified));
    v.insert("dropped".into(), json!(dropped));
    v.insert(
        "timings".into(),
        json!({
            "queue_ms": ms(started.saturating_duration_since(arrived)),
            "detect_ms": ms(r.detect),
            "identify_ms": ms(r.identify),
            "total_ms": ms(arrived.elapsed()),
        }),
    );
    Value::Object(v)
}
