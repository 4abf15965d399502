//! `/admin/users*`: account administration for admins — list and create accounts, grant or
//! revoke admin, disable, reset a password, delete an account with all its data, and see or
//! revoke another account's API keys. Anyone who is not an admin gets `404`, as for
//! `/admin/jobs`: the routes do not exist for them. The rules (no self-demotion or deletion
//! here, never zero active admins) live in `auth::admin`.

use super::auth::ApiKeyOut;
use super::extract::Checks;
use super::{handler, ApiError, App, Doc, Req, Routes};
use crate::auth::{check_password, Actor, Registration};
use crate::clock::rfc3339;
use crate::http::{empty, json, Body};
use crate::secret::Secret;
use crate::store::{DeletedUser, User};
use http::{Method, Response, StatusCode};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use utoipa::ToSchema;
use uuid::Uuid;

type Answer = Result<Response<Body>, ApiError>;

pub fn routes(r: &mut Routes) {
    let doc = |summary| Doc::new("admin", summary).secured();
    r.add(
        Method::GET,
        "/admin/users",
        handler(list),
        doc("Every account (admins only)").json_list::<AdminUser>(200).errors(&[404]),
    );
    r.add(
        Method::POST,
        "/admin/users",
        handler(create),
        doc("Create an account, also while registration is closed (admins only)")
            .body::<NewUserRequest>()
            .json::<AdminUser>(201)
            .errors(&[404, 409]),
    );
    r.add(
        Method::GET,
        "/admin/users/{id}",
        handler(show),
        doc("One account (admins only)").json::<AdminUser>(200).errors(&[404]),
    );
    r.add(
        Method::PATCH,
        "/admin/users/{id}",
        handler(update),
        doc("Grant or revoke admin, disable or enable (admins only; not your own role or \
             access, never the last admin's role)")
        .body::<UserPatch>()
        .json::<AdminUser>(200)
        .errors(&[403, 404, 409]),
    );
    r.add(
        Method::DELETE,
        "/admin/users/{id}",
        handler(delete),
        doc("Delete an account with its conversations, API keys, sessions and background \
             jobs, in one transaction (admins only; not yourself, never the last admin)")
        .json::<DeletedUserOut>(200)
        .errors(&[403, 404, 409]),
    );
    r.add(
        Method::PUT,
        "/admin/users/{id}/password",
        handler(reset_password),
        doc("Set a new password and end the account's sessions (admins only)")
            .body::<PasswordReset>()
            .empty(204)
            .errors(&[404]),
    );
    r.add(
        Method::GET,
        "/admin/users/{id}/api-keys",
        handler(list_keys),
        doc("An account's API keys, without the keys (admins only)")
            .json_list::<ApiKeyOut>(200)
            .errors(&[404]),
    );
    r.add(
        Method::DELETE,
        "/admin/users/{id}/api-keys/{key_id}",
        handler(revoke_key),
        doc("Revoke one of an account's API keys at once (admins only)").empty(204).errors(&[404]),
    );
}

/// An account as admins see it.
#[derive(Serialize, ToSchema)]
pub struct AdminUser {
    id: String,
    username: String,
    email: String,
    is_admin: bool,
    disabled: bool,
    created_at: String,
}

/// `POST /admin/users`.
#[derive(Deserialize, ToSchema)]
pub struct NewUserRequest {
    /// 3–32 characters of letters, digits, `_`, `.`, `-`; unique ignoring case.
    #[schema(min_length = 3, max_length = 32, pattern = "^[A-Za-z0-9_.-]{3,32}$")]
    username: String,
    /// A plausible address, unique ignoring case.
    #[schema(format = Email, max_length = 254)]
    email: String,
    /// At least 8 characters and at most 1024 bytes (UTF-8).
    #[schema(value_type = String, format = Password, min_length = 8, max_length = 1024)]
    password: Secret,
    /// Make the account an admin.
    #[serde(default)]
    is_admin: bool,
}

/// `PATCH /admin/users/{id}`: the fields to change; absent ones stay.
#[derive(Deserialize, ToSchema)]
pub struct UserPatch {
    /// Grant (`true`) or revoke (`false`) admin rights.
    #[serde(default)]
    is_admin: Option<bool>,
    /// Disable (`true`: tokens and API keys stop at once) or re-enable (`false`).
    #[serde(default)]
    disabled: Option<bool>,
}

