//! The API's errors: every failure leaves as `{"error": {"code", "message"}}` with a
//! stable machine-readable code and the matching HTTP status. The codes are part of the
//! API (documented in `openapi.json`); messages are for people and may change.

use bytes::Bytes;
use hatchery_scheduler::platform::PlatformError;
use http_body_util::Full;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use hyper::{Response, StatusCode};

use crate::auth::AuthError;

/// Every error code the API answers (the OpenAPI document lists the same).
pub const ERROR_CODES: &[&str] = &[
    "bad_json",
    "invalid_request",
    "invalid_limits",
    "policy_exceeds_org",
    "exceeds_largest_host",
    "exceeds_largest_group",
    "unknown_language",
    "payload_too_large",
    "code_too_large",
    "unauthorized",
    "forbidden",
    "not_found",
    "unknown_route",
    "method_not_allowed",
    "websocket_required",
    "queue_full",
    "store_unavailable",
    "not_ready",
    "internal",
];

/// Seconds a client is told to wait after `queue_full`.
pub const RETRY_AFTER_SECS: u32 = 2;

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// `Retry-After` seconds (503).
    pub retry_after: Option<u32>,
    /// `Allow` (405).
    pub allow: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
            allow: None,
        }
    }

    pub fn bad_json(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::BAD_REQUEST, "bad_json", message)
    }

    pub fn invalid(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message)
    }

    pub fn invalid_limits(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_limits", message)
    }

    pub fn payload_too_large(limit: usize) -> ApiError {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request body is larger than {limit} bytes"),
        )
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn unknown_route(path: &str) -> ApiError {
        Self::new(
            StatusCode::NOT_FOUND,
            "unknown_route",
            format!("no route {path}; see /v1/openapi.json"),
        )
    }

    pub fn method_not_allowed(allow: &[&str]) -> ApiError {
        let mut e = Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("this route answers {}", allow.join(", ")),
        );
        e.allow = Some(allow.join(", "));
        e
    }

    pub fn upgrade_required() -> ApiError {
        Self::new(
            StatusCode::UPGRADE_REQUIRED,
            "websocket_required",
            "this route is a WebSocket: send a GET with `Upgrade: websocket`",
        )
    }

    pub fn internal() -> ApiError {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error (logged with the request id)",
        )
    }

    pub fn into_response(self) -> Response<Full<Bytes>> {
        let body = serde_json::json!({
            "error": { "code": self.code, "message": self.message }
        });
        let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
        *resp.status_mut() = self.status;
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if self.status == StatusCode::UNAUTHORIZED {
            h.insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"hatchery\""),
            );
        }
        if let Some(s) = self.retry_after {
            h.insert(RETRY_AFTER, HeaderValue::from(s));
        }
        if let Some(a) = &self.allow {
            if let Ok(v) = HeaderValue::from_str(a) {
                h.insert(ALLOW, v);
            }
        }
        resp
    }
}

impl From<PlatformError> for ApiError {
    fn from(e: PlatformError) -> ApiError {
        let status = match &e {
            PlatformError::NotFound | PlatformError::NoArtifact(_) | PlatformError::NoHost(_) => {
                StatusCode::NOT_FOUND
            }
            PlatformError::Forbidden(_) => StatusCode::FORBIDDEN,
            PlatformError::UnknownLanguage(_)
            | PlatformError::InvalidLimits(_)
            | PlatformError::PolicyExceedsOrg(_)
            | PlatformError::ExceedsLargestHost { .. }
            | PlatformError::ExceedsLargestGroup { .. }
            | PlatformError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            PlatformError::CodeTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            PlatformError::QueueFull | PlatformError::StoreUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            PlatformError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if let PlatformError::Internal(m) = &e {
            tracing::error!(error = %m, "platform error");
            return ApiError::internal();
        }
        let mut out = ApiError::new(status, e.code(), e.to_string());
        if matches!(
            e,
            PlatformError::QueueFull | PlatformError::StoreUnavailable
        ) {
            out.retry_after = Some(RETRY_AFTER_SECS);
        }
        out
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> ApiError {
        ApiError::unauthorized(e.to_string())
    }
}

/// A JSON body's parse error: malformed JSON is `bad_json` (400); well-formed JSON of
/// the wrong shape (unknown or missing fields, wrong types) is `invalid_request` (422).
pub fn from_json_error(e: serde_json::Error) -> ApiError {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => {
            ApiError::bad_json(format!("malformed JSON: {e}"))
        }
        Category::Data => ApiError::invalid(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_errors_map_to_statuses() {
        let e: ApiError = PlatformError::QueueFull.into();
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.code, "queue_full");
        let r = e.into_response();
        assert_eq!(r.headers()[RETRY_AFTER], "2");
        let e: ApiError = PlatformError::CodeTooLarge { size: 9, limit: 1 }.into();
        assert_eq!(
            (e.status, e.code),
            (StatusCode::PAYLOAD_TOO_LARGE, "code_too_large")
        );
        let e: ApiError = PlatformError::Internal("secret path".into()).into();
        assert!(!e.message.contains("secret"));
        let r = ApiError::unauthorized("x").into_response();
        assert!(r.headers()[WWW_AUTHENTICATE]
            .to_str()
            .unwrap()
            .starts_with("Bearer"));
    }

    #[test]
    fn json_errors_split_syntax_from_shape() {
        let syntax = serde_json::from_str::<serde_json::Value>("{nope").unwrap_err();
        assert_eq!(from_json_error(syntax).code, "bad_json");
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct S {
            a: u32,
        }
        let shape = serde_json::from_str::<S>("{\"b\": 1}").unwrap_err();
        assert_eq!(from_json_error(shape).code, "invalid_request");
    }
}
