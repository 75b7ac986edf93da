//! The admin API: JSON under `/admin/api/…`, bearer-token protected (see `auth`), described by an
//! OpenAPI 3 document generated from these handlers (`GET /admin/api/openapi.json`).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::{OpenApi, ToSchema};

use super::explain::{self, RecordExplanation};
use super::pause::{self, Pause, Resumed};
use super::status::{self, DeadLetterView, FlowStatus, SystemStatus};
use super::AdminState;
use crate::domain::{RecordKey, SystemId};
use crate::ops::gauges::{self, QueueState};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tether admin API",
        description = "Operate Tether: systems, dataflows, record explanations, dead letters and \
                       the queue. Every call needs `Authorization: Bearer <admin.token>`."
    ),
    paths(systems, flows, pause_flow, resume_flow, record, dead_letters, retry_dead_letter, queue),
    modifiers(&BearerScheme),
    security(("bearer" = []))
)]
pub struct ApiDoc;

struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "bearer",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
    }
}

/// The protected routes (the caller adds the bearer check).
pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/admin/api/systems", get(systems))
        .route("/admin/api/flows", get(flows))
        .route("/admin/api/flows/{flow}/pause", post(pause_flow))
        .route("/admin/api/flows/{flow}/resume", post(resume_flow))
        .route(
            "/admin/api/records/{system}/{entity_type}/{id}",
            get(record),
        )
        .route("/admin/api/dead-letters", get(dead_letters))
        .route(
            "/admin/api/dead-letters/{id}/retry",
            post(retry_dead_letter),
        )
        .route("/admin/api/queue", get(queue))
}

/// `GET /admin/api/openapi.json`: open, like any API description (it holds no data).
pub async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

/// An error answer: `{"error": code, "message": ...}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ApiError {
    #[serde(skip)]
    status: StatusCode,
    /// `not_found`, `bad_request` or `database_unavailable`.
    pub error: &'static str,
    pub message: String,
}

impl ApiError {
    fn not_found(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            error: "not_found",
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            error: "bad_request",
            message: message.into(),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> ApiError {
        // The detail goes to the log only: it may name the database host.
        tracing::warn!(error = %e, "admin API: database error");
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            error: "database_unavailable",
            message: "the database did not answer; try again".to_owned(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self)).into_response()
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// Each system: connected, credentials ok, paused flows, last delivery and poll.
#[utoipa::path(get, path = "/admin/api/systems",
    responses((status = 200, body = Vec<SystemStatus>), (status = 401, body = ApiError)))]
async fn systems(State(state): State<AdminState>) -> ApiResult<Vec<SystemStatus>> {
    Ok(Json(status::systems(&state).await?))
}

/// Each dataflow with its links, recent decisions and last errors.
#[utoipa::path(get, path = "/admin/api/flows",
    responses((status = 200, body = Vec<FlowStatus>), (status = 401, body = ApiError)))]
async fn flows(State(state): State<AdminState>) -> ApiResult<Vec<FlowStatus>> {
    Ok(Json(status::flows(&state).await?))
}

/// Why a pause was made (optional body of the pause call).
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct PauseRequest {
    pub reason: Option<String>,
}

/// Pauses a dataflow in every replica (durable; see `resume`).
#[utoipa::path(post, path = "/admin/api/flows/{flow}/pause",
    params(("flow" = String, Path, description = "The flow id, e.g. `zendesk.Organizations->customerp.Customer`")),
    request_body(content = Option<PauseRequest>, content_type = "application/json"),
    responses((status = 200, body = Pause), (status = 404, body = ApiError)))]
async fn pause_flow(
    State(state): State<AdminState>,
    Path(flow): Path<String>,
    body: Option<Json<PauseRequest>>,
) -> ApiResult<Pause> {
    state.known_flow(&flow)?;
    let reason = body.and_then(|Json(b)| b.reason);
    Ok(Json(
        pause::pause(&state.pool, &flow, reason.as_deref()).await?,
    ))
}

