//! A small HTTP/1.1 load generator: N keep-alive connections, each sending the next body
//! as soon as the previous answer is read (closed loop), for a fixed time, on reqwest (one
//! client per connection). Latency per request, answers by status, and the
//! server's x-queue-time / x-inference-time headers.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What to send.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub path: String,
    /// JSON bodies, used in turn.
    pub bodies: Vec<Vec<u8>>,
}

/// One level's figures.
#[derive(Debug, Clone, Default)]
pub struct LevelReport {
    pub connections: usize,
    pub seconds: f64,
    /// Latencies (ms) of 200 answers, sorted.
    pub ok_ms: Vec<f64>,
    /// Answers by status, 200 included.
    pub by_status: BTreeMap<u16, u64>,
    /// Connection or framing failures.
    pub io_errors: u64,
    /// x-queue-time and x-inference-time of 200 answers (ms), sorted.
    pub queue_ms: Vec<f64>,
    pub inference_ms: Vec<f64>,
}

fn pct(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

impl LevelReport {
    pub fn rps(&self) -> f64 {
        self.ok_ms.len() as f64 / self.seconds
    }
    pub fn p50(&self) -> f64 {
        pct(&self.ok_ms, 0.5)
    }
    pub fn p99(&self) -> f64 {
        pct(&self.ok_ms, 0.99)
    }
    fn count(&self, status: u16) -> u64 {
        self.by_status.get(&status).copied().unwrap_or(0)
    }
    fn other_errors(&self) -> String {
        let others: Vec<String> =
            self.by_status.iter().filter(|(s, _)| **s != 200 && **s != 429).map(|(s, n)| format!("{s}: {n}")).collect();
        if others.is_empty() { "none".into() } else { others.join(", ") }
    }

    /// One printed line.
    pub fn line(&self) -> String {
        format!(
            "{:>3} conn: {:7.1} req/s  p50 {:7.2} ms  p99 {:7.2} ms  ok {}  429 {}  other errors {}  io errors {}  (server p50: queue {:.2} ms, inference {:.2} ms)",
            self.connections,
            self.rps(),
            self.p50(),
            self.p99(),
            self.count(200),
            self.count(429),
            self.other_errors(),
            self.io_errors,
            pct(&self.queue_ms, 0.5),
            pct(&self.inference_ms, 0.5)
        )
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "connections": self.connections, "seconds": self.seconds, "rps": self.rps(), "p50_ms": self.p50(), "p99_ms": self.p99(),
            "ok": self.count(200), "rejected_429": self.count(429),
            "by_status": self.by_status.iter().map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<_, _>>(),
            "io_errors": self.io_errors, "queue_p50_ms": pct(&self.queue_ms, 0.5), "inference_p50_ms": pct(&self.inference_ms, 0.5),
        })
    }
}

/// One answer's status and timing headers.
struct Answer {
    status: u16,
    queue_ms: Option<f64>,
    inference_ms: Option<f64>,
}

/// Sends one body and reads the whole answer (framing is reqwest's).
async fn exchange(client: &reqwest::Client, url: &str, body: &[u8]) -> reqwest::Result<Answer> {
    let response = client.post(url).header(reqwest::header::CONTENT_TYPE, "application/json").body(body.to_vec()).send().await?;
    let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok());
    let answer = Answer { status: response.status().as_u16(), queue_ms: header("x-queue-time"), inference_ms: header("x-inference-time") };
    response.bytes().await?;
    Ok(answer)
}

/// `connections` closed-loop connections for `warm_up` (not counted) then `measure`.
pub async fn drive(target: &Target, connections: usize, warm_up: Duration, measure: Duration) -> anyhow::Result<LevelReport> {
    anyhow::ensure!(!target.bodies.is_empty(), "nothing to send");
    let bodies: Arc<Vec<Vec<u8>>> = Arc::new(target.bodies.clone());
    let url: Arc<str> = format!("http://{}{}", target.addr, target.path).into();
    let start = Instant::now();
    let (from, until) = (start + warm_up, start + warm_up + measure);
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..connections {
        let (bodies, url) = (Arc::clone(&bodies), Arc::clone(&url));
        // One client per connection, keeping at most one idle connection: a keep-alive
        // connection per closed loop, reopened after a failure.
        let client = reqwest::Client::builder().pool_max_idle_per_host(1).tcp_nodelay(true).no_proxy().build()?;
        tasks.spawn(async move {
            let mut r = LevelReport::default();
            let mut i = c;
            loop {
                let now = Instant::now();
                if now >= until {
                    break;
                }
                let sent = Instant::now();
                let result = exchange(&client, &url, &bodies[i % bodies.len()]).await;
                let done = Instant::now();
                i += 1;
                let counted = done >= from && done <= until;
                match result {
                    Ok(a) => {
                        if counted {
                            *r.by_status.entry(a.status).or_default() += 1;
                            if a.status == 200 {
                                r.ok_ms.push((done - sent).as_secs_f64() * 1000.0);
                                r.queue_ms.extend(a.queue_ms);
                                r.inference_ms.extend(a.inference_ms);
                            }
                        }
                    }
                    Err(e) => {
                        if counted || e.is_connect() {
                            r.io_errors += 1;
                        }
                        if e.is_connect() {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
            }
            r
        });
    }
    let mut total = LevelReport { connections, seconds: measure.as_secs_f64(), ..LevelReport::default() };
    while let Some(joined) = tasks.join_next().await {
        let r = joined?;
        total.ok_ms.extend(r.ok_ms);
        total.queue_ms.extend(r.queue_ms);
        total.inference_ms.extend(r.inference_ms);
        total.io_errors += r.io_errors;
        for (s, n) in r.by_status {
            *total.by_status.entry(s).or_default() += n;
        }
    }
    for v in [&mut total.ok_ms, &mut total.queue_ms, &mut total.inference_ms] {
        v.sort_by(f64::total_cmp);
    }
    Ok(total)
}
