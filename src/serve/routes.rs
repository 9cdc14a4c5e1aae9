//! The HTTP API: `POST /v1/predict`, `POST /v1/encode`, `GET /v1/tasks`, `GET /health`,
//! `GET /metrics`. Handlers check and tokenize the request, hand the inputs to the batcher
//! and wait for its answer; every error is a JSON `{"error": "…"}` naming what is wrong.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use clap::ValueEnum;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use super::batcher::{Job, Queue, SubmitError, Work};
use super::infer::{Answer, ModelInfo};
use super::metrics::Metrics;
use crate::data::Tokenizer;
use crate::data::tokenizer::Encoded;
use crate::encode::Pooling;

/// What the handlers share.
pub struct AppState {
    pub queue: Queue,
    pub tokenizer: Tokenizer,
    pub info: ModelInfo,
    pub metrics: Arc<Metrics>,
    /// Inputs per request at most (`--max-inputs`).
    pub max_inputs: usize,
    /// Request body bytes at most (`--max-body`).
    pub max_body: usize,
}

pub fn router(state: Arc<AppState>) -> Router {
    let max_body = state.max_body;
    Router::new()
        .route("/v1/predict", post(predict))
        .route("/v1/encode", post(encode))
        .route("/v1/tasks", get(tasks))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

/// A 4xx or 5xx answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

fn error(status: StatusCode, message: impl Into<String>) -> ApiError {
    ApiError { status, message: message.into() }
}

fn bad_request(message: impl Into<String>) -> ApiError {
    error(StatusCode::BAD_REQUEST, message)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = axum::Json(json!({ "error": self.message }));
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            return (self.status, [(header::RETRY_AFTER, "1")], body).into_response();
        }
        (self.status, body).into_response()
    }
}

/// Answers and counts: the route's latency and status go to the metrics.
fn respond(state: &AppState, route: &str, started: Instant, result: Result<Value, ApiError>) -> Response {
    let response = match result {
        Ok(value) => axum::Json(value).into_response(),
        Err(error) => error.into_response(),
    };
    state.metrics.request(route, response.status().as_u16(), started.elapsed());
    response
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    text: Option<String>,
    text_b: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PredictRequest {
    task: Option<String>,
    inputs: Option<Vec<Input>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EncodeRequest {
    inputs: Option<Vec<Input>>,
    /// mean (default), cls or pooler.
    pooling: Option<String>,
    normalize: Option<bool>,
    /// Whose encoder, for `separate` checkpoints (one encoder per task).
    task: Option<String>,
}

/// The body as JSON of type `T`: 413 over the size limit, 400 if not UTF-8 or not valid.
fn parse<T: for<'de> Deserialize<'de>>(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => {
            error(rejection.status(), format!("request body over {} bytes (--max-body)", state.max_body))
        }
        status => error(status, format!("reading the request body: {}", rejection.body_text())),
    })?;
    let text = std::str::from_utf8(&bytes).map_err(|e| {
        bad_request(format!("request body is not UTF-8 (invalid byte at offset {})", e.valid_up_to()))
    })?;
    serde_json::from_str(text).map_err(|e| bad_request(format!("malformed JSON request: {e}")))
}

/// Checks the count and tokenizes each input as training did (pairs, truncation).
fn tokenize(state: &AppState, inputs: Option<Vec<Input>>, pairs: bool) -> Result<Vec<Encoded>, ApiError> {
    let inputs = inputs.ok_or_else(|| bad_request("missing \"inputs\": a list of {\"text\": …}"))?;
    if inputs.is_empty() {
        return Err(bad_request("\"inputs\" is empty"));
    }
    if inputs.len() > state.max_inputs {
        let message =
            format!("{} inputs, at most {} per request (--max-inputs)", inputs.len(), state.max_inputs);
        return Err(error(StatusCode::PAYLOAD_TOO_LARGE, message));
    }
    let mut encoded = Vec::with_capacity(inputs.len());
    for (i, input) in inputs.iter().enumerate() {
        let text =
            input.text.as_deref().ok_or_else(|| bad_request(format!("inputs[{i}]: missing \"text\"")))?;
        if input.text_b.is_some() && !pairs {
            return Err(bad_request(format!("inputs[{i}]: \"text_b\": /v1/encode embeds single texts")));
        }
        let e = state
            .tokenizer
            .encode_pair(text, input.text_b.as_deref(), state.info.max_length)
            .map_err(|e| bad_request(format!("inputs[{i}]: {e}")))?;
        encoded.push(e);
    }
    Ok(encoded)
}

