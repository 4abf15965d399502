//! One suite, two instances: every behaviour `Store` promises, run against the redb file (in
//! a temp dir) and against PostgreSQL (a database of its own on the test server that
//! `tests/common/postgres.rs` starts). What only one backend has (redb's group commit, its
//! full-disk recovery; PostgreSQL's migration lock and row locks) is tested beside it.

use super::*;
use crate::secret::Secret;
use serde_json::json;
use uuid::Uuid;

#[path = "../../tests/common/postgres.rs"]
pub(super) mod server;

/// A store on a fresh PostgreSQL database.
pub(super) async fn postgres() -> Store {
    let url = server::database();
    Store::connect(&PostgresOptions::new(Secret::new(url))).await.expect("PostgreSQL store")
}

/// Runs each named `async fn(Store)` twice: `NAME::redb` and `NAME::postgres`.
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redb() {
                let dir = tempfile::tempdir().unwrap();
                super::$name(super::Store::open(dir.path()).unwrap()).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name(super::postgres().await).await
            }
        }
    )*};
}

on_both!(
    usernames_and_emails_are_unique_ignoring_case,
    refresh_rotation_and_reuse_revokes_the_family,
    expired_refresh_tokens_are_purged_in_batches_rotated_ones_included,
    deleting_a_user_deletes_everything_of_theirs_in_every_table_and_nothing_else,
    the_last_active_admin_is_neither_deleted_nor_demoted,
    turns_pagination_isolation_and_delete,
    expired_leases_are_rescued_and_old_finished_jobs_purged_in_batches,
    caps_refuse_per_user_then_in_all,
    concurrent_claims_never_take_the_same_job,
    a_settled_job_stores_its_turn_with_its_result_once,
    concurrent_enqueues_meet_the_caps_exactly,
);

fn new_user(name: &str, email: &str) -> NewUser {
    NewUser {
        username: name.into(),
        email: email.into(),
        password_hash: "$argon2id$x".into(),
        is_admin: false,
    }
}

/// A user jobs and conversations can be stored for.
async fn user(store: &Store, name: &str) -> Uuid {
    store.create_user(new_user(name, &format!("{name}@x.io")), 0).await.unwrap().id
}

/// A plain message of `role` (model `m`).
pub(super) fn msg(role: Role, text: &str) -> NewMessage {
    NewMessage {
        role,
        content: text.into(),
        tool_calls: Vec::new(),
        tool_call_id: None,
        model: Some("m".into()),
        provider: None,
        usage: None,
    }
}

async fn usernames_and_emails_are_unique_ignoring_case(store: Store) {
    let a = store.create_user(new_user("Alice", "a@x.io"), 1).await.unwrap();
    let e = store.create_user(new_user("alice", "b@x.io"), 2).await.unwrap_err();
    assert!(matches!(e, StoreError::Conflict(UniqueField::Username)), "{e}");
    let e = store.create_user(new_user("bob", "A@X.IO"), 3).await.unwrap_err();
    assert!(matches!(e, StoreError::Conflict(UniqueField::Email)), "{e}");
    assert_eq!(store.user_by_username("ALICE").await.unwrap().unwrap().id, a.id);
    assert_eq!(store.users().await.unwrap().len(), 1, "a refused write leaves nothing behind");
}

async fn refresh_rotation_and_reuse_revokes_the_family(store: Store) {
    let user = user(&store, "u").await;
    store.insert_refresh_token([1; 32], user, 100).await.unwrap();
    let r = store.rotate_refresh_token([1; 32], [2; 32], 10, 100).await.unwrap();
    assert_eq!(r, RotateOutcome::Rotated { user_id: user });
    assert_eq!(
        store.rotate_refresh_token([1; 32], [3; 32], 11, 100).await.unwrap(),
        RotateOutcome::Reused
    );
    // The live descendant died with its family.
    assert_eq!(
        store.rotate_refresh_token([2; 32], [4; 32], 12, 100).await.unwrap(),
        RotateOutcome::Invalid
    );
    // Expiry.
    store.insert_refresh_token([5; 32], user, 50).await.unwrap();
    assert_eq!(
        store.rotate_refresh_token([5; 32], [6; 32], 50, 100).await.unwrap(),
        RotateOutcome::Invalid
    );
    // Logout revokes the family: its live token no longer rotates.
    store.insert_refresh_token([7; 32], user, 100).await.unwrap();
    store.revoke_refresh_token([7; 32], 20).await.unwrap();
    assert_eq!(
        store.rotate_refresh_token([7; 32], [8; 32], 21, 100).await.unwrap(),
        RotateOutcome::Invalid
    );
}

