//! The built-in chat page at `/`: served from the binary with a strict CSP, and used end to end
//! in a real headless Chromium (driven over WebDriver by chromedriver) against the real local
//! model: register, sign in, chat with a streamed answer, see a fallback marked, reload and
//! reopen the conversation. Screenshots go to `target/web-page*.png` for reviewers.

mod common;
mod common_local;
mod webdriver;

use common::{with_default_model, TestServer};
use common_local::default_model;
use futures_util::FutureExt;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use webdriver::{Browser, ENTER};

#[tokio::test]
async fn the_page_and_its_assets_are_served_from_the_binary_under_a_strict_csp() {
    let s = TestServer::start(|_| {}).await;
    let r = s.get("/", None).await;
    assert_eq!(r.status(), StatusCode::OK);
    let h = r.headers().clone();
    assert_eq!(h["content-type"], "text/html; charset=utf-8");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["cache-control"], "no-cache");
    let csp = h["content-security-policy"].to_str().unwrap();
    for directive in [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
        "require-trusted-types-for 'script'",
    ] {
        assert!(csp.contains(directive), "{directive} missing from {csp}");
    }
    assert!(!csp.contains("unsafe"), "{csp}");
    let html = r.text().await.unwrap();
    assert!(!html.contains("http://") && !html.contains("https://"), "no outside URLs");

    // Everything the page loads is ours, under /ui/, with the right type.
    let mut assets = Vec::new();
    for attr in ["src=\"", "href=\""] {
        for part in html.split(attr).skip(1) {
            assets.push(part.split('"').next().unwrap().to_string());
        }
    }
    assets.retain(|a| a != "/docs"); // the <noscript> pointer to the API explorer
    assets.sort();
    assert_eq!(assets, ["/ui/chat.css", "/ui/chat.js"]);
    for (path, content_type) in [
        ("/ui/chat.js", "text/javascript; charset=utf-8"),
        ("/ui/chat.css", "text/css; charset=utf-8"),
    ] {
        let r = s.get(path, None).await;
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        assert_eq!(r.headers()["content-type"], content_type, "{path}");
        assert_eq!(r.headers()["cache-control"], "no-cache", "{path}");
        let etag = r.headers()["etag"].to_str().unwrap().to_string();
        assert!(r.text().await.unwrap().len() > 500, "{path}");
        // Revalidation is cheap: the same build answers 304 with no body.
        let again = s.get_with(path, "if-none-match", &etag).await;
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED, "{path}");
        assert_eq!(again.headers()["etag"].to_str().unwrap(), etag);
        assert!(again.bytes().await.unwrap().is_empty());
    }
    assert_eq!(s.get("/ui/other.js", None).await.status(), StatusCode::NOT_FOUND);
    s.stop().await;
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

/// Saves a screenshot under `target/` and says where, for people reviewing the run.
async fn screenshot(b: &Browser, name: &str) -> PathBuf {
    let path = target_dir().join(name);
    b.screenshot(&path).await;
    println!("screenshot: {}", path.display());
    path
}

const QUESTION: &str = "What is the capital of France?";
const ANSWERED: &str = "#messages li.assistant[data-state='done'], \
    #messages li.assistant[data-state='failed']";
const SHORT: Duration = Duration::from_secs(10);
/// Generous for 24 tokens on two busy cores; an answer normally takes about a second.
const GENERATION: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread")]
async fn a_user_registers_signs_in_chats_and_reopens_the_conversation_in_chromium() {
    let started = Instant::now();
    let model = default_model();
    let s = TestServer::start(|c| {
        with_default_model(c, &model);
        // Short answers keep the test quick on two cores.
        c.routing.default_max_tokens = 24;
        // "Server default" on the page asks for OpenAI, which has no key here: the local
        // model stands in, and the page must say so.
        c.routing.default_model = "gpt-4o-mini".into();
    })
    .await;
    let b = Browser::start(1280, 860).await;
    let flow = AssertUnwindSafe(user_flow(&b, &s)).catch_unwind().await;
    if flow.is_err() {
        screenshot(&b, "web-page-failure.png").await;
    }
    b.close().await;
    s.stop().await;
    if let Err(panic) = flow {
        std::panic::resume_unwind(panic);
    }
    println!("browser test took {:.1} s", started.elapsed().as_secs_f64());
}

