//! The outbox store's SQL contract, in process against real Postgres (a fresh database per test): what a
//! claim takes and leaves, how it settles, what it refuses. The binary-level tests keep what only they can
//! show (faults, exit codes, failover).

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use std::time::Duration;

use qx_relay::relay::config::{OnPublish, RelayConfig, ShardKey};
use qx_relay::relay::shard::{Scope, Shard};
use qx_relay::relay::store::{OutboxStore, Requeue, RowFailure, TableProblem, SAMPLE_ROWS};
use qx_relay_testkit::{poll, TestDb};
use uuid::Uuid;

const BATCH: u32 = 100;

fn relay_config(shard_key: ShardKey, on_publish: OnPublish) -> RelayConfig {
    RelayConfig { subject_prefix: Some("orders".into()), shard_key, on_publish, ..RelayConfig::default() }
}

async fn open_store(db: &TestDb, relay: &RelayConfig) -> OutboxStore {
    OutboxStore::connect(&db.url, relay, Duration::from_secs(5)).await.expect("connect")
}

async fn default_store(db: &TestDb) -> OutboxStore {
    open_store(db, &relay_config(ShardKey::Id, OnPublish::Mark)).await
}

/// A database holding `count` pending rows, their ids oldest first, and the default store on it.
async fn store_with_rows(count: usize) -> (TestDb, Vec<Uuid>, OutboxStore) {
    let db = TestDb::create().await;
    let inserted = db.insert_events(count, "order.placed").await;
    let store = default_store(&db).await;
    (db, inserted, store)
}

fn ids(batch: &qx_relay::relay::store::ClaimedBatch) -> Vec<Uuid> {
    batch.rows.iter().map(|row| row.id).collect()
}

#[tokio::test]
async fn concurrent_claims_never_overlap_and_take_the_oldest_rows_first() {
    let (_db, inserted, store) = store_with_rows(250).await;
    let (a, b) = tokio::join!(store.claim(BATCH, &[], &[], &[]), store.claim(BATCH, &[], &[], &[]));
    let (a, b) = (a.expect("claim a"), b.expect("claim b"));
    let (a_ids, b_ids): (HashSet<Uuid>, HashSet<Uuid>) =
        (ids(&a).into_iter().collect(), ids(&b).into_iter().collect());
    assert_eq!((a_ids.len(), b_ids.len()), (100, 100));
    assert!(a_ids.is_disjoint(&b_ids), "two claims took the same row");
    let both: HashSet<Uuid> = a_ids.union(&b_ids).copied().collect();
    assert_eq!(both, inserted[..200].iter().copied().collect(), "the 200 oldest rows");
    let third = store.claim(BATCH, &[], &[], &[]).await.expect("claim c");
    assert_eq!(ids(&third), inserted[200..], "the rest, in (occurred_at, id) order");
}

#[tokio::test]
async fn held_keys_and_skipped_event_names_are_left_out() {
    let db = TestDb::create().await;
    let placed = db.insert_events(3, "order.placed").await;
    let paid = db.insert_events(3, "order.paid").await;
    let store = default_store(&db).await;
    let held = vec![placed[0].to_string()];
    let batch = store.claim(BATCH, &held, &["order.paid".to_owned()], &[]).await.expect("claim");
    assert_eq!(ids(&batch), placed[1..], "neither the held key nor the skipped event name");
    drop(batch);
    let batch = store.claim(BATCH, &[], &[], &[]).await.expect("claim");
    assert_eq!(ids(&batch).len(), placed.len() + paid.len(), "both are back once released");
}

#[tokio::test]
async fn claim_after_continues_after_the_batch_in_flight() {
    let (_db, inserted, store) = store_with_rows(250).await;
    let first = store.claim(BATCH, &[], &[], &[]).await.expect("claim");
    let last = first.rows.last().map(|row| (row.occurred_at, row.id)).expect("rows");
    let next = store.claim_after(BATCH, &[], &[], &[], last).await.expect("claim after");
    assert_eq!(ids(&next), inserted[100..200]);
}