/// `PUT /admin/users/{id}/password`.
#[derive(Deserialize, ToSchema)]
pub struct PasswordReset {
    /// At least 8 characters and at most 1024 bytes (UTF-8).
    #[schema(value_type = String, format = Password, min_length = 8, max_length = 1024)]
    password: Secret,
}

/// What went with a deleted account.
#[derive(Serialize, ToSchema)]
pub struct DeletedCounts {
    conversations: u64,
    messages: u64,
    api_keys: u64,
    refresh_tokens: u64,
    jobs: u64,
}

/// The deleted account, and what was deleted with it.
#[derive(Serialize, ToSchema)]
pub struct DeletedUserOut {
    user: AdminUser,
    deleted: DeletedCounts,
}

impl From<&User> for AdminUser {
    fn from(u: &User) -> Self {
        AdminUser {
            id: u.id.to_string(),
            username: u.username.clone(),
            email: u.email.clone(),
            is_admin: u.is_admin,
            disabled: u.disabled,
            created_at: rfc3339(u.created_at),
        }
    }
}

impl From<&DeletedUser> for DeletedUserOut {
    fn from(d: &DeletedUser) -> Self {
        DeletedUserOut {
            user: AdminUser::from(&d.user),
            deleted: DeletedCounts {
                conversations: d.conversations,
                messages: d.messages,
                api_keys: d.api_keys,
                refresh_tokens: d.refresh_tokens,
                jobs: d.jobs,
            },
        }
    }
}

/// The `{id}` of the path: a user id, or `404`.
fn target(req: &Req) -> Result<Uuid, ApiError> {
    req.id("id", "User not found")
}

fn user_json(status: StatusCode, user: &User) -> Response<Body> {
    json(status, &AdminUser::from(user))
}

async fn list(app: Arc<App>, req: Req) -> Answer {
    req.admin(&app).await?;
    let users: Vec<AdminUser> = app.auth.users().await?.iter().map(AdminUser::from).collect();
    Ok(json(StatusCode::OK, &users))
}

async fn create(app: Arc<App>, mut req: Req) -> Answer {
    req.admin(&app).await?;
    let body: NewUserRequest = req.json(&app).await?;
    let reg = Registration { username: body.username, email: body.email, password: body.password };
    Checks::default().all(reg.problems()).finish()?;
    let user = app.auth.register(reg, body.is_admin).await?;
    Ok(user_json(StatusCode::CREATED, &user))
}

async fn show(app: Arc<App>, req: Req) -> Answer {
    req.admin(&app).await?;
    Ok(user_json(StatusCode::OK, &app.auth.user(target(&req)?).await?))
}

async fn update(app: Arc<App>, mut req: Req) -> Answer {
    let actor = Actor::Admin(req.admin(&app).await?.user.id);
    let id = target(&req)?;
    let patch: UserPatch = req.json(&app).await?;
    let user = app.auth.change_access(actor, id, patch.is_admin, patch.disabled).await?;
    Ok(user_json(StatusCode::OK, &user))
}

async fn delete(app: Arc<App>, req: Req) -> Answer {
    let actor = Actor::Admin(req.admin(&app).await?.user.id);
    let deleted = app.auth.delete_user(actor, target(&req)?).await?;
    tracing::info!(user = %deleted.user.id, jobs = deleted.jobs, "account deleted by an admin");
    Ok(json(StatusCode::OK, &DeletedUserOut::from(&deleted)))
}

async fn reset_password(app: Arc<App>, mut req: Req) -> Answer {
    req.admin(&app).await?;
    let id = target(&req)?;
    let body: PasswordReset = req.json(&app).await?;
    Checks::default().field("password", check_password(body.password.expose())).finish()?;
    app.auth.reset_password(id, &body.password).await?;
    Ok(empty(StatusCode::NO_CONTENT))
}

async fn list_keys(app: Arc<App>, req: Req) -> Answer {
    req.admin(&app).await?;
    let keys: Vec<ApiKeyOut> =
        app.auth.user_api_keys(target(&req)?).await?.iter().map(ApiKeyOut::from).collect();
    Ok(json(StatusCode::OK, &keys))
}

async fn revoke_key(app: Arc<App>, req: Req) -> Answer {
    req.admin(&app).await?;
    let user = target(&req)?;
    let key = req.id("key_id", "API key not found")?;
    app.auth.revoke_api_key(user, key).await?;
    Ok(empty(StatusCode::NO_CONTENT))
}
