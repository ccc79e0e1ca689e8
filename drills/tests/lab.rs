//! End-to-end tests of the lab itself: they start real processes (invoker, etcd, PostgreSQL),
//! so they are named `e2e_*` and run one at a time (nextest group `lab`, .config/nextest.toml).
//! They need the workspace binaries: `cargo build --workspace --bins` first.

use std::collections::BTreeSet;
use std::time::Duration;

use drills::lab::{self, pid_alive, ProcState};
use drills::{down_dir, Components, Lab, LabDescription, LabError, LabOptions, ProcessKind};

/// Every pid of the lab, postgres backends included (children of each postmaster).
fn all_pids(desc: &LabDescription) -> BTreeSet<u32> {
    let mut pids: BTreeSet<u32> = desc.processes.iter().map(|p| p.pid).collect();
    let postmasters: Vec<u32> = desc
        .processes
        .iter()
        .filter(|p| p.kind == ProcessKind::Postgres)
        .map(|p| p.pid)
        .collect();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces, so split after the last ')'.
        let ppid = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid.is_some_and(|p| postmasters.contains(&p)) {
            pids.insert(pid);
        }
    }
    pids
}

fn assert_none_alive(pids: &BTreeSet<u32>) {
    let alive: Vec<u32> = pids.iter().copied().filter(|p| pid_alive(*p)).collect();
    assert!(alive.is_empty(), "still alive: {alive:?}");
}

