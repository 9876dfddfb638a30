//! Helpers of the stream tests: a scene of two real people (deepface fixtures, see
//! tests/fixtures/SOURCES.md) moving across a 640x480 canvas, rendered as JPEG frames; a
//! WebSocket client that sends frames at a fixed rate and collects the answers (optionally
//! reading slowly); the server's resident memory.

use std::io::Cursor;
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use image::{ImageFormat, RgbImage};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use super::fixture;

pub const WIDTH: u32 = 640;
pub const HEIGHT: u32 = 480;

/// A face cut from a fixture photo around its golden box (1.6 times its size), scaled to `w`.
fn face_patch(name: &str, bbox: [f32; 4], w: u32) -> RgbImage {
    let img = image::load_from_memory(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}")).to_rgb8();
    let (cx, cy) = ((bbox[0] + bbox[2]) / 2.0, (bbox[1] + bbox[3]) / 2.0);
    let (hw, hh) = ((bbox[2] - bbox[0]) * 0.8, (bbox[3] - bbox[1]) * 0.8);
    let x0 = (cx - hw).max(0.0) as u32;
    let y0 = (cy - hh).max(0.0) as u32;
    let x1 = ((cx + hw) as u32).min(img.width());
    let y1 = ((cy + hh) as u32).min(img.height());
    let crop = image::imageops::crop_imm(&img, x0, y0, x1 - x0, y1 - y0).to_image();
    let h = (f64::from(crop.height()) * f64::from(w) / f64::from(crop.width())).round() as u32;
    image::imageops::resize(&crop, w, h, image::imageops::FilterType::Triangle)
}

/// Who is in the scene: the user names the tests enrol, and their photos.
pub const TOP: &str = "alice"; // deepface id01
pub const BOTTOM: &str = "bob"; // deepface id05
/// Enrolment photos (not the ones the frames are made from).
pub const TOP_ENROL: &[&str] = &["img5.jpg", "img6.jpg"];
pub const BOTTOM_ENROL: &[&str] = &["img16.jpg"];

/// `n` JPEG frames: `alice` (img10.jpg) moving left to right in the top half, `bob`
/// (img17.jpg) right to left in the bottom half, on a grey canvas.
pub fn scene(n: usize) -> Vec<Vec<u8>> {
    let top = face_patch("img10.jpg", [96.0, 99.0, 303.0, 392.0], 140);
    let bottom = face_patch("img17.jpg", [372.0, 82.0, 589.0, 390.0], 140);
    let span = |p: &RgbImage| i64::from(WIDTH - p.width());
    (0..n)
        .map(|i| {
            let t = if n > 1 { i as f64 / (n - 1) as f64 } else { 0.0 };
            let mut canvas = RgbImage::from_pixel(WIDTH, HEIGHT, image::Rgb([118, 118, 118]));
            image::imageops::overlay(&mut canvas, &top, (t * span(&top) as f64) as i64, 10);
            image::imageops::overlay(&mut canvas, &bottom, ((1.0 - t) * span(&bottom) as f64) as i64, 250);
            let mut jpeg = Vec::new();
            canvas.write_to(&mut Cursor::new(&mut jpeg), ImageFormat::Jpeg).expect("encode frame");
            jpeg
        })
        .collect()
}

/// What a run of a stream client saw.
#[derive(Debug, Default)]
pub struct Run {
    /// Every `type: frame` answer, in arrival order.
    pub answers: Vec<Value>,
    /// Other messages (ready, errors).
    pub others: Vec<Value>,
    pub sent: usize,
    /// Close frame received (code, reason), if any.
    pub closed: Option<(u16, String)>,
    pub elapsed: Duration,
}

impl Run {
    /// Frames the server reported dropped (in its last answer).
    pub fn dropped(&self) -> u64 {
        self.answers.last().and_then(|a| a["dropped"].as_u64()).unwrap_or(0)
    }
}

/// How a client behaves.
#[derive(Debug, Clone)]
pub struct ClientPlan {
    pub fps: f64,
    /// Pause after reading each message (a slow consumer).
    pub read_pause: Duration,
    /// Subprotocols offered (`Sec-WebSocket-Protocol`).
    pub protocols: Option<String>,
    /// A text message sent before the frames (credentials, `log`).
    pub hello: Option<Value>,
    /// Bytes of the client's socket receive buffer (small: the server's writes block sooner).
    pub recv_buffer: Option<u32>,
    /// When non-zero: frames go as JSON text (base64) with a `pad` field of this many bytes,
    /// which the server echoes: large answers, so a slow reader fills the sockets' buffers soon.
    pub pad: usize,
    pub deadline: Duration,
}

