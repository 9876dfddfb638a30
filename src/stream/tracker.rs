//! Faces followed across the frames of one stream: each frame's detections are associated with
//! the live tracks by box overlap (IoU, greedily, best pair first), so a face keeps its
//! `track_id` while it moves. A track's identity is (re)computed only when it is needed: a new
//! track, every `refresh_frames` frames, or a clearly better view of the face (detector score
//! times box side, `better_factor` times the one it was identified on). A steady scene costs
//! detection only. Pure logic: no engine, no I/O.

/// How tracks are kept.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrackerOptions {
    /// Least IoU for a detection to continue a track.
    pub min_iou: f32,
    /// Frames a track may go unseen before it is forgotten.
    pub max_missed: u32,
    /// A track is identified again after this many frames (0: never again).
    pub refresh_frames: u64,
    /// A face this many times better (score x side) than the one a track was identified on is
    /// identified again.
    pub better_factor: f32,
}

impl Default for TrackerOptions {
    fn default() -> Self {
        TrackerOptions { min_iou: 0.3, max_missed: 5, refresh_frames: 30, better_factor: 1.5 }
    }
}

/// Who a track is, once identified.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    /// The user, or `Unknown <n>` (n per stream, fixed for the track).
    pub name: String,
    /// Best similarity with any user when identified.
    pub similarity: f32,
    /// Whether `name` is a user (similarity at or above the threshold).
    pub known: bool,
}

#[derive(Debug, Clone)]
struct Track {
    id: u64,
    bbox: [f32; 4],
    missed: u32,
    identity: Option<Identity>,
    /// The frame the identity was computed on, and the quality of that face.
    identified_at: u64,
    identified_quality: f32,
    /// The `Unknown <n>` number this track got, kept when it is identified again.
    unknown_no: Option<u64>,
}

/// One detection of a frame, after association.
#[derive(Debug, Clone, PartialEq)]
pub struct Assigned {
    pub track_id: u64,
    /// The identity must be computed for this face now.
    pub identify: bool,
    /// The track's identity so far (`None` for a new track).
    pub identity: Option<Identity>,
}

/// The tracks of one stream.
#[derive(Debug, Default)]
pub struct Tracker {
    opts: TrackerOptions,
    tracks: Vec<Track>,
    next_id: u64,
    next_unknown: u64,
}

/// Intersection over union of two x1, y1, x2, y2 boxes.
pub fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    let area = |r: &[f32; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let union = area(a) + area(b) - inter;
    if union <= 0.0 { 0.0 } else { inter / union }
}

/// How good a view of a face is: detector score times the box's geometric side.
pub fn quality(bbox: &[f32; 4], det_score: f32) -> f32 {
    let area = (bbox[2] - bbox[0]).max(0.0) * (bbox[3] - bbox[1]).max(0.0);
    det_score * area.sqrt()
}

impl Tracker {
    pub fn new(opts: TrackerOptions) -> Tracker {
        Tracker { opts, tracks: Vec::new(), next_id: 1, next_unknown: 1 }
    }

    /// Tracks alive now.
    pub fn len(&self) -> usize {
        self.tracks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tracks.is_empty()
    }

    /// Associates frame `frame`'s detections (box, detector score) with the tracks: one
    /// [`Assigned`] per detection, in order. Unmatched detections start tracks; unmatched
    /// tracks age and are forgotten after `max_missed` frames.
    pub fn update(&mut self, frame: u64, detections: &[([f32; 4], f32)]) -> Vec<Assigned> {
        let mut pairs: Vec<(f32, usize, usize)> = Vec::new();
        for (d, (bbox, _)) in detections.iter().enumerate() {
            for (t, track) in self.tracks.iter().enumerate() {
                let v = iou(bbox, &track.bbox);
                if v >= self.opts.min_iou {
                    pairs.push((v, d, t));
                }
            }
        }
        pairs.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut det_track: Vec<Option<usize>> = vec![None; detections.len()];
        let mut track_taken = vec![false; self.tracks.len()];
        for (_, d, t) in pairs {
            if det_track[d].is_none() && !track_taken[t] {
                det_track[d] = Some(t);
                track_taken[t] = true;
            }
        }
        for (t, track) in self.tracks.iter_mut().enumerate() {
            if !track_taken[t] {
                track.missed += 1;
            }
        }
        let mut out = Vec::with_capacity(detections.len());
        for (d, (bbox, score)) in detections.iter().enumerate() {
            let q = quality(bbox, *score);
            match det_track[d] {
                Some(t) => {
                    let track = &mut self.tracks[t];
                    track.bbox = *bbox;
                    track.missed = 0;
                    let stale = self.opts.refresh_frames > 0 && frame.saturating_sub(track.identified_at) >= self.opts.refresh_frames;
                    let better = q > track.identified_quality * self.opts.better_factor;
                    let identify = track.identity.is_none() || stale || better;
                    out.push(Assigned { track_id: track.id, identify, identity: track.identity.clone() });
                }
                None => {
                    let id = self.next_id;
                    self.next_id += 1;
                    self.tracks.push(Track {
                        id,
                        bbox: *bbox,
                        missed: 0,
                        identity: None,
                        identified_at: frame,
                        identified_quality: q,
                        unknown_no: None,
                    });
                    out.push(Assigned { track_id: id, identify: true, identity: None });
                }
            }
        }
        let max_missed = self.opts.max_missed;
        self.tracks.retain(|t| t.missed <= max_missed);
        out
    }

