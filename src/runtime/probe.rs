//! `INFERENCE_BACKEND=auto`: which backend is faster on this machine, measured at start on
//! the pack's own models (not a rule about CPU vendors: it is the same answer on any CPU,
//! including ones nobody measured). Each workload is loaded on both backends, run twice to
//! warm up, then both backends are timed in alternation, `ROUNDS` times, so that noise
//! from a shared machine falls on both alike; the lower median wins. Costs about a second.

use std::time::{Duration, Instant};

use super::onnx::OnnxRuntime;
use super::openvino::OpenVinoRuntime;
use super::{ActiveBackend, ModelSession, Workload};

const WARMUP: usize = 2;
const ROUNDS: usize = 7;

/// Which backend won, and the figures behind it (for the log and `/health`).
#[derive(Debug, Clone)]
pub struct Outcome {
    pub winner: ActiveBackend,
    pub reason: String,
    /// Median time of one pass over the workloads, per backend (ONNX Runtime, OpenVINO).
    pub medians: Option<(Duration, Duration)>,
}

/// Times `workloads` on both backends and picks the faster. Any failure keeps ONNX Runtime,
/// the reference backend, with the reason.
pub fn compare(ort: &OnnxRuntime, ov: &OpenVinoRuntime, workloads: &[Workload]) -> Outcome {
    let fallback = |winner, reason: String| Outcome { winner, reason, medians: None };
    let mut ort_sessions = Vec::new();
    let mut ov_sessions = Vec::new();
    for w in workloads {
        match ort.load_session(&w.path) {
            Ok(s) => ort_sessions.push(Box::new(s) as Box<dyn ModelSession>),
            Err(e) => return fallback(ActiveBackend::OnnxRuntime, format!("auto: the probe could not load a model on ONNX Runtime ({e})")),
        }
        match ov.load(&w.path) {
            Ok(s) => ov_sessions.push(Box::new(s) as Box<dyn ModelSession>),
            Err(e) => return fallback(ActiveBackend::OnnxRuntime, format!("auto: OpenVINO could not load a model ({e})")),
        }
    }
    // A dimension the model fixes wins over the workload's (a detector exported at 640, a
    // recognizer taking 128 px): the probe runs what the model accepts.
    let workloads: Vec<Workload> = workloads
        .iter()
        .zip(&ort_sessions)
        .map(|(w, s)| {
            let declared = &s.signature().input;
            let shape = w.shape.iter().enumerate().map(|(i, &d)| declared.get(i).filter(|&&v| v > 0).map_or(d, |&v| v as usize)).collect();
            Workload { path: w.path.clone(), shape }
        })
        .collect();
    let workloads = workloads.as_slice();
    let inputs: Vec<Vec<f32>> = workloads.iter().map(|w| pattern(w.shape.iter().product())).collect();
    let mut ort_times = Vec::with_capacity(ROUNDS);
    let mut ov_times = Vec::with_capacity(ROUNDS);
    for round in 0..WARMUP + ROUNDS {
        let a = pass(&mut ort_sessions, workloads, &inputs);
        let b = pass(&mut ov_sessions, workloads, &inputs);
        let (a, b) = match (a, b) {
            (Ok(a), Ok(b)) => (a, b),
            (_, Err(e)) => return fallback(ActiveBackend::OnnxRuntime, format!("auto: OpenVINO failed a probe run ({e})")),
            (Err(e), _) => {
                return fallback(ActiveBackend::OnnxRuntime, format!("auto: the probe failed on ONNX Runtime ({e}); keeping it"));
            }
        };
        if round >= WARMUP {
            ort_times.push(a);
            ov_times.push(b);
        }
    }
    let (ort_med, ov_med) = (median(&mut ort_times), median(&mut ov_times));
    let winner = if ov_med < ort_med { ActiveBackend::OpenVino } else { ActiveBackend::OnnxRuntime };
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let reason = format!(
        "auto: openvino {:.1} ms against onnxruntime {:.1} ms per probe pass (median of {ROUNDS}, interleaved)",
        ms(ov_med),
        ms(ort_med)
    );
    Outcome { winner, reason, medians: Some((ort_med, ov_med)) }
}

fn pass(sessions: &mut [Box<dyn ModelSession>], workloads: &[Workload], inputs: &[Vec<f32>]) -> Result<Duration, String> {
    let started = Instant::now();
    for ((s, w), input) in sessions.iter_mut().zip(workloads).zip(inputs) {
        s.run(&w.shape, input)?;
    }
    Ok(started.elapsed())
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// A fixed, image-like input in about [-1, 1] (not zeros: some kernels skip zeros).
fn pattern(len: usize) -> Vec<f32> {
    (0..len).map(|i| ((i.wrapping_mul(7919) % 255) as f32 - 127.5) / 128.0).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_is_the_middle_value() {
        let mut v = [5, 1, 3].map(Duration::from_millis);
        assert_eq!(median(&mut v), Duration::from_millis(3));
        assert_eq!(median(&mut []), Duration::ZERO);
    }

    #[test]
    fn the_pattern_is_image_like() {
        let p = pattern(1000);
        assert!(p.iter().all(|v| (-1.0..=1.0).contains(v)));
        assert!(p.iter().any(|&v| v != p[0]));
    }
}
