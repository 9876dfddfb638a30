//! `GET /redoc`: ReDoc's reference page, rendered from `/openapi.json` with ReDoc's script
//! compiled into the binary (assets/README.md says where it comes from), so the page works
//! with no network. Swagger UI at `/docs` is served by utoipa-swagger-ui (vendored too). Both
//! pages carry a Content-Security-Policy that lets them load only from this service.

use axum::http::{HeaderValue, header};
use axum::response::{Html, IntoResponse, Response};

/// The policy of `/docs` and `/redoc`: scripts, styles, fonts and requests from this service
/// only, no inline script (ReDoc's start is a file of its own), no frames, no form posts out.
/// Inline styles are allowed (both pages set `style` attributes from script); images may be
/// `data:` (Swagger UI's icons); ReDoc's search runs in a worker made from a `blob:` URL.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; \
font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// Router layer on the reference pages: their Content-Security-Policy.
pub async fn content_security_policy(mut resp: Response) -> Response {
    resp.headers_mut().insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    resp
}

/// What starts ReDoc on the page, as a file so that the policy needs no inline script.
const REDOC_INIT_JS: &str = "Redoc.init(\"/openapi.json\", { hideDownloadButton: false }, document.getElementById(\"redoc-container\"));\n";

/// ReDoc 2.5.4's standalone bundle.
const REDOC_JS: &[u8] = include_bytes!("assets/redoc.standalone.js");

const REDOC_HTML: &str = r#"<!DOCTYPE html>
<html lang="en">
  <head>
    <title>Face Recognition API - ReDoc</title>
    <meta charset="utf-8" />
    <meta name="viewport" content="width=device-width, initial-scale=1" />
    <style>body { margin: 0; padding: 0; }</style>
  </head>
  <body>
    <div id="redoc-container"></div>
    <script src="/redoc/redoc.standalone.js"></script>
    <script src="/redoc/redoc.init.js"></script>
  </body>
</html>
"#;

/// `GET /redoc`.
pub async fn redoc_page() -> Html<&'static str> {
    Html(REDOC_HTML)
}

/// `GET /redoc/redoc.standalone.js`.
pub async fn redoc_script() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/javascript; charset=utf-8"), (header::CACHE_CONTROL, "public, max-age=86400")], REDOC_JS)
}

/// `GET /redoc/redoc.init.js`.
pub async fn redoc_init() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/javascript; charset=utf-8"), (header::CACHE_CONTROL, "public, max-age=86400")], REDOC_INIT_JS)
}
