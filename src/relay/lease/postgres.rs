//! The Postgres backend: session advisory locks on connections of their own, which die with their session,
//! so a partitioned holder is fenced by construction, and which Postgres ends after `leader_ttl` idle
//! (`idle_session_timeout`, PostgreSQL 14 and later), so a holder that stops answering lets go like an expired
//! Redis lease. The membership record of elastic replicas is one two-key advisory lock per replica, read from
//! `pg_locks`; `status` names each lock's session from `pg_stat_activity`.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool};
use sqlx::{Connection, PgConnection};
use tokio::time::timeout;
use uuid::Uuid;

use super::outcome::{Acquired, Holder, LockError, Session, STANDBY_POLL_MAX};
use crate::relay::identity::Identity;

/// The live members of a Postgres membership: the granted two-key advisory locks of its class, in order.
const PG_MEMBERS_SQL: &str = "SELECT objid::bigint FROM pg_locks \
     WHERE locktype = 'advisory' AND granted AND objsubid = 2 AND classid::bigint = $1 \
       AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
     ORDER BY objid";

/// Where the locks and the membership record live: the outbox's database.
#[derive(Debug, Clone)]
pub(crate) struct PgBackend {
    pub(super) url: String,
    pub(super) table: String,
    pub(super) ttl: Duration,
    /// The longest wait for Postgres in one step of a lookup.
    pub(super) statement_timeout: Duration,
}

impl PgBackend {
    /// The advisory lock `name`: a standby keeps its session between tries when `standby_session`, else it
    /// holds none while the lock is not held (elastic replicas try many shards' locks).
    pub(super) fn lock(&self, name: &str, standby_session: bool) -> AdvisoryLock {
        AdvisoryLock {
            url: self.url.clone(),
            key: advisory_key(name),
            connection: None,
            check_every: (self.ttl / 3).min(STANDBY_POLL_MAX),
            lease: self.ttl,
            standby_session,
        }
    }

    /// A fresh member of the table's membership record.
    pub(super) fn membership(&self) -> PgMembership {
        PgMembership {
            url: self.url.clone(),
            class: members_class(&self.table),
            member: member_id(),
            connection: None,
            ttl: self.ttl,
        }
    }

    /// How many replicas sharing the shards are alive; `pool` is the outbox's.
    pub(super) async fn live_members(&self, pool: &PgPool) -> Result<usize, LockError> {
        let members =
            sqlx::query_scalar::<_, i64>(PG_MEMBERS_SQL).bind(members_class(&self.table)).fetch_all(pool);
        let members = timeout(self.statement_timeout, members).await.map_err(|_| LockError::TimedOut)??;
        Ok(members.len())
    }
}

/// A Postgres session advisory lock held on a connection of its own, whose session Postgres ends after
/// `lease` without a check.
pub(crate) struct AdvisoryLock {
    url: String,
    pub(super) key: i64,
    connection: Option<PgConnection>,
    pub(super) check_every: Duration,
    lease: Duration,
    /// Whether a standby keeps its session between tries.
    standby_session: bool,
}

impl AdvisoryLock {
    pub(super) async fn try_acquire(&mut self) -> Result<Acquired, LockError> {
        if self.connection.is_none() {
            self.connection = Some(session(&self.url, self.lease, self.check_every * 2).await?);
        }
        let connection = self.connection.as_mut().expect("just connected");
        let locked =
            sqlx::query_scalar("SELECT pg_try_advisory_lock($1)").bind(self.key).fetch_one(connection);
        let locked = timeout(self.check_every * 2, locked).await;
        if session_outcome(&mut self.connection, locked)? {
            return Ok(Acquired::Yes);
        }
        if !self.standby_session {
            self.connection = None;
        }
        Ok(Acquired::No { retry_in: STANDBY_POLL_MAX })
    }

    /// The session is alive, so the lock is still ours.
    pub(super) async fn check(&mut self, limit: Duration) -> Result<bool, LockError> {
        let Some(connection) = self.connection.as_mut() else { return Ok(false) };
        let pinged = timeout(limit, connection.ping()).await;
        session_outcome(&mut self.connection, pinged).map(|()| true)
    }

    pub(super) async fn release(&mut self) -> Result<(), LockError> {
        if let Some(connection) = self.connection.take() {
            // Closing the session releases the lock; no unlock call needed.
            timeout(self.check_every * 2, connection.close()).await.map_err(|_| LockError::TimedOut)??;
        }
        Ok(())
    }
}

