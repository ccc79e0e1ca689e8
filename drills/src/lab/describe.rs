//! `DIR/lab.json` and `DIR/pids/<name>.pid`: what runs where, readable without a running lab.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::LabError;

pub const LAB_JSON: &str = "lab.json";
pub const PIDS_DIR: &str = "pids";
pub const LOGS_DIR: &str = "logs";
pub const TOPOLOGY_TOML: &str = "topology.toml";
/// Marks a directory as a lab directory, so that `lab up` may wipe it.
pub const MARKER: &str = ".gift-lab";

/// Which parts of the deployment a lab starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Components {
    /// The three invoker nodes only (fast; for control-plane tests).
    InvokersOnly,
    /// Invokers, one etcd per site, PostgreSQL primary (site a) and streaming replica (site b).
    Full,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessKind {
    Invoker,
    Etcd,
    Postgres,
    Wallet,
    GiftApi,
    Agent,
    /// The edge router (HTTP proxy in front of both sites' gift-api).
    Edge,
}

impl std::fmt::Display for ProcessKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProcessKind::Invoker => "invoker",
            ProcessKind::Etcd => "etcd",
            ProcessKind::Postgres => "postgres",
            ProcessKind::Wallet => "wallet",
            ProcessKind::GiftApi => "gift-api",
            ProcessKind::Agent => "agent",
            ProcessKind::Edge => "edge",
        })
    }
}

impl ProcessKind {
    /// The key in [`ProcessInfo::listen`] of the address clients use.
    pub fn main_addr_key(self) -> &'static str {
        match self {
            ProcessKind::Invoker | ProcessKind::Wallet => "grpc",
            ProcessKind::Etcd => "client",
            ProcessKind::Postgres => "sql",
            ProcessKind::GiftApi | ProcessKind::Edge => "http",
            // Agents listen on nothing.
            ProcessKind::Agent => "none",
        }
    }
}

/// One child process of the lab.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    /// `invoker-1`, `etcd-a`, `postgres-b`, ...
    pub name: String,
    pub kind: ProcessKind,
    /// `a`, `b` or `witness`.
    pub site: String,
    /// The raft node id (invokers only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<u64>,
    /// The pid of the latest incarnation (it may have exited since).
    pub pid: u32,
    /// Its process group (each child leads its own group).
    pub pgid: u32,
    /// Start time of `pid` in clock ticks after boot (field 22 of `/proc/<pid>/stat`); tells
    /// our process from an unrelated one that reused the pid.
    pub start_ticks: u64,
    /// Listening addresses by role: `grpc`, `metrics`, `client`, `peer`, `sql`.
    pub listen: BTreeMap<String, String>,
    pub log: PathBuf,
    pub data_dir: PathBuf,
    /// The config file, if the process has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<PathBuf>,
    /// Program and arguments.
    pub command: Vec<String>,
    /// Environment variables set on top of the lab's own environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The user the process runs as, when not the lab's own (PostgreSQL under root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// How many times the lab respawned it.
    #[serde(default)]
    pub restarts: u32,
}

impl ProcessInfo {
    /// The description of a process about to be spawned from `spec`: name, log, environment
    /// and command come from the spec; pid, group and start time are filled in at spawn.
    pub(crate) fn planned(
        spec: &super::proc::SpawnSpec,
        kind: ProcessKind,
        site: &str,
        listen: BTreeMap<String, String>,
        data_dir: PathBuf,
    ) -> ProcessInfo {
        ProcessInfo {
            name: spec.name.clone(),
            kind,
            site: site.to_string(),
            node_id: None,
            pid: 0,
            pgid: 0,
            start_ticks: 0,
            listen,
            log: spec.log.clone(),
            data_dir,
            config: None,
            command: spec.command_line(),
            env: spec.env.clone(),
            user: None,
            restarts: 0,
        }
    }

