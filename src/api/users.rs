//! Users: create, list (no vectors), delete (the use cases are the service's).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AppState;
use super::error::{ApiError, ErrorBody};
use super::extract::{JsonBody, parse_json, validate_new_username};
use crate::store::{UserSummary, rfc3339};

/// `POST /users` body.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"username": "alice"}))]
pub struct CreateUser {
    /// 1 to 128 characters, no control characters, not `Unknown <n>` (how unknown faces are named).
    pub username: String,
}

/// `GET /users` answer.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"count": 1, "users": [{"username": "alice", "samples": 3, "model_id": "w600k_mbf@9cc6e4a75f0e", "updated_at": "2026-11-22T08:00:00.000Z"}]}))]
pub struct UserList {
    pub count: usize,
    pub users: Vec<UserSummary>,
}

/// `DELETE /users/{username}` answer.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"status": "deleted", "username": "alice"}))]
pub struct Deleted {
    pub status: String,
    pub username: String,
}

/// Create a user (no template until the first enrolment).
#[utoipa::path(
    post,
    path = "/users",
    tag = "users",
    request_body = CreateUser,
    responses(
        (status = 201, description = "Created", body = UserSummary),
        (status = 400, description = "Bad body or username, `Unknown <n>` included (`invalid_json`, `invalid_username`)", body = ErrorBody),
        (status = 409, description = "The name is taken (`user_exists`)", body = ErrorBody),
        (status = 415, description = "The body is not labelled `Content-Type: application/json` (`unsupported_media_type`)", body = ErrorBody),
        (status = 503, description = "Database unavailable; nothing changed (`store_unavailable`)", body = ErrorBody),
    )
)]
pub async fn create_user(State(st): State<Arc<AppState>>, JsonBody(body): JsonBody) -> Result<(StatusCode, Json<UserSummary>), ApiError> {
    let req: CreateUser = parse_json(&body)?;
    validate_new_username(&req.username, &st.limits)?;
    let record = st.service.create_user(&req.username).await?;
    let summary = UserSummary {
        username: record.username,
        samples: record.samples,
        model_id: record.model_id,
        updated_at: rfc3339(record.updated_at),
    };
    Ok((StatusCode::CREATED, Json(summary)))
}

/// List users with their sample counts (no vectors), sorted by name.
#[utoipa::path(
    get,
    path = "/users",
    tag = "users",
    responses(
        (status = 200, description = "Every user", body = UserList),
        (status = 503, description = "Database unavailable (`store_unavailable`)", body = ErrorBody),
    )
)]
pub async fn list_users(State(st): State<Arc<AppState>>) -> Result<Json<UserList>, ApiError> {
    let users = st.service.list_users().await?;
    Ok(Json(UserList { count: users.len(), users }))
}

/// Delete a user: gone from the store and from recognition.
#[utoipa::path(
    delete,
    path = "/users/{username}",
    tag = "users",
    params(("username" = String, Path, description = "The user to delete")),
    responses(
        (status = 200, description = "Deleted", body = Deleted),
        (status = 404, description = "No such user (`user_not_found`)", body = ErrorBody),
        (status = 503, description = "Database unavailable; nothing changed (`store_unavailable`)", body = ErrorBody),
    )
)]
pub async fn delete_user(State(st): State<Arc<AppState>>, Path(username): Path<String>) -> Result<Json<Deleted>, ApiError> {
    st.service.delete_user(&username).await?;
    Ok(Json(Deleted { status: "deleted".into(), username }))
}
