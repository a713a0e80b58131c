//! The frontend's one error type: every failure becomes an OpenAI-shaped JSON body
//! (`{"error": {"message", "type", "param", "code"}}`) with the matching HTTP status. Messages say
//! what was wrong and how to fix it; internals (stack traces, addresses) never leak.

use axum::{
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    /// 400: the request is well-formed JSON but asks for something invalid.
    pub fn invalid(message: impl Into<String>, param: &'static str) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: message.into(),
            param: Some(param),
            code: None,
        }
    }

    /// 400: the body is not JSON, or a field has the wrong type.
    pub fn malformed(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: message.into(),
            param: None,
            code: Some("invalid_json"),
        }
    }

    pub fn context_too_long(context: u32, prompt: u32, max_tokens: Option<u32>) -> ApiError {
        let message = match max_tokens {
            Some(m) => format!(
                "This model's maximum context length is {context} tokens. However, you requested {} tokens ({prompt} in the prompt, {m} in the completion). Please reduce the length of the prompt or of max_tokens.",
                u64::from(prompt) + u64::from(m)
            ),
            None => format!(
                "This model's maximum context length is {context} tokens. However, your prompt has {prompt} tokens, which leaves no room for the completion. Please reduce the length of the prompt."
            ),
        };
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message,
            param: Some("messages"),
            code: Some("context_length_exceeded"),
        }
    }

    pub fn model_not_found(requested: &str, served: &str) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "invalid_request_error",
            message: format!(
                "The model {requested:?} does not exist on this server. It serves {served:?} (see GET /v1/models)."
            ),
            param: Some("model"),
            code: Some("model_not_found"),
        }
    }

    pub fn too_large(limit: usize) -> ApiError {
        ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            kind: "invalid_request_error",
            message: format!(
                "Request body is larger than the limit of {limit} bytes. Send a shorter prompt, or raise the server's --max-body-bytes."
            ),
            param: None,
            code: Some("request_too_large"),
        }
    }

    pub fn no_worker(model: &str) -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "service_unavailable",
            message: format!(
                "No live worker is serving model {model:?} right now. Retry shortly; if this persists, check that the workers are running (GET /health lists them)."
            ),
            param: None,
            code: Some("no_live_worker"),
        }
    }

    pub fn draining() -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "service_unavailable",
            message: "The server is shutting down and takes no new requests; retry against another replica.".into(),
            param: None,
            code: Some("shutting_down"),
        }
    }

    pub fn upstream(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_GATEWAY,
            kind: "api_error",
            message: message.into(),
            param: None,
            code: Some("worker_error"),
        }
    }

    pub fn not_found(path: &str) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "invalid_request_error",
            message: format!(
                "Unknown path {path}. Endpoints: /v1/chat/completions, /v1/completions, /v1/models, /health, /live, /metrics, /openapi.json"
            ),
            param: None,
            code: Some("unknown_url"),
        }
    }

    pub fn method_not_allowed() -> ApiError {
        ApiError {
            status: StatusCode::METHOD_NOT_ALLOWED,
            kind: "invalid_request_error",
            message: "Method not allowed on this path (completions endpoints take POST with a JSON body).".into(),
            param: None,
            code: Some("method_not_allowed"),
        }
    }

    /// The JSON body alone (also used for an error event inside an SSE stream).
    pub fn to_json(&self) -> String {
        serde_json::to_string(&Body {
            error: Inner {
                message: &self.message,
                kind: self.kind,
                param: self.param,
                code: self.code,
            },
        })
        .unwrap_or_else(|_| r#"{"error":{"message":"internal error","type":"api_error"}}"#.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            self.to_json(),
        )
            .into_response()
    }
}

/// Describes a JSON decoding failure with the path of the offending field.
pub fn from_json_error(e: &serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = e.path().to_string();
    let inner = e.inner();
    let message = if inner.is_syntax() || inner.is_eof() {
        format!("Request body is not valid JSON: {inner}")
    } else if path.is_empty() || path == "." {
        format!("Invalid request body: {inner}")
    } else {
        format!("Invalid value for {path}: {inner}")
    };
    ApiError::malformed(message)
}
