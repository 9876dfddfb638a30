//! The live-stream use case: one frame of a stream is detected (every frame), its faces are
//! associated with the stream's tracks, and only the faces whose track needs an identity (new,
//! due for a refresh, or a clearly better view) are embedded and compared with the users. With
//! `log` on, each frame that identified faces is recorded in the audit trail like `/recognize`
//! (its identified faces, their aligned crops).

use std::time::{Duration, Instant};

use ::image::RgbImage;
use base64::Engine as _;
use serde_json::{Map, Value, json};

use super::Service;
use crate::audit::{AuditRecord, Crop};
use crate::error::ApiError;
use crate::stream::tracker::{Tracker, TrackerOptions};

/// What a stream keeps between frames.
#[derive(Debug)]
pub struct StreamState {
    tracker: Tracker,
    /// Send identifications to the audit trail.
    pub log: bool,
}

impl StreamState {
    pub fn new(opts: TrackerOptions) -> StreamState {
        StreamState { tracker: Tracker::new(opts), log: false }
    }
}

/// One face of a frame's answer.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StreamFace {
    pub bbox: [f32; 4],
    pub landmarks: [[f32; 2]; 5],
    pub det_score: f32,
    pub track_id: u64,
    pub name: String,
    pub similarity: f32,
    /// The identity was computed on this frame (not carried by the track).
    pub identified: bool,
}

/// What one frame gave.
#[derive(Debug, Clone)]
pub struct FrameResult {
    pub faces: Vec<StreamFace>,
    pub width: u32,
    pub height: u32,
    /// Engine queue wait + decode + detection.
    pub detect: Duration,
    /// Embedding and comparison of the faces identified (zero when none).
    pub identify: Duration,
    /// Faces embedded on this frame.
    pub identified: usize,
}

fn round(v: f32, digits: i32) -> f32 {
    let f = 10f32.powi(digits);
    (v * f).round() / f
}

impl Service {
    /// Detects frame `frame_id` of a stream, tracks its faces and identifies those that need it.
    /// `extra` is the client's echoed fields (for the audit line).
    pub async fn stream_frame(
        &self,
        state: &mut StreamState,
        frame_id: u64,
        bytes: Vec<u8>,
        extra: &Map<String, Value>,
    ) -> Result<FrameResult, ApiError> {
        let t = Instant::now();
        let analysis = self.engine.detect(bytes).await?;
        let detect = t.elapsed();
        let dets: Vec<([f32; 4], f32)> = analysis.faces.iter().map(|f| (f.bbox, f.det_score)).collect();
        let assigned = state.tracker.update(frame_id, &dets);
        let wanted: Vec<usize> = assigned.iter().enumerate().filter(|(_, a)| a.identify).map(|(i, _)| i).collect();
        let t = Instant::now();
        let mut crops: Vec<Option<RgbImage>> = analysis.crops.into_iter().map(Some).collect();
        let mut chosen: Vec<RgbImage> = wanted.iter().filter_map(|&i| crops.get_mut(i).and_then(Option::take)).collect();
        // The crops go to the engine; a logging stream keeps a copy for the audit trail.
        let to_embed = if state.log { chosen.clone() } else { std::mem::take(&mut chosen) };
        let embeddings = self.engine.embed_faces(to_embed).await?;
        let threshold = self.options.sim_threshold;
        let mut faces = Vec::with_capacity(assigned.len());
        let mut fresh = wanted.iter().zip(embeddings.iter()).peekable();
        for (i, (a, f)) in assigned.into_iter().zip(&analysis.faces).enumerate() {
            let identity = match fresh.peek() {
                Some(&(&w, emb)) if w == i => {
                    let best = self.gallery.best(emb);
                    let score = best.as_ref().map_or(0.0, |m| m.score);
                    let user = best.filter(|m| m.score >= threshold).map(|m| m.name);
                    fresh.next();
                    Some((state.tracker.identify(a.track_id, frame_id, &f.bbox, f.det_score, user, score), true))
                }
                _ => a.identity.map(|id| (id, false)),
            };
            let (name, similarity, identified) = match identity {
                Some((id, fresh)) => (id.name, id.similarity, fresh),
                None => ("Unknown".to_string(), 0.0, false),
            };
            faces.push(StreamFace {
                bbox: f.bbox.map(|v| round(v, 1)),
                landmarks: f.kps.map(|p| p.map(|v| round(v, 1))),
                det_score: round(f.det_score, 4),
                track_id: a.track_id,
                name,
                similarity: round(similarity, 6),
                identified,
            });
        }
        let identify = if wanted.is_empty() { Duration::ZERO } else { t.elapsed() };
        if state.log && !chosen.is_empty() {
            self.log_stream_frame(frame_id, &faces, chosen, extra).await;
        }
        Ok(FrameResult { faces, width: analysis.width, height: analysis.height, detect, identify, identified: wanted.len() })
    }

    /// Records a frame's identified faces in the audit trail: a line shaped like `/recognize`'s
    /// (`bboxes` with `name`, `similarity` and the face's aligned crop as base64 PNG, plus `source`,
    /// `frame_id`, `track_id` and the client's fields) and each crop under its name in the photo folder.
    async fn log_stream_frame(&self, frame_id: u64, faces: &[StreamFace], crops: Vec<RgbImage>, extra: &Map<String, Value>) {
        let identified: Vec<&StreamFace> = faces.iter().filter(|f| f.identified).collect();
        let pngs: Vec<Option<Vec<u8>>> = crops
            .into_iter()
            .map(|img| {
                let mut png = Vec::new();
                img.write_to(&mut std::io::Cursor::new(&mut png), ::image::ImageFormat::Png).ok().map(|_| png)
            })
            .collect();
        let mut line = extra.clone();
        line.insert("source".into(), json!("stream"));
        line.insert("frame_id".into(), json!(frame_id));
        let entries = identified
            .iter()
            .zip(&pngs)
            .map(|(f, png)| {
                let crop = png.as_ref().map(|p| base64::engine::general_purpose::STANDARD.encode(p));
                json!({"bbox": f.bbox, "track_id": f.track_id, "det_score": f.det_score, "name": f.name, "similarity": f.similarity, "crop": crop})
            })
            .collect();
        line.insert("bboxes".into(), Value::Array(entries));
        let crops = identified
            .iter()
            .zip(pngs)
            .enumerate()
            .filter_map(|(i, (f, png))| {
                png.map(|bytes| Crop { name: f.name.clone(), bytes, ext: "png", at: Some(format!("/bboxes/{i}/crop")) })
            })
            .collect();
        if let Err(e) = self.audit.record(AuditRecord { line: Value::Object(line), crops }).await {
            tracing::debug!(error = %e, "stream frame answered without its full audit record");
        }
    }
}