    /// The address clients use (`grpc` of an invoker, `client` of etcd, `sql` of postgres).
    pub fn main_addr(&self) -> Option<&str> {
        self.listen
            .get(self.kind.main_addr_key())
            .map(String::as_str)
    }

    /// What the recorded process is doing now.
    pub fn state(&self) -> super::ProcState {
        super::process_state(self.pid, self.start_ticks)
    }

    pub(crate) fn pid_record(&self) -> PidRecord {
        PidRecord {
            name: self.name.clone(),
            kind: self.kind,
            pid: self.pid,
            pgid: self.pgid,
            start_ticks: self.start_ticks,
        }
    }
}

/// Where clients reach the lab.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoints {
    /// Invoker gRPC endpoints, `host:port`, node 1 first.
    pub invokers: Vec<String>,
    /// PostgreSQL URL per site (`postgres://postgres@127.0.1.3:PORT/gift`).
    #[serde(default)]
    pub postgres: BTreeMap<String, String>,
    /// etcd client URL per site.
    #[serde(default)]
    pub etcd: BTreeMap<String, String>,
    /// Wallet gRPC address (`host:port`) per site.
    #[serde(default)]
    pub wallet: BTreeMap<String, String>,
    /// gift-api base URL (`http://host:port`) per site.
    #[serde(default)]
    pub gift_api: BTreeMap<String, String>,
    /// The edge router's proxy URL (`http://host:port`), in front of both sites' gift-api.
    #[serde(default)]
    pub edge: Option<String>,
    /// The edge router's admin URL (`/metrics`, `/readyz`, `/routing`).
    #[serde(default)]
    pub edge_admin: Option<String>,
}

/// The content of `DIR/lab.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabDescription {
    pub dir: PathBuf,
    pub components: Components,
    /// RFC 3339, UTC.
    pub started_at: String,
    pub started_at_unix_ms: u64,
    /// Time from the start of `Lab::start` until everything was healthy; `None` while starting.
    pub healthy_after_ms: Option<u64>,
    /// The topology applied (or to apply with `invokerctl apply`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<PathBuf>,
    pub processes: Vec<ProcessInfo>,
    pub endpoints: Endpoints,
    /// The on-call operator the invokers accept approvals from, and the file with their token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oncall: Option<Oncall>,
}

/// An operator configured on the lab's invokers (`invokerctl approve --operator NAME
/// --token-file FILE`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Oncall {
    pub operator: String,
    pub token_file: PathBuf,
}

impl LabDescription {
    pub(crate) fn new(dir: &Path, components: Components) -> LabDescription {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let ms = u64::try_from(now.as_millis()).unwrap_or(u64::MAX);
        LabDescription {
            dir: dir.to_path_buf(),
            components,
            started_at: rfc3339(now.as_secs()),
            started_at_unix_ms: ms,
            healthy_after_ms: None,
            topology: None,
            processes: Vec::new(),
            endpoints: Endpoints::default(),
            oncall: None,
        }
    }

    pub fn process(&self, name: &str) -> Option<&ProcessInfo> {
        self.processes.iter().find(|p| p.name == name)
    }

    pub(crate) fn process_mut(&mut self, name: &str) -> Option<&mut ProcessInfo> {
        self.processes.iter_mut().find(|p| p.name == name)
    }

    /// Inserts or replaces (by name).
    pub(crate) fn upsert(&mut self, info: ProcessInfo) {
        match self.process_mut(&info.name) {
            Some(slot) => *slot = info,
            None => self.processes.push(info),
        }
    }

    /// Reads `DIR/lab.json`.
    pub fn load(dir: &Path) -> Result<LabDescription, LabError> {
        let path = dir.join(LAB_JSON);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| LabError::io(format!("reading {}", path.display()), e))?;
        serde_json::from_str(&text).map_err(|source| LabError::Json { path, source })
    }

    /// Writes `DIR/lab.json` atomically (temporary file and rename).
    pub(crate) fn save(&self) -> Result<(), LabError> {
        let path = self.dir.join(LAB_JSON);
        let text = serde_json::to_string_pretty(self).map_err(|source| LabError::Json {
            path: path.clone(),
            source,
        })?;
        write_atomic(&path, &text)
    }
}

