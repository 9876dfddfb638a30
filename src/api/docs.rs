//! `GET /redoc`: ReDoc's reference page, rendered from `/openapi.json` with ReDoc's script
//! compiled into the binary (assets/README.md says where it comes from), so the page works
//! with no network. Swagger UI at `/docs` is served by utoipa-swagger-ui (vendored too).

use axum::http::header;
use axum::response::{Html, IntoResponse};

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
    <script>
      Redoc.init("/openapi.json", { hideDownloadButton: false }, document.getElementById("redoc-container"));
    </script>
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