async fn user_flow(b: &Browser, s: &TestServer) {
    b.goto(&s.url("/")).await;
    // The script ran (it shows the sign-in view) and the stylesheet applied: both got past
    // the CSP.
    b.expect("#auth-view:not([hidden])", SHORT).await;
    let layout = b.execute("return getComputedStyle(document.body).display", vec![]).await;
    assert_eq!(layout, "flex", "chat.css is applied");

    // Register through the page.
    b.type_into("#register-username", "amelie").await;
    b.type_into("#register-email", "amelie@example.com").await;
    b.type_into("#register-password", "correct-horse").await;
    b.click("#register-form button").await;
    b.expect("#auth-notice:not([hidden])", SHORT).await;
    assert!(b.text("#auth-notice").await.contains("created"));
    let login = b.find("#login-username").await;
    assert_eq!(b.property(&login, "value").await, "amelie", "the new name is filled in");

    // A wrong password is refused with a clear message; the right one (Enter submits) signs in.
    b.type_into("#login-password", "wrong-password").await;
    b.click("#login-form button").await;
    b.expect("#login-error:not([hidden])", SHORT).await;
    assert_eq!(b.text("#login-error").await, "Wrong username or password.");
    b.type_into("#login-password", &format!("correct-horse{ENTER}")).await;
    b.expect("#chat-view:not([hidden])", SHORT).await;
    b.expect("#who:not(:empty)", SHORT).await;
    assert_eq!(b.text("#who").await, "amelie");

    // Pick the local model from /v1/models and ask; Enter sends.
    let option = b.expect("#model option[value='smollm2']", SHORT).await;
    b.click_on(&option).await;
    // Record what the answer shows while it is still streaming.
    b.execute(
        "window.partials = [];
         new MutationObserver(() => {
           const a = document.querySelector(\"#messages li.assistant[data-state='streaming'] .content\");
           if (a && a.textContent) window.partials.push(a.textContent);
         }).observe(document.getElementById('messages'),
                    {subtree: true, childList: true, characterData: true});",
        vec![],
    )
    .await;
    let asked = Instant::now();
    b.type_into("#message", &format!("{QUESTION}{ENTER}")).await;
    let answer = b.expect(ANSWERED, GENERATION).await;
    println!("streamed answer complete after {:.2} s", asked.elapsed().as_secs_f64());
    if b.attr(&answer, "data-state").await.as_deref() != Some("done") {
        panic!("the chat failed: {:?}", b.contents("#messages li.assistant").await);
    }
    let reply = b.contents("#messages li.assistant .content").await.remove(0);
    assert!(!reply.trim().is_empty(), "the answer is empty");
    println!("the local model answered: {reply:?}");
    assert_eq!(b.contents("#messages li.assistant .provider").await, ["local"]);
    assert!(b.contents("#messages .badge.fallback").await.is_empty(), "not a fallback");
    let partials: Vec<String> =
        serde_json::from_value(b.execute("return window.partials", vec![]).await).unwrap();
    assert!(
        partials.iter().any(|p| p.len() < reply.len() && reply.starts_with(p.as_str())),
        "no partial answer was rendered before the whole one: {partials:?} then {reply:?}"
    );
    println!("{} partial renders before the whole answer", partials.len());

    // The new conversation is listed and marked as the open one.
    let current = b.expect("#conversations button[aria-current='true']", SHORT).await;
    let id = b.attr(&current, "data-id").await.unwrap();

    // "Server default" is OpenAI without a key: the local model answers, visibly marked.
    b.click("#new-chat").await;
    b.click("#model option[value='']").await;
    b.type_into("#message", &format!("Say hello.{ENTER}")).await;
    let answer = b.expect(ANSWERED, GENERATION).await;
    assert_eq!(b.attr(&answer, "data-state").await.as_deref(), Some("done"));
    assert_eq!(b.attr(&answer, "data-fallback").await.as_deref(), Some("true"));
    assert_eq!(b.contents("#messages .badge.fallback").await, ["answered by local fallback"]);
    let badge = b.find("#messages .badge.fallback").await;
    let why = b.attr(&badge, "title").await;
    assert_eq!(why.as_deref(), Some("openai->local: not_configured"));
    screenshot(b, "web-page-fallback.png").await;

    // Reload: still signed in (sessionStorage), both conversations listed; reopen the first.
    b.refresh().await;
    b.expect("#chat-view:not([hidden])", SHORT).await;
    let listed = b.expect(&format!("#conversations button[data-id='{id}']"), SHORT).await;
    assert_eq!(b.contents("#conversations button").await.len(), 2);
    assert!(b.contents("#messages li").await.is_empty(), "a reload starts a new chat");
    b.click_on(&listed).await;
    b.expect("#messages li.assistant .meta", SHORT).await;
    assert_eq!(b.contents("#messages li.user .content").await, [QUESTION]);
    assert_eq!(b.contents("#messages li.assistant .content").await, [reply.as_str()]);

    // What the page showed is what was stored.
    let login = json!({"username": "amelie", "password": "correct-horse"});
    let token: Value = s.post("/auth/login", &login, None).await.json().await.unwrap();
    let token = token["access_token"].as_str().unwrap();
    let stored: Value =
        s.get(&format!("/conversations/{id}"), Some(token)).await.json().await.unwrap();
    let said: Vec<(&str, &str)> = stored["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect();
    // The page starts a conversation with a plain system line, and shows only the dialogue.
    let system = ("system", "You are a helpful assistant.");
    assert_eq!(said, [system, ("user", QUESTION), ("assistant", reply.as_str())]);

    let path = screenshot(b, "web-page.png").await;
    assert!(std::fs::metadata(path).unwrap().len() > 10_000, "a real picture");

    // The job queue: no way in for a user; an admin opens it from the page, which holds the
    // token a browser would not send to /admin/jobs by itself.
    b.expect("#jobs-link[hidden]", SHORT).await;
    let (ok, _, err) = common::user_cmd(s.dir.path(), &["grant-admin", "amelie"], "");
    assert!(ok, "{err}");
    b.refresh().await;
    let jobs = b.expect("#jobs-link:not([hidden])", SHORT).await;
    b.click_on(&jobs).await;
    b.expect("#jobs-view:not([hidden]) #jobs-counts th", SHORT).await;
    assert!(b.text("#jobs-summary").await.starts_with("Oldest queued:"));
    assert!(b.contents("#jobs-counts th").await.contains(&"queued".to_string()));
    b.click("#jobs-back").await;
    b.expect("#chat-view:not([hidden])", SHORT).await;
}