async fn wait_streaming(lab: &Lab) {
    let sql = "select count(*) from pg_stat_replication where state = 'streaming'";
    let mut last = String::new();
    // The replica's walreceiver retries every 5 s (wal_retrieve_retry_interval).
    for _ in 0..300 {
        match lab.psql("postgres-a", "postgres", sql).await {
            Ok(n) if n == "1" => return,
            Ok(n) => last = n,
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the replica does not stream again: {last}");
}

#[tokio::test]
async fn e2e_full_lab_up_is_described_streams_and_down_stops_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let mut lab = Lab::start(LabOptions::new(tmp.path())).await.unwrap();
    let desc = lab.describe().clone();
    eprintln!("healthy after {:?} ms", desc.healthy_after_ms);

    // lab.json on disk says what describe() says, and lists every process, alive.
    let on_disk = LabDescription::load(tmp.path()).unwrap();
    assert_eq!(on_disk, desc);
    let names: BTreeSet<&str> = desc.processes.iter().map(|p| p.name.as_str()).collect();
    let expected = [
        "invoker-1",
        "invoker-2",
        "invoker-3",
        "etcd-a",
        "etcd-b",
        "postgres-a",
        "postgres-b",
        "wallet-a",
        "wallet-b",
        "gift-api-a",
        "gift-api-b",
        "edge-router",
    ];
    assert_eq!(names, expected.into_iter().collect());
    for p in &desc.processes {
        assert!(pid_alive(p.pid), "{} (pid {}) is not alive", p.name, p.pid);
        assert_eq!(p.state(), ProcState::Running, "{}", p.name);
        assert_eq!(p.pgid, p.pid, "{} leads its own process group", p.name);
        assert!(p.log.is_file(), "{} has a log", p.name);
        assert!(p.main_addr().is_some(), "{} has an address", p.name);
        assert!(tmp
            .path()
            .join("pids")
            .join(format!("{}.pid", p.name))
            .is_file());
    }
    let site_prefix = |site: &str| match site {
        "a" => "127.0.1.",
        "b" => "127.0.2.",
        _ => "127.0.3.",
    };
    for p in &desc.processes {
        assert!(
            p.main_addr().unwrap().starts_with(site_prefix(&p.site)),
            "{} listens in its site's range",
            p.name
        );
    }
    assert_eq!(desc.endpoints.invokers, lab.invoker_endpoints());
    assert_eq!(desc.endpoints.invokers.len(), 3);
    assert!(desc.endpoints.postgres["a"].starts_with("postgres://postgres@127.0.1.3:"));
    assert!(desc.endpoints.postgres["a"].ends_with("/gift"));
    assert!(desc.endpoints.etcd["b"].starts_with("http://127.0.2.2:"));
    assert!(desc.endpoints.wallet["a"].starts_with("127.0.1.4:"));
    assert!(desc.endpoints.wallet["b"].starts_with("127.0.2.4:"));
    assert!(desc.endpoints.gift_api["a"].starts_with("http://127.0.1.5:"));
    assert!(desc.endpoints.gift_api["b"].starts_with("http://127.0.2.5:"));
    let edge = desc.endpoints.edge.as_deref().unwrap();
    assert!(edge.starts_with("http://127.0.3.10:"), "{edge}");
    assert!(desc
        .endpoints
        .edge_admin
        .as_deref()
        .unwrap()
        .starts_with("http://127.0.3.10:"));
    assert_eq!(
        lab.process("edge-router").map(|p| p.kind),
        Some(ProcessKind::Edge)
    );
    assert_eq!(
        lab.process("wallet-b").map(|p| p.kind),
        Some(ProcessKind::Wallet)
    );
    assert!(desc.healthy_after_ms.is_some());
    assert!(tmp.path().join("topology.toml").is_file());
    assert_eq!(
        lab.process("postgres-b").map(|p| p.kind),
        Some(ProcessKind::Postgres)
    );

    // The replica streams, and a write on the primary reaches it.
    let streaming = lab
        .psql(
            "postgres-a",
            "postgres",
            "select count(*) from pg_stat_replication where state = 'streaming'",
        )
        .await
        .unwrap();
    assert_eq!(streaming, "1");
    lab.psql(
        "postgres-a",
        "gift",
        "create table t (x int); insert into t values (42)",
    )
    .await
    .unwrap();
    let mut seen = String::new();
    for _ in 0..100 {
        if let Ok(out) = lab.psql("postgres-b", "gift", "select x from t").await {
            seen = out;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seen, "42");

    let (id, name) = lab.invoker_leader(Duration::from_secs(10)).await.unwrap();
    assert_eq!(name, format!("invoker-{id}"));

    // A second lab in the same directory is refused while this one runs.
    match Lab::start(LabOptions::new(tmp.path())).await {
        Err(LabError::AlreadyRunning { names, .. }) => {
            assert_eq!(names.len(), desc.processes.len())
        }
        Err(other) => panic!("expected AlreadyRunning, got {other}"),
        Ok(_) => panic!("a second lab started in the same directory"),
    }

    // PostgreSQL survives the lab's faults: the replica stopped and restarted, the primary
    // SIGKILLed (backends included) and restarted; the replica streams again each time.
    let old_pids = all_pids(&desc);
    lab.stop("postgres-b").await.unwrap();
    lab.restart("postgres-b").await.unwrap();
    wait_streaming(&lab).await;
    let primary_pid = lab.process("postgres-a").unwrap().pid;
    lab.kill("postgres-a").unwrap();
    assert!(!pid_alive(primary_pid));
    lab.restart("postgres-a").await.unwrap();
    wait_streaming(&lab).await;
    assert_eq!(lab.process("postgres-a").unwrap().restarts, 1);

    let mut pids = all_pids(lab.describe());
    pids.extend(old_pids);
    assert!(
        pids.len() > 7,
        "postgres backends are counted too: {pids:?}"
    );
    lab.down().await.unwrap();
    assert_none_alive(&pids);
    assert!(lab::running_processes(tmp.path()).is_empty());
}

#[tokio::test]
async fn e2e_down_dir_stops_a_leaked_lab() {
    let tmp = tempfile::tempdir().unwrap();
    let lab = Lab::start(LabOptions::new(tmp.path())).await.unwrap();
    let desc = lab.describe().clone();
    // Three invokers, two etcd, two PostgreSQL, two wallets, two gift-apis, the edge router.
    assert_eq!(desc.processes.len(), 12, "{:?}", desc.processes);
    let pids = all_pids(&desc);
    // Simulates a crash of the process that ran the lab: no Drop, no down.
    std::mem::forget(lab);
    for p in &desc.processes {
        assert!(pid_alive(p.pid), "{} should still run", p.name);
    }

    let report = down_dir(tmp.path()).unwrap();
    assert_eq!(
        report.stopped.len() + report.killed.len(),
        desc.processes.len(),
        "{report:?}"
    );
    assert_none_alive(&pids);
    assert!(lab::running_processes(tmp.path()).is_empty());

    // Nothing left to do the second time.
    let again = down_dir(tmp.path()).unwrap();
    assert!(
        again.stopped.is_empty() && again.killed.is_empty(),
        "{again:?}"
    );
    assert_eq!(again.not_running.len(), desc.processes.len());
}

#[tokio::test]
async fn e2e_invokers_only_kill_pause_restart_and_drop() {
    let tmp = tempfile::tempdir().unwrap();
    let mut opts = LabOptions::invokers_only(tmp.path());
    opts.raft.snapshot_logs_since_last = Some(50);
    opts.invoker_env = vec![("RUST_LOG".into(), "info".into())];
    let mut lab = Lab::start(opts).await.unwrap();
    let desc = lab.describe().clone();
    assert_eq!(desc.components, Components::InvokersOnly);
    assert_eq!(desc.processes.len(), 3);
    assert!(desc.endpoints.postgres.is_empty());

    // The overrides reach the config file and the environment.
    let node1 = lab.process("invoker-1").unwrap().clone();
    let config = std::fs::read_to_string(node1.config.as_ref().unwrap()).unwrap();
    assert!(config.contains("snapshot_logs_since_last = 50"), "{config}");
    let environ = std::fs::read(format!("/proc/{}/environ", node1.pid)).unwrap();
    assert!(String::from_utf8_lossy(&environ).contains("RUST_LOG=info"));
    assert!(String::from_utf8_lossy(&environ).contains(lab::LAB_DIR_ENV));

    // Kill the leader: the two others elect a new one; restart brings it back.
    let (old_id, old_name) = lab.invoker_leader(Duration::from_secs(10)).await.unwrap();
    let old_pid = lab.process(&old_name).unwrap().pid;
    lab.kill(&old_name).unwrap();
    assert!(!pid_alive(old_pid));
    assert!(!lab.is_running(&old_name));
    assert!(matches!(lab.kill(&old_name), Err(LabError::NotRunning(_))));
    let (new_id, _) = lab.invoker_leader(Duration::from_secs(20)).await.unwrap();
    assert_ne!(new_id, old_id);
    lab.restart(&old_name).await.unwrap();
    let restarted = lab.process(&old_name).unwrap().clone();
    assert_ne!(restarted.pid, old_pid);
    assert_eq!(restarted.restarts, 1);
    assert_eq!(
        LabDescription::load(tmp.path())
            .unwrap()
            .process(&old_name)
            .unwrap()
            .pid,
        restarted.pid,
        "lab.json follows the restart"
    );

    // Pause / resume a follower.
    let follower = ["invoker-1", "invoker-2", "invoker-3"]
        .into_iter()
        .find(|n| *n != format!("invoker-{new_id}"))
        .unwrap();
    lab.pause(follower).unwrap();
    assert_eq!(lab.process(follower).unwrap().state(), ProcState::Paused);
    lab.resume(follower).unwrap();
    assert_eq!(lab.process(follower).unwrap().state(), ProcState::Running);

    // Graceful stop of one node.
    let stopped_pid = lab.process(follower).unwrap().pid;
    lab.stop(follower).await.unwrap();
    assert!(!pid_alive(stopped_pid));

    // Dropping the lab kills the rest.
    let pids: Vec<u32> = lab.describe().processes.iter().map(|p| p.pid).collect();
    drop(lab);
    for pid in pids {
        assert!(!pid_alive(pid), "pid {pid} survived the drop");
    }
}
