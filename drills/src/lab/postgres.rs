//! PostgreSQL: a primary in site a and a streaming replica in site b.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tokio::time::Instant;

use super::describe::{ProcessInfo, ProcessKind, LOGS_DIR};
use super::proc::SpawnSpec;
use super::{lock, ms, poll_until, LabError, Registry};

/// The replication slot the replica streams from.
pub const REPLICA_SLOT: &str = "lab_replica_b";
/// The database the lab creates on the primary.
pub const DATABASE: &str = "gift";

/// Where the PostgreSQL binaries are and whom to run them as.
#[derive(Debug, Clone)]
pub(crate) struct PgSetup {
    pub bin: PathBuf,
    /// (uid, gid) of `postgres` when the lab runs as root.
    pub run_as: Option<(u32, u32)>,
}

impl PgSetup {
    pub fn detect() -> Result<PgSetup, LabError> {
        Ok(PgSetup {
            bin: super::paths::pg_bin_dir()?,
            run_as: super::paths::pg_run_as()?,
        })
    }

    fn user(&self) -> Option<String> {
        self.run_as.map(|_| "postgres".to_string())
    }
}

#[derive(Debug, Clone)]
pub(crate) struct PgPlan {
    pub site: String,
    pub host: String,
    pub port: u16,
}

impl PgPlan {
    pub fn name(&self) -> String {
        format!("postgres-{}", self.site)
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@{}:{}/{DATABASE}", self.host, self.port)
    }

    fn data_dir(&self, dir: &Path) -> PathBuf {
        dir.join(self.name())
    }

    fn log(&self, dir: &Path) -> PathBuf {
        dir.join(LOGS_DIR).join(format!("{}.log", self.name()))
    }

    /// A one-shot tool (initdb, pg_basebackup) run as the PostgreSQL user, logging to this
    /// server's log.
    fn tool(&self, dir: &Path, pg: &PgSetup, program: &str, args: Vec<String>) -> SpawnSpec {
        SpawnSpec {
            name: program.to_string(),
            program: pg.bin.join(program),
            args,
            env: BTreeMap::new(),
            run_as: pg.run_as,
            cwd: dir.to_path_buf(),
            log: self.log(dir),
            lab_dir: dir.to_path_buf(),
        }
    }

    /// The postmaster, started directly (not through pg_ctl) so that the recorded pid is its.
    pub fn server(&self, dir: &Path, pg: &PgSetup) -> (SpawnSpec, ProcessInfo) {
        let name = self.name();
        let data_dir = self.data_dir(dir);
        let args = vec![
            "-D".to_string(),
            data_dir.display().to_string(),
            "-c".to_string(),
            format!("listen_addresses={}", self.host),
            "-c".to_string(),
            format!("port={}", self.port),
            // No Unix socket: every client (and pg_basebackup) uses TCP, and no socket path
            // runs into the 107-byte limit under a deep temporary directory.
            "-c".to_string(),
            "unix_socket_directories=".to_string(),
            "-c".to_string(),
            format!("cluster_name=lab-{}", self.site),
        ];
        let spec = SpawnSpec {
            name: name.clone(),
            program: pg.bin.join("postgres"),
            args,
            env: BTreeMap::new(),
            run_as: pg.run_as,
            cwd: dir.to_path_buf(),
            log: self.log(dir),
            lab_dir: dir.to_path_buf(),
        };
        let listen = BTreeMap::from([("sql".to_string(), format!("{}:{}", self.host, self.port))]);
        let info = ProcessInfo {
            user: pg.user(),
            ..ProcessInfo::planned(&spec, ProcessKind::Postgres, &self.site, listen, data_dir)
        };
        (spec, info)
    }
}

/// Creates an empty data directory owned by the PostgreSQL user, mode 0700.
fn make_data_dir(path: &Path, pg: &PgSetup) -> Result<(), LabError> {
    std::fs::create_dir_all(path)
        .map_err(|e| LabError::io(format!("creating {}", path.display()), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| LabError::io(format!("chmod 0700 {}", path.display()), e))?;
    if let Some((uid, gid)) = pg.run_as {
        nix::unistd::chown(
            path,
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
        )
        .map_err(|e| LabError::io(format!("chown postgres {}", path.display()), e.into()))?;
    }
    Ok(())
}

fn append(path: &Path, text: &str) -> Result<(), LabError> {
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| LabError::io(format!("opening {}", path.display()), e))?;
    file.write_all(text.as_bytes())
        .map_err(|e| LabError::io(format!("appending to {}", path.display()), e))
}

const PRIMARY_CONF: &str = "
# Added by the gift lab.
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
hot_standby = on
shared_buffers = 32MB
# The lost-transaction checks read when each wallet write committed; pg_rewind needs hints.
track_commit_timestamp = on
wal_log_hints = on
# Two wallets and two gift-apis (16 connections each), a replica pool, tools, pgbench.
max_connections = 200
log_line_prefix = '%m [%p] %q%u@%d '
";

const HBA: &str = "
# Added by the gift lab: every lab address is on 127/8.
host    replication     all             127.0.0.0/8             trust
host    all             all             127.0.0.0/8             trust
";

