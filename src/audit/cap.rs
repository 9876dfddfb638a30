//! One log line within LOG_MAX_LINE_BYTES. A line carries every crop as base64 (as the original
//! service wrote it); past the cap, the crops the photo folder holds are referred to by file name
//! (`crop_file`) instead of carried, and if the line is still too long (a client's own fields),
//! it is cut to a summary: each entry's bbox, name, similarity, error and crop file, and
//! `line_cut` saying how long the whole line was. Nothing a crop file holds is lost.

use serde_json::{Map, Value, json};

use super::Crop;

/// The smallest cap a configuration may set: a summary of a few hundred faces fits.
pub const MIN_LINE_BYTES: usize = 64 * 1024;

/// What a summary keeps of each entry.
const KEPT: &[&str] = &["bbox", "name", "similarity", "error", "crop_file", "crop_omitted", "track_id", "det_score", "frame_id"];

/// Top-level strings longer than this are left out of a summary.
const MAX_KEPT_STRING: usize = 256;

fn to_line(v: &Value) -> Result<Vec<u8>, serde_json::Error> {
    let mut line = serde_json::to_vec(v)?;
    line.push(b'\n');
    Ok(line)
}

/// `line` serialised as one NDJSON line (newline included) of at most `max` bytes (at least
/// [`MIN_LINE_BYTES`]); `saved[i]` is the file name `crops[i]` was saved under, where it was.
pub fn fit(mut line: Value, crops: &[Crop], saved: &[String], max: usize) -> Result<Vec<u8>, serde_json::Error> {
    let max = max.max(MIN_LINE_BYTES);
    let whole = to_line(&line)?;
    if whole.len() <= max {
        return Ok(whole);
    }
    for (i, crop) in crops.iter().enumerate() {
        let Some((parent, key)) = crop.at.as_deref().and_then(|at| at.rsplit_once('/')) else { continue };
        let Some(entry) = line.pointer_mut(parent).and_then(Value::as_object_mut) else { continue };
        if entry.get(key).is_some_and(Value::is_string) {
            entry.insert(key.to_owned(), Value::Null);
            match saved.get(i) {
                Some(name) => entry.insert("crop_file".into(), json!(name)),
                None => entry.insert("crop_omitted".into(), json!("line over LOG_MAX_LINE_BYTES and the crop not saved")),
            };
        }
    }
    let referred = to_line(&line)?;
    if referred.len() <= max {
        return Ok(referred);
    }
    let mut summary = summarise(&line);
    summary.insert("line_cut".into(), json!({"bytes": whole.len(), "max": max}));
    let mut omitted = 0usize;
    loop {
        let out = to_line(&Value::Object(summary.clone()))?;
        let entries = summary.get_mut("bboxes").and_then(Value::as_array_mut);
        match entries {
            Some(list) if out.len() > max && !list.is_empty() => {
                // Halve what is over, at least one entry; the count is told.
                let over = list.len().div_ceil(2).max(1);
                list.truncate(list.len() - over);
                omitted += over;
                summary.insert("bboxes_omitted".into(), json!(omitted));
            }
            _ => return Ok(out),
        }
    }
}

fn summarise(line: &Value) -> Map<String, Value> {
    let mut out = Map::new();
    let Some(obj) = line.as_object() else { return out };
    for (k, v) in obj {
        let small = match v {
            Value::String(s) => s.len() <= MAX_KEPT_STRING,
            Value::Array(_) | Value::Object(_) => false,
            _ => true,
        };
        if small {
            out.insert(k.clone(), v.clone());
        }
    }
    if let Some(list) = obj.get("bboxes").and_then(Value::as_array) {
        let entries = list
            .iter()
            .map(|e| {
                let kept = e
                    .as_object()
                    .map(|o| o.iter().filter(|(k, _)| KEPT.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect());
                Value::Object(kept.unwrap_or_default())
            })
            .collect();
        out.insert("bboxes".into(), Value::Array(entries));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crop(at: &str) -> Crop {
        Crop { name: "alice".into(), bytes: vec![1, 2, 3], ext: "jpg", at: Some(at.into()) }
    }

    fn parse(line: &[u8]) -> Value {
        assert_eq!(line.last(), Some(&b'\n'));
        serde_json::from_slice(line).expect("a JSON line")
    }

    #[test]
    fn a_short_line_is_written_whole() {
        let line = json!({"camera": "gate", "bboxes": [{"crop": "AAAA", "name": "alice"}]});
        let out = fit(line.clone(), &[crop("/bboxes/0/crop")], &["photo_alice_1.jpg".into()], 1 << 20).expect("fits");
        assert_eq!(parse(&out), line);
    }

    #[test]
    fn a_long_line_refers_to_the_saved_crops() {
        let big = "A".repeat(100_000);
        let line = json!({"camera": "gate", "bboxes": [{"crop": big, "name": "alice"}, {"crop": big, "name": "bob"}]});
        let crops = [crop("/bboxes/0/crop"), crop("/bboxes/1/crop")];
        let out = fit(line, &crops, &["photo_alice_1.jpg".into()], MIN_LINE_BYTES).expect("fits");
        assert!(out.len() <= MIN_LINE_BYTES);
        let v = parse(&out);
        assert_eq!(v["camera"], "gate");
        assert_eq!(v["bboxes"][0]["crop"], Value::Null);
        assert_eq!(v["bboxes"][0]["crop_file"], "photo_alice_1.jpg");
        assert_eq!(v["bboxes"][1]["crop"], Value::Null);
        assert!(v["bboxes"][1]["crop_omitted"].is_string(), "{v}");
        assert_eq!(v["bboxes"][1]["name"], "bob");
        assert!(v.get("line_cut").is_none());
    }

    #[test]
    fn a_line_long_with_the_clients_fields_is_cut_to_a_summary() {
        let line = json!({"camera": "gate", "note": "x".repeat(200_000), "bboxes": [{"crop": "AAAA", "name": "alice", "similarity": 0.61, "extra": "y".repeat(1000)}]});
        let out = fit(line, &[crop("/bboxes/0/crop")], &["photo_alice_1.jpg".into()], MIN_LINE_BYTES).expect("fits");
        assert!(out.len() <= MIN_LINE_BYTES);
        let v = parse(&out);
        assert_eq!(v["camera"], "gate");
        assert!(v.get("note").is_none());
        assert_eq!(v["bboxes"][0], json!({"name": "alice", "similarity": 0.61, "crop_file": "photo_alice_1.jpg"}));
        assert!(v["line_cut"]["bytes"].as_u64().is_some_and(|n| n > 200_000), "{v}");
    }

    #[test]
    fn too_many_entries_are_counted_not_written() {
        let entries: Vec<Value> = (0..5000).map(|i| json!({"name": format!("person-{i}-{}", "z".repeat(40)), "similarity": 0.5})).collect();
        let line = json!({"bboxes": entries});
        let out = fit(line, &[], &[], MIN_LINE_BYTES).expect("fits");
        assert!(out.len() <= MIN_LINE_BYTES);
        let v = parse(&out);
        let kept = v["bboxes"].as_array().map_or(0, Vec::len);
        let omitted = v["bboxes_omitted"].as_u64().unwrap_or(0) as usize;
        assert!(kept > 0 && kept + omitted == 5000, "{kept} + {omitted}");
    }
}