async fn expired_refresh_tokens_are_purged_in_batches_rotated_ones_included(store: Store) {
    let user = user(&store, "u").await;
    store.insert_refresh_token([1; 32], user, 100).await.unwrap();
    store.insert_refresh_token([2; 32], user, 120).await.unwrap();
    store.rotate_refresh_token([1; 32], [3; 32], 10, 300).await.unwrap();
    assert_eq!(store.purge_expired_refresh_tokens(100, 10).await.unwrap(), 0);
    assert_eq!(store.purge_expired_refresh_tokens(200, 1).await.unwrap(), 1);
    assert_eq!(store.purge_expired_refresh_tokens(200, 10).await.unwrap(), 1);
    assert!(!store.has_refresh_token(&[1; 32]).await && !store.has_refresh_token(&[2; 32]).await);
    // The rotated-to token lives on until its own expiry.
    assert!(store.has_refresh_token(&[3; 32]).await);
    assert_eq!(store.purge_expired_refresh_tokens(301, 10).await.unwrap(), 1);
    assert!(!store.has_refresh_token(&[3; 32]).await);
}

/// Gives `user` a bit of everything: a key, sessions (one family revoked), two conversations,
/// and a finished, a running and a queued job.
async fn populate(store: &Store, user: Uuid, seed: u8) {
    let key = ApiKeyRecord {
        id: Uuid::now_v7(),
        user_id: user,
        name: "k".into(),
        hash: [seed; 32],
        created_at: 0,
        last_used_at: None,
    };
    store.create_api_key(key).await.unwrap();
    store.insert_refresh_token([seed + 1; 32], user, 1_000).await.unwrap();
    store.insert_refresh_token([seed + 2; 32], user, 1_000).await.unwrap();
    store.revoke_refresh_token([seed + 2; 32], 5).await.unwrap();
    for title in ["a", "b"] {
        let target = TurnTarget::New { title: title.into(), model: "m".into() };
        let turn = vec![msg(Role::User, "x"), msg(Role::Assistant, "x")];
        store.record_turn(user, target, turn, 1).await.unwrap();
    }
    let limits = QueueLimits { per_user: 10, total: 100 };
    // The third is due far later, so the claims below take this user's first two.
    let jobs = [0, 0, 1_000_000].map(|at| Job::new(user, json!({}), at)).into();
    store.enqueue_jobs(jobs, limits).await.unwrap();
    let done = store.claim_job(1, 100).await.unwrap().unwrap();
    let failed = Settlement::Failed { error: "x".into() };
    store.settle_job(done.id, 1, failed, 2).await.unwrap().unwrap();
    store.claim_job(3, 100).await.unwrap().unwrap();
}