/// Runs one statement with `psql` over TCP and returns its unaligned output.
pub(crate) async fn psql(
    bin: &Path,
    host: &str,
    port: u16,
    db: &str,
    sql: &str,
) -> Result<String, String> {
    let out = tokio::process::Command::new(bin.join("psql"))
        .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"])
        .args(["-h", host, "-p", &port.to_string(), "-U", "postgres"])
        .args(["-d", db, "-c", sql])
        .env("PGCONNECT_TIMEOUT", "2")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("running psql: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "psql {host}:{port}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Waits until `plan`'s server answers `select 1`.
pub(crate) async fn wait_accepting(
    reg: &Mutex<Registry>,
    pg: &PgSetup,
    plan: &PgPlan,
    started: Instant,
    deadline: Instant,
) -> Result<(), LabError> {
    let what = format!("{} to accept connections", plan.name());
    poll_until(
        || lock(reg).check_exited(None),
        started,
        deadline,
        &what,
        || async {
            psql(&pg.bin, &plan.host, plan.port, "postgres", "select 1")
                .await
                .map(|_| ())
        },
    )
    .await
}

/// Replaces `target`'s data directory with a fresh base backup of `source` that streams from
/// it (`-R`): how an old primary comes back as the new primary's replica. `target` must be
/// stopped.
pub(crate) async fn base_backup(
    dir: &Path,
    pg: &PgSetup,
    target: &PgPlan,
    source: &PgPlan,
    timeout: std::time::Duration,
) -> Result<(), LabError> {
    let data_dir = target.data_dir(dir);
    if data_dir.exists() {
        std::fs::remove_dir_all(&data_dir)
            .map_err(|e| LabError::io(format!("removing {}", data_dir.display()), e))?;
    }
    make_data_dir(&data_dir, pg)?;
    // A slot of its own on the source: the source's data directory still names the slot it
    // streamed through as a replica (`primary_slot_name`), which `-S` overrides.
    let slot = format!("lab_replica_{}", target.site);
    let drop_slot = format!(
        "select pg_drop_replication_slot(slot_name) from pg_replication_slots where slot_name = '{slot}'"
    );
    psql(&pg.bin, &source.host, source.port, "postgres", &drop_slot)
        .await
        .map_err(|detail| LabError::CommandFailed {
            command: drop_slot.clone(),
            status: "failed".into(),
            log: source.log(dir),
            tail: detail,
        })?;
    target
        .tool(
            dir,
            pg,
            "pg_basebackup",
            vec![
                "-h".into(),
                source.host.clone(),
                "-p".into(),
                source.port.to_string(),
                "-U".into(),
                "postgres".into(),
                "-D".into(),
                data_dir.display().to_string(),
                "-R".into(),
                "-X".into(),
                "stream".into(),
                "-C".into(),
                "-S".into(),
                slot,
                "--checkpoint=fast".into(),
                "--no-sync".into(),
            ],
        )
        .run(timeout)
        .await
}

/// initdb, start the primary, create the database, pg_basebackup the replica, start it, and
/// wait until it streams.
pub(crate) async fn start(
    reg: &Mutex<Registry>,
    dir: &Path,
    pg: &PgSetup,
    primary: &PgPlan,
    replica: &PgPlan,
    started: Instant,
    deadline: Instant,
) -> Result<(), LabError> {
    let remaining = || deadline.saturating_duration_since(Instant::now());
    let a_dir = primary.data_dir(dir);
    make_data_dir(&a_dir, pg)?;
    primary
        .tool(
            dir,
            pg,
            "initdb",
            vec![
                "-D".into(),
                a_dir.display().to_string(),
                "-U".into(),
                "postgres".into(),
                "--auth=trust".into(),
                "-N".into(),
                "-E".into(),
                "UTF8".into(),
                "--locale=C".into(),
            ],
        )
        .run(remaining())
        .await?;
    tracing::info!(elapsed_ms = ms(started), "lab: initdb done");
    append(&a_dir.join("postgresql.conf"), PRIMARY_CONF)?;
    append(&a_dir.join("pg_hba.conf"), HBA)?;

    let (spec, info) = primary.server(dir, pg);
    lock(reg).spawn(spec, info)?;
    wait_accepting(reg, pg, primary, started, deadline).await?;
    tracing::info!(
        elapsed_ms = ms(started),
        "lab: postgres primary accepts connections"
    );
    // The database is created while the base backup runs: a base backup is fuzzy by design,
    // and whatever it misses reaches the replica through WAL. Saves a few hundred ms.
    let create = format!("create database {DATABASE}");
    let create_db = async {
        psql(&pg.bin, &primary.host, primary.port, "postgres", &create)
            .await
            .map_err(|detail| LabError::CommandFailed {
                command: create.clone(),
                status: "failed".into(),
                log: primary.log(dir),
                tail: detail,
            })
    };
    let b_dir = replica.data_dir(dir);
    make_data_dir(&b_dir, pg)?;
    let basebackup = replica.tool(
        dir,
        pg,
        "pg_basebackup",
        vec![
            "-h".into(),
            primary.host.clone(),
            "-p".into(),
            primary.port.to_string(),
            "-U".into(),
            "postgres".into(),
            "-D".into(),
            b_dir.display().to_string(),
            "-R".into(),
            "-X".into(),
            "stream".into(),
            "-C".into(),
            "-S".into(),
            REPLICA_SLOT.into(),
            "--checkpoint=fast".into(),
            "--no-sync".into(),
        ],
    );
    tokio::try_join!(create_db, basebackup.run(remaining()))?;
    tracing::info!(elapsed_ms = ms(started), "lab: replica base backup taken");
    let (spec, info) = replica.server(dir, pg);
    lock(reg).spawn(spec, info)?;

    let what = format!("{} to stream from {}", replica.name(), primary.name());
    poll_until(
        || lock(reg).check_exited(None),
        started,
        deadline,
        &what,
        || async {
            let n = psql(
                &pg.bin,
                &primary.host,
                primary.port,
                "postgres",
                "select count(*) from pg_stat_replication where state = 'streaming'",
            )
            .await?;
            if n == "1" {
                Ok(())
            } else {
                Err(format!("{n} streaming replicas"))
            }
        },
    )
    .await
}
