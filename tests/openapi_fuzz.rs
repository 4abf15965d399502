//! Property-based fuzzing of every documented operation with schemathesis: no 5xx for any
//! input, responses match the document, schema-valid requests are accepted and invalid ones
//! refused. A fixed seed keeps the run reproducible.

mod common;

use common::upstream::{answer, Upstream};
use common::{user_cmd, TestServer};
use edgechat::config::{ProviderName, RouteRule};
use std::process::Command;

#[tokio::test(flavor = "multi_thread")]
async fn schemathesis_finds_no_failures() {
    let st = Command::new("st").arg("--version").output();
    assert!(
        st.is_ok_and(|o| o.status.success()),
        "schemathesis is missing: pip install schemathesis==4.32.5 (./scripts/test.sh does)"
    );
    // Chat goes to a loopback stand-in for OpenAI (no local model: generation is slow here).
    let upstream = Upstream::start(vec![answer(vec!["Hello", "!"])]).await;
    let s = TestServer::start(|c| {
        c.providers.openai.base_url = upstream.base.clone();
        c.providers.openai.api_key = Some(edgechat::secret::Secret::new("sk-test"));
        c.routing.default_model = "gpt-4o-mini".into();
        c.routing.rules = vec![RouteRule::new("*", ProviderName::OPENAI)];
    })
    .await;
    let token = s.user("fuzzer").await;
    schemathesis(&s.url("/openapi.json"), &token, &[]).await;
    // The admin routes answer 404 to the token above; an admin's token reaches their inputs.
    // (No admin can demote, disable or delete itself over the API, so the run keeps its rights.)
    let dir = s.dir.path().to_path_buf();
    let created = tokio::task::spawn_blocking(move || {
        let args = ["create", "fuzzadmin", "--email", "fuzzadmin@example.com", "--admin"];
        user_cmd(&dir, &args, "password-fuzzadmin\n")
    });
    let (ok, _, err) = created.await.unwrap();
    assert!(ok, "{err}");
    let admin = s.login("fuzzadmin").await["access_token"].as_str().unwrap().to_string();
    schemathesis(&s.url("/openapi.json"), &admin, &["--include-path-regex", "^/admin/users"]).await;
    s.stop().await;
}

/// Runs schemathesis over the document at `spec` as `token`, with `extra` arguments.
async fn schemathesis(spec: &str, token: &str, extra: &[&str]) {
    let work = tempfile::tempdir().unwrap();
    // A named `tool_choice` must name one of the request's tools, which no JSON schema can say:
    // a schema-valid request to the OpenAI face may get the 400 that names the mismatch.
    let config = r#"
[[operations]]
include-path = "/v1/chat/completions"
include-method = "POST"
checks.positive_data_acceptance.expected-statuses = ["2XX", 400, 401, 403, 404, 409, 429, "5XX"]
"#;
    std::fs::write(work.path().join("schemathesis.toml"), config).unwrap();
    let mut st = Command::new("st");
    st.current_dir(work.path())
        .args(["run", spec, "--checks", "all", "--max-examples", "30", "--seed", "1"])
        // DELETE /chat/tasks/{id} cancels (API.md) and the task stays readable, which this
        // check takes for a use after free; deleted conversations are tested in
        // conversations.rs.
        .args(["--exclude-checks", "use_after_free"])
        .args(["--header", &format!("Authorization: Bearer {token}")])
        .args(extra)
        .env("NO_COLOR", "1");
    let out = tokio::task::spawn_blocking(move || st.output().unwrap()).await.unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{report}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(report.contains("passed"), "{report}");
}
