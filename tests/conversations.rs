//! Conversations over HTTP: listing with cursors, detail with messages, delete, and strict
//! isolation between users. Turns are written through the store API the chat service uses.

mod common;

use common::TestServer;
use edgechat::store::{NewMessage, Role, TurnTarget, Usage};
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

async fn user_id(s: &TestServer, token: &str) -> Uuid {
    let me: Value = s.get("/auth/me", Some(token)).await.json().await.unwrap();
    me["id"].as_str().unwrap().parse().unwrap()
}

async fn add_conversation(s: &TestServer, owner: Uuid, title: &str, at: i64) -> Uuid {
    let turn = vec![
        NewMessage {
            role: Role::User,
            content: format!("{title}?"),
            tool_calls: Vec::new(),
            tool_call_id: None,
            model: None,
            provider: None,
            usage: None,
        },
        NewMessage {
            role: Role::Assistant,
            content: format!("{title}!"),
            tool_calls: Vec::new(),
            tool_call_id: None,
            model: Some("smollm2".into()),
            provider: Some("local".into()),
            usage: Some(Usage { prompt_tokens: 3, completion_tokens: 2, cached_tokens: 0 }),
        },
    ];
    let target = TurnTarget::New { title: title.into(), model: "smollm2".into() };
    s.running().store().record_turn(owner, target, turn, at).await.unwrap().0.id
}

#[tokio::test]
async fn listing_pages_newest_first_and_detail_shows_messages() {
    let s = TestServer::start(|_| {}).await;
    let token = s.user("alice").await;
    let alice = user_id(&s, &token).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(add_conversation(&s, alice, &format!("c{i}"), 1_000 + i).await);
    }
    let mut seen = Vec::new();
    let mut path = "/conversations?limit=2".to_string();
    loop {
        let page: Value = s.get(&path, Some(&token)).await.json().await.unwrap();
        seen.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["title"].as_str().unwrap().to_string()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => path = format!("/conversations?limit=2&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(seen, ["c4", "c3", "c2", "c1", "c0"]);

    let page: Value = s.get("/conversations", Some(&token)).await.json().await.unwrap();
    let first = &page["items"][0];
    assert_eq!(first["message_count"], 2);
    assert_eq!(first["model"], "smollm2");
    assert!(first["updated_at"].as_str().unwrap().ends_with('Z'));

    let detail: Value =
        s.get(&format!("/conversations/{}", ids[0]), Some(&token)).await.json().await.unwrap();
    assert_eq!(detail["title"], "c0");
    let messages = detail["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2);
    assert_eq!(
        (messages[0]["role"].as_str(), messages[0]["content"].as_str()),
        (Some("user"), Some("c0?"))
    );
    assert_eq!(messages[1]["provider"], "local");
    assert_eq!(
        messages[1]["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})
    );
    assert!(messages[0]["usage"].is_null());
    s.stop().await;
}

#[tokio::test]
async fn another_users_conversation_is_404_everywhere() {
    let s = TestServer::start(|_| {}).await;
    let a = s.user("anna").await;
    let b = s.user("bert").await;
    let anna = user_id(&s, &a).await;
    let ids =
        [add_conversation(&s, anna, "one", 1).await, add_conversation(&s, anna, "two", 2).await];
    let listing: Value = s.get("/conversations", Some(&b)).await.json().await.unwrap();
    assert_eq!(listing["items"], json!([]));
    for id in ids {
        let path = format!("/conversations/{id}");
        let r = s.get(&path, Some(&b)).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert_eq!(r.json::<Value>().await.unwrap(), json!({"detail": "Conversation not found"}));
        assert_eq!(s.delete(&path, &b).await.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            s.get(&path, Some(&a)).await.status(),
            StatusCode::OK,
            "bert's delete did nothing"
        );
    }
    // Unknown and malformed ids look the same as someone else's.
    assert_eq!(
        s.get(&format!("/conversations/{}", Uuid::now_v7()), Some(&a)).await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(s.get("/conversations/not-a-uuid", Some(&a)).await.status(), StatusCode::NOT_FOUND);
    s.stop().await;
}

#[tokio::test]
async fn delete_removes_the_conversation_and_its_messages() {
    let s = TestServer::start(|_| {}).await;
    let token = s.user("carl").await;
    let carl = user_id(&s, &token).await;
    let keep = add_conversation(&s, carl, "keep", 1).await;
    let gone = add_conversation(&s, carl, "gone", 2).await;
    assert_eq!(
        s.delete(&format!("/conversations/{gone}"), &token).await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        s.get(&format!("/conversations/{gone}"), Some(&token)).await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        s.delete(&format!("/conversations/{gone}"), &token).await.status(),
        StatusCode::NOT_FOUND
    );
    let listing: Value = s.get("/conversations", Some(&token)).await.json().await.unwrap();
    assert_eq!(listing["items"].as_array().unwrap().len(), 1);
    assert_eq!(listing["items"][0]["id"], keep.to_string());
    assert!(s.running().store().conversation(carl, gone).await.unwrap().is_none());
    s.stop().await;
}

#[tokio::test]
async fn bad_paging_parameters_are_422_and_credentials_are_required() {
    let s = TestServer::start(|_| {}).await;
    let token = s.user("dora").await;
    for query in ["limit=0", "limit=101", "limit=ten", "cursor=garbage"] {
        let r = s.get(&format!("/conversations?{query}"), Some(&token)).await;
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY, "{query}");
        let b: Value = r.json().await.unwrap();
        assert_eq!(b["detail"][0]["loc"][0], "query", "{b}");
    }
    assert_eq!(s.get("/conversations", None).await.status(), StatusCode::UNAUTHORIZED);
    s.stop().await;
}