impl Default for ClientPlan {
    fn default() -> Self {
        ClientPlan {
            fps: 15.0,
            read_pause: Duration::ZERO,
            protocols: None,
            hello: None,
            recv_buffer: None,
            pad: 0,
            deadline: Duration::from_secs(180),
        }
    }
}

/// Connects to `/api/stream` on `port`, sends `frames` at `plan.fps` and reads answers until the
/// last frame is answered, the server closes, or the deadline passes.
pub async fn run_stream(port: u16, frames: &[Vec<u8>], plan: &ClientPlan) -> Run {
    let started = Instant::now();
    let mut req = format!("ws://127.0.0.1:{port}/api/stream").into_client_request().expect("request");
    if let Some(p) = &plan.protocols {
        req.headers_mut().insert("sec-websocket-protocol", p.parse().expect("header"));
    }
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    if let Some(n) = plan.recv_buffer {
        socket.set_recv_buffer_size(n).expect("SO_RCVBUF");
    }
    let tcp = socket.connect(([127, 0, 0, 1], port).into()).await.expect("connect");
    let (ws, _) = tokio_tungstenite::client_async(req, tcp).await.expect("websocket handshake");
    let (mut tx, mut rx) = ws.split();
    let total = frames.len();
    let owned: Vec<Vec<u8>> = frames.to_vec();
    let hello = plan.hello.clone();
    let pad = "p".repeat(plan.pad);
    let period = Duration::from_secs_f64(1.0 / plan.fps);
    let sender = tokio::spawn(async move {
        if let Some(h) = hello
            && tx.send(Message::Text(h.to_string().into())).await.is_err()
        {
            return (tx, 0);
        }
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sent = 0;
        for f in owned {
            tick.tick().await;
            let msg = if pad.is_empty() {
                Message::Binary(f.into())
            } else {
                let b64 = base64::engine::general_purpose::STANDARD.encode(&f);
                Message::Text(serde_json::json!({"frame": b64, "pad": pad}).to_string().into())
            };
            if tx.send(msg).await.is_err() {
                break;
            }
            sent += 1;
        }
        (tx, sent)
    });
    let mut run = Run::default();
    let deadline = started + plan.deadline;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = match tokio::time::timeout(left, rx.next()).await {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(_))) | Ok(None) => break,
            Err(_) => panic!("no answer to the last frame within {:?}: {} answers so far", plan.deadline, run.answers.len()),
        };
        match msg {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(t.as_str()).expect("answers are JSON");
                let last = v["type"] == "frame" && v["frame_id"].as_u64() == Some(total as u64);
                if v["type"] == "frame" {
                    run.answers.push(v);
                } else {
                    run.others.push(v);
                }
                if last {
                    break;
                }
            }
            Message::Close(c) => {
                run.closed = c.map(|c| (u16::from(c.code), c.reason.to_string()));
                break;
            }
            _ => {}
        }
        if !plan.read_pause.is_zero() {
            tokio::time::sleep(plan.read_pause).await;
        }
    }
    let (mut tx, sent) = sender.await.expect("sender");
    run.sent = sent;
    let _ = tx.send(Message::Close(None)).await;
    run.elapsed = started.elapsed();
    run
}

pub type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A stream connection, offering `protocols` when given.
pub async fn connect(port: u16, protocols: Option<&str>) -> Ws {
    let mut req = format!("ws://127.0.0.1:{port}/api/stream").into_client_request().expect("request");
    if let Some(p) = protocols {
        req.headers_mut().insert("sec-websocket-protocol", p.parse().expect("header"));
    }
    tokio_tungstenite::connect_async(req).await.expect("websocket handshake").0
}

/// The next text message as JSON (bounded wait).
pub async fn next_text(ws: &mut Ws) -> Value {
    loop {
        match tokio::time::timeout(Duration::from_secs(60), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return serde_json::from_str(t.as_str()).expect("JSON"),
            Ok(Some(Ok(_))) => continue,
            other => panic!("no text message: {other:?}"),
        }
    }
}

/// Waits (bounded) for the server's close frame: (code, reason).
pub async fn next_close(ws: &mut Ws) -> (u16, String) {
    loop {
        match tokio::time::timeout(Duration::from_secs(60), ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(c))))) => return (u16::from(c.code), c.reason.to_string()),
            Ok(Some(Ok(_))) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    }
}

/// The resident memory of process `pid`, in kB (VmRSS of /proc/PID/status).
pub fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).expect("VmRSS")
}
