//! A database of a run's own holding the qx-db outbox table, so runs in parallel never see each other's rows.

use std::time::Duration;

use serde_json::Value;
use sqlx::postgres::PgPool;
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

use crate::outbox::{self, FixtureRow, OUTBOX_DDL};
use crate::servers::PgCluster;
use crate::wait::poll_every;
use crate::{clean_up_blocking, env_var};

/// How often [`TestDb::wait_for`] counts: a count may read much of a table the relay under test is draining.
const COUNT_EVERY: Duration = Duration::from_millis(50);

/// A database named `qxr_<uuid>` with the outbox table, dropped on drop.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
    /// Where to drop it from; `None` on a private cluster, whose data goes with the cluster.
    admin_url: Option<String>,
}

impl TestDb {
    /// One on the server of `DATABASE_URL`.
    pub async fn create() -> Self {
        let admin_url = env_var("DATABASE_URL");
        Self::create_at(&admin_url, Some(admin_url.clone())).await
    }

    /// One on a private cluster.
    pub async fn create_on(cluster: &PgCluster) -> Self {
        Self::create_at(&cluster.url("postgres"), None).await
    }

    async fn create_at(admin_url: &str, drop_from: Option<String>) -> Self {
        let name = format!("qxr_{}", Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(admin_url).await.expect("connect to create a database");
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut admin).await.expect("create database");
        let url = with_database(admin_url, &name);
        let pool = PgPool::connect(&url).await.expect("connect the test database");
        sqlx::raw_sql(OUTBOX_DDL).execute(&pool).await.expect("create the outbox table");
        Self { name, url, pool, admin_url: drop_from }
    }

    /// Closes the pool's connections, so their statistics reach the server (backends report them at exit),
    /// and opens a new pool.
    pub async fn reconnect(&mut self) {
        self.pool.close().await;
        self.pool = PgPool::connect(&self.url).await.expect("reconnect the test database");
    }

    /// Runs `sql`, statements without parameters, which must succeed.
    pub async fn execute(&self, sql: &str) {
        sqlx::raw_sql(sql).execute(&self.pool).await.unwrap_or_else(|err| panic!("{sql}: {err}"));
    }

    /// Inserts `count` qx-db-shaped rows of `event_name`, oldest first, every other one with a tenant; returns
    /// their ids in order.
    pub async fn insert_events(&self, count: usize, event_name: &str) -> Vec<Uuid> {
        let ids: Vec<Uuid> = (0..count).map(|_| Uuid::new_v4()).collect();
        let insert = outbox::insert_from(
            "SELECT r.id, $2, 1, jsonb_build_object( \
                      'payload', jsonb_build_object('order_id', gen_random_uuid(), 'n', r.n), \
                      'actor_id', NULL, 'event_id', gen_random_uuid(), 'tenant_id', r.tenant, \
                      'event_name', $2::text, 'occurred_at', to_char(r.at AT TIME ZONE 'UTC', \
                      'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"'), 'causation_id', NULL, 'event_version', 1, \
                      'correlation_id', r.corr), \
                    r.at, r.corr, NULL, r.tenant, NULL, 0, NULL \
             FROM (SELECT id, n, clock_timestamp() + n * interval '1 microsecond' AS at, gen_random_uuid() AS corr, \
                          CASE WHEN n % 2 = 0 THEN gen_random_uuid() END AS tenant \
                   FROM UNNEST($1::uuid[]) WITH ORDINALITY AS u(id, n)) r",
        );
        for chunk in ids.chunks(5000) {
            sqlx::query(&insert)
                .bind(chunk)
                .bind(event_name)
                .execute(&self.pool)
                .await
                .expect("insert events");
        }
        ids
    }

    /// Inserts one row of `event_name` whose envelope is `payload`; returns its id.
    pub async fn insert_raw(&self, event_name: &str, payload: &str) -> Uuid {
        let id = Uuid::new_v4();
        self.insert_rows(&[serde_json::json!({ "id": id, "event_name": event_name, "payload": payload })])
            .await;
        id
    }

    /// Inserts `rows` (see [`outbox::insert_rows`]).
    pub async fn insert_rows(&self, rows: &[Value]) {
        outbox::insert_rows(&self.pool, rows).await.expect("insert rows");
    }

    /// Inserts the qx-db fixture rows with every column as written; returns them.
    pub async fn insert_fixtures(&self) -> Vec<FixtureRow> {
        let rows: Vec<Value> = outbox::FIXTURE_ROWS
            .lines()
            .map(|line| serde_json::from_str(line).expect("fixture row"))
            .collect();
        self.insert_rows(&rows).await;
        outbox::fixture_rows()
    }

    /// Rows matching `condition`.
    pub async fn count(&self, condition: &str) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM qx_outbox_events WHERE {condition}"))
            .fetch_one(&self.pool)
            .await
            .expect("count rows")
    }

    pub async fn unpublished(&self) -> i64 {
        self.count("published_at IS NULL").await
    }

    /// Waits until `condition` holds for `expected` rows; panics after `limit`.
    pub async fn wait_for(&self, condition: &str, expected: i64, limit: Duration) {
        let reached = poll_every(COUNT_EVERY, limit, || async {
            (self.count(condition).await == expected).then_some(())
        });
        if reached.await.is_none() {
            let count = self.count(condition).await;
            panic!("waited {limit:?} for {expected} rows {condition}, have {count}");
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(admin_url) = self.admin_url.take() else { return };
        let drop_database = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        clean_up_blocking(async move {
            if let Ok(mut admin) = PgConnection::connect(&admin_url).await {
                let _ = sqlx::query(&drop_database).execute(&mut admin).await;
            }
        });
    }
}

/// Replaces the database of a `postgres://…/db` URL, keeping its query.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = url.split_once('?').map_or((url, None), |(b, q)| (b, Some(q)));
    let (server, _) = base.rsplit_once('/').expect("the Postgres URL names a database");
    match query {
        Some(query) => format!("{server}/{database}?{query}"),
        None => format!("{server}/{database}"),
    }
}
