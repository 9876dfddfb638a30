//! The rules every store applies the same way, written once: which stored vectors are
//! comparable with ours, what an enrolment may write, and the weighted-mean template.

use super::{EMBEDDING_DIM, StoreError};

/// Whether a vector stored with recognizer id `stored` can be compared with vectors of `ours`.
/// A vector without one (`None`, or an empty id: written by the original service or another
/// tool) is taken as ours; any other id must be ours exactly.
pub fn is_ours(stored: Option<&str>, ours: &str) -> bool {
    stored.is_none_or(|m| m.is_empty() || m == ours)
}

/// What an enrolment may fold in: at least one embedding, each of [`EMBEDDING_DIM`] finite
/// numbers (anything else is a bug of the caller, refused before any write).
pub fn check_new_embeddings(embeddings: &[Vec<f32>]) -> Result<(), StoreError> {
    if embeddings.is_empty() {
        return Err(StoreError::Internal("enroll called with no embeddings".to_owned()));
    }
    for e in embeddings {
        if e.len() != EMBEDDING_DIM {
            return Err(StoreError::Internal(format!("enroll called with a {}-dimensional embedding, not {EMBEDDING_DIM}", e.len())));
        }
        if !e.iter().all(|x| x.is_finite()) {
            return Err(StoreError::Internal("enroll called with non-finite embedding values".to_owned()));
        }
    }
    Ok(())
}

/// The weighted-mean enrolment rule, shared by every store: the new template is the
/// L2-normalised mean of the old template (weighing `old_samples` images, at least one
/// when a template exists) and the new embeddings (one image each).
pub fn weighted_template(old: &[f32], old_samples: u64, new: &[Vec<f32>]) -> (Vec<f32>, u64) {
    let dim = new.first().map_or(old.len(), Vec::len);
    let mut acc = vec![0.0f64; dim];
    let old_weight = if old.len() == dim && !old.is_empty() { old_samples.max(1) } else { 0 };
    if old_weight > 0 {
        for (a, &v) in acc.iter_mut().zip(old) {
            *a += f64::from(v) * old_weight as f64;
        }
    }
    for e in new {
        for (a, &v) in acc.iter_mut().zip(e) {
            *a += f64::from(v);
        }
    }
    let norm = acc.iter().map(|v| v * v).sum::<f64>().sqrt();
    let template = if norm > 0.0 { acc.iter().map(|v| (v / norm) as f32).collect() } else { vec![0.0; dim] };
    (template, old_weight + new.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_recognizers_count_as_ours() {
        assert!(is_ours(None, "m1") && is_ours(Some(""), "m1") && is_ours(Some("m1"), "m1"));
        assert!(!is_ours(Some("m2"), "m1"));
    }

    #[test]
    fn new_embeddings_must_be_whole_and_finite() {
        assert!(check_new_embeddings(&[vec![0.5; EMBEDDING_DIM]]).is_ok());
        assert!(check_new_embeddings(&[]).is_err());
        assert!(check_new_embeddings(&[vec![0.5; 3]]).is_err());
        let mut bad = vec![0.5; EMBEDDING_DIM];
        bad[7] = f32::NAN;
        assert!(check_new_embeddings(&[bad]).is_err());
    }

    #[test]
    fn weighted_mean_counts_every_image() {
        let old = vec![1.0, 0.0];
        let (t, n) = weighted_template(&old, 3, &[vec![0.0, 1.0]]);
        assert_eq!(n, 4);
        let norm = (9.0f32 + 1.0).sqrt();
        assert!((t[0] - 3.0 / norm).abs() < 1e-6 && (t[1] - 1.0 / norm).abs() < 1e-6);
        // A legacy template without a count weighs as one image.
        let (t, n) = weighted_template(&old, 0, &[vec![0.0, 1.0]]);
        assert_eq!(n, 2);
        assert!((t[0] - t[1]).abs() < 1e-6);
        // No template yet: the mean of the new ones.
        let (t, n) = weighted_template(&[], 0, &[vec![1.0, 0.0], vec![1.0, 0.0]]);
        assert_eq!((t, n), (vec![1.0, 0.0], 2));
    }
}
