//! The one place errors become HTTP responses: `{"success": false, "code", "message"}`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use meridian_catalog::CatalogError;
use meridian_core::{MessageRejection, RegionId};
use serde_json::{Value, json};
use tracing::error;

use crate::headers::X_REGION;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Stamped as `X-Region` (else the node's home region is).
    pub region: Option<RegionId>,
    pub retry_after_secs: Option<u64>,
    /// Seconds until a rate-limited project's bucket is full again (`X-RateLimit-Reset`).
    pub rate_limit_reset_secs: Option<u64>,
    /// Extra top-level fields of the body (e.g. `rejected`).
    pub extra: Option<Box<(&'static str, Value)>>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            region: None,
            retry_after_secs: None,
            rate_limit_reset_secs: None,
            extra: None,
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn invalid_api_key(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "invalid_api_key", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, code, message)
    }

    pub fn payload_too_large(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, code, message)
    }

    pub fn unavailable(
        code: &'static str,
        message: impl Into<String>,
        retry_after_secs: u64,
    ) -> ApiError {
        ApiError {
            retry_after_secs: Some(retry_after_secs),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
        }
    }

    pub fn rate_limited(retry_after_secs: u64, reset_secs: u64) -> ApiError {
        ApiError {
            retry_after_secs: Some(retry_after_secs),
            rate_limit_reset_secs: Some(reset_secs),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("this project is over its message rate; retry after {retry_after_secs} s"),
            )
        }
    }

    pub fn too_many_requests(
        code: &'static str,
        message: impl Into<String>,
        retry_after_secs: u64,
    ) -> ApiError {
        ApiError {
            retry_after_secs: Some(retry_after_secs),
            ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, code, message)
        }
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", message)
    }

    pub fn in_region(mut self, region: RegionId) -> ApiError {
        self.region = Some(region);
        self
    }

    pub fn with_extra(mut self, key: &'static str, value: Value) -> ApiError {
        self.extra = Some(Box::new((key, value)));
        self
    }

    pub fn from_rejection(rejection: MessageRejection) -> ApiError {
        let status = match rejection.code {
            meridian_core::RejectCode::MessageTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError::new(status, rejection.code.as_str(), rejection.message)
    }
}

impl From<CatalogError> for ApiError {
    fn from(failure: CatalogError) -> ApiError {
        match failure {
            CatalogError::NotFound(message) => ApiError::not_found(message),
            CatalogError::Conflict { code, message } => ApiError::conflict(code, message),
            CatalogError::Invalid(message) => ApiError::bad_request("invalid_request", message),
            CatalogError::Database(database_error) => {
                error!(error = %database_error, "catalog unavailable");
                ApiError::unavailable(
                    "catalog_unavailable",
                    "the catalog is unavailable; try again shortly",
                    5,
                )
            }
            not_served @ CatalogError::RegionNotServed { .. } => {
                ApiError::unavailable("region_not_served", not_served.to_string(), 5)
            }
            CatalogError::Corrupt(message) => {
                error!(%message, "catalog data inconsistent");
                ApiError::internal(
                    "the catalog holds inconsistent data; operators have been alerted in the logs",
                )
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"success": false, "code": self.code, "message": self.message});
        if let (Some(extra), Some(object)) = (self.extra, body.as_object_mut()) {
            let (key, value) = *extra;
            object.insert(key.to_string(), value);
        }
        let mut response = (self.status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        if let Some(region) = self.region
            && let Ok(value) = HeaderValue::from_str(region.as_str())
        {
            headers.insert(X_REGION, value);
        }
        if let Some(seconds) = self.retry_after_secs {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if let Some(seconds) = self.rate_limit_reset_secs {
            headers.insert("x-ratelimit-reset", HeaderValue::from(seconds));
        }
        response
    }
}

/// `axum::extract::Path` whose rejection is a JSON 400 like every other error.
pub struct ApiPath<T>(pub T);

impl<T, S> axum::extract::FromRequestParts<S> for ApiPath<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(ApiPath(value)),
            Err(rejection) => Err(ApiError::bad_request(
                "invalid_path",
                format!("invalid path parameter: {}", rejection.body_text()),
            )),
        }
    }
}
