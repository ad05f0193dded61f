//! What one claim costs, by scope and by state of the table, with a large backlog pending: the claims a relay
//! makes while it drains (a rescan, then claims after the batch in flight), each rolled back so every one
//! meets the same table. Also one sweep (a rescan from the very oldest row), and each case's plan.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use qx_relay::relay::config::{RelayConfig, ShardKey};
use qx_relay::relay::shard::{Scope, Shard};
use qx_relay::relay::store::{ClaimedBatch, OutboxStore};
use qx_relay_testkit::outbox::{insert_from, OUTBOX_DDL};
use serde::Serialize;

use crate::services::BenchDb;

/// Rows per claim, as the relay's default batch.
const LIMIT: u32 = 1000;
/// Claims measured per case; every tenth is a rescan from the floor, as the relay's rescans once a second.
const CLAIMS: usize = 100;
/// Distinct order keys of the keyed scopes.
const KEYS: u32 = 200;
/// The relay's rescans start this long before the scope's oldest pending row (its late-commit margin).
const FLOOR_MARGIN: chrono::TimeDelta = chrono::TimeDelta::seconds(10);

/// ~1 KiB rows (the envelope plus filler), one of `KEYS` order ids each; `$1` rows from `$2` on, occurring in
/// order one microsecond apart, published when `$3`. `$4` keeps only rows whose id and order key both fall in
/// shard 0 of 3 (the rows of a stopped relay's shard), or any row when false.
const ROWS: &str = "\
SELECT id, 'order.placed', 1, \
       jsonb_build_object('payload', jsonb_build_object('order_id', 'order-' || (n % $5), 'seq', n, \
                                                        'filler', repeat('x', 900)), \
                          'event_id', gen_random_uuid(), 'event_name', 'order.placed', 'event_version', 1), \
       now() - interval '1 hour' + ($2 + n) * interval '1 microsecond', NULL, NULL, NULL, \
       CASE WHEN $3 THEN now() END, 0, NULL \
FROM (SELECT n, gen_random_uuid() AS id FROM generate_series(1, $1::bigint * CASE WHEN $4 THEN 12 ELSE 1 END) n) r \
WHERE NOT $4 OR (ABS(HASHTEXT(id::text)::bigint) % 3 = 0 \
                 AND ABS(HASHTEXT('order-' || (n % $5))::bigint) % 3 = 0) \
LIMIT $1";

/// One scope's claims in one state of the table.
#[derive(Debug, Clone, Serialize)]
pub struct ClaimCost {
    pub state: &'static str,
    pub scope: &'static str,
    pub claims: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// A rescan from the oldest row of the table, as the relay makes every 30 s.
    pub sweep_ms: f64,
    /// The rescan's plan, as `EXPLAIN (ANALYZE)` prints it.
    pub plan: String,
}

/// The scopes a relay claims in: the whole table, one static shard of three, four elastic shards of twelve;
/// each with every row its own key and with an order key. None of them holds shard 0 of 3.
fn scopes() -> Vec<(&'static str, Scope, Vec<i32>, ShardKey)> {
    let keyed: ShardKey = "payload.order_id".parse().expect("shard key");
    let static_shard = Scope::One(Shard { id: 1, count: 3 });
    let elastic = (Scope::Assigned { count: 12 }, vec![1, 2, 4, 5]);
    vec![
        ("unsharded", Scope::One(Shard::WHOLE), vec![], ShardKey::Id),
        ("unsharded, keyed", Scope::One(Shard::WHOLE), vec![], keyed.clone()),
        ("static shard 1/3", static_shard, vec![], ShardKey::Id),
        ("static shard 1/3, keyed", static_shard, vec![], keyed.clone()),
        ("elastic, 4 of 12", elastic.0, elastic.1.clone(), ShardKey::Id),
        ("elastic, 4 of 12, keyed", elastic.0, elastic.1, keyed),
    ]
}

