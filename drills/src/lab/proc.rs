//! Child processes: spawning into their own process group, finding a process tree in /proc,
//! signalling it, and waiting for it to be gone.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use super::describe::{PidRecord, ProcessKind};
use super::LabError;

/// Environment variable set on every child: the lab directory it belongs to.
pub const LAB_DIR_ENV: &str = "GIFT_LAB_DIR";

/// What `/proc/<pid>/stat` says about a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcStat {
    pub state: char,
    pub ppid: u32,
    pub pgrp: u32,
    pub start_ticks: u64,
}

impl ProcStat {
    /// Zombies (exited, not yet reaped) and dead entries count as gone.
    pub fn running(&self) -> bool {
        !matches!(self.state, 'Z' | 'X' | 'x')
    }
}

pub(crate) fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

fn parse_stat(text: &str) -> Option<ProcStat> {
    // "pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime
    // stime cutime cstime priority nice threads itrealvalue starttime ...": comm may hold
    // spaces and parentheses, so split after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(ProcStat {
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        pgrp: fields.get(2)?.parse().ok()?,
        start_ticks: fields.get(19)?.parse().ok()?,
    })
}

/// True if `pid` exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|s| s.running())
}

/// What a recorded process is doing now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcState {
    Running,
    /// Stopped by SIGSTOP (`Lab::pause`).
    Paused,
    /// Gone, a zombie, or the pid now belongs to another process.
    Exited,
}

impl std::fmt::Display for ProcState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProcState::Running => "running",
            ProcState::Paused => "paused",
            ProcState::Exited => "exited",
        })
    }
}

/// The state of the process a record (or `lab.json` entry) names.
pub fn process_state(pid: u32, start_ticks: u64) -> ProcState {
    match proc_stat(pid) {
        Some(s) if s.running() && s.start_ticks == start_ticks => {
            if matches!(s.state, 'T' | 't') {
                ProcState::Paused
            } else {
                ProcState::Running
            }
        }
        _ => ProcState::Exited,
    }
}

/// One process instance: a pid and its start time, so that a reused pid never matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub(crate) struct ProcId {
    pub pid: u32,
    pub start_ticks: u64,
}

impl ProcId {
    pub fn alive(&self) -> bool {
        proc_stat(self.pid).is_some_and(|s| s.running() && s.start_ticks == self.start_ticks)
    }
}

/// True if the process a record names is still the one we started, and running.
pub(crate) fn record_alive(rec: &PidRecord) -> bool {
    ProcId {
        pid: rec.pid,
        start_ticks: rec.start_ticks,
    }
    .alive()
}

/// The running processes of `leader`'s tree: its process group plus every descendant by parent
/// pid. PostgreSQL backends call setsid() and so leave the postmaster's group; they are found
/// as descendants. Empty if the leader is no longer the process we started.
pub(crate) fn tree(leader: ProcId, pgid: u32) -> Vec<ProcId> {
    if !leader.alive() {
        return Vec::new();
    }
    let me = std::process::id();
    let mut all = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(stat) = proc_stat(pid) {
                if stat.running() && pid != me {
                    all.push((pid, stat));
                }
            }
        }
    }
    let mut members: BTreeSet<u32> = BTreeSet::from([leader.pid]);
    for (pid, stat) in &all {
        if stat.pgrp == pgid && pgid != 0 {
            members.insert(*pid);
        }
    }
    // Descendants: repeat until no new member appears (trees are shallow).
    loop {
        let before = members.len();
        for (pid, stat) in &all {
            if members.contains(&stat.ppid) {
                members.insert(*pid);
            }
        }
        if members.len() == before {
            break;
        }
    }
    all.iter()
        .filter(|(pid, _)| members.contains(pid))
        .map(|(pid, stat)| ProcId {
            pid: *pid,
            start_ticks: stat.start_ticks,
        })
        .collect()
}

/// Sends `signal` to each process; one that is already gone is not an error.
pub(crate) fn signal_all(procs: &[ProcId], signal: Signal) {
    for p in procs {
        if p.alive() {
            // Best effort: the process may exit between the check and the signal.
            let _ = kill(pid_of(p.pid), signal);
        }
    }
}

pub(crate) fn pid_of(pid: u32) -> Pid {
    Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX))
}

/// The signal that asks a process of this kind to shut down cleanly, sent to its leader only.
/// PostgreSQL: SIGINT is "fast shutdown" (SIGTERM would be "smart", waiting for clients).
pub(crate) fn graceful_signal(kind: ProcessKind) -> Signal {
    match kind {
        ProcessKind::Postgres => Signal::SIGINT,
        ProcessKind::Invoker
        | ProcessKind::Etcd
        | ProcessKind::Wallet
        | ProcessKind::GiftApi
        | ProcessKind::Agent
        | ProcessKind::Edge => Signal::SIGTERM,
    }
}

