use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while starting, inspecting or stopping a lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{name} not found at {}: {hint}", path.display())]
    MissingBinary {
        name: String,
        path: PathBuf,
        hint: String,
    },
    #[error(
        "a lab is already running in {} ({}); stop it first with `lab down --dir {}`",
        dir.display(),
        names.join(", "),
        dir.display()
    )]
    AlreadyRunning { dir: PathBuf, names: Vec<String> },
    #[error(
        "{} is not empty and is not a lab directory (no .gift-lab marker); choose another --dir",
        .0.display()
    )]
    NotALabDir(PathBuf),
    #[error("no lab in {}: neither lab.json nor pid files found", .0.display())]
    NoLab(PathBuf),
    #[error(
        "PostgreSQL refuses to run as root, so the lab runs it as user `postgres`, but that user \
         cannot reach {}: {} is not traversable by it. Use a --dir under /tmp (e.g. /tmp/gift-lab)",
        dir.display(),
        blocker.display()
    )]
    PostgresCannotReach { dir: PathBuf, blocker: PathBuf },
    #[error(
        "running as root but there is no `postgres` user to run PostgreSQL as (PostgreSQL refuses \
         to run as root): run scripts/setup.sh, or run the lab as an unprivileged user"
    )]
    NoPostgresUser,
    #[error("could not start {name} ({}): {source}", program.display())]
    Spawn {
        name: String,
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}); last lines of {}:\n{tail}", log.display())]
    CommandFailed {
        command: String,
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error("{name} exited ({status}); last lines of {}:\n{tail}", log.display())]
    ProcessExited {
        name: String,
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error("timed out after {after:.1?} waiting for {what}: {detail}")]
    Timeout {
        what: String,
        after: Duration,
        detail: String,
    },
    #[error("invoker cluster: {0}")]
    Invoker(#[from] invoker_api::ClientError),
    #[error("invoker rpc: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("invalid topology: {0}")]
    Topology(#[from] invoker_domain::DomainError),
    #[error("serialising TOML: {0}")]
    Toml(#[from] toml::ser::Error),
    #[error("{}: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("no process named {0:?} in this lab")]
    UnknownProcess(String),
    #[error("{0} is not running")]
    NotRunning(String),
    #[error("cannot send {signal} to {name} (pid {pid}): {source}")]
    Signal {
        name: String,
        signal: String,
        pid: i32,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("still running after SIGKILL: {}", .0.join(", "))]
    StillRunning(Vec<String>),
    #[error("invalid lab options: {0}")]
    Options(String),
}

impl LabError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> LabError {
        LabError::Io {
            context: context.into(),
            source,
        }
    }
}
