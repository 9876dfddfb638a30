//! What a stream's client sends: a binary message holding an image (JPEG, PNG or WebP), or a
//! JSON text message `{"frame": "<base64 or data: URL>", ...}` whose other fields are echoed
//! in the frame's answer. A text message may also carry credentials (`api_key`, `token`) and
//! the stream's settings (`log`), taken from the first message only; a text message without
//! `frame` only does that. Credentials may instead come in `Sec-WebSocket-Protocol`
//! ([`credentials_from_protocols`]), for browsers, which cannot set headers on a WebSocket.

use base64::Engine as _;
use serde_json::{Map, Value};

/// The subprotocol the server speaks (and answers with when the client offers it).
pub const PROTOCOL: &str = "facerec.v1";
/// `Sec-WebSocket-Protocol` entry carrying an API key: `facerec.key.<key>`.
pub const KEY_PROTOCOL_PREFIX: &str = "facerec.key.";
/// `Sec-WebSocket-Protocol` entry carrying a JWT: `facerec.bearer.<token>`.
pub const BEARER_PROTOCOL_PREFIX: &str = "facerec.bearer.";

/// A credential sent by the client.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    ApiKey(String),
    Bearer(String),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Credential::ApiKey(_) => "ApiKey(..)",
            Credential::Bearer(_) => "Bearer(..)",
        })
    }
}

impl Credential {
    /// The credential as the request headers the HTTP endpoints check.
    pub fn headers(&self) -> axum::http::HeaderMap {
        let mut h = axum::http::HeaderMap::new();
        let (name, value) = match self {
            Credential::ApiKey(k) => (axum::http::HeaderName::from_static("x-api-key"), k.clone()),
            Credential::Bearer(t) => (axum::http::header::AUTHORIZATION, format!("Bearer {t}")),
        };
        if let Ok(v) = axum::http::HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
        h
    }
}

/// One parsed client message.
#[derive(Debug, Default)]
pub struct Incoming {
    /// The image bytes, when the message holds a frame.
    pub frame: Option<Vec<u8>>,
    /// Fields to echo in the frame's answer.
    pub extra: Map<String, Value>,
    pub credential: Option<Credential>,
    /// `log`: send this stream's recognitions to the audit trail.
    pub log: Option<bool>,
}

/// Why a message was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {size} bytes is over the limit of {limit} bytes (STREAM_MAX_FRAME_BYTES)")]
    TooBig { size: usize, limit: usize },
    #[error("text messages must be a JSON object: {0}")]
    NotJson(String),
    #[error("`frame` must be a base64 string (or a data: URL)")]
    BadFrame,
    #[error("`{0}` has the wrong type")]
    BadField(&'static str),
}

/// A binary message: the image itself.
pub fn binary(bytes: Vec<u8>, limit: usize) -> Result<Incoming, FrameError> {
    if bytes.len() > limit {
        return Err(FrameError::TooBig { size: bytes.len(), limit });
    }
    Ok(Incoming { frame: Some(bytes), ..Incoming::default() })
}

