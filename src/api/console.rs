//! `GET /console`: the operators' web console (people, face records, live camera, activity),
//! plain HTML, CSS and JavaScript modules under `assets/console/`, compiled into the binary so
//! that it works with no network and no build toolchain: edit the files, rebuild, reload. The
//! page itself is public; every call it makes goes to the protected endpoints with the key or
//! token the operator types (kept in the tab's session storage). Its Content-Security-Policy
//! lets it run only its own scripts and talk only to this service.

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::error::{ApiError, ErrorCode};

/// The console's policy: scripts and styles from this service only (no inline script or style
/// attribute), requests (fetch, the stream's WebSocket) to this service only, images from this
/// service or made in the page (`blob:` crops and snapshots, `data:`), the camera's stream as
/// media, no frames, no plugins, no form posts elsewhere.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; \
media-src 'self' blob: mediastream:; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

const JS: &str = "text/javascript; charset=utf-8";

/// The page's files: (name under `/console/`, content type, bytes).
const ASSETS: &[(&str, &str, &[u8])] = &[
    ("console.css", "text/css; charset=utf-8", include_bytes!("assets/console/console.css")),
    ("api.js", JS, include_bytes!("assets/console/api.js")),
    ("main.js", JS, include_bytes!("assets/console/main.js")),
    ("people.js", JS, include_bytes!("assets/console/people.js")),
    ("faces.js", JS, include_bytes!("assets/console/faces.js")),
    ("live.js", JS, include_bytes!("assets/console/live.js")),
    ("activity.js", JS, include_bytes!("assets/console/activity.js")),
];

const INDEX_HTML: &str = include_str!("assets/console/index.html");

/// The console's routes (public), with their policy.
pub fn router() -> Router {
    Router::new()
        .route("/console", get(page))
        .route("/console/", get(page))
        .route("/console/{file}", get(asset))
        .layer(axum::middleware::map_response(content_security_policy))
}

async fn content_security_policy(mut resp: Response) -> Response {
    resp.headers_mut().insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    resp
}

/// `GET /console`.
async fn page() -> Response {
    // Not cached: after an upgrade the page and its modules change together.
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], INDEX_HTML).into_response()
}

/// `GET /console/{file}`: one of [`ASSETS`].
async fn asset(Path(file): Path<String>) -> Result<Response, ApiError> {
    let (_, content_type, bytes) = ASSETS
        .iter()
        .find(|(name, _, _)| *name == file)
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("no console file {file}")))?;
    Ok(([(header::CONTENT_TYPE, *content_type), (header::CACHE_CONTROL, "no-cache")], *bytes).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file the page or a module names is served, and every served file is named.
    #[test]
    fn the_page_and_its_modules_name_exactly_the_served_files() {
        let mut named: Vec<String> = Vec::new();
        for (i, _) in INDEX_HTML.match_indices("/console/") {
            let rest = &INDEX_HTML[i + "/console/".len()..];
            named.push(rest.chars().take_while(|&c| c != '"').collect());
        }
        for (_, _, bytes) in ASSETS {
            let text = std::str::from_utf8(bytes).expect("assets are UTF-8");
            for (i, _) in text.match_indices("from \"./") {
                let rest = &text[i + "from \"./".len()..];
                named.push(rest.chars().take_while(|&c| c != '"').collect());
            }
        }
        named.sort();
        named.dedup();
        let mut served: Vec<String> = ASSETS.iter().map(|(n, _, _)| n.to_string()).collect();
        served.sort();
        assert_eq!(named, served);
    }

    /// Nothing is loaded from elsewhere: no absolute URL in the page or its files.
    #[test]
    fn no_file_refers_to_another_host() {
        let texts = ASSETS.iter().map(|(_, _, b)| std::str::from_utf8(b).expect("UTF-8")).chain([INDEX_HTML]);
        for text in texts {
            for needle in ["http://", "https://", "src=\"//", "href=\"//", "url("] {
                assert!(!text.contains(needle), "a console file contains {needle:?}");
            }
        }
    }
}
