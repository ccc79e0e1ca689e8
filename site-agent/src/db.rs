//! The agent's SQL on its own site's database: the writer lease, the fence, the promotion.
//!
//! One connection per [`Db`], every operation under its own deadline (the connection gets a
//! matching `statement_timeout` too); a connection that missed a deadline or broke is
//! dropped and the next operation connects again. A frozen database therefore costs one
//! deadline per operation, never a blocked caller.
//!
//! The schemas are the strong service's (`wallet`) and its shadow copy (`shadow_wallet`):
//! both hold a single-row `fencing` table (`epoch`, `lease_until`, `updated_at`).

use std::str::FromStr;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{Connection, Row};

use crate::AgentError;

/// The `application_name` of every agent connection. The fence terminates every client
/// session of the database except those whose name starts with it (the agents' own).
pub const APPLICATION_NAME: &str = "site-agent";

/// Whether the configuration files (`ALTER SYSTEM`) turn `default_transaction_read_only`
/// on: what new sessions get after a reload. A session's own `current_setting` only follows
/// once it has processed the reload's SIGHUP, a moment later.
const CONFIGURED_READ_ONLY: &str = "coalesce((SELECT lower(setting) IN ('on', 'true', 'yes', '1') \
    FROM pg_file_settings WHERE name = 'default_transaction_read_only' AND applied \
    ORDER BY seqno DESC LIMIT 1), false)";

/// How often promotion and catch-up are polled (the approval → first gift budget is 1 s).
const POLL: Duration = Duration::from_millis(10);
/// How long recovery may take to end after `pg_promote`.
const PROMOTE_LIMIT: Duration = Duration::from_secs(30);

/// The database as the lease loop sees it (one statement).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DbState {
    pub in_recovery: bool,
    /// The strong service's fencing epoch.
    pub epoch: u64,
    /// `lease_until - clock_timestamp()` in ms (negative: expired); `None`: NULL, no lease
    /// enforced yet.
    pub lease_remaining_ms: Option<i64>,
    /// `default_transaction_read_only` as configured (`ALTER SYSTEM`), i.e. fenced.
    pub read_only: bool,
    /// Standbys streaming from it (`pg_stat_replication`): zero-loss mode needs one.
    pub streaming_standbys: u32,
    /// Primary: `pg_current_wal_lsn()` as bytes (0 on a replica); sent with lease requests.
    pub wal_lsn: u64,
    /// The wallet ledger's highest sequence (0 when empty).
    pub ledger_sequence: u64,
}

/// Where the database's WAL and the wallet ledger are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Positions {
    /// Primary: `pg_current_wal_flush_lsn()` (what streaming can have shipped; after a fence
    /// or a promotion equal to `pg_current_wal_lsn()`); replica: `pg_last_wal_replay_lsn()`;
    /// as bytes.
    pub lsn: u64,
    /// The ledger's highest `seq`, 0 when empty.
    pub ledger_sequence: u64,
}

/// What one fence did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FenceReport {
    pub took_ms: u64,
    /// The database was a replica: nothing to expire, read-only set for its future.
    pub replica: bool,
    /// Sessions terminated (and gone before the fence returned).
    pub terminated: u64,
    /// The lease write waited on a session's lock and was done again after the terminations.
    pub lease_retried: bool,
}

/// What one promotion did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PromoteReport {
    /// False: the database already was the primary of this epoch (a repeat).
    pub promoted: bool,
    pub catch_up_ms: u64,
    /// `pg_promote` until out of recovery.
    pub promote_ms: u64,
    /// Receipt of the command until the epoch write committed.
    pub total_ms: u64,
    /// Right after the promotion (the promotion point).
    pub positions: Positions,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// One connection to the site's own database, with the SQL of the lease and of commands.
pub struct Db {
    options: PgConnectOptions,
    conn: Option<PgConnection>,
    timeout: Duration,
    /// The strong service's schema and its shadow copy.
    schemas: [String; 2],
}

