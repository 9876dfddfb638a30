//! Request extractors whose rejections are our own errors, so a malformed, oversized or
//! mislabelled body gets the same JSON error shape as everything else; and the check that
//! keeps other web sites' pages from posting forms here when authentication is off.

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::{HeaderMap, StatusCode, header};
use serde::de::DeserializeOwned;

use super::error::{ApiError, ErrorCode};

/// A JSON endpoint's raw body: `Content-Type: application/json` (parameters such as `charset`
/// allowed) or 415 `unsupported_media_type`, so a web page elsewhere cannot send it as a
/// "simple" cross-site request (`text/plain` and the form types need no CORS preflight); the
/// body limit turned into `payload_too_large`.
pub struct JsonBody(pub Bytes);

/// Whether `headers` label the body `application/json` (case-insensitively, any parameters).
pub fn is_json_content_type(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json_content_type(req.headers()) {
            let got = req.headers().get(header::CONTENT_TYPE).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
            return Err(ApiError::new(
                ErrorCode::UnsupportedMediaType,
                match got {
                    Some(ct) => format!("expected `Content-Type: application/json`, got `{}`", ct.chars().take(100).collect::<String>()),
                    None => "expected `Content-Type: application/json` (none was sent)".to_owned(),
                },
            ));
        }
        Bytes::from_request(req, state).await.map(JsonBody).map_err(|e| {
            if timed_out(&e) {
                body_timeout()
            } else if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(ErrorCode::PayloadTooLarge, "request body is larger than MAX_BODY_BYTES")
            } else {
                ApiError::new(ErrorCode::InvalidRequest, format!("could not read the request body: {e}"))
            }
        })
    }
}

/// Middleware: a request whose `Content-Length` is over MAX_BODY_BYTES is 413
/// `payload_too_large` at once, before any of its body is read: hyper sends `100 Continue` only
/// when the body is first read, so a client that asked for it (`Expect: 100-continue`) is told
/// to stop before sending. The connection is closed after the answer (the body is not read).
pub async fn refuse_declared_oversize(
    axum::extract::State(max): axum::extract::State<usize>,
    req: Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        let mut resp = axum::response::IntoResponse::into_response(ApiError::new(
            ErrorCode::PayloadTooLarge,
            "request body is larger than MAX_BODY_BYTES",
        ));
        resp.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
        return resp;
    }
    next.run(req).await
}

/// What tower-http's body timeout says when it fires (the multipart parser keeps only the text).
const BODY_TIMEOUT_TEXT: &str = "within the designated timeout";

/// Whether reading a body failed because it stopped arriving for BODY_READ_TIMEOUT.
fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.is::<tower_http::timeout::TimeoutError>() || c.to_string().contains(BODY_TIMEOUT_TEXT) {
            return true;
        }
        cause = c.source();
    }
    false
}

/// 408 `request_timeout`; the connection is closed after it (see `error`).
fn body_timeout() -> ApiError {
    ApiError::new(ErrorCode::RequestTimeout, "the request body stopped arriving for longer than BODY_READ_TIMEOUT")
}

/// Limits on what one request may ask for (the body's size is bounded by the router's layer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Most entries in one `/recognize` body (MAX_CROPS).
    pub max_crops: usize,
    /// Most files in one enrolment (MAX_FILES).
    pub max_files: usize,
    /// Longest `username` or `displayName`, in characters (MAX_NAME_CHARS).
    pub max_name_chars: usize,
    /// Bytes of request bodies in flight at most (REQUEST_BYTES_IN_FLIGHT): see [`super::budget`].
    pub bytes_in_flight: usize,
}

/// The default REQUEST_BYTES_IN_FLIGHT: twice the default MAX_BODY_BYTES.
pub const DEFAULT_BYTES_IN_FLIGHT: usize = 256 * 1024 * 1024;

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits { max_crops: 512, max_files: 32, max_name_chars: 128, bytes_in_flight: DEFAULT_BYTES_IN_FLIGHT }
    }
}

/// Parses a JSON body into `T`: `invalid_json` when it is not JSON at all, `invalid_request`
/// when it is JSON of the wrong shape (a missing field, a number where a string belongs).
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => {
            ApiError::new(ErrorCode::InvalidRequest, format!("the JSON body does not have the shape this endpoint expects: {e}"))
        }
        _ => ApiError::new(ErrorCode::InvalidJson, format!("request body is not valid JSON: {e}")),
    })
}