async fn deleting_a_user_deletes_everything_of_theirs_in_every_table_and_nothing_else(
    store: Store,
) {
    let bob = user(&store, "bob").await;
    populate(&store, bob, 10).await;
    let before = store.table_sizes().await;
    let counts_before = store.job_counts().await.unwrap();

    let alice = store.create_user(new_user("Alice", "A@x.io"), 0).await.unwrap();
    populate(&store, alice.id, 100).await;
    assert_ne!(store.table_sizes().await, before);
    let running = store.jobs(alice.id, 10, None).await.unwrap().0;
    let running = running.iter().find(|j| j.state == JobState::Running).unwrap();

    let AccountChange::Done(d) = store.delete_user(alice.id).await.unwrap() else {
        panic!("not the last admin")
    };
    assert_eq!(
        (d.conversations, d.messages, d.api_keys, d.refresh_tokens, d.jobs),
        (2, 4, 1, 2, 3)
    );
    // Every table holds exactly what it held before alice came (the revocation of her family
    // and, on redb, her active-job counter included), and the per-state counts are bob's.
    assert_eq!(store.table_sizes().await, before);
    assert_eq!(store.job_counts().await.unwrap(), counts_before);
    assert!(store.user_by_username("alice").await.unwrap().is_none());
    assert_eq!(store.api_keys(bob).await.unwrap().len(), 1);
    // Her name and email are free again.
    store.create_user(new_user("alice", "a@x.io"), 9).await.unwrap();
    // Her unfinished jobs left the queue's count: bob's two are all that count now.
    let room_for_one = QueueLimits { per_user: 100, total: 3 };
    let job = |n| Job::new(bob, json!({ "n": n }), 0);
    assert!(store.enqueue_job(job(1), room_for_one).await.unwrap().is_ok());
    let full = store.enqueue_job(job(2), room_for_one).await.unwrap();
    assert_eq!(full.err(), Some(Refusal::QueueFull(3)));

    // Her running job's worker loses it quietly: no renewal, its result discarded.
    assert!(!store.renew_lease(running.id, 1, 500).await.unwrap());
    let late = Settlement::Failed { error: "late".into() };
    assert!(store.settle_job(running.id, 1, late, 9).await.unwrap().is_none());
    assert!(matches!(store.delete_user(alice.id).await, Err(StoreError::NotFound)));
    // Rows for a deleted user are refused.
    assert!(matches!(
        store.insert_refresh_token([7; 32], alice.id, 1_000).await,
        Err(StoreError::NotFound)
    ));
}

async fn the_last_active_admin_is_neither_deleted_nor_demoted(store: Store) {
    let admin = |name: &str| NewUser { is_admin: true, ..new_user(name, &format!("{name}@x")) };
    let root = store.create_user(admin("root"), 0).await.unwrap();
    let demote = || UserChange { is_admin: Some(false), ..UserChange::default() };
    assert_eq!(store.update_user(root.id, demote()).await.unwrap(), AccountChange::LastAdmin);
    assert_eq!(store.delete_user(root.id).await.unwrap(), AccountChange::LastAdmin);
    // A disabled admin does not count as another admin.
    let other = store.create_user(admin("other"), 0).await.unwrap();
    let disable = |disabled| UserChange { disabled: Some(disabled), ..UserChange::default() };
    store.update_user(other.id, disable(true)).await.unwrap();
    assert_eq!(store.update_user(root.id, demote()).await.unwrap(), AccountChange::LastAdmin);
    // An active one does.
    store.update_user(other.id, disable(false)).await.unwrap();
    let AccountChange::Done(u) = store.update_user(root.id, demote()).await.unwrap() else {
        panic!("other is an active admin")
    };
    assert!(!u.is_admin);
    assert_eq!(store.delete_user(other.id).await.unwrap(), AccountChange::LastAdmin);
    // A password change ends the sessions.
    store.insert_refresh_token([1; 32], other.id, 1_000).await.unwrap();
    let change = UserChange { password_hash: Some("$argon2id$new".into()), ..Default::default() };
    let AccountChange::Done(u) = store.update_user(other.id, change).await.unwrap() else {
        panic!("a password change is never refused")
    };
    assert_eq!(u.password_hash, "$argon2id$new");
    assert!(!store.has_refresh_token(&[1; 32]).await);
    assert_eq!(store.user(other.id).await.unwrap().unwrap().password_hash, "$argon2id$new");
}