    /// Records a track's identity, computed on frame `frame` from a face of this box and score.
    /// `user` is the best match when it reached the threshold; otherwise the track is
    /// `Unknown <n>`, its number kept for the rest of the track. Returns the identity.
    pub fn identify(
        &mut self,
        track_id: u64,
        frame: u64,
        bbox: &[f32; 4],
        det_score: f32,
        user: Option<String>,
        similarity: f32,
    ) -> Identity {
        let Some(track) = self.tracks.iter_mut().find(|t| t.id == track_id) else {
            return Identity { name: user.unwrap_or_else(|| "Unknown".into()), similarity, known: false };
        };
        let identity = match user {
            Some(name) => Identity { name, similarity, known: true },
            None => {
                let n = *track.unknown_no.get_or_insert_with(|| {
                    let n = self.next_unknown;
                    self.next_unknown += 1;
                    n
                });
                Identity { name: format!("Unknown {n}"), similarity, known: false }
            }
        };
        track.identity = Some(identity.clone());
        track.identified_at = frame;
        track.identified_quality = quality(bbox, det_score);
        identity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boxed(x: f32, y: f32) -> [f32; 4] {
        [x, y, x + 100.0, y + 120.0]
    }

    #[test]
    fn iou_of_equal_disjoint_and_half_boxes() {
        let a = [0.0, 0.0, 10.0, 10.0];
        assert!((iou(&a, &a) - 1.0).abs() < 1e-6);
        assert_eq!(iou(&a, &[20.0, 20.0, 30.0, 30.0]), 0.0);
        assert!((iou(&a, &[5.0, 0.0, 15.0, 10.0]) - 1.0 / 3.0).abs() < 1e-6);
        assert_eq!(iou(&[0.0, 0.0, 0.0, 0.0], &[0.0, 0.0, 0.0, 0.0]), 0.0);
    }

    #[test]
    fn two_faces_moving_keep_their_tracks_and_are_identified_once() {
        let mut t = Tracker::new(TrackerOptions { refresh_frames: 0, ..TrackerOptions::default() });
        let mut identified = 0;
        let mut ids = None;
        for f in 0..50u64 {
            let x = f as f32 * 6.0;
            let dets = [(boxed(x, 50.0), 0.8), (boxed(500.0 - x, 250.0), 0.8)];
            let out = t.update(f, &dets);
            for (a, (bbox, s)) in out.iter().zip(&dets) {
                if a.identify {
                    identified += 1;
                    t.identify(a.track_id, f, bbox, *s, None, 0.1);
                }
            }
            let now = (out[0].track_id, out[1].track_id);
            assert_eq!(*ids.get_or_insert(now), now, "frame {f}");
        }
        assert_eq!(identified, 2);
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn refresh_better_face_and_forgetting() {
        let mut t = Tracker::new(TrackerOptions { refresh_frames: 10, max_missed: 2, ..TrackerOptions::default() });
        let a = t.update(0, &[(boxed(0.0, 0.0), 0.6)]);
        assert!(a[0].identify);
        let first = t.identify(a[0].track_id, 0, &boxed(0.0, 0.0), 0.6, None, 0.1);
        assert_eq!(first.name, "Unknown 1");
        assert!(!t.update(1, &[(boxed(1.0, 0.0), 0.6)])[0].identify);
        // Score 0.6 -> 0.95: more than 1.5 times better.
        let b = t.update(2, &[(boxed(2.0, 0.0), 0.95)]);
        assert!(b[0].identify);
        let again = t.identify(b[0].track_id, 2, &boxed(2.0, 0.0), 0.95, None, 0.12);
        assert_eq!(again.name, "Unknown 1", "an unknown track keeps its number");
        assert!(!t.update(11, &[(boxed(3.0, 0.0), 0.95)])[0].identify);
        assert!(t.update(12, &[(boxed(3.0, 0.0), 0.95)])[0].identify, "refreshed after 10 frames");
        // Unseen for 3 frames: forgotten; the face then starts a new track.
        for f in 13..16 {
            t.update(f, &[]);
        }
        assert!(t.is_empty());
        let c = t.update(16, &[(boxed(3.0, 0.0), 0.95)]);
        assert_ne!(c[0].track_id, b[0].track_id);
        let named = t.identify(c[0].track_id, 16, &boxed(3.0, 0.0), 0.95, Some("alice".into()), 0.7);
        assert!(named.known);
        assert_eq!(t.update(17, &[(boxed(4.0, 0.0), 0.9)])[0].identity.as_ref().map(|i| i.name.as_str()), Some("alice"));
    }
}
