//! Reading raw BSON documents of `users`: ids, names, stamps, templates of every stored shape.

use super::*;

pub(super) fn key_of_bson(id: &Bson) -> IdKey {
    match id {
        Bson::ObjectId(o) => IdKey::Oid(o.bytes()),
        other => IdKey::Other(format!("{other:?}")),
    }
}

/// A document's `_id` key and what the feed remembers of it.
pub(super) fn entry_of(raw: &RawDocument) -> Option<(IdKey, Entry)> {
    let id = raw.get("_id").ok().flatten()?;
    let id = Bson::try_from(id.to_raw_bson()).ok()?;
    let entry = Entry { id: id.clone(), username: str_of(raw, "username").map(str::to_owned), stamp: stamp_of(raw) };
    Some((key_of_bson(&id), entry))
}

pub(super) fn id_text(raw: &RawDocument) -> String {
    raw.get("_id").ok().flatten().and_then(|id| Bson::try_from(id.to_raw_bson()).ok()).map_or_else(|| "?".into(), |b| b.to_string())
}

pub(super) fn str_of<'a>(raw: &'a RawDocument, key: &str) -> Option<&'a str> {
    match raw.get(key) {
        Ok(Some(RawBsonRef::String(s))) => Some(s),
        _ => None,
    }
}

/// The recognizer of the template, when recorded (a string).
pub(super) fn model_of(raw: &RawDocument) -> Option<&str> {
    str_of(raw, MODEL_FIELD)
}

/// Whether `embeddings` is a non-empty array (a template, usable or not).
pub(super) fn has_template(raw: &RawDocument) -> bool {
    matches!(raw.get("embeddings"), Ok(Some(RawBsonRef::Array(a))) if a.into_iter().next().is_some())
}

/// `samples` as stored (missing, negative or not a number: 0, "unknown", which weighs as one image).
pub(super) fn samples_of(raw: &RawDocument) -> u64 {
    match raw.get("samples") {
        Ok(Some(RawBsonRef::Int32(n))) => u64::try_from(n).unwrap_or(0),
        Ok(Some(RawBsonRef::Int64(n))) => u64::try_from(n).unwrap_or(0),
        Ok(Some(RawBsonRef::Double(n))) if n.is_finite() && n >= 0.0 => n as u64,
        _ => 0,
    }
}

pub(super) fn stamp_of(raw: &RawDocument) -> Option<i64> {
    match raw.get("updated_at") {
        Ok(Some(RawBsonRef::DateTime(d))) => Some(d.timestamp_millis()),
        _ => None,
    }
}

/// `updated_at` (missing: the epoch, as the embedded store does for legacy rows).
pub(super) fn updated_at_of(raw: &RawDocument) -> SystemTime {
    stamp_of(raw)
        .and_then(|ms| u64::try_from(ms).ok())
        .and_then(|ms| SystemTime::UNIX_EPOCH.checked_add(Duration::from_millis(ms)))
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// The template: none (missing, null or an empty array) or exactly [`EMBEDDING_DIM`] finite
/// numbers, not all zero, returned L2-normalised; anything else is described in the error.
pub(super) fn template_of(raw: &RawDocument) -> Result<Vec<f32>, String> {
    let array = match raw.get("embeddings") {
        Ok(None) | Ok(Some(RawBsonRef::Null)) => return Ok(Vec::new()),
        Ok(Some(RawBsonRef::Array(a))) => a,
        Ok(Some(other)) => return Err(format!("`embeddings` is {:?}, not an array", other.element_type())),
        Err(e) => return Err(format!("`embeddings` cannot be read: {e}")),
    };
    let values = numbers_of(array)?;
    if values.is_empty() {
        return Ok(Vec::new());
    }
    if values.len() != EMBEDDING_DIM {
        return Err(format!("`embeddings` has {} numbers, not {EMBEDDING_DIM}", values.len()));
    }
    let norm = values.iter().map(|v| v * v).sum::<f64>().sqrt();
    if !(norm > 0.0 && norm.is_finite()) {
        return Err("`embeddings` is all zeros".to_owned());
    }
    Ok(values.iter().map(|v| (v / norm) as f32).collect())
}

/// The elements of a vector field: finite numbers (doubles, ints, longs or decimals, as other
/// tools write them); anything else is described in the error.
pub(super) fn numbers_of(array: &RawArray) -> Result<Vec<f64>, String> {
    let mut values = Vec::with_capacity(EMBEDDING_DIM);
    for (i, item) in array.into_iter().enumerate() {
        let v = match item {
            Ok(RawBsonRef::Double(v)) => v,
            Ok(RawBsonRef::Int32(v)) => f64::from(v),
            Ok(RawBsonRef::Int64(v)) => v as f64,
            Ok(RawBsonRef::Decimal128(d)) => d.to_string().parse::<f64>().map_err(|_| format!("element {i} is not a number"))?,
            Ok(other) => return Err(format!("element {i} is {:?}, not a number", other.element_type())),
            Err(e) => return Err(format!("element {i} cannot be read: {e}")),
        };
        if !v.is_finite() {
            return Err(format!("element {i} is not finite"));
        }
        values.push(v);
    }
    Ok(values)
}

pub(super) fn record_of(raw: &RawDocument, username: String, embedding: Vec<f32>) -> UserRecord {
    UserRecord { username, embedding, samples: samples_of(raw), model_id: model_of(raw).map(str::to_owned), updated_at: updated_at_of(raw) }
}

/// A document facerec just wrote, as a record.
pub(super) fn parsed_record(raw: &RawDocument) -> Result<UserRecord, StoreError> {
    let username = str_of(raw, "username").ok_or_else(|| StoreError::Internal("the written document has no username".into()))?;
    let embedding = template_of(raw).map_err(|why| StoreError::Internal(format!("user '{username}' as written: {why}")))?;
    Ok(record_of(raw, username.to_owned(), embedding))
}