async fn turns_pagination_isolation_and_delete(store: Store) {
    let (alice, bob) = (user(&store, "alice").await, user(&store, "bob").await);
    let new = || TurnTarget::New { title: "t".into(), model: "m".into() };
    let e = store.record_turn(Uuid::now_v7(), new(), vec![msg(Role::User, "hi")], 0);
    assert!(matches!(e.await, Err(StoreError::NotFound)), "no rows for a missing user");
    let mut ids = Vec::new();
    for i in 0..5 {
        let target = TurnTarget::New { title: format!("t{i}"), model: "m".into() };
        let (c, _) =
            store.record_turn(alice, target, vec![msg(Role::User, "hi")], i).await.unwrap();
        ids.push(c.id);
    }
    // Activity on the oldest moves it to the front.
    let mut two = vec![msg(Role::User, "again"), msg(Role::Assistant, "hello")];
    two[1].tool_calls =
        vec![ToolCall { id: "c1".into(), name: "f".into(), arguments: "{}".into() }];
    two[1].usage = Some(Usage { prompt_tokens: 3, completion_tokens: 2, cached_tokens: 1 });
    store.record_turn(alice, TurnTarget::Existing(ids[0]), two, 10).await.unwrap();

    let page = |after| store.conversations(alice, 2, after);
    let p1 = page(None).await.unwrap();
    assert_eq!(p1.items.iter().map(|c| c.id).collect::<Vec<_>>(), vec![ids[0], ids[4]]);
    let cursor = Cursor::decode(&p1.next.unwrap().encode()).unwrap();
    let p2 = page(Some(cursor)).await.unwrap();
    assert_eq!(p2.items.iter().map(|c| c.id).collect::<Vec<_>>(), vec![ids[3], ids[2]]);
    let p3 = page(p2.next).await.unwrap();
    assert_eq!(p3.items.iter().map(|c| c.id).collect::<Vec<_>>(), vec![ids[1]]);
    assert!(p3.next.is_none());

    let (c, messages) = store.conversation(alice, ids[0]).await.unwrap().unwrap();
    assert_eq!((c.message_count, c.updated_at), (3, 10));
    let texts: Vec<_> = messages.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(texts, ["hi", "again", "hello"]);
    assert_eq!(messages[2].tool_calls[0].name, "f", "tool calls come back");
    assert_eq!(messages[2].usage.map(|u| u.cached_tokens), Some(1), "usage comes back");
    assert_eq!(store.conversation_header(alice, ids[0]).await.unwrap(), Some(c));

    assert!(store.conversation(bob, ids[0]).await.unwrap().is_none());
    assert!(store.conversation_header(bob, ids[0]).await.unwrap().is_none());
    let e = store.record_turn(bob, TurnTarget::Existing(ids[0]), vec![msg(Role::User, "x")], 11);
    assert!(matches!(e.await, Err(StoreError::NotFound)));
    assert!(matches!(store.delete_conversation(bob, ids[0]).await, Err(StoreError::NotFound)));

    store.delete_conversation(alice, ids[0]).await.unwrap();
    assert!(store.conversation(alice, ids[0]).await.unwrap().is_none());
    assert_eq!(store.conversations(alice, 10, None).await.unwrap().items.len(), 4);
    assert!(Cursor::decode("not a cursor").is_none());
}

const LIMITS: QueueLimits = QueueLimits { per_user: 10, total: 100 };

async fn count_of(store: &Store, state: JobState) -> u64 {
    let stats = store.job_stats(0, 0, 10).await.unwrap();
    stats.counts.iter().find(|(s, _)| *s == state).map_or(0, |(_, n)| *n)
}

async fn expired_leases_are_rescued_and_old_finished_jobs_purged_in_batches(store: Store) {
    let user = user(&store, "ann").await;
    let jobs = (0..4).map(|i| Job::new(user, json!({ "n": i }), 10)).collect();
    assert!(store.enqueue_jobs(jobs, LIMITS).await.unwrap().iter().all(Result::is_ok));
    assert_eq!(store.next_job_due().await.unwrap(), Some(10));

    // One claimed with a lease until 50: still owned at 40, rescued at 60.
    let claimed = store.claim_job(20, 50).await.unwrap().unwrap();
    assert_eq!(store.rescue_jobs(40).await.unwrap(), 0);
    assert!(store.renew_lease(claimed.id, 1, 55).await.unwrap());
    assert_eq!(store.rescue_jobs(60).await.unwrap(), 1);
    let again = store.claim_job(70, 500).await.unwrap().unwrap();
    assert_eq!((again.id, again.attempts), (claimed.id, 2), "the rescued job runs again");
    // The first attempt's late result is discarded.
    let late = Settlement::Failed { error: "late".into() };
    assert!(store.settle_job(claimed.id, 1, late, 80).await.unwrap().is_none());

    // Three finish at 100, 200 and 300; purging before 250 takes two, one per batch.
    let failed = |e: &str| Settlement::Failed { error: e.into() };
    store.settle_job(again.id, 2, failed("a"), 100).await.unwrap().unwrap();
    for t in [200, 300] {
        let job = store.claim_job(t, t + 500).await.unwrap().unwrap();
        store.settle_job(job.id, 1, failed("b"), t).await.unwrap().unwrap();
    }
    assert_eq!(count_of(&store, JobState::Failed).await, 3);
    let stats = store.job_stats(400, 150, 10).await.unwrap();
    assert_eq!((stats.finished_in_window, stats.failed_in_window), (2, 2));
    assert_eq!((stats.recent_failures.len(), stats.oldest_queued_ms), (2, Some(390)));
    assert_eq!(store.purge_jobs(250, 1).await.unwrap(), 1);
    assert_eq!(store.purge_jobs(250, 1).await.unwrap(), 1);
    assert_eq!(store.purge_jobs(250, 1).await.unwrap(), 0);
    assert_eq!(count_of(&store, JobState::Failed).await, 1);
    assert_eq!(count_of(&store, JobState::Queued).await, 1);
    assert_eq!(store.job_backlog().await.unwrap(), (1, 0));
    let listed = store.jobs(user, 10, None).await.unwrap().0;
    assert_eq!(listed.len(), 2, "purged jobs leave the listing");
    assert!(store.job(user, again.id).await.unwrap().is_none());
    // Newest first, in pages.
    let (first, more) = store.jobs(user, 1, None).await.unwrap();
    let (second, _) = store.jobs(user, 1, Some(first[0].id)).await.unwrap();
    assert!(more && first[0].id > second[0].id);
}