/// A multipart form, with its rejections as our errors.
pub struct Form(pub Multipart);

impl<S: Send + Sync> FromRequest<S> for Form {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        Multipart::from_request(req, state)
            .await
            .map(Form)
            .map_err(|e| ApiError::new(ErrorCode::InvalidRequest, format!("expected a multipart/form-data body: {e}")))
    }
}

/// One part of a multipart form.
pub struct Part {
    pub name: String,
    pub file_name: Option<String>,
    pub bytes: Bytes,
}

impl Form {
    /// Every part, in order.
    pub async fn parts(mut self) -> Result<Vec<Part>, ApiError> {
        let mut out = Vec::new();
        loop {
            let field = self.0.next_field().await.map_err(multipart_error)?;
            let Some(field) = field else { return Ok(out) };
            let name = field.name().unwrap_or_default().to_string();
            let file_name = field.file_name().map(str::to_string);
            let bytes = field.bytes().await.map_err(multipart_error)?;
            out.push(Part { name, file_name, bytes });
        }
    }
}

fn multipart_error(e: axum::extract::multipart::MultipartError) -> ApiError {
    if timed_out(&e) || e.body_text().contains(BODY_TIMEOUT_TEXT) {
        body_timeout()
    } else if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(ErrorCode::PayloadTooLarge, "request body is larger than MAX_BODY_BYTES")
    } else {
        ApiError::new(ErrorCode::InvalidRequest, format!("malformed multipart body: {}", e.body_text()))
    }
}

/// Whether a request comes from a page of another site: an `Origin` header (browsers send one
/// on every cross-site POST) whose host and port are not the `Host` the request was sent to
/// (`null`, sent by sandboxed and file pages, counts as foreign). No `Origin`: not a browser's
/// cross-site request (curl, scripts), so not foreign.
pub fn is_foreign_origin(headers: &HeaderMap, uri: &axum::http::Uri) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else { return false };
    let Ok(origin) = origin.to_str() else { return true };
    let Some((scheme, authority)) = origin.trim().split_once("://") else { return true };
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "http" => ":80",
        "https" => ":443",
        _ => return true,
    };
    let host =
        headers.get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_owned).or_else(|| uri.authority().map(|a| a.to_string()));
    let Some(host) = host else { return true };
    let normal = |a: &str| {
        let a = a.trim().trim_end_matches('/').to_ascii_lowercase();
        a.strip_suffix(default_port).map(str::to_owned).unwrap_or(a)
    };
    normal(authority) != normal(&host)
}

/// Checks the username of a user that should exist (a lookup): see [`super::names::check_existing`].
pub fn validate_username(name: &str, limits: &RequestLimits) -> Result<(), ApiError> {
    super::names::check_existing("username", name, limits)
}

/// Checks a new name given by a client (`displayName`, a new `username`): the one rule of
/// [`super::names::check_new`]. A name is data, never a path: where one ends up in a file name
/// (the photo folder's crops), the audit writer makes it safe.
pub fn validate_name(field: &str, name: &str, limits: &RequestLimits) -> Result<(), ApiError> {
    super::names::check_new(field, name, limits)
}

/// Checks the name of a new user: [`validate_username`], and not `Unknown <n>` in any case or
/// spacing (`unknown 3`, `UNKNOWN_3`, `Unknown\u{a0}3`, `Unknown3`, `Unknown`): /recognize names
/// unknown faces so, and a user of that name would look exactly like an unknown face.
pub fn validate_new_username(name: &str, limits: &RequestLimits) -> Result<(), ApiError> {
    validate_name("username", name, limits)?;
    if looks_like_unknown(name) {
        return Err(ApiError::new(
            ErrorCode::InvalidUsername,
            format!("invalid username: '{name}' is how /recognize names unknown faces (`Unknown <n>`)"),
        ));
    }
    Ok(())
}

