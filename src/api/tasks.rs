//! Background chat (`/chat/background`, `/chat/tasks*`) and the queue's admin view
//! (`/admin/jobs`, JSON or a small HTML page): what Celery's API and Flower gave the seed.
//! Another user's task answers exactly like a missing one (`404`), and so does `/admin/jobs`
//! for anyone who is not an admin.

use super::chat::input;
use super::frame::admit;
use super::seed::{SeedAnswer, SeedRequest};
use super::{handler, ApiError, App, Doc, Req, Routes};
use crate::clock::rfc3339;
use crate::http::{bytes, json, Body};
use crate::jobs::JobAnswer;
use crate::store::{Job, JobStats};
use http::{header, HeaderValue, Method, Response, StatusCode};
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;
use utoipa::ToSchema;
use uuid::Uuid;

type Answer = Result<Response<Body>, ApiError>;

/// The window of the admin view's throughput and failure rate.
const WINDOW: Duration = Duration::from_secs(3600);

pub fn routes(r: &mut Routes) {
    let doc = |summary| Doc::new("tasks", summary).secured();
    r.add(
        Method::POST,
        "/chat/background",
        handler(enqueue),
        doc("Queue a chat to run in the background; stored before the answer")
            .body::<SeedRequest>()
            .json::<Queued>(202)
            .errors(&[404, 429, 503]),
    );
    r.add(
        Method::GET,
        "/chat/tasks",
        handler(list),
        doc("Your tasks, newest first")
            .paged(
                "^([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})?$",
            )
            .json::<TaskPage>(200)
            .errors(&[422]),
    );
    r.add(
        Method::GET,
        "/chat/tasks/{task_id}",
        handler(get),
        doc("One task").json::<Task>(200).errors(&[404]),
    );
    r.add(
        Method::DELETE,
        "/chat/tasks/{task_id}",
        handler(cancel),
        doc("Cancel a queued or running task").json::<Task>(200).errors(&[404, 409]),
    );
    r.add(
        Method::GET,
        "/admin/jobs",
        handler(admin),
        Doc::new("admin", "The job queue as a whole (admins only; HTML when asked for)")
            .secured()
            .json::<QueueView>(200)
            .errors(&[404]),
    );
}

/// `202` from `POST /chat/background`.
#[derive(Serialize, ToSchema)]
pub struct Queued {
    task_id: String,
    /// Always `queued`.
    status: &'static str,
}

/// A background task.
#[derive(Serialize, ToSchema)]
pub struct Task {
    task_id: String,
    /// `queued`, `running`, `succeeded`, `failed` or `cancelled`.
    status: &'static str,
    attempts: u32,
    /// What `POST /chat` would have answered, once succeeded.
    result: Option<SeedAnswer>,
    error: Option<String>,
    created_at: String,
    started_at: Option<String>,
    finished_at: Option<String>,
}

impl Task {
    fn of(job: &Job) -> Task {
        Task {
            task_id: job.id.to_string(),
            status: job.state.as_str(),
            attempts: job.attempts,
            result: job
                .result
                .clone()
                .and_then(|v| serde_json::from_value::<JobAnswer>(v).ok())
                .map(SeedAnswer::from),
            error: job.error.clone(),
            created_at: rfc3339(job.created_at),
            started_at: job.started_at.map(rfc3339),
            finished_at: job.finished_at.map(rfc3339),
        }
    }
}

/// One page of tasks.
#[derive(Serialize, ToSchema)]
pub struct TaskPage {
    items: Vec<Task>,
    /// Pass as `cursor` for the next page; `null` on the last one.
    next_cursor: Option<String>,
}

async fn enqueue(app: Arc<App>, mut req: Req) -> Answer {
    let principal = req.principal(&app).await?;
    let body: SeedRequest = req.json(&app).await?;
    admit(&app, principal.user.id)?;
    let input = input(&app, &body, principal.user.id)?;
    // What `POST /chat` would refuse before answering (an unknown model, another user's
    // conversation) is refused now, with the same status, not by a failed job later.
    app.chat.check(&input).await?;
    let job = app.jobs.enqueue(&input).await?;
    let mut r =
        json(StatusCode::ACCEPTED, &Queued { task_id: job.id.to_string(), status: "queued" });
    if let Ok(v) = HeaderValue::from_str(&format!("/chat/tasks/{}", job.id)) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    Ok(r)
}