async fn caps_refuse_per_user_then_in_all(store: Store) {
    let limits = QueueLimits { per_user: 2, total: 3 };
    let (a, b) = (user(&store, "ann").await, user(&store, "ben").await);
    let jobs =
        vec![Job::new(a, json!({}), 0), Job::new(a, json!({}), 0), Job::new(a, json!({}), 0)];
    let out = store.enqueue_jobs(jobs, limits).await.unwrap();
    assert_eq!(out[2].as_ref().err(), Some(&Refusal::UserLimit(2)));
    let jobs = vec![Job::new(b, json!({}), 0), Job::new(b, json!({}), 0)];
    let out = store.enqueue_jobs(jobs, limits).await.unwrap();
    assert!(out[0].is_ok());
    assert_eq!(out[1].as_ref().err(), Some(&Refusal::QueueFull(3)));
    // A user deleted while the request was on its way gets nothing stored.
    let nobody = Job::new(Uuid::now_v7(), json!({}), 0);
    let out = store.enqueue_job(nobody, QueueLimits { per_user: 9, total: 9 }).await;
    assert_eq!(out.unwrap().err(), Some(Refusal::UserGone));
    assert_eq!(store.job_backlog().await.unwrap().0, 3, "nothing was stored for nobody");
    // A cancelled job frees its place; cancelling it again says it had finished.
    let queued = store.jobs(a, 1, None).await.unwrap().0.remove(0);
    assert!(matches!(store.cancel_job(a, queued.id, 5).await, Ok(CancelOutcome::Cancelled(_))));
    assert!(matches!(store.cancel_job(a, queued.id, 6).await, Ok(CancelOutcome::Finished(_))));
    assert!(matches!(store.cancel_job(b, queued.id, 6).await, Err(StoreError::NotFound)));
    assert!(store.enqueue_job(Job::new(a, json!({}), 0), limits).await.unwrap().is_ok());
}

/// 64 enqueues of one user at once against a cap of 50: exactly 50 stored, the rest refused
/// (group commit puts them in shared transactions; the cap is checked inside them).
async fn concurrent_enqueues_meet_the_caps_exactly(store: Store) {
    let user = user(&store, "ann").await;
    let limits = QueueLimits { per_user: 50, total: 1000 };
    let all = (0..64).map(|i| {
        let store = store.clone();
        tokio::spawn(async move {
            store.enqueue_job(Job::new(user, json!({ "n": i }), 0), limits).await
        })
    });
    let outcomes: Vec<_> = futures_util::future::join_all(all).await;
    let stored = outcomes.iter().filter(|o| matches!(o, Ok(Ok(Ok(_))))).count();
    let refused =
        outcomes.iter().filter(|o| matches!(o, Ok(Ok(Err(Refusal::UserLimit(50)))))).count();
    assert_eq!((stored, refused), (50, 14));
    assert_eq!(store.job_backlog().await.unwrap(), (50, 0));
    // The total cap counts every user's unfinished jobs.
    let other = self::user(&store, "ben").await;
    let full = QueueLimits { per_user: 50, total: 50 };
    let out = store.enqueue_job(Job::new(other, json!({}), 0), full).await.unwrap();
    assert_eq!(out.err(), Some(Refusal::QueueFull(50)));
}