/// A process to shut down: its leader, group and kind.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub name: String,
    pub kind: ProcessKind,
    pub leader: ProcId,
    pub pgid: u32,
}

impl From<&PidRecord> for Target {
    fn from(rec: &PidRecord) -> Target {
        Target {
            name: rec.name.clone(),
            kind: rec.kind,
            leader: ProcId {
                pid: rec.pid,
                start_ticks: rec.start_ticks,
            },
            pgid: rec.pgid,
        }
    }
}

/// Result of [`terminate`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Terminated {
    /// Exited after the graceful signal.
    pub graceful: Vec<String>,
    /// Needed SIGKILL.
    pub killed: Vec<String>,
    /// Were not running (or the pid now belongs to another process).
    pub not_running: Vec<String>,
    /// Still running after SIGKILL.
    pub remaining: Vec<String>,
}

/// Shuts targets down: the graceful signal (to the leader for postgres, to the whole tree
/// otherwise), up to `grace` for everything to exit, then SIGKILL to whatever is left of each
/// tree. Blocking (polls every 20 ms); zombies count as gone.
pub(crate) fn terminate(targets: &[Target], grace: Duration) -> Terminated {
    let mut out = Terminated::default();
    let mut trees: BTreeMap<String, Vec<ProcId>> = BTreeMap::new();
    for t in targets {
        let procs = tree(t.leader, t.pgid);
        if procs.is_empty() {
            out.not_running.push(t.name.clone());
            continue;
        }
        let signal = graceful_signal(t.kind);
        if t.kind == ProcessKind::Postgres {
            signal_all(&[t.leader], signal);
        } else {
            signal_all(&procs, signal);
        }
        // A paused (SIGSTOPped) process acts on the signal only once it runs again.
        signal_all(&procs, Signal::SIGCONT);
        trees.insert(t.name.clone(), procs);
    }
    wait_trees_gone(&trees, grace);
    let mut hard = BTreeMap::new();
    for (name, procs) in trees {
        // Pick up children spawned since (a postgres checkpointer during shutdown, say).
        let mut procs: BTreeSet<ProcId> = procs.into_iter().filter(ProcId::alive).collect();
        if let Some(t) = targets.iter().find(|t| t.name == name) {
            procs.extend(tree(t.leader, t.pgid));
        }
        if procs.is_empty() {
            out.graceful.push(name);
        } else {
            let procs: Vec<ProcId> = procs.into_iter().collect();
            signal_all(&procs, Signal::SIGKILL);
            hard.insert(name, procs);
        }
    }
    wait_trees_gone(&hard, Duration::from_secs(5));
    for (name, procs) in hard {
        if procs.iter().any(ProcId::alive) {
            out.remaining.push(name);
        } else {
            out.killed.push(name);
        }
    }
    out
}

/// SIGKILL to a whole tree, then wait (up to 5 s) until it is gone. Returns false if some
/// process survived.
pub(crate) fn kill_tree(leader: ProcId, pgid: u32) -> bool {
    let procs = tree(leader, pgid);
    signal_all(&procs, Signal::SIGKILL);
    let trees = BTreeMap::from([(String::new(), procs)]);
    wait_trees_gone(&trees, Duration::from_secs(5))
}

