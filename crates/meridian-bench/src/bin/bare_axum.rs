//! The HTTP ceiling for benchmarks: an axum server whose every POST answers 200 with the same
//! body Meridian sends, after reading the request body. Same runtime and HTTP stack as Meridian.
//!
//! Usage: bare-axum [ADDRESS] (default 127.0.0.1:18099)

use axum::Router;
use axum::body::Bytes;
use axum::http::header;
use axum::routing::post;

async fn answer(_body: Bytes) -> ([(header::HeaderName, &'static str); 1], &'static str) {
    (
        [(header::CONTENT_TYPE, "application/json")],
        r#"{"success":true}"#,
    )
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let address = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18099".to_string());
    let app = Router::new()
        .route("/v1/track", post(answer))
        .route("/v1/batch", post(answer));
    let listener = tokio::net::TcpListener::bind(&address).await?;
    eprintln!("bare-axum listening on {address}");
    axum::serve(listener, app).await
}