/// Eight workers claiming 40 jobs at once: each job is claimed exactly once.
async fn concurrent_claims_never_take_the_same_job(store: Store) {
    let user = user(&store, "ann").await;
    let limits = QueueLimits { per_user: 100, total: 100 };
    let jobs = (0..40).map(|i| Job::new(user, json!({ "n": i }), 0)).collect();
    store.enqueue_jobs(jobs, limits).await.unwrap();
    let workers = (0..8).map(|_| {
        let store = store.clone();
        tokio::spawn(async move {
            let mut mine = Vec::new();
            while let Some(job) = store.claim_job(1, 1_000_000).await.unwrap() {
                mine.push(job.id);
            }
            mine
        })
    });
    let mut claimed: Vec<Uuid> = Vec::new();
    for w in futures_util::future::join_all(workers).await {
        claimed.extend(w.unwrap());
    }
    let total = claimed.len();
    claimed.sort();
    claimed.dedup();
    assert_eq!((total, claimed.len()), (40, 40), "every job claimed once");
    assert_eq!(store.job_backlog().await.unwrap(), (0, 40));
}

/// A successful attempt stores its turn and a result built from the stored ids together, and
/// a retried one goes back to the queue with its error.
async fn a_settled_job_stores_its_turn_with_its_result_once(store: Store) {
    let user = user(&store, "ann").await;
    store.enqueue_job(Job::new(user, json!({}), 0), LIMITS).await.unwrap().unwrap();
    let job = store.claim_job(1, 100).await.unwrap().unwrap();
    let retry = Settlement::Retry { error: "busy".into(), run_at: 50 };
    let queued = store.settle_job(job.id, 1, retry, 2).await.unwrap().unwrap();
    assert_eq!((queued.state, queued.error.as_deref()), (JobState::Queued, Some("busy")));
    assert!(store.claim_job(49, 100).await.unwrap().is_none(), "not due before run_at");
    let job = store.claim_job(50, 150).await.unwrap().unwrap();
    assert_eq!(job.attempts, 2);
    let turn = (
        TurnTarget::New { title: "t".into(), model: "m".into() },
        vec![msg(Role::User, "q"), msg(Role::Assistant, "a")],
    );
    let how = Settlement::Succeeded {
        turn: Some(turn),
        result: Box::new(|stored| {
            let (conv, messages) = stored.expect("the turn was stored");
            json!({ "conversation": conv.id, "message": messages[1].id })
        }),
    };
    let done = store.settle_job(job.id, 2, how, 60).await.unwrap().unwrap();
    assert_eq!((done.state, done.error), (JobState::Succeeded, None));
    let result = done.result.unwrap();
    let conv: Uuid = serde_json::from_value(result["conversation"].clone()).unwrap();
    let (_, messages) = store.conversation(user, conv).await.unwrap().unwrap();
    assert_eq!(json!(messages[1].id), result["message"]);
    assert_eq!(store.job(user, job.id).await.unwrap().unwrap().state, JobState::Succeeded);
    // A second settlement of the same attempt writes nothing.
    let again = Settlement::Failed { error: "x".into() };
    assert!(store.settle_job(job.id, 2, again, 70).await.unwrap().is_none());
    assert_eq!(store.conversations(user, 10, None).await.unwrap().items.len(), 1);
}

/// Replicas starting together: one migrates, the others wait on the lock and find it done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_replicas_starting_together_migrate_once() {
    let options = PostgresOptions::new(Secret::new(server::database()));
    let starts = (0..4).map(|_| {
        let options = options.clone();
        tokio::spawn(async move { Store::connect(&options).await })
    });
    for store in futures_util::future::join_all(starts).await {
        assert_eq!(store.unwrap().unwrap().schema_version().await.unwrap(), 3);
    }
}

