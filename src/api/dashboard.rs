//! The web dashboard: `/` and its assets, files of `assets/dashboard/` embedded in the
//! binary (it works offline, with no Node toolchain to build it). The pages are a client
//! of the same HTTP API as everyone else, so they need no route or role of their own: the
//! shell holds no data, and every read it makes carries the `read` token the person
//! signed in with.
//!
//! Every answer carries a strict Content-Security-Policy (scripts and styles only from
//! this origin, nothing inline, no frames), the second wall behind the pages' rule of
//! showing record text only as text.

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sha2::{Digest, Sha256};

use super::AppState;

/// The policy every dashboard response carries.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; \
     frame-ancestors 'none'";

/// One embedded file.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

macro_rules! asset {
    ($path:literal, $type:literal) => {
        Asset { path: $path, content_type: $type, body: include_bytes!(concat!("../../assets/dashboard/", $path)) }
    };
}

/// The dashboard's files. The vendored library keeps its licence beside it.
const ASSETS: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("app.js", "text/javascript; charset=utf-8"),
    asset!("app.css", "text/css; charset=utf-8"),
    asset!("favicon.svg", "image/svg+xml"),
    asset!("vendor/uPlot.iife.min.js", "text/javascript; charset=utf-8"),
    asset!("vendor/uPlot.min.css", "text/css; charset=utf-8"),
    asset!("vendor/uPlot.LICENSE", "text/plain; charset=utf-8"),
];

/// The dashboard's routes: open, like the shell of any web application.
pub(super) fn routes() -> Router<AppState> {
    Router::new().route("/", get(index)).route("/assets/{*path}", get(asset))
}

async fn index(headers: HeaderMap) -> Response {
    serve("index.html", &headers)
}

async fn asset(Path(path): Path<String>, headers: HeaderMap) -> Response {
    if path == "index.html" {
        return StatusCode::NOT_FOUND.into_response();
    }
    serve(&path, &headers)
}

/// Answers with the embedded file, or `304` when the browser's copy is current: files
/// change only with the binary, and `no-cache` makes the browser ask every time, so a new
/// version is never hidden behind a stale cache.
fn serve(path: &str, headers: &HeaderMap) -> Response {
    let Some(asset) = ASSETS.iter().find(|a| a.path == path) else {
        return (StatusCode::NOT_FOUND, secure_headers(), "no such file").into_response();
    };
    let etag = format!("\"{}\"", hex::encode(&Sha256::digest(asset.body)[..12]));
    let fresh = headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()).is_some_and(|v| v == etag);
    let mut response = if fresh { StatusCode::NOT_MODIFIED.into_response() } else { asset.body.into_response() };
    let h = response.headers_mut();
    h.extend(secure_headers());
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(etag) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, etag);
    }
    response
}

fn secure_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_the_page_names_is_embedded() {
        let index = std::str::from_utf8(ASSETS[0].body).unwrap();
        for reference in index.split('"').filter(|s| s.starts_with("/assets/")) {
            let path = reference.trim_start_matches("/assets/");
            assert!(ASSETS.iter().any(|a| a.path == path), "{path} is referenced by index.html but not embedded");
        }
    }

    #[test]
    fn the_page_has_no_inline_script_or_style() {
        for asset in ASSETS.iter().filter(|a| a.path.ends_with(".html")) {
            let text = std::str::from_utf8(asset.body).unwrap();
            assert!(!text.contains("<script>") && !text.contains("style="), "{}", asset.path);
            assert!(!text.contains("http://") && !text.contains("https://"), "{} loads from elsewhere", asset.path);
        }
    }

    #[test]
    fn the_pages_weigh_less_than_300_kb() {
        let total: usize = ASSETS.iter().filter(|a| !a.path.ends_with("LICENSE")).map(|a| a.body.len()).sum();
        assert!(total < 300 * 1024, "{total} bytes");
    }
}