/// A text message: a JSON object, maybe with a base64 `frame`.
pub fn text(text: &str, limit: usize) -> Result<Incoming, FrameError> {
    let value: Value = serde_json::from_str(text).map_err(|e| FrameError::NotJson(e.to_string()))?;
    let Value::Object(mut extra) = value else { return Err(FrameError::NotJson("not an object".into())) };
    let mut out = Incoming::default();
    let string = |v: Value, field: &'static str| match v {
        Value::String(s) => Ok(s),
        _ => Err(FrameError::BadField(field)),
    };
    if let Some(v) = extra.remove("api_key") {
        out.credential = Some(Credential::ApiKey(string(v, "api_key")?));
    }
    if let Some(v) = extra.remove("token") {
        out.credential = Some(Credential::Bearer(string(v, "token")?));
    }
    if let Some(v) = extra.remove("log") {
        out.log = Some(v.as_bool().ok_or(FrameError::BadField("log"))?);
    }
    if let Some(v) = extra.remove("frame") {
        let s = string(v, "frame").map_err(|_| FrameError::BadFrame)?;
        // A data: URL (what a browser canvas gives) carries the base64 after its comma.
        let b64 = match s.strip_prefix("data:") {
            Some(rest) => rest.split_once(',').map(|(_, b)| b).ok_or(FrameError::BadFrame)?,
            None => s.as_str(),
        };
        let estimate = b64.len() / 4 * 3;
        if estimate > limit + 2 {
            return Err(FrameError::TooBig { size: estimate, limit });
        }
        let bytes = base64::engine::general_purpose::STANDARD.decode(b64.trim()).map_err(|_| FrameError::BadFrame)?;
        if bytes.len() > limit {
            return Err(FrameError::TooBig { size: bytes.len(), limit });
        }
        out.frame = Some(bytes);
    }
    out.extra = extra;
    Ok(out)
}

/// The credential in a `Sec-WebSocket-Protocol` header (comma-separated entries), if any.
pub fn credentials_from_protocols(header: &str) -> Option<Credential> {
    header.split(',').map(str::trim).find_map(|p| {
        if let Some(k) = p.strip_prefix(KEY_PROTOCOL_PREFIX) {
            Some(Credential::ApiKey(k.to_string()))
        } else {
            p.strip_prefix(BEARER_PROTOCOL_PREFIX).map(|t| Credential::Bearer(t.to_string()))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_frames_credentials_and_echoed_fields() {
        let m = text(r#"{"frame": "aGVsbG8=", "camera": "door", "n": 1.50}"#, 100).unwrap();
        assert_eq!(m.frame.as_deref(), Some(&b"hello"[..]));
        assert_eq!(m.extra.get("camera"), Some(&Value::String("door".into())));
        assert_eq!(m.extra.get("n").map(|v| v.to_string()).as_deref(), Some("1.50"), "numbers echoed as written");
        let m = text("{\"frame\": \"data:image/jpeg;base64,aGVsbG8=\"}", 100).unwrap();
        assert_eq!(m.frame.as_deref(), Some(&b"hello"[..]));
        let m = text(r#"{"api_key": "k1", "log": true}"#, 100).unwrap();
        assert_eq!((m.frame, m.credential, m.log), (None, Some(Credential::ApiKey("k1".into())), Some(true)));
        assert!(m.extra.is_empty(), "credentials are never echoed");
    }

    #[test]
    fn refusals() {
        assert!(matches!(text("[1]", 10), Err(FrameError::NotJson(_))));
        assert!(matches!(text("nope", 10), Err(FrameError::NotJson(_))));
        assert_eq!(text(r#"{"frame": 3}"#, 10).unwrap_err(), FrameError::BadFrame);
        assert_eq!(text(r#"{"frame": "!!!"}"#, 10).unwrap_err(), FrameError::BadFrame);
        assert_eq!(text(r#"{"log": "yes"}"#, 10).unwrap_err(), FrameError::BadField("log"));
        assert!(matches!(text(r#"{"frame": "aGVsbG8gd29ybGQgaGVsbG8gd29ybGQ="}"#, 10), Err(FrameError::TooBig { .. })));
        assert!(matches!(binary(vec![0; 11], 10), Err(FrameError::TooBig { size: 11, limit: 10 })));
        assert!(binary(vec![0; 10], 10).is_ok());
    }

    #[test]
    fn protocol_credentials() {
        assert_eq!(credentials_from_protocols("facerec.v1, facerec.key.abc"), Some(Credential::ApiKey("abc".into())));
        assert_eq!(credentials_from_protocols("facerec.bearer.x.y.z"), Some(Credential::Bearer("x.y.z".into())));
        assert_eq!(credentials_from_protocols("facerec.v1"), None);
        assert_eq!(format!("{:?}", Credential::ApiKey("secret".into())), "ApiKey(..)");
    }
}