/// Waits until no process of any tree runs; returns true if that happened within `timeout`.
pub(crate) fn wait_trees_gone(trees: &BTreeMap<String, Vec<ProcId>>, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !trees.values().flatten().any(ProcId::alive) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Signals a whole tree (pause / resume). For SIGSTOP and SIGCONT, also waits (up to 2 s)
/// until every process of the tree shows the new state, since delivery is asynchronous.
pub(crate) fn signal_tree(
    name: &str,
    leader: ProcId,
    pgid: u32,
    signal: Signal,
) -> Result<(), LabError> {
    let procs = tree(leader, pgid);
    if procs.is_empty() {
        return Err(LabError::NotRunning(name.to_string()));
    }
    for p in &procs {
        match kill(pid_of(p.pid), signal) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(source) => {
                return Err(LabError::Signal {
                    name: name.to_string(),
                    signal: signal.to_string(),
                    pid: i32::try_from(p.pid).unwrap_or(i32::MAX),
                    source,
                })
            }
        }
    }
    let want_stopped = match signal {
        Signal::SIGSTOP => true,
        Signal::SIGCONT => false,
        _ => return Ok(()),
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        let settled = procs.iter().all(|p| match proc_stat(p.pid) {
            Some(s) if s.running() && s.start_ticks == p.start_ticks => {
                matches!(s.state, 'T' | 't') == want_stopped
            }
            _ => true,
        });
        if settled {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// How to start one child.
#[derive(Debug, Clone)]
pub(crate) struct SpawnSpec {
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// (uid, gid) to run as, if not the lab's own user.
    pub run_as: Option<(u32, u32)>,
    pub cwd: PathBuf,
    pub log: PathBuf,
    pub lab_dir: PathBuf,
}

impl SpawnSpec {
    pub fn command_line(&self) -> Vec<String> {
        std::iter::once(self.program.display().to_string())
            .chain(self.args.iter().cloned())
            .collect()
    }

    fn command(&self) -> Result<tokio::process::Command, LabError> {
        let log = open_log(&self.log)?;
        let log_err = log
            .try_clone()
            .map_err(|e| LabError::io(format!("duplicating {}", self.log.display()), e))?;
        let mut cmd = tokio::process::Command::new(&self.program);
        cmd.args(&self.args)
            .current_dir(&self.cwd)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // Own process group: Ctrl-C in the lab's terminal does not reach the child, and the
            // whole group can be signalled.
            .process_group(0)
            .env(LAB_DIR_ENV, &self.lab_dir);
        // A service's variable in the caller's environment would silently override the config
        // file the lab wrote.
        for (key, _) in std::env::vars_os() {
            let key_text = key.to_string_lossy();
            if ["INVOKER_", "WALLET_", "GIFT_API_"]
                .iter()
                .any(|prefix| key_text.starts_with(prefix))
            {
                cmd.env_remove(key);
            }
        }
        cmd.envs(&self.env);
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        Ok(cmd)
    }

    /// Starts a long-running child. Returns it with its identity.
    pub fn spawn(&self) -> Result<(tokio::process::Child, ProcId), LabError> {
        log_line(
            &self.log,
            &format!("starting: {}", self.command_line().join(" ")),
        );
        let child = self.command()?.spawn().map_err(|source| LabError::Spawn {
            name: self.name.clone(),
            program: self.program.clone(),
            source,
        })?;
        // A freshly spawned child that has not been waited for always has an id.
        let pid = child.id().unwrap_or(0);
        let start_ticks = proc_stat(pid).map(|s| s.start_ticks).unwrap_or(0);
        Ok((child, ProcId { pid, start_ticks }))
    }

    /// Runs a command to completion (initdb, pg_basebackup) with its output in the log.
    pub async fn run(&self, timeout: Duration) -> Result<(), LabError> {
        let line = self.command_line().join(" ");
        log_line(&self.log, &format!("running: {line}"));
        let mut cmd = self.command()?;
        cmd.kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|source| LabError::Spawn {
            name: self.name.clone(),
            program: self.program.clone(),
            source,
        })?;
        // If this future is dropped (Ctrl-C while the lab starts), the tool's own children
        // (initdb's single-user postgres) must die with it: kill the whole group.
        let mut group = GroupGuard(child.id());
        let status = match tokio::time::timeout(timeout, child.wait()).await {
            Ok(status) => {
                // Reaped: its pid (the group id) may be reused from now on.
                group.0 = None;
                status
                    .map_err(|e| LabError::io(format!("waiting for `{line}`"), e))?
                    .to_string()
            }
            Err(_) => format!("timed out after {timeout:?}"),
        };
        drop(group);
        if status == "exit status: 0" {
            return Ok(());
        }
        Err(LabError::CommandFailed {
            command: line,
            status,
            log: self.log.clone(),
            tail: tail(&self.log, 20),
        })
    }
}

/// Sends SIGKILL to a process group when dropped (a no-op once the group is gone).
struct GroupGuard(Option<u32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            // ESRCH (the group already exited) is the normal case.
            let _ = nix::sys::signal::killpg(pid_of(pgid), Signal::SIGKILL);
        }
    }
}

fn open_log(path: &Path) -> Result<std::fs::File, LabError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| LabError::io(format!("opening log {}", path.display()), e))
}

/// Appends a marker line to a child's log (best effort).
pub(crate) fn log_line(path: &Path, text: &str) {
    if let Ok(mut f) = open_log(path) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let _ = writeln!(
            f,
            "=== lab {}: {text}",
            super::describe::rfc3339(now.as_secs())
        );
    }
}

/// The last `lines` lines of a file (for error messages).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_command_names() {
        let line = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        let stat = parse_stat(line).unwrap();
        assert_eq!(
            stat,
            ProcStat {
                state: 'S',
                ppid: 1,
                pgrp: 4242,
                start_ticks: 987_654
            }
        );
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn own_process_is_alive_and_a_reused_pid_is_not() {
        let me = std::process::id();
        let stat = proc_stat(me).unwrap();
        assert!(pid_alive(me));
        let real = ProcId {
            pid: me,
            start_ticks: stat.start_ticks,
        };
        assert!(real.alive());
        let reused = ProcId {
            pid: me,
            start_ticks: stat.start_ticks + 1,
        };
        assert!(!reused.alive());
    }
}