impl Db {
    /// No connection yet: the first operation connects. `service` must be an SQL identifier
    /// (the config checks it).
    pub fn new(url: &str, service: &str, timeout: Duration) -> Result<Db, AgentError> {
        let timeout_ms = ms(timeout).to_string();
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| AgentError::Config(format!("database_url: {e}")))?
            .application_name(APPLICATION_NAME)
            .options([
                ("statement_timeout", timeout_ms.as_str()),
                ("lock_timeout", timeout_ms.as_str()),
            ]);
        Ok(Db {
            options,
            conn: None,
            timeout,
            schemas: [service.to_string(), format!("shadow_{service}")],
        })
    }

    fn wallet(&self) -> &str {
        &self.schemas[0]
    }

    /// Runs `f` on the connection (connecting first when needed) within the deadline. A
    /// missed deadline or a broken connection drops the connection.
    async fn with<T, F>(&mut self, op: &'static str, f: F) -> Result<T, AgentError>
    where
        F: for<'c> FnOnce(&'c mut PgConnection) -> BoxFuture<'c, Result<T, sqlx::Error>>,
    {
        let options = &self.options;
        let slot = &mut self.conn;
        let result = tokio::time::timeout(self.timeout, async move {
            let conn = match slot {
                Some(c) => c,
                None => slot.insert(PgConnection::connect_with(options).await?),
            };
            f(conn).await
        })
        .await;
        match result {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if !matches!(e, sqlx::Error::Database(_)) {
                    self.conn = None;
                }
                Err(AgentError::Database {
                    op,
                    message: e.to_string(),
                })
            }
            Err(_) => {
                self.conn = None;
                Err(AgentError::DatabaseTimeout {
                    op,
                    ms: ms(self.timeout),
                })
            }
        }
    }

    /// Role, fencing epoch, lease, read-only: one statement.
    pub async fn state(&mut self) -> Result<DbState, AgentError> {
        let sql = format!(
            "SELECT pg_is_in_recovery() AS recovery, f.epoch, \
             (extract(epoch FROM f.lease_until - clock_timestamp()) * 1000)::bigint AS lease_ms, \
             {CONFIGURED_READ_ONLY} AS read_only, \
             (SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming') AS standbys, \
             CASE WHEN pg_is_in_recovery() THEN 0 \
                  ELSE (pg_current_wal_lsn() - '0/0')::bigint END AS wal_lsn, \
             (SELECT coalesce(max(seq), 0) FROM {w}.ledger) AS ledger_seq \
             FROM {w}.fencing f",
            w = self.wallet()
        );
        self.with("read the fencing row", move |c| {
            Box::pin(async move {
                let row = sqlx::query(&sql).fetch_one(c).await?;
                Ok(DbState {
                    in_recovery: row.try_get("recovery")?,
                    epoch: to_u64(row.try_get("epoch")?),
                    lease_remaining_ms: row.try_get("lease_ms")?,
                    read_only: row.try_get("read_only")?,
                    streaming_standbys: u32::try_from(row.try_get::<i64, _>("standbys")?)
                        .unwrap_or(u32::MAX),
                    wal_lsn: to_u64(row.try_get("wal_lsn")?),
                    ledger_sequence: to_u64(row.try_get("ledger_seq")?),
                })
            })
        })
        .await
    }

    pub async fn positions(&mut self) -> Result<Positions, AgentError> {
        let sql = format!(
            "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
             ELSE pg_current_wal_flush_lsn() END - '0/0')::bigint AS lsn, \
             (SELECT coalesce(max(seq), 0) FROM {}.ledger) AS seq",
            self.wallet()
        );
        self.with("read WAL and ledger positions", move |c| {
            Box::pin(async move {
                let row = sqlx::query(&sql).fetch_one(c).await?;
                Ok(Positions {
                    lsn: to_u64(row.try_get::<Option<i64>, _>("lsn")?.unwrap_or(0)),
                    ledger_sequence: to_u64(row.try_get("seq")?),
                })
            })
        })
        .await
    }

    /// Writes the lease into both fencing rows of `epoch`: `lease_until = clock_timestamp()
    /// + remaining` (a duration: the two hosts' clocks are never compared).
    pub async fn write_lease(&mut self, epoch: u64, remaining: Duration) -> Result<(), AgentError> {
        self.set_lease(epoch, remaining, false).await
    }

    /// A peer's renewal of another site's writer database: only pushes a lease that is still
    /// running further out, never revives an expired (fenced) one and never shortens one.
    pub async fn extend_lease(
        &mut self,
        epoch: u64,
        remaining: Duration,
    ) -> Result<(), AgentError> {
        self.set_lease(epoch, remaining, true).await
    }

    async fn set_lease(
        &mut self,
        epoch: u64,
        remaining: Duration,
        extend_only: bool,
    ) -> Result<(), AgentError> {
        let updates: Vec<String> = self
            .schemas
            .iter()
            .map(|s| {
                let until = "clock_timestamp() + $2::float8 * interval '1 millisecond'";
                if extend_only {
                    format!(
                        "UPDATE {s}.fencing SET lease_until = greatest(lease_until, {until}) \
                         WHERE epoch = $1 AND lease_until > clock_timestamp()"
                    )
                } else {
                    format!("UPDATE {s}.fencing SET lease_until = {until} WHERE epoch = $1")
                }
            })
            .collect();
        let remaining_ms = to_i64(ms(remaining));
        let updated = self
            .with("write the writer lease", move |c| {
                Box::pin(async move {
                    let mut tx = c.begin().await?;
                    sqlx::query("SET TRANSACTION READ WRITE")
                        .execute(&mut *tx)
                        .await?;
                    let mut updated = Vec::new();
                    for sql in &updates {
                        let done = sqlx::query(sql)
                            .bind(to_i64(epoch))
                            .bind(remaining_ms)
                            .execute(&mut *tx)
                            .await?;
                        updated.push(done.rows_affected());
                    }
                    if updated.first() == Some(&1) {
                        tx.commit().await?;
                    } else {
                        tx.rollback().await?;
                    }
                    Ok(updated)
                })
            })
            .await?;
        if updated.first() == Some(&1) {
            if updated.get(1) != Some(&1) {
                tracing::warn!(
                    schema = %self.schemas[1],
                    epoch,
                    "the shadow fencing row does not hold the lease's epoch: its lease was not written"
                );
            }
            return Ok(());
        }
        let database = self.state().await?.epoch;
        Err(AgentError::EpochMismatch {
            expected: epoch,
            database,
        })
    }

    /// Expires the lease in both fencing rows now (the wallet refuses at once).
    async fn expire_lease(&mut self) -> Result<(), AgentError> {
        let updates: Vec<String> = self
            .schemas
            .iter()
            .map(|s| {
                format!(
                    "UPDATE {s}.fencing SET lease_until = \
                     least(coalesce(lease_until, clock_timestamp()), clock_timestamp())"
                )
            })
            .collect();
        // A session holding the fencing row (FOR SHARE) must not hold the fence up: wait a
        // quarter of the deadline, then terminate it and come back.
        let lock_ms = (ms(self.timeout) / 4).max(1);
        self.with("expire the writer lease", move |c| {
            Box::pin(async move {
                let mut tx = c.begin().await?;
                sqlx::query("SET TRANSACTION READ WRITE")
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(&format!("SET LOCAL lock_timeout = '{lock_ms}ms'"))
                    .execute(&mut *tx)
                    .await?;
                for sql in &updates {
                    sqlx::query(sql).execute(&mut *tx).await?;
                }
                tx.commit().await
            })
        })
        .await
    }

    /// `default_transaction_read_only` on or off (`ALTER SYSTEM` + reload) unless already so;
    /// returns whether it changed the configuration.
    /// Zero-loss mode: commits wait for any one standby (`synchronous_standby_names = '*'`)
    /// or for none (`''`). A reload releases the commits waiting when it is cleared.
    pub async fn set_synchronous(&mut self, on: bool) -> Result<(), AgentError> {
        self.with("set synchronous_standby_names", move |c| {
            Box::pin(async move {
                let sql = if on {
                    "ALTER SYSTEM SET synchronous_standby_names = '*'"
                } else {
                    "ALTER SYSTEM SET synchronous_standby_names = ''"
                };
                sqlx::query(sql).execute(&mut *c).await?;
                sqlx::query("SELECT pg_reload_conf()")
                    .execute(&mut *c)
                    .await?;
                Ok(())
            })
        })
        .await
    }

    async fn set_read_only(&mut self, on: bool) -> Result<bool, AgentError> {
        self.with("set default_transaction_read_only", move |c| {
            Box::pin(async move {
                let configured: bool =
                    sqlx::query_scalar(&format!("SELECT {CONFIGURED_READ_ONLY}"))
                        .fetch_one(&mut *c)
                        .await?;
                let changed = configured != on;
                if changed {
                    let sql = if on {
                        "ALTER SYSTEM SET default_transaction_read_only = on"
                    } else {
                        "ALTER SYSTEM RESET default_transaction_read_only"
                    };
                    sqlx::query(sql).execute(&mut *c).await?;
                }
                // Reloaded until this session runs with it (so the reload has happened; the
                // other sessions follow at their next statement, or are terminated).
                loop {
                    let current: bool = sqlx::query_scalar(
                        "SELECT current_setting('default_transaction_read_only') = 'on'",
                    )
                    .fetch_one(&mut *c)
                    .await?;
                    if current == on {
                        return Ok(changed);
                    }
                    sqlx::query("SELECT pg_reload_conf()")
                        .execute(&mut *c)
                        .await?;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        })
        .await
    }

    /// Terminates every client session of this database but the agents' own, and waits
    /// (within the deadline) until they are gone, so that none of their transactions can
    /// still commit.
    async fn terminate_sessions(&mut self) -> Result<u64, AgentError> {
        let pattern = format!("{APPLICATION_NAME}%");
        self.with("terminate client sessions", move |c| {
            Box::pin(async move {
                // Chosen first, terminated after: in one WHERE clause the planner may call
                // pg_terminate_backend before the other conditions (it killed walsenders).
                let pids: Vec<i32> = sqlx::query_scalar(
                    "WITH chosen AS MATERIALIZED ( \
                       SELECT pid FROM pg_stat_activity \
                       WHERE datname = current_database() AND backend_type = 'client backend' \
                         AND pid <> pg_backend_pid() \
                         AND coalesce(application_name, '') NOT LIKE $1) \
                     SELECT pid FROM chosen WHERE pg_terminate_backend(pid)",
                )
                .bind(&pattern)
                .fetch_all(&mut *c)
                .await?;
                loop {
                    let left: i64 = sqlx::query_scalar(
                        "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)",
                    )
                    .bind(&pids)
                    .fetch_one(&mut *c)
                    .await?;
                    if left == 0 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Ok(u64::try_from(pids.len()).unwrap_or(u64::MAX))
            })
        })
        .await
    }

    /// The fence, in this order: the lease expires in both fencing rows (the wallet refuses
    /// at once), `default_transaction_read_only` on, then (when `terminate`) every client
    /// session but the agents' own is terminated and gone. Idempotent. A database that does
    /// not answer ends the fence with the error at the first step (its own lease_until
    /// still expires on its own).
    pub async fn fence(&mut self, terminate: bool) -> Result<FenceReport, AgentError> {
        let started = Instant::now();
        let replica: bool = self
            .with("read the role", |c| {
                Box::pin(async move {
                    sqlx::query_scalar("SELECT pg_is_in_recovery()")
                        .fetch_one(c)
                        .await
                })
            })
            .await?;
        let mut lease_retried = false;
        let mut lease_failed = None;
        if !replica {
            match self.expire_lease().await {
                Ok(()) => {}
                Err(e @ AgentError::Database { .. }) => {
                    lease_retried = true;
                    lease_failed = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        self.set_read_only(true).await?;
        let terminated = if terminate && !replica {
            self.terminate_sessions().await?
        } else {
            0
        };
        if !replica {
            // Again, now that no session holds the fencing row: the retry when the first one
            // waited on a lock, and in any case a committed write after the terminations, so
            // that everything before it (the terminated sessions' abort records too) is
            // flushed and the WAL position read next is one the replica will reach.
            if let Some(first) = &lease_failed {
                tracing::info!("lease expiry waited on a session's lock ({first}): again after the terminations");
            }
            self.expire_lease().await?;
        }
        Ok(FenceReport {
            took_ms: ms(started.elapsed()),
            replica,
            terminated,
            lease_retried,
        })
    }

    /// `default_transaction_read_only` off again. Returns whether it was on.
    pub async fn unfence(&mut self) -> Result<bool, AgentError> {
        self.set_read_only(false).await
    }

    async fn scalar_i64(&mut self, op: &'static str, sql: &'static str) -> Result<i64, AgentError> {
        self.with(op, move |c| {
            Box::pin(async move { sqlx::query_scalar(sql).fetch_one(c).await })
        })
        .await
    }

    /// Makes this database the primary of `epoch`. `received` is when the command arrived:
    /// the lease written is `lease` counted from then (so it never outlives the leader's
    /// view). See [`crate::commands`] for the protocol.
    pub async fn promote(
        &mut self,
        epoch: u64,
        min_replay_lsn: u64,
        catch_up_timeout: Duration,
        lease: Duration,
        received: Instant,
    ) -> Result<PromoteReport, AgentError> {
        let state = self.state().await?;
        let mut catch_up_ms = 0;
        let mut promote_ms = 0;
        if !state.in_recovery {
            if state.epoch == epoch {
                let positions = self.positions().await?;
                return Ok(PromoteReport {
                    promoted: false,
                    catch_up_ms,
                    promote_ms,
                    total_ms: ms(received.elapsed()),
                    positions,
                });
            }
            if state.epoch > epoch {
                return Err(AgentError::HigherEpoch {
                    requested: epoch,
                    database: state.epoch,
                });
            }
            // A primary below the epoch: an earlier promotion stopped before its epoch
            // write. Finish it.
        } else {
            let started = Instant::now();
            if min_replay_lsn > 0 {
                loop {
                    let replayed = to_u64(
                        self.scalar_i64(
                            "read the replay position",
                            "SELECT coalesce((pg_last_wal_replay_lsn() - '0/0')::bigint, 0)",
                        )
                        .await?,
                    );
                    if replayed >= min_replay_lsn {
                        break;
                    }
                    if started.elapsed() >= catch_up_timeout {
                        return Err(AgentError::CatchUpTimeout {
                            wanted: min_replay_lsn,
                            replayed,
                            waited_ms: ms(started.elapsed()),
                        });
                    }
                    tokio::time::sleep(POLL).await;
                }
            }
            catch_up_ms = ms(started.elapsed());
            // wait => false and our own fast poll: pg_promote's own wait polls every 100 ms.
            let promoting = Instant::now();
            self.with("pg_promote", |c| {
                Box::pin(async move {
                    sqlx::query("SELECT pg_promote(false)").execute(c).await?;
                    Ok(())
                })
            })
            .await?;
            loop {
                let in_recovery: bool = self
                    .with("read the role", |c| {
                        Box::pin(async move {
                            sqlx::query_scalar("SELECT pg_is_in_recovery()")
                                .fetch_one(c)
                                .await
                        })
                    })
                    .await?;
                if !in_recovery {
                    break;
                }
                if promoting.elapsed() >= PROMOTE_LIMIT {
                    return Err(AgentError::PromoteTimeout {
                        waited_ms: ms(promoting.elapsed()),
                    });
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            promote_ms = ms(promoting.elapsed());
        }
        let positions = self.positions().await?;
        self.unfence().await?;
        self.write_epoch(
            epoch,
            (received + lease).saturating_duration_since(Instant::now()),
        )
        .await?;
        Ok(PromoteReport {
            promoted: true,
            catch_up_ms,
            promote_ms,
            total_ms: ms(received.elapsed()),
            positions,
        })
    }

    /// The proof that the database takes writes: both fencing rows move to `epoch` with a
    /// lease of `remaining`, in one READ WRITE transaction.
    async fn write_epoch(&mut self, epoch: u64, remaining: Duration) -> Result<(), AgentError> {
        let updates: Vec<String> = self
            .schemas
            .iter()
            .map(|s| {
                format!(
                    "UPDATE {s}.fencing SET epoch = $1, \
                     lease_until = clock_timestamp() + $2::float8 * interval '1 millisecond', \
                     updated_at = now() WHERE epoch < $1"
                )
            })
            .collect();
        let remaining_ms = to_i64(ms(remaining));
        let updated = self
            .with("write the new epoch", move |c| {
                Box::pin(async move {
                    let mut tx = c.begin().await?;
                    sqlx::query("SET TRANSACTION READ WRITE")
                        .execute(&mut *tx)
                        .await?;
                    let mut updated = 0;
                    for sql in &updates {
                        updated += sqlx::query(sql)
                            .bind(to_i64(epoch))
                            .bind(remaining_ms)
                            .execute(&mut *tx)
                            .await?
                            .rows_affected();
                    }
                    tx.commit().await?;
                    Ok(updated)
                })
            })
            .await?;
        if updated == 0 {
            let database = self.state().await?.epoch;
            if database > epoch {
                return Err(AgentError::HigherEpoch {
                    requested: epoch,
                    database,
                });
            }
        }
        Ok(())
    }
}