/// A database a newer edgechat migrated is refused, naming both versions and no password.
#[tokio::test]
async fn postgres_newer_schema_is_refused() {
    let url = server::database();
    let options = PostgresOptions::new(Secret::new(url.clone()));
    drop(Store::connect(&options).await.unwrap());
    let db = url.rsplit('/').next().unwrap();
    server::server().sql_in(db, "UPDATE edgechat_meta SET value = 99 WHERE key = 'schema_version'");
    let e = Store::connect(&options).await.unwrap_err();
    assert!(matches!(e, StoreError::NewerSchema { found: 99, supported: 3, .. }), "{e}");
    assert!(e.to_string().contains(&format!("127.0.0.1:{}/{db}", server::server().port)), "{e}");
}

/// Start-up failures say what to fix: an unreachable server, a role without rights.
#[tokio::test]
async fn postgres_start_errors_say_what_to_fix() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("postgres://edgechat:hunter2hunter2@127.0.0.1:{closed}/x");
    let e = Store::connect(&PostgresOptions::new(Secret::new(url))).await.unwrap_err();
    let text = e.to_string();
    assert!(text.contains("cannot reach the database") && text.contains("storage.url"), "{text}");
    assert!(!text.contains("hunter2"), "the password stays out of messages: {text}");

    // A database the role does not own: PostgreSQL 15 lets only the owner create tables.
    let server = server::server();
    let name = format!("notours{}", std::process::id());
    server.sql(&format!("CREATE DATABASE {name}"));
    let e = Store::connect(&PostgresOptions::new(Secret::new(server.url(&name)))).await;
    let text = e.unwrap_err().to_string();
    assert!(text.contains("lacks a right") && text.contains("grant"), "{text}");

    let bad = PostgresOptions::new(Secret::new("postgres://a@b:notaport/c"));
    let text = Store::connect(&bad).await.unwrap_err().to_string();
    assert!(text.contains("not a PostgreSQL URL"), "{text}");
}

/// The shared counters' steps, as the failed-login limits use them from several replicas.
#[tokio::test]
async fn postgres_shared_counters_take_refuse_refund_and_forget() {
    let store = postgres().await;
    let take = |now| CounterStep::Take { now, interval: 100, tolerance: 100 };
    assert_eq!(store.counter("k", take(1_000)).await.unwrap(), (true, Some(1_100)));
    assert_eq!(store.counter("k", take(1_000)).await.unwrap(), (true, Some(1_200)));
    assert_eq!(store.counter("k", take(1_000)).await.unwrap(), (false, Some(1_200)));
    let refund = CounterStep::Refund { now: 1_000, amount: 100 };
    assert_eq!(store.counter("k", refund).await.unwrap(), (true, Some(1_100)));
    let charge = CounterStep::Charge { now: 1_000, amount: 300 };
    assert_eq!(store.counter("k", charge).await.unwrap(), (true, Some(1_400)));
    assert_eq!(store.counter("k", CounterStep::Peek).await.unwrap(), (true, Some(1_400)));
    assert_eq!(store.purge_counters(1_400).await.unwrap(), 0);
    assert_eq!(store.purge_counters(1_401).await.unwrap(), 1);
    assert_eq!(store.counter("k", CounterStep::Peek).await.unwrap(), (true, None));
    store.counter("j", take(0)).await.unwrap();
    store.counter("j", CounterStep::Forget).await.unwrap();
    assert_eq!(store.counter("j", CounterStep::Peek).await.unwrap(), (true, None));
}

/// An enqueue on one replica wakes a listener on another (and nothing else does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_an_enqueue_wakes_other_replicas() {
    let url = server::database();
    let options = PostgresOptions::new(Secret::new(url));
    let (a, b) = (Store::connect(&options).await.unwrap(), Store::connect(&options).await.unwrap());
    let mut signals = b.job_signals().expect("PostgreSQL notifies");
    // The first `next` resolves once listening.
    tokio::time::timeout(std::time::Duration::from_secs(10), signals.next()).await.unwrap();
    let user = user(&a, "ann").await;
    let quiet = tokio::time::timeout(std::time::Duration::from_millis(300), signals.next());
    assert!(quiet.await.is_err(), "no job, no signal");
    a.enqueue_job(Job::new(user, json!({}), 0), LIMITS).await.unwrap().unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(10), signals.next())
        .await
        .expect("the enqueue on A woke B");
    let redb = tempfile::tempdir().unwrap();
    assert!(Store::open(redb.path()).unwrap().job_signals().is_none());
}