#[tokio::test]
async fn the_byte_budget_cuts_a_batch_but_the_first_row_always_fits() {
    let db = TestDb::create().await;
    let blob = |size: usize| {
        format!(r#"{{"payload": {{"blob": "{}"}}, "event_id": "{}"}}"#, "x".repeat(size), Uuid::new_v4())
    };
    for _ in 0..10 {
        db.insert_raw("order.placed", &blob(40_000)).await;
    }
    let relay = RelayConfig { max_batch_bytes: 100_000, ..relay_config(ShardKey::Id, OnPublish::Mark) };
    let store = open_store(&db, &relay).await;
    let batch = store.claim(BATCH, &[], &[], &[]).await.expect("claim");
    assert_eq!(batch.rows.len(), 3, "40 KB rows while the bytes before them are under 100 KB");
    assert!(batch.left_out, "the rows left out are said to be");
    drop(batch);

    let huge = TestDb::create().await;
    huge.insert_raw("order.placed", &blob(300_000)).await;
    let batch = open_store(&huge, &relay).await.claim(BATCH, &[], &[], &[]).await.expect("claim");
    assert_eq!(batch.rows.len(), 1, "a row larger than the budget still goes out alone");
    assert!(!batch.left_out);
    drop(batch);
}

#[tokio::test]
async fn claims_never_wait_for_rows_another_relay_holds() {
    let db = TestDb::create().await;
    db.insert_events(20, "order.placed").await;
    let unordered = default_store(&db).await;
    let holder = unordered.claim(5, &[], &[], &[]).await.expect("the other relay's claim");
    let skipping = unordered.claim(BATCH, &[], &[], &[]).await.expect("claim around it");
    assert_eq!(skipping.rows.len(), 15, "every row its own key: the locked ones are skipped");
    assert!(skipping.held_elsewhere.is_empty());
    let oldest: DateTime<Utc> = sqlx::query_scalar("SELECT min(occurred_at) FROM qx_outbox_events")
        .fetch_one(&db.pool)
        .await
        .expect("the oldest row");
    assert_eq!(skipping.first_seen, Some(oldest), "where the scope's oldest pending row is, held or not");
    drop((holder, skipping));

    // Two orders, their events interleaved: the other relay holds the first event of order `a`.
    let keyed = TestDb::create().await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let events = (0..10).map(|step| (if step % 2 == 0 { a } else { b }, step, "order.placed"));
    qx_relay_testkit::handover::insert_order_events(&keyed, events).await;
    let ordered =
        open_store(&keyed, &relay_config("payload.order_id".parse().unwrap(), OnPublish::Mark)).await;
    let holder = ordered.claim(1, &[], &[], &[]).await.expect("the other relay's claim");
    let batch = ordered.claim(BATCH, &[], &[], &[]).await.expect("claim around it, without waiting");
    let keys: HashSet<String> = batch.rows.iter().map(|row| row.order_key()).collect();
    assert_eq!(keys, HashSet::from([b.to_string()]), "order b goes on; a's later events wait for its first");
    assert_eq!(batch.rows.len(), 5);
    assert_eq!(batch.held_elsewhere, vec![a.to_string()]);
    assert!(batch.left_out, "a's later events are locked by this claim but not in it");
    drop((holder, batch));
    // Their rollbacks go out as the pool takes their connections back, while another claims on an idle one.
    let released = poll(Duration::from_secs(5), || async {
        let batch = ordered.claim(BATCH, &[], &[], &[]).await.expect("claim once released");
        (batch.rows.len() == 10).then_some(batch)
    });
    let batch = released.await.expect("every row claimable once the holders are gone");
    assert!(batch.held_elsewhere.is_empty());
}

#[tokio::test]
async fn settling_marks_published_rows_and_writes_failures_cut_to_the_column() {
    let (db, inserted, store) = store_with_rows(3).await;
    let batch = store.claim(BATCH, &[], &[], &[]).await.expect("claim");
    let failure = RowFailure { id: inserted[2], attempts: 4, last_error: "é".repeat(3000) };
    store.settle(batch, &inserted[..2], std::slice::from_ref(&failure)).await.expect("settle");
    assert_eq!(db.count("published_at IS NOT NULL").await, 2);
    let (attempts, chars): (i32, i32) =
        sqlx::query_as("SELECT attempts, char_length(last_error) FROM qx_outbox_events WHERE id = $1")
            .bind(inserted[2])
            .fetch_one(&db.pool)
            .await
            .expect("read the failed row");
    assert_eq!((attempts, chars), (4, 2048), "attempts written, last_error cut to VARCHAR(2048)");
}

#[tokio::test]
async fn rows_of_a_child_table_settle_by_id_and_deletes_remove_only_published_rows() {
    let db = TestDb::create().await;
    db.insert_events(10, "order.placed").await;
    db.execute(
        "CREATE TABLE qx_outbox_events_child () INHERITS (qx_outbox_events);
         WITH moved AS (DELETE FROM ONLY qx_outbox_events
                        WHERE id IN (SELECT id FROM qx_outbox_events ORDER BY occurred_at LIMIT 5) RETURNING *)
         INSERT INTO qx_outbox_events_child SELECT * FROM moved",
    )
    .await;
    let store = open_store(&db, &relay_config(ShardKey::Id, OnPublish::Delete)).await;
    let batch = store.claim(BATCH, &[], &[], &[]).await.expect("claim");
    let published: Vec<Uuid> = batch.rows.iter().step_by(2).map(|row| row.id).collect();
    store.settle(batch, &published, &[]).await.expect("settle");
    assert_eq!(db.count("true").await, 5, "the five published rows are gone, from either table");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM qx_outbox_events WHERE id = ANY($1)")
        .bind(&published)
        .fetch_one(&db.pool)
        .await
        .expect("count");
    assert_eq!(left, 0);
}

#[tokio::test]
async fn rows_published_before_an_outage_are_marked_by_id_once() {
    let (db, inserted, store) = store_with_rows(3).await;
    store.mark_published(&inserted[..2]).await.expect("mark");
    let first: Vec<(Uuid, chrono::DateTime<chrono::Utc>)> =
        sqlx::query_as("SELECT id, published_at FROM qx_outbox_events WHERE published_at IS NOT NULL")
            .fetch_all(&db.pool)
            .await
            .expect("read");
    assert_eq!(first.len(), 2);
    store.mark_published(&inserted[..2]).await.expect("mark again");
    let again: i64 = sqlx::query_scalar("SELECT count(*) FROM qx_outbox_events WHERE published_at = ANY($1)")
        .bind(first.iter().map(|(_, at)| *at).collect::<Vec<_>>())
        .fetch_one(&db.pool)
        .await
        .expect("count");
    assert_eq!(again, 2, "marking again keeps the first published_at");
}

#[tokio::test]
async fn requeue_touches_parked_rows_only_and_the_backlog_counts_them_apart() {
    let db = TestDb::create().await;
    let inserted = db.insert_events(4, "order.placed").await;
    sqlx::query("UPDATE qx_outbox_events SET attempts = 10, last_error = 'parked' WHERE id = ANY($1)")
        .bind(&inserted[..2])
        .execute(&db.pool)
        .await
        .expect("park two rows");
    sqlx::query("UPDATE qx_outbox_events SET attempts = 3, last_error = 'failing' WHERE id = $1")
        .bind(inserted[2])
        .execute(&db.pool)
        .await
        .expect("fail one row");
    let store = default_store(&db).await;
    let backlog = store.backlog(&[Shard { id: 0, count: 1 }], None).await.expect("backlog");
    assert_eq!((backlog.pending, backlog.parked), (2, 2));
    assert_eq!(store.requeue(&Requeue::All).await.expect("requeue"), 2);
    assert_eq!(db.count("attempts = 3 AND last_error = 'failing'").await, 1, "a failing row is not parked");
    assert_eq!(db.count("attempts = 0 AND last_error IS NULL").await, 3);
}

#[tokio::test]
async fn a_backlog_sample_reads_a_bounded_number_of_rows_and_still_finds_the_oldest_pending() {
    // Two orders in different shards of two: `a`'s backlog is older than the whole sample, `b` comes after.
    let db = TestDb::create().await;
    let pool = &db.pool;
    let hash = |key: Uuid| async move {
        sqlx::query_scalar::<_, i64>("SELECT ABS(HASHTEXT($1)::bigint) % 2")
            .bind(key.to_string())
            .fetch_one(pool)
            .await
            .expect("hash")
    };
    let a = Uuid::new_v4();
    let b = loop {
        let b = Uuid::new_v4();
        if hash(b).await != hash(a).await {
            break b;
        }
    };
    let ahead = SAMPLE_ROWS as usize + 100;
    let events = (0..ahead + 10).map(|n| (if n < ahead { a } else { b }, n, "order.placed"));
    qx_relay_testkit::handover::insert_order_events(&db, events).await;
    let store = open_store(&db, &relay_config("payload.order_id".parse().unwrap(), OnPublish::Mark)).await;

    let whole = store.backlog(&[Shard::WHOLE], None).await.expect("sample the table");
    assert_eq!((whole.pending, whole.parked, whole.more), (SAMPLE_ROWS, 0, true), "the oldest rows only");
    let b_shard = Shard { id: hash(b).await as u32, count: 2 };
    let behind = store.backlog(&[b_shard], None).await.expect("sample b's shard");
    assert_eq!((behind.pending, behind.more), (0, true), "none of b's rows is among the sampled ones");
    assert!(behind.oldest_pending_seconds.is_some(), "b's oldest pending row is still found");
    // From the relay loop's floor, the look for it starts after a's backlog.
    let b_first: DateTime<Utc> = sqlx::query_scalar(
        "SELECT min(occurred_at) FROM qx_outbox_events WHERE payload #>> '{payload,order_id}' = $1",
    )
    .bind(b.to_string())
    .fetch_one(&db.pool)
    .await
    .expect("b's first row");
    let from_floor = store.backlog(&[b_shard], Some(b_first)).await.expect("sample from the floor");
    assert!(from_floor.oldest_pending_seconds.is_some());
    let past = store.backlog(&[b_shard], Some(b_first + chrono::TimeDelta::hours(1))).await.expect("sample");
    assert_eq!(past.oldest_pending_seconds, None, "nothing of b's shard is pending after its floor");
}

#[tokio::test]
async fn a_view_a_missing_table_and_nullable_columns_are_refused() {
    let db = TestDb::create().await;
    db.execute("CREATE VIEW outbox_view AS SELECT * FROM qx_outbox_events").await;
    let problem = |table: &str| {
        let relay = RelayConfig { table: table.to_owned(), ..relay_config(ShardKey::Id, OnPublish::Mark) };
        let db = &db;
        async move { open_store(db, &relay).await.table_problem().await.expect("check the table") }
    };
    assert_eq!(problem("qx_outbox_events").await, None);
    assert_eq!(problem("outbox_view").await, Some(TableProblem::MissingColumns(vec!["ctid", "tableoid"])));
    assert_eq!(problem("no_such_table").await, Some(TableProblem::Missing));
    db.execute("ALTER TABLE qx_outbox_events ALTER COLUMN attempts DROP NOT NULL").await;
    assert_eq!(problem("qx_outbox_events").await, Some(TableProblem::NullableColumns(vec!["attempts"])));
}

#[tokio::test]
async fn assigned_shards_are_claimed_and_counted_in_one_scan() {
    let (db, _, store) = store_with_rows(600).await;
    let relay = relay_config(ShardKey::Id, OnPublish::Mark);
    let assigned = store.for_scope(&relay, Scope::Assigned { count: 12 });
    let shard_of = |ids: &[Uuid]| {
        let sql = "SELECT DISTINCT (ABS(HASHTEXT(id::text)::bigint) % 12)::int FROM qx_outbox_events \
                   WHERE id = ANY($1) ORDER BY 1";
        let pool = db.pool.clone();
        let ids = ids.to_vec();
        async move { sqlx::query_scalar::<_, i32>(sql).bind(ids).fetch_all(&pool).await.expect("shards") }
    };
    let expected = db.count("ABS(HASHTEXT(id::text)::bigint) % 12 IN (1, 4)").await;
    let two = [Shard { id: 1, count: 12 }, Shard { id: 4, count: 12 }];
    assert_eq!(
        store.backlog(&two, None).await.expect("backlog").pending,
        expected,
        "the two shards' backlog"
    );
    let batch = assigned.claim(1000, &[], &[], &[1, 4]).await.expect("claim shards 1 and 4");
    assert_eq!(batch.rows.len() as i64, expected, "every row of the two shards, and no other");
    assert_eq!(shard_of(&ids(&batch)).await, [1, 4]);
    let none = assigned.claim(1000, &[], &[], &[]).await.expect("claim no shard");
    assert!(none.rows.is_empty(), "no shard assigned, no row");
}