/// Every scope in every state, with `pending` rows pending.
pub async fn claim_costs(db: &BenchDb, pending: u64) -> Vec<ClaimCost> {
    let pending = i64::try_from(pending).expect("row count");
    let mut costs = Vec::new();
    // After an outage: the statistics were taken while every row was published, then a burst arrived.
    reset(db).await;
    insert(db, pending, 0, true, false).await;
    db.execute("ANALYZE qx_outbox_events").await;
    insert(db, pending, pending, false, false).await;
    db.checkpoint().await;
    measure(db, "fresh burst, stale statistics", &mut costs).await;
    db.execute("ANALYZE qx_outbox_events").await;
    measure(db, "after ANALYZE", &mut costs).await;
    // Every pending row rewritten (as a mass requeue does): the index's pending end is half dead entries.
    db.execute("UPDATE qx_outbox_events SET attempts = 0 WHERE published_at IS NULL").await;
    db.checkpoint().await;
    measure(db, "after a mass UPDATE", &mut costs).await;
    // A relay of shard 0/3 stopped for a while: its backlog is older than every row of the measured scopes.
    reset(db).await;
    insert(db, pending / 2, 0, false, true).await;
    insert(db, pending - pending / 2, pending * 12, false, false).await;
    db.execute("ANALYZE qx_outbox_events").await;
    db.checkpoint().await;
    measure(db, "another shard's backlog ahead", &mut costs).await;
    costs
}

async fn reset(db: &BenchDb) {
    db.execute("DROP TABLE IF EXISTS qx_outbox_events CASCADE").await;
    db.execute(OUTBOX_DDL).await;
    // No autovacuum: the states are what each step leaves.
    db.execute("ALTER TABLE qx_outbox_events SET (autovacuum_enabled = off)").await;
}

async fn insert(db: &BenchDb, rows: i64, first: i64, published: bool, stopped_shard: bool) {
    sqlx::query(&insert_from(ROWS))
        .bind(rows)
        .bind(first)
        .bind(published)
        .bind(stopped_shard)
        .bind(i64::from(KEYS))
        .execute(&db.pool)
        .await
        .expect("insert rows");
}

async fn measure(db: &BenchDb, state: &'static str, costs: &mut Vec<ClaimCost>) {
    for (scope_name, scope, assigned, key) in scopes() {
        let relay =
            RelayConfig { subject_prefix: Some("bench".into()), shard_key: key, ..RelayConfig::default() };
        let whole = OutboxStore::connect(&db.url, &relay, Duration::from_secs(10)).await.expect("connect");
        let store = whole.for_scope(&relay, scope);
        let cost = measure_scope(&store, &assigned).await;
        let (p50_ms, p99_ms, max_ms, sweep_ms) = cost.0;
        let plan = store.explain_claim(LIMIT, &assigned, cost.1).await.expect("explain");
        costs.push(ClaimCost {
            state,
            scope: scope_name,
            claims: CLAIMS,
            p50_ms,
            p99_ms,
            max_ms,
            sweep_ms,
            plan,
        });
    }
}

/// The relay's claims over one scope: the p50, p99 and longest of them, a sweep's time, and the floor.
async fn measure_scope(
    store: &OutboxStore,
    assigned: &[i32],
) -> ((f64, f64, f64, f64), Option<DateTime<Utc>>) {
    let timed = Instant::now();
    let sweep = store.claim_from(LIMIT, &[], &[], assigned, None).await.expect("sweep");
    let sweep_ms = ms(timed.elapsed());
    let floor = sweep.first_seen.map(|at| at - FLOOR_MARGIN);
    let mut last = last_key(&sweep);
    drop(sweep);
    let mut times = Vec::with_capacity(CLAIMS);
    for n in 0..CLAIMS {
        let timed = Instant::now();
        let batch = match last {
            Some(after) if n % 10 != 0 => store.claim_after(LIMIT, &[], &[], assigned, after).await,
            _ => store.claim_from(LIMIT, &[], &[], assigned, floor).await,
        }
        .expect("claim");
        times.push(ms(timed.elapsed()));
        last = last_key(&batch).or(last);
    }
    times.sort_by(f64::total_cmp);
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    ((at(0.5), at(0.99), at(1.0), sweep_ms), floor)
}

fn last_key(batch: &ClaimedBatch) -> Option<(DateTime<Utc>, uuid::Uuid)> {
    batch.rows.last().map(|row| (row.occurred_at, row.id))
}

fn ms(elapsed: Duration) -> f64 {
    elapsed.as_secs_f64() * 1000.0
}
