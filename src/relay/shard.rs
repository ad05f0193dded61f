//! Which rows a relay owns: pure functions over the shard id and count.
//!
//! The split is the Python relay's, `ABS(HASHTEXT(key)::bigint) % shard_count = shard_id` with the row id as
//! the default key, so Python and Rust relays can share one table during a migration.

use super::config::{RelayConfig, ShardId};

/// One slice of the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// `0..count`.
    pub id: u32,
    /// How many slices the table is split into; 1 = the whole table.
    pub count: u32,
}

impl Shard {
    /// The whole table.
    pub const WHOLE: Self = Self { id: 0, count: 1 };

    /// The shard `relay` is configured for; `None` when the replicas share them (`shard_id = "auto"`).
    pub fn of(relay: &RelayConfig) -> Option<Self> {
        match relay.shard_id {
            ShardId::Fixed(id) => Some(Self { id, count: relay.shard_count }),
            ShardId::Auto => None,
        }
    }

    /// Every shard of a split into `count`.
    pub fn all_of(count: u32) -> impl Iterator<Item = Self> {
        (0..count.max(1)).map(move |id| Self { id, count: count.max(1) })
    }

    /// The `AND …` clause selecting this shard's rows by `key_sql`; empty when unsharded.
    pub fn sql_clause(&self, key_sql: &str) -> String {
        if self.count <= 1 {
            return String::new();
        }
        format!("AND ABS(HASHTEXT({key_sql})::bigint) % {} = {}", self.count, self.id)
    }

    /// The condition selecting the rows of any of `shards` (of one split) by `key_sql`.
    pub fn set_condition(shards: &[Shard], key_sql: &str) -> String {
        match shards {
            [] => "false".to_owned(),
            [one] if one.count <= 1 => "true".to_owned(),
            [first, ..] => {
                let ids: Vec<String> = shards.iter().map(|shard| shard.id.to_string()).collect();
                format!("ABS(HASHTEXT({key_sql})::bigint) % {} IN ({})", first.count, ids.join(", "))
            }
        }
    }

    /// The leader-lock key of this shard: one lock per shard, so each shard can have a hot standby.
    pub fn lock_key(&self, base: &str) -> String {
        if self.count <= 1 {
            base.to_owned()
        } else {
            format!("{base}:{}", self.id)
        }
    }

    /// The name of this shard's Postgres advisory lock (hashed to its key) on `table`.
    pub fn advisory_lock_name(&self, table: &str) -> String {
        self.lock_key(&format!("qx-relay:{table}"))
    }
}

/// The rows one relay loop claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// One shard's (the whole table's, unsharded).
    One(Shard),
    /// Those of whichever of `count` shards the loop is assigned at each claim (elastic shards).
    Assigned {
        /// The shard count.
        count: u32,
    },
}

impl Scope {
    /// The `AND …` clause selecting the scope's rows by `key_sql`; an assigned scope's shard ids are the
    /// `int[]` parameter number `param`.
    pub fn sql_clause(&self, key_sql: &str, param: usize) -> String {
        match self {
            Self::One(shard) => shard.sql_clause(key_sql),
            Self::Assigned { count } => {
                format!("AND ABS(HASHTEXT({key_sql})::bigint) % {count} = ANY(${param}::int[])")
            }
        }
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.id, self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsharded_selects_everything() {
        let whole = Shard { id: 0, count: 1 };
        assert_eq!(whole.sql_clause("id::text"), "");
        assert_eq!(whole.lock_key("leader:outbox-relay"), "leader:outbox-relay");
    }

    #[test]
    fn sharded_matches_the_python_expression() {
        let shard = Shard { id: 1, count: 3 };
        assert_eq!(shard.sql_clause("id::text"), "AND ABS(HASHTEXT(id::text)::bigint) % 3 = 1");
        assert_eq!(shard.lock_key("leader:outbox-relay"), "leader:outbox-relay:1");
        assert_eq!(Shard::all_of(3).count(), 3);
        assert_eq!(
            Scope::Assigned { count: 12 }.sql_clause("id::text", 5),
            "AND ABS(HASHTEXT(id::text)::bigint) % 12 = ANY($5::int[])"
        );
        assert_eq!(Scope::One(shard).sql_clause("id::text", 5), shard.sql_clause("id::text"));
        let two = [Shard { id: 1, count: 12 }, Shard { id: 4, count: 12 }];
        assert_eq!(Shard::set_condition(&two, "id::text"), "ABS(HASHTEXT(id::text)::bigint) % 12 IN (1, 4)");
        assert_eq!(
            Shard::set_condition(&two[..1], "id::text"),
            "ABS(HASHTEXT(id::text)::bigint) % 12 IN (1)"
        );
        assert_eq!(Shard::set_condition(&[Shard::WHOLE], "id::text"), "true");
        assert_eq!(Shard::set_condition(&[], "id::text"), "false");
    }
}