/// The index of the task called `name` ("sst-2", "SST2" and "SST-2" are one task).
fn find_task(info: &ModelInfo, name: &str) -> Result<usize, ApiError> {
    let key = |s: &str| s.to_lowercase().replace(['-', '_'], "");
    info.tasks.iter().position(|t| key(&t.name) == key(name)).ok_or_else(|| {
        let known: Vec<&str> = info.tasks.iter().map(|t| t.name.as_str()).collect();
        bad_request(format!("unknown task '{name}': this model serves {}", known.join(", ")))
    })
}

/// Queues the inputs and waits for the batch that carries them.
async fn run(state: &AppState, work: Work, inputs: Vec<Encoded>) -> Result<Vec<Vec<f32>>, ApiError> {
    let (reply, answer) = oneshot::channel();
    let job = Job { work, inputs, queued: Instant::now(), reply };
    state.queue.submit(job).map_err(|e| match e {
        SubmitError::Full => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the queue is full ({} requests waiting): try again", state.metrics.queue_depth()),
        ),
        SubmitError::Stopped => error(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down"),
    })?;
    match answer.await {
        Ok(Ok(outputs)) => Ok(outputs),
        Ok(Err(message)) => {
            Err(error(StatusCode::INTERNAL_SERVER_ERROR, format!("inference failed: {message}")))
        }
        Err(_) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, "the GPU thread stopped")),
    }
}

async fn predict(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let started = Instant::now();
    let result = async {
        let request: PredictRequest = parse(&state, body)?;
        let name = request.task.ok_or_else(|| bad_request("missing \"task\""))?;
        let task = find_task(&state.info, &name)?;
        let inputs = tokenize(&state, request.inputs, true)?;
        let outputs = run(&state, Work::Predict { task }, inputs).await?;
        let info = &state.info.tasks[task];
        let answers: Vec<Answer> = outputs.iter().map(|o| Answer::new(info, o)).collect();
        Ok(json!({ "task": info.name, "predictions": answers }))
    }
    .await;
    respond(&state, "/v1/predict", started, result)
}

async fn encode(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let started = Instant::now();
    let result = async {
        let request: EncodeRequest = parse(&state, body)?;
        let name = request.pooling.as_deref().unwrap_or("mean");
        let pooling = Pooling::from_str(name, true)
            .map_err(|_| bad_request(format!("\"pooling\": '{name}': use mean, cls or pooler")))?;
        let encoder = match (&request.task, state.info.encoders) {
            (Some(name), _) => state.info.tasks[find_task(&state.info, name)?].encoder,
            (None, 1) => 0,
            (None, _) => {
                return Err(bad_request(
                    "this checkpoint has one encoder per task (separate): name one in \"task\"",
                ));
            }
        };
        let inputs = tokenize(&state, request.inputs, false)?;
        let mut embeddings = run(&state, Work::Encode { encoder, pooling }, inputs).await?;
        if request.normalize.unwrap_or(false) {
            crate::encode::normalize(&mut embeddings);
        }
        let dimensions = embeddings.first().map_or(0, Vec::len);
        Ok(json!({ "pooling": name.to_lowercase(), "dimensions": dimensions, "embeddings": embeddings }))
    }
    .await;
    respond(&state, "/v1/encode", started, result)
}

async fn tasks(State(state): State<Arc<AppState>>) -> Response {
    let started = Instant::now();
    let result = serde_json::to_value(&state.info)
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()));
    respond(&state, "/v1/tasks", started, result)
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    let started = Instant::now();
    let result = Ok(json!({ "status": "ok", "queue_depth": state.metrics.queue_depth() }));
    respond(&state, "/health", started, result)
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let content_type = [(header::CONTENT_TYPE, "text/plain; version=0.0.4")];
    (content_type, state.metrics.render()).into_response()
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    let routes = "POST /v1/predict, POST /v1/encode, GET /v1/tasks, GET /health, GET /metrics";
    error(StatusCode::NOT_FOUND, format!("no route {}: the routes are {routes}", uri.path()))
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    error(StatusCode::METHOD_NOT_ALLOWED, format!("{method} {} is not served", uri.path()))
}