pub use crate::service::looks_like_unknown;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_bounded_and_printable() {
        let lim = RequestLimits { max_name_chars: 5, ..RequestLimits::default() };
        assert!(validate_name("username", "alice", &lim).is_ok());
        assert!(validate_name("username", "Zoë", &lim).is_ok());
        assert!(validate_name("username", "../x", &lim).is_ok(), "a name is data; file names are made safe where used");
        for bad in ["", "alice2", "a\nb", "a\0b", "a\u{1b}b", "a\u{202e}b", " al", "al ", "a\u{200b}b"] {
            let e = validate_name("username", bad, &lim).expect_err(bad);
            assert_eq!(e.code, ErrorCode::InvalidUsername, "{bad:?}");
        }
    }

    #[test]
    fn unknown_n_is_not_a_username() {
        let lim = RequestLimits::default();
        for bad in [
            "Unknown 1",
            "unknown 1",
            "UNKNOWN 12",
            "Unknown  3",
            "Unknown\t3",
            "Unknown\u{a0}3",
            "Unknown_3",
            "Unknown-3",
            "Unknown3",
            "Unknown",
            "unKnown \u{3000}7",
            "Unknown \u{0663}",
        ] {
            assert!(looks_like_unknown(bad), "{bad:?}");
        }
        for good in ["Unknownson", "Unknown Pleasures", "An Unknown 1", "alice", "Unknown 1a"] {
            assert!(!looks_like_unknown(good), "{good:?}");
            assert!(validate_new_username(good, &lim).is_ok(), "{good:?}");
        }
        assert_eq!(validate_new_username("Unknown 1", &lim).err().map(|e| e.code), Some(ErrorCode::InvalidUsername));
    }

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        pairs.iter().map(|(k, v)| (k.clone(), v.parse().expect("value"))).collect()
    }

    #[test]
    fn only_application_json_is_a_json_body() {
        for good in ["application/json", "application/json; charset=utf-8", "Application/JSON;charset=UTF-8", " application/json "] {
            assert!(is_json_content_type(&headers(&[(header::CONTENT_TYPE, good)])), "{good}");
        }
        for bad in
            ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/jsonx", "text/json", ""]
        {
            assert!(!is_json_content_type(&headers(&[(header::CONTENT_TYPE, bad)])), "{bad}");
        }
        assert!(!is_json_content_type(&HeaderMap::new()));
    }

    #[test]
    fn an_origin_is_foreign_unless_it_is_the_host() {
        let uri: axum::http::Uri = "/api/face/register".parse().expect("uri");
        let with = |origin: &str, host: &str| is_foreign_origin(&headers(&[(header::ORIGIN, origin), (header::HOST, host)]), &uri);
        assert!(!is_foreign_origin(&headers(&[(header::HOST, "x:8000")]), &uri), "no Origin: not a cross-site page");
        assert!(!with("http://localhost:8000", "localhost:8000"));
        assert!(!with("http://LOCALHOST:8000", "localhost:8000"));
        assert!(!with("http://10.0.0.5", "10.0.0.5:80"));
        assert!(!with("https://faces.example", "faces.example"));
        assert!(!with("http://[::1]:8000", "[::1]:8000"));
        assert!(with("http://evil.example", "localhost:8000"));
        assert!(with("http://localhost:8001", "localhost:8000"), "another port is another origin");
        assert!(with("http://localhost.evil.example:8000", "localhost:8000"));
        assert!(with("null", "localhost:8000"));
        assert!(with("file://", "localhost:8000"));
        assert!(with("ftp://localhost:8000", "localhost:8000"));
        assert!(is_foreign_origin(&headers(&[(header::ORIGIN, "http://a")]), &uri), "no Host to compare with");
        let absolute: axum::http::Uri = "http://a:9/x".parse().expect("uri");
        assert!(!is_foreign_origin(&headers(&[(header::ORIGIN, "http://a:9")]), &absolute), "HTTP/2: the authority");
    }

    #[test]
    fn json_syntax_and_shape_get_different_codes() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct T {
            username: String,
        }
        assert_eq!(parse_json::<T>(b"{oops").map(|_| ()).err().map(|e| e.code), Some(ErrorCode::InvalidJson));
        assert_eq!(parse_json::<T>(b"").map(|_| ()).err().map(|e| e.code), Some(ErrorCode::InvalidJson));
        assert_eq!(parse_json::<T>(b"[1]").map(|_| ()).err().map(|e| e.code), Some(ErrorCode::InvalidRequest));
        assert_eq!(parse_json::<T>(br#"{"username": 5}"#).map(|_| ()).err().map(|e| e.code), Some(ErrorCode::InvalidRequest));
        assert!(parse_json::<T>(br#"{"username": "a"}"#).is_ok());
    }
}
