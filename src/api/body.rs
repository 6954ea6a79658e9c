//! The run-parameters body of `POST /api/pipelines/{name}/runs`, read by hand so that each way it can
//! be wrong gets its own status and a message naming the problem: too large (413), not declared as
//! JSON (415), not valid JSON or not an object (400). axum's `Json` extractor would instead ignore a
//! body sent without a `Content-Type`, silently starting a run without the parameters asked for.

use std::borrow::Cow;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use serde_json::{Value, json};
use utoipa::openapi::{RefOr, Schema};

use super::ApiError;

/// Largest request body the API reads; run parameters are a few small values.
pub const MAX_BODY: usize = 64 * 1024;

/// Run parameters: a JSON object; `{}` when the body is empty or `null` (the document marks the body
/// optional and nullable).
pub struct RunParams(pub Value);

impl<S: Send + Sync> FromRequest<S> for RunParams {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let content_type = req
            .headers()
            .get(CONTENT_TYPE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| match e.status() {
                StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge(format!(
                    "the request body is larger than {} KiB; run parameters are a small JSON object",
                    MAX_BODY / 1024
                )),
                _ => ApiError::BadRequest(format!("cannot read the request body: {}", e.body_text())),
            })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(RunParams(json!({})));
        }
        match content_type.as_deref() {
            Some(ct) if is_json(ct) => {}
            Some(ct) => {
                return Err(ApiError::UnsupportedMediaType(format!(
                    "Content-Type \"{}\" is not JSON: send the run parameters as application/json",
                    ct.chars().take(100).collect::<String>()
                )));
            }
            None => {
                return Err(ApiError::UnsupportedMediaType(
                    "the body has no Content-Type: send the run parameters as application/json"
                        .into(),
                ));
            }
        }
        let value: Value = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::BadRequest(format!("the body is not valid JSON: {e}")))?;
        if value.is_null() {
            return Ok(RunParams(json!({})));
        }
        if !value.is_object() {
            return Err(ApiError::BadRequest(format!(
                "the body must be a JSON object of run parameters, not {}",
                kind(&value)
            )));
        }
        Ok(RunParams(value))
    }
}

/// Property names and strings: anything but NUL, which PostgreSQL's jsonb cannot store.
const NO_NUL: &str = "^[^\\u0000]*$";

/// The document's `RunParams`: what the database accepts (see `crm_sync.params_problem`), so that a
/// client generating requests from the document (schemathesis does) knows what will be refused. The
/// size (64 KiB) and depth (64) limits are stated in the description; JSON Schema cannot say them.
impl utoipa::PartialSchema for RunParams {
    fn schema() -> RefOr<Schema> {
        serde_json::from_value(json!({
            "type": "object",
            "description": "Run parameters: a JSON object of at most 64 KiB, nested at most 64 deep, \
                            without NUL characters, numbers below 1e308 in magnitude",
            "propertyNames": { "type": "string", "pattern": NO_NUL },
            "additionalProperties": { "$ref": "#/components/schemas/ParamValue" },
        }))
        .expect("RunParams schema")
    }
}

impl utoipa::ToSchema for RunParams {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("RunParams")
    }

    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        let value = serde_json::from_value(json!({
            "description": "A run parameter: JSON without NUL characters, numbers below 1e308 in magnitude",
            "anyOf": [
                { "type": "null" },
                { "type": "boolean" },
                { "type": "number", "exclusiveMinimum": -1e308, "exclusiveMaximum": 1e308 },
                { "type": "string", "pattern": NO_NUL },
                { "type": "array", "items": { "$ref": "#/components/schemas/ParamValue" } },
                {
                    "type": "object",
                    "propertyNames": { "type": "string", "pattern": NO_NUL },
                    "additionalProperties": { "$ref": "#/components/schemas/ParamValue" },
                },
            ],
        }))
        .expect("ParamValue schema");
        schemas.push(("ParamValue".into(), value));
    }
}

/// `application/json` or any `+json` type, parameters (charset) allowed.
fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// A JSON value's kind, for messages.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types() {
        assert!(is_json("application/json"));
        assert!(is_json("Application/JSON; charset=utf-8"));
        assert!(is_json("application/merge-patch+json"));
        assert!(!is_json("text/plain"));
        assert!(!is_json("application/x-www-form-urlencoded"));
        assert!(!is_json(""));
    }
}
