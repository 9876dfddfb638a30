//! How the catalogue's errors ([`crate::error`]) are answered over HTTP: the JSON body, the
//! request id on server errors, `Retry-After` on `overloaded`; plain-text answers of axum and
//! layers rewritten into the same shape; a panicking handler answered `internal`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

pub use crate::error::{ApiError, EntryError, ErrorBody, ErrorCode};

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.code.status();
        let request_id = (status.is_server_error() && !self.legacy).then(super::observe::current_request_id).flatten();
        let body = ErrorBody { status: "error".into(), code: (!self.legacy).then_some(self.code), message: self.message, request_id };
        let mut resp = (status, axum::Json(body)).into_response();
        // For the metrics (errors by code).
        resp.extensions_mut().insert(self.code);
        if self.code == ErrorCode::Overloaded {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        // The rest of a body that stopped arriving will not be read: the connection ends here.
        if self.code == ErrorCode::RequestTimeout {
            resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

/// Router layer (`map_response`): an error answer that is not JSON (axum's own rejections,
/// a layer's plain-text answer) is rewritten into the catalogue's shape with the same status,
/// so a client parses every error the same way. A client error keeps its text as the message;
/// a server error's text is logged and replaced by a generic message.
pub async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json") || v.starts_with("application/problem+json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.map(|b| String::from_utf8_lossy(&b).trim().to_owned()).unwrap_or_default();
    let code = match status {
        StatusCode::UNAUTHORIZED => ErrorCode::Unauthorized,
        StatusCode::NOT_FOUND => ErrorCode::NotFound,
        StatusCode::METHOD_NOT_ALLOWED => ErrorCode::MethodNotAllowed,
        StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::PayloadTooLarge,
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ErrorCode::UnsupportedMediaType,
        StatusCode::TOO_MANY_REQUESTS => ErrorCode::Overloaded,
        StatusCode::SERVICE_UNAVAILABLE => ErrorCode::NotReady,
        s if s.is_server_error() => ErrorCode::Internal,
        _ => ErrorCode::InvalidRequest,
    };
    let message = if status.is_server_error() {
        tracing::error!(status = status.as_u16(), detail = %text, "server error");
        "internal error: the incident was logged".to_owned()
    } else if code == ErrorCode::PayloadTooLarge {
        "request body is larger than MAX_BODY_BYTES".to_owned()
    } else if text.is_empty() {
        status.canonical_reason().unwrap_or("bad request").to_owned()
    } else {
        text
    };
    let mut fresh = ApiError::new(code, message).into_response();
    *fresh.status_mut() = status;
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.remove(header::TRANSFER_ENCODING);
    for (name, value) in fresh.headers() {
        parts.headers.insert(name.clone(), value.clone());
    }
    parts.extensions.extend(std::mem::take(fresh.extensions_mut()));
    Response::from_parts(parts, fresh.into_body())
}

/// A handler that panicked (a bug): the client gets `internal`, the log gets the panic.
pub fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let detail = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("a handler panicked");
    ApiError::internal(format!("panic: {detail}")).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body_json(resp: Response) -> serde_json::Value {
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.expect("body");
        serde_json::from_slice(&bytes).expect("JSON body")
    }

    fn plain(status: StatusCode, text: &'static str) -> Response {
        (status, [(header::ALLOW, "GET")], text).into_response()
    }

    #[tokio::test]
    async fn plain_text_errors_become_catalogue_json() {
        let r = json_errors(plain(StatusCode::BAD_REQUEST, "Invalid URL: Cannot parse `%FF`")).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
        assert_eq!(r.headers()[header::ALLOW], "GET", "other headers are kept");
        let v = body_json(r).await;
        assert_eq!((v["status"].as_str(), v["code"].as_str()), (Some("error"), Some("invalid_request")));
        assert_eq!(v["message"], "Invalid URL: Cannot parse `%FF`");

        let r = json_errors(plain(StatusCode::UNSUPPORTED_MEDIA_TYPE, "")).await;
        assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE, "the status is kept");
        let v = body_json(r).await;
        assert_eq!((v["code"].as_str(), v["message"].as_str()), (Some("unsupported_media_type"), Some("Unsupported Media Type")));

        let r = json_errors(plain(StatusCode::PAYLOAD_TOO_LARGE, "length limit exceeded")).await;
        assert_eq!(body_json(r).await["code"], "payload_too_large");

        // A server error's text is internal: logged, not sent.
        let r = json_errors(plain(StatusCode::BAD_GATEWAY, "db password is hunter2")).await;
        assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
        let v = body_json(r).await;
        assert_eq!(v["code"], "internal");
        assert!(!v.to_string().contains("hunter2"));
    }

    #[tokio::test]
    async fn json_and_successes_pass_through() {
        let ok = json_errors((StatusCode::OK, "fine").into_response()).await;
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(axum::body::to_bytes(ok.into_body(), 64).await.expect("body"), "fine");
        let legacy = ApiError::legacy(ErrorCode::UserNotFound, "User 'a' not found.").into_response();
        let v = body_json(json_errors(legacy).await).await;
        assert_eq!(v, serde_json::json!({"status": "error", "message": "User 'a' not found."}));
    }

    #[tokio::test]
    async fn a_panic_is_internal_without_its_text() {
        let r = panic_response(Box::new("index out of bounds: secret detail".to_owned()));
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let v = body_json(r).await;
        assert_eq!(v["code"], "internal");
        assert!(!v.to_string().contains("secret"));
    }
}
