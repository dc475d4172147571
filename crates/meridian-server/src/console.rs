//! The admin console: static pages compiled into the binary (`console/` of this crate), served at
//! `/console`, working only through the admin API with the token the admin pastes (held in the
//! tab's sessionStorage, sent as a bearer header: no cookie, so no CSRF). Every response carries a
//! Content-Security-Policy that allows this origin only and no inline script, and the headers that
//! keep the pages out of frames and their addresses out of referrers.

use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::error::{ApiError, ApiPath};
use crate::routes::ApiRoutes;

const INDEX_HTML: &str = include_str!("../console/index.html");
const APP_JS: &str = include_str!("../console/app.js");
const APP_CSS: &str = include_str!("../console/app.css");

/// Only this origin; no inline script or style; no frames; forms and fetches to this origin.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; \
     frame-ancestors 'none'";

pub fn routes() -> ApiRoutes {
    ApiRoutes::new()
        .add(Method::GET, "/console", index)
        .add(Method::GET, "/console/", index)
        .add(Method::GET, "/console/{asset}", asset)
}

/// A console response with its security headers.
fn page(content_type: &'static str, body: &'static str) -> Response {
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    secure(headers);
    response
}

/// The console's security headers (also on its errors).
pub fn secure(headers: &mut axum::http::HeaderMap) {
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
}

async fn index() -> Response {
    page("text/html; charset=utf-8", INDEX_HTML)
}

async fn asset(ApiPath(asset): ApiPath<String>) -> Result<Response, ApiError> {
    match asset.as_str() {
        "app.js" => Ok(page("text/javascript; charset=utf-8", APP_JS)),
        "app.css" => Ok(page("text/css; charset=utf-8", APP_CSS)),
        "index.html" => Ok(page("text/html; charset=utf-8", INDEX_HTML)),
        _ => {
            let mut response =
                ApiError::not_found(format!("the console has no `{asset}`")).into_response();
            secure(response.headers_mut());
            Ok(response)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pages_have_no_inline_script_or_style() {
        for (name, text) in [("index.html", INDEX_HTML)] {
            let lower = text.to_ascii_lowercase();
            for (start, _) in lower.match_indices("<script") {
                let tag_end = lower[start..]
                    .find('>')
                    .map(|end| start + end)
                    .unwrap_or(lower.len());
                assert!(
                    lower[start..tag_end].contains(" src="),
                    "{name}: an inline <script>"
                );
            }
            assert!(!lower.contains("<style"), "{name}: an inline <style>");
            assert!(
                !lower.contains(" style="),
                "{name}: an inline style attribute"
            );
            assert!(
                !lower.contains(" onclick="),
                "{name}: an inline event handler"
            );
        }
        assert!(
            !APP_JS.contains("innerHTML"),
            "the console writes text, never HTML"
        );
        assert!(!APP_JS.contains("eval("));
    }
}