/// A session of its own on `url`, named after this process so that `status` (through `pg_stat_activity`) can
/// say who holds its locks; ended by the server after `lease` idle.
///
/// # Errors
/// When `url` is not a Postgres URL, or no session opens within `limit`.
async fn session(url: &str, lease: Duration, limit: Duration) -> Result<PgConnection, LockError> {
    let options = url
        .parse::<PgConnectOptions>()?
        .application_name(&Identity::current().application_name())
        .extra_float_digits(None);
    // Set by a statement, not the `options` startup parameter, which PgBouncer refuses or (told to ignore it)
    // drops without a word: a lease that never ends would keep a frozen relay's shards.
    let lease = format!("SET idle_session_timeout = {}", lease.as_millis());
    let open = async {
        let mut connection = PgConnection::connect_with(&options).await?;
        sqlx::query(&lease).execute(&mut connection).await?;
        Ok::<_, sqlx::Error>(connection)
    };
    timeout(limit, open).await.map_err(|_| LockError::TimedOut)?.map_err(Into::into)
}

/// The outcome of a step on the session in `slot`, given its deadline: a session that failed or did not answer
/// is dropped, so the next step opens a new one.
///
/// # Errors
/// The step's error, or [`LockError::TimedOut`].
fn session_outcome<T>(
    slot: &mut Option<PgConnection>,
    outcome: Result<Result<T, sqlx::Error>, tokio::time::error::Elapsed>,
) -> Result<T, LockError> {
    let result = match outcome {
        Ok(Ok(value)) => return Ok(value),
        Ok(Err(err)) => Err(err.into()),
        Err(_) => Err(LockError::TimedOut),
    };
    *slot = None;
    result
}

/// A member holding its advisory lock `(class, member)` on a session of its own.
pub(crate) struct PgMembership {
    url: String,
    class: i64,
    pub(super) member: i32,
    pub(super) connection: Option<PgConnection>,
    ttl: Duration,
}

impl PgMembership {
    pub(super) async fn beat(&mut self) -> Result<Vec<String>, LockError> {
        let limit = self.ttl / 3;
        if self.connection.is_none() {
            let mut connection = session(&self.url, self.ttl, limit).await?;
            let class = i32::try_from(self.class).expect("a class fits an int4");
            let join = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
                .bind(class)
                .bind(self.member)
                .fetch_one(&mut connection);
            let joined: bool = timeout(limit, join).await.map_err(|_| LockError::TimedOut)??;
            if !joined {
                // Another replica drew the same id: draw again next beat.
                self.member = member_id();
                return Err(LockError::TimedOut);
            }
            self.connection = Some(connection);
        }
        let connection = self.connection.as_mut().expect("just connected");
        let members = sqlx::query_scalar::<_, i64>(PG_MEMBERS_SQL).bind(self.class).fetch_all(connection);
        let members = timeout(limit, members).await;
        let members = session_outcome(&mut self.connection, members)?;
        Ok(members.iter().map(i64::to_string).collect())
    }
}

/// Who holds the advisory lock `name` in the database of `pool`: the session from `pg_locks`, named by
/// `pg_stat_activity` (`application_name` is visible to every role; the client address only to the same role
/// or `pg_read_all_stats`).
///
/// # Errors
/// Any database error.
pub(super) async fn holder(pool: &PgPool, name: &str) -> Result<Holder, sqlx::Error> {
    // A bigint advisory key shows in pg_locks as its high half (classid) and low half (objid), objsubid 1.
    let session: Option<(i32, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT a.pid, a.application_name, host(a.client_addr) \
         FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
           AND ((l.classid::bigint << 32) | l.objid::bigint) = $1",
    )
    .bind(advisory_key(name))
    .fetch_optional(pool)
    .await?;
    let identity =
        session.as_ref().and_then(|(_, app, _)| app.as_deref().and_then(Identity::from_application_name));
    Ok(Holder {
        key: name.to_owned(),
        backend: "postgres",
        held: session.is_some(),
        token: None,
        ttl_left_ms: None,
        identity,
        since: None,
        session: session.map(|(backend_pid, application_name, client_addr)| Session {
            backend_pid,
            application_name,
            client_addr,
        }),
    })
}

/// The first key of the members' advisory locks on `table`: non-negative, so `pg_locks` shows it as is.
fn members_class(table: &str) -> i64 {
    advisory_key(&format!("qx-relay:{table}:members")) & 0x7fff_ffff
}

/// A random member id: the second key of this replica's advisory lock.
fn member_id() -> i32 {
    i32::try_from(Uuid::new_v4().as_u128() & 0x7fff_ffff).expect("31 bits fit an int4")
}

/// A stable 64-bit key for `name` (FNV-1a), so every relay of a table and shard picks the same lock.
fn advisory_key(name: &str) -> i64 {
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    i64::from_ne_bytes(hash.to_ne_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advisory_keys_are_stable_and_distinct() {
        assert_eq!(advisory_key("qx_outbox_events:0"), advisory_key("qx_outbox_events:0"));
        assert_ne!(advisory_key("qx_outbox_events:0"), advisory_key("qx_outbox_events:1"));
    }
}