async fn get(app: Arc<App>, req: Req) -> Answer {
    let principal = req.principal(&app).await?;
    let id = req.id("task_id", "Task not found")?;
    Ok(json(StatusCode::OK, &Task::of(&app.jobs.get(principal.user.id, id).await?)))
}

async fn list(app: Arc<App>, req: Req) -> Answer {
    let principal = req.principal(&app).await?;
    let (limit, cursor) = req.page(|c| Uuid::parse_str(c).ok())?;
    let (jobs, more) = app.jobs.list(principal.user.id, limit, cursor).await?;
    let next_cursor = jobs.last().filter(|_| more).map(|j| j.id.to_string());
    Ok(json(StatusCode::OK, &TaskPage { items: jobs.iter().map(Task::of).collect(), next_cursor }))
}

async fn cancel(app: Arc<App>, req: Req) -> Answer {
    let principal = req.principal(&app).await?;
    let id = req.id("task_id", "Task not found")?;
    Ok(json(StatusCode::OK, &Task::of(&app.jobs.cancel(principal.user.id, id).await?)))
}

/// `GET /admin/jobs`: what Flower showed.
#[derive(Serialize, ToSchema)]
pub struct QueueView {
    /// Jobs per state.
    #[schema(value_type = Object)]
    counts: serde_json::Map<String, serde_json::Value>,
    /// How long the oldest queued job has waited, in seconds.
    oldest_queued_age_s: Option<f64>,
    /// Over the last hour: jobs finished per minute, and the share of them that failed.
    window_s: u64,
    throughput_per_min: f64,
    failure_rate: f64,
    running: Vec<Task>,
    recent_failures: Vec<Task>,
}

impl QueueView {
    fn of(s: &JobStats) -> QueueView {
        let counts = s.counts.iter().map(|(k, n)| (k.as_str().to_string(), (*n).into())).collect();
        let minutes = WINDOW.as_secs_f64() / 60.0;
        QueueView {
            counts,
            oldest_queued_age_s: s.oldest_queued_ms.map(|ms| ms as f64 / 1000.0),
            window_s: WINDOW.as_secs(),
            throughput_per_min: s.finished_in_window as f64 / minutes,
            failure_rate: match s.finished_in_window {
                0 => 0.0,
                n => s.failed_in_window as f64 / n as f64,
            },
            running: s.running.iter().map(Task::of).collect(),
            recent_failures: s.recent_failures.iter().map(Task::of).collect(),
        }
    }
}

async fn admin(app: Arc<App>, req: Req) -> Answer {
    req.admin(&app).await?;
    let view = QueueView::of(&app.jobs.stats(WINDOW).await?);
    let wants_html = req
        .parts
        .headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"));
    if !wants_html {
        return Ok(json(StatusCode::OK, &view));
    }
    let mut r = bytes(StatusCode::OK, "text/html; charset=utf-8", html(&view));
    r.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'"),
    );
    Ok(r)
}

/// A plain page of the same figures; every value is escaped.
fn html(v: &QueueView) -> String {
    let esc = |s: &str| {
        s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
    };
    let mut out = String::from("<!doctype html><meta charset=utf-8><title>edgechat jobs</title><style>body{font:14px system-ui;margin:2em}td,th{padding:.2em .8em;text-align:left}</style><h1>Jobs</h1><table><tr>");
    for (state, n) in &v.counts {
        out += &format!("<th>{}</th><td>{}</td>", esc(state), n);
    }
    out += &format!(
        "</tr></table><p>Oldest queued: {} · finished per minute (last hour): {:.2} · failure rate: {:.1}%</p>",
        v.oldest_queued_age_s.map_or("none".into(), |s| format!("{s:.1} s")),
        v.throughput_per_min,
        v.failure_rate * 100.0
    );
    let rows = |title: &str, tasks: &[Task]| {
        let mut t = format!("<h2>{title}</h2><table><tr><th>task</th><th>attempts</th><th>started</th><th>error</th></tr>");
        for task in tasks {
            t += &format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&task.task_id),
                task.attempts,
                esc(task.started_at.as_deref().unwrap_or("")),
                esc(task.error.as_deref().unwrap_or(""))
            );
        }
        t + "</table>"
    };
    out += &rows("Running", &v.running);
    out += &rows("Recent failures", &v.recent_failures);
    out
}