/// Resumes a dataflow and replays the events that met the pause.
#[utoipa::path(post, path = "/admin/api/flows/{flow}/resume",
    params(("flow" = String, Path, description = "The flow id")),
    responses((status = 200, body = Resumed), (status = 404, body = ApiError)))]
async fn resume_flow(
    State(state): State<AdminState>,
    Path(flow): Path<String>,
) -> ApiResult<Resumed> {
    state.known_flow(&flow)?;
    Ok(Json(
        pause::resume(&state.pool, &flow, state.resume_settle).await?,
    ))
}

/// A record's links, every decision about it, and why it is not synced when it has no link.
#[utoipa::path(get, path = "/admin/api/records/{system}/{entity_type}/{id}",
    params(("system" = String, Path), ("entity_type" = String, Path), ("id" = String, Path)),
    responses((status = 200, body = RecordExplanation), (status = 400, body = ApiError)))]
async fn record(
    State(state): State<AdminState>,
    Path((system, entity_type, id)): Path<(String, String, String)>,
) -> ApiResult<RecordExplanation> {
    let key = record_key(&system, entity_type, id)?;
    Ok(Json(explain::explain(&state.pool, &key).await?))
}

/// Parses the record address of the API and the console.
pub fn record_key(system: &str, entity_type: String, id: String) -> Result<RecordKey, ApiError> {
    let system: SystemId = system
        .parse()
        .map_err(|e: crate::domain::UnknownSystem| ApiError::bad_request(e.to_string()))?;
    if entity_type.is_empty() || id.is_empty() {
        return Err(ApiError::bad_request(
            "the entity type and the id must not be empty",
        ));
    }
    Ok(RecordKey {
        system,
        entity_type,
        record_id: id,
    })
}

/// Jobs that failed for good, oldest first.
#[utoipa::path(get, path = "/admin/api/dead-letters",
    responses((status = 200, body = Vec<DeadLetterView>)))]
async fn dead_letters(State(state): State<AdminState>) -> ApiResult<Vec<DeadLetterView>> {
    Ok(Json(status::dead_letters(&state.pool).await?))
}

/// What a retry did.
#[derive(Debug, Serialize, ToSchema)]
pub struct Retried {
    /// The job put back in the queue.
    pub id: i64,
}

/// Puts one dead letter back in the queue with all its attempts.
#[utoipa::path(post, path = "/admin/api/dead-letters/{id}/retry",
    params(("id" = i64, Path, description = "The job id")),
    responses((status = 200, body = Retried), (status = 404, body = ApiError)))]
async fn retry_dead_letter(
    State(state): State<AdminState>,
    Path(id): Path<i64>,
) -> ApiResult<Retried> {
    retry(&state, id).await.map(Json)
}

/// Retries dead letter `id` (the API's and the console's one path).
pub async fn retry(state: &AdminState, id: i64) -> Result<Retried, ApiError> {
    let ids = crate::queue::store::retry_dead(&state.pool, Some(id)).await?;
    if ids.is_empty() {
        return Err(ApiError::not_found(format!(
            "job {id} is not a dead letter"
        )));
    }
    tracing::info!(
        job_id = id,
        "dead letter put back in the queue by an operator"
    );
    Ok(Retried { id })
}

/// Jobs per state and the age of the oldest due one, cluster-wide.
#[utoipa::path(get, path = "/admin/api/queue", responses((status = 200, body = QueueState)))]
async fn queue(State(state): State<AdminState>) -> ApiResult<QueueState> {
    Ok(Json(gauges::read(&state.pool).await?))
}

impl AdminState {
    /// 404 unless `flow` is a dataflow of the registry.
    pub fn known_flow(&self, flow: &str) -> Result<(), ApiError> {
        if self.registry.dataflows.iter().any(|f| f.id == flow) {
            Ok(())
        } else {
            Err(ApiError::not_found(format!(
                "no dataflow {flow:?} in the registry (see GET /admin/api/flows)"
            )))
        }
    }
}