/// `DIR/pids/<name>.pid`: written as soon as a child is spawned, so that `lab down` works even
/// when the lab itself crashed before it could write `lab.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PidRecord {
    pub name: String,
    pub kind: ProcessKind,
    pub pid: u32,
    pub pgid: u32,
    pub start_ticks: u64,
}

impl PidRecord {
    pub(crate) fn path(dir: &Path, name: &str) -> PathBuf {
        dir.join(PIDS_DIR).join(format!("{name}.pid"))
    }

    pub(crate) fn save(&self, dir: &Path) -> Result<(), LabError> {
        let path = PidRecord::path(dir, &self.name);
        let text = serde_json::to_string(self).map_err(|source| LabError::Json {
            path: path.clone(),
            source,
        })?;
        write_atomic(&path, &text)
    }

    pub(crate) fn remove(dir: &Path, name: &str) {
        // Best effort: a missing file is what we want anyway.
        let _ = std::fs::remove_file(PidRecord::path(dir, name));
    }

    /// Every record of the lab in `dir`: the pid files, plus any process of `lab.json` that has
    /// no pid file (pid files win: they are written first).
    pub fn load_all(dir: &Path) -> Vec<PidRecord> {
        let mut by_name = BTreeMap::new();
        if let Ok(desc) = LabDescription::load(dir) {
            for p in &desc.processes {
                by_name.insert(p.name.clone(), p.pid_record());
            }
        }
        if let Ok(entries) = std::fs::read_dir(dir.join(PIDS_DIR)) {
            for entry in entries.flatten() {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "pid") {
                    if let Ok(text) = std::fs::read_to_string(&path) {
                        if let Ok(rec) = serde_json::from_str::<PidRecord>(&text) {
                            by_name.insert(rec.name.clone(), rec);
                        }
                    }
                }
            }
        }
        by_name.into_values().collect()
    }
}

pub(crate) fn write_atomic(path: &Path, text: &str) -> Result<(), LabError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, text)
        .map_err(|e| LabError::io(format!("writing {}", tmp.display()), e))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| LabError::io(format!("renaming {} into place", tmp.display()), e))
}

/// Formats seconds since the Unix epoch as RFC 3339 UTC (`2024-05-01T12:00:00Z`).
pub(crate) fn rfc3339(secs: u64) -> String {
    invoker_domain::format_utc_ms(i64::try_from(secs).unwrap_or(i64::MAX / 1000) * 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn description_round_trips_and_pid_files_win() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(PIDS_DIR)).unwrap();
        let mut desc = LabDescription::new(dir.path(), Components::Full);
        let info = ProcessInfo {
            name: "etcd-a".into(),
            kind: ProcessKind::Etcd,
            site: "a".into(),
            node_id: None,
            pid: 10,
            pgid: 10,
            start_ticks: 5,
            listen: BTreeMap::from([("client".into(), "127.0.1.2:1".into())]),
            log: dir.path().join("logs/etcd-a.log"),
            data_dir: dir.path().join("etcd-a"),
            config: None,
            command: vec!["/usr/bin/etcd".into()],
            env: BTreeMap::new(),
            user: None,
            restarts: 0,
        };
        desc.upsert(info.clone());
        desc.save().unwrap();
        assert_eq!(LabDescription::load(dir.path()).unwrap(), desc);
        assert_eq!(
            desc.process("etcd-a").unwrap().main_addr(),
            Some("127.0.1.2:1")
        );

        let mut newer = info.pid_record();
        newer.pid = 11;
        newer.save(dir.path()).unwrap();
        let all = PidRecord::load_all(dir.path());
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].pid, 11);
    }
}
