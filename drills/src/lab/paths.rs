//! Finding binaries, preparing the lab directory, and picking free ports.

use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::describe::{PidRecord, LOGS_DIR, MARKER, PIDS_DIR};
use super::proc::record_alive;
use super::LabError;

const BUILD_HINT: &str = "run `cargo build --workspace --bins` first (or set LAB_BIN_DIR)";

/// Where the workspace's binaries are: `LAB_BIN_DIR`, else the directory of the current
/// executable (its parent if that is cargo's `deps` directory, as for a test binary).
pub fn bin_dir() -> Result<PathBuf, LabError> {
    if let Some(dir) = std::env::var_os("LAB_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe =
        std::env::current_exe().map_err(|e| LabError::io("finding the current executable", e))?;
    let mut dir = exe
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    if dir.file_name().is_some_and(|n| n == "deps") {
        if let Some(parent) = dir.parent() {
            dir = parent.to_path_buf();
        }
    }
    Ok(dir)
}

/// A workspace binary (`invoker`, ...), or a clear error naming where it was looked for.
pub fn find_bin(name: &str) -> Result<PathBuf, LabError> {
    let path = bin_dir()?.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(LabError::MissingBinary {
            name: format!("binary `{name}`"),
            path,
            hint: BUILD_HINT.to_string(),
        })
    }
}

/// `LAB_ETCD_BIN`, else `/usr/bin/etcd`.
pub fn etcd_bin() -> Result<PathBuf, LabError> {
    let path = std::env::var_os("LAB_ETCD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/etcd"));
    if path.is_file() {
        Ok(path)
    } else {
        Err(LabError::MissingBinary {
            name: "etcd".into(),
            path,
            hint: "install etcd-server (scripts/setup.sh) or set LAB_ETCD_BIN".into(),
        })
    }
}

/// `LAB_PG_BIN_DIR`, else the newest `/usr/lib/postgresql/<version>/bin` holding `initdb`.
pub fn pg_bin_dir() -> Result<PathBuf, LabError> {
    let hint = "install postgresql (scripts/setup.sh) or set LAB_PG_BIN_DIR".to_string();
    if let Some(dir) = std::env::var_os("LAB_PG_BIN_DIR") {
        let dir = PathBuf::from(dir);
        let initdb = dir.join("initdb");
        return if initdb.is_file() {
            Ok(dir)
        } else {
            Err(LabError::MissingBinary {
                name: "PostgreSQL's initdb".into(),
                path: initdb,
                hint,
            })
        };
    }
    let root = Path::new("/usr/lib/postgresql");
    let mut best: Option<(Vec<u64>, PathBuf)> = None;
    if let Ok(entries) = std::fs::read_dir(root) {
        for entry in entries.flatten() {
            let bin = entry.path().join("bin");
            if !bin.join("initdb").is_file() {
                continue;
            }
            let version: Vec<u64> = entry
                .file_name()
                .to_string_lossy()
                .split('.')
                .map(|p| p.parse().unwrap_or(0))
                .collect();
            if best.as_ref().is_none_or(|(v, _)| version > *v) {
                best = Some((version, bin));
            }
        }
    }
    best.map(|(_, bin)| bin).ok_or(LabError::MissingBinary {
        name: "PostgreSQL's initdb".into(),
        path: root.join("*/bin/initdb"),
        hint,
    })
}

/// The user PostgreSQL must run as: `postgres` when we are root (PostgreSQL refuses to run as
/// root), else ourselves (`None`).
pub(crate) fn pg_run_as() -> Result<Option<(u32, u32)>, LabError> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    match nix::unistd::User::from_name("postgres") {
        Ok(Some(user)) => Ok(Some((user.uid.as_raw(), user.gid.as_raw()))),
        _ => Err(LabError::NoPostgresUser),
    }
}

/// Checks that `uid`/`gid` can traverse every directory down to and including `dir`.
pub(crate) fn check_traversable(dir: &Path, uid: u32, gid: u32) -> Result<(), LabError> {
    for ancestor in dir.ancestors() {
        let meta = std::fs::metadata(ancestor)
            .map_err(|e| LabError::io(format!("inspecting {}", ancestor.display()), e))?;
        let mode = meta.mode();
        let ok = if meta.uid() == uid {
            mode & 0o100 != 0
        } else if meta.gid() == gid {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if !ok {
            return Err(LabError::PostgresCannotReach {
                dir: dir.to_path_buf(),
                blocker: ancestor.to_path_buf(),
            });
        }
    }
    Ok(())
}

/// Names of the lab's processes in `dir` that are still running.
pub fn running_processes(dir: &Path) -> Vec<String> {
    PidRecord::load_all(dir)
        .into_iter()
        .filter(record_alive)
        .map(|r| r.name)
        .collect()
}

/// Creates (or recycles) the lab directory and returns its canonical path. Refuses a
/// directory where a lab still runs, or a non-empty directory that is not a lab's.
pub(crate) fn prepare_dir(dir: &Path) -> Result<PathBuf, LabError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| LabError::io(format!("creating {}", dir.display()), e))?;
    let dir = dir
        .canonicalize()
        .map_err(|e| LabError::io(format!("resolving {}", dir.display()), e))?;
    let entries: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| LabError::io(format!("listing {}", dir.display()), e))?
        .flatten()
        .map(|e| e.path())
        .collect();
    if dir.join(MARKER).exists() {
        let running = running_processes(&dir);
        if !running.is_empty() {
            return Err(LabError::AlreadyRunning {
                dir: dir.clone(),
                names: running,
            });
        }
        // A previous lab's leftovers: ours to wipe, so that every lab starts from scratch.
        for entry in entries {
            let result = if entry.is_dir() && !entry.is_symlink() {
                std::fs::remove_dir_all(&entry)
            } else {
                std::fs::remove_file(&entry)
            };
            result.map_err(|e| LabError::io(format!("removing {}", entry.display()), e))?;
        }
    } else if !entries.is_empty() {
        return Err(LabError::NotALabDir(dir));
    }
    std::fs::write(
        dir.join(MARKER),
        "a gift lab directory: `lab up` may wipe it\n",
    )
    .map_err(|e| LabError::io(format!("writing the marker in {}", dir.display()), e))?;
    for sub in [LOGS_DIR, PIDS_DIR] {
        let path = dir.join(sub);
        std::fs::create_dir_all(&path)
            .map_err(|e| LabError::io(format!("creating {}", path.display()), e))?;
    }
    // Other users (postgres, when we are root) must be able to traverse it.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| LabError::io(format!("chmod 0755 {}", dir.display()), e))?;
    Ok(dir)
}

/// Picks free TCP ports: binds `ip:0` for each request while holding the earlier listeners,
/// so that one call never returns the same address twice.
pub(crate) fn free_ports(ips: &[Ipv4Addr]) -> Result<Vec<u16>, LabError> {
    let mut listeners = Vec::with_capacity(ips.len());
    for ip in ips {
        let listener = TcpListener::bind((*ip, 0))
            .map_err(|e| LabError::io(format!("binding {ip}:0 to pick a free port"), e))?;
        listeners.push(listener);
    }
    listeners
        .iter()
        .map(|l| {
            l.local_addr()
                .map(|a| a.port())
                .map_err(|e| LabError::io("reading a picked port", e))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepare_dir_recycles_a_lab_dir_but_refuses_a_foreign_one() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = prepare_dir(tmp.path()).unwrap();
        std::fs::write(dir.join("lab.json"), "{}").unwrap();
        std::fs::create_dir_all(dir.join("etcd-a/member")).unwrap();
        let again = prepare_dir(&dir).unwrap();
        assert!(!again.join("lab.json").exists());
        assert!(!again.join("etcd-a").exists());
        assert!(again.join(LOGS_DIR).is_dir());

        let foreign = tempfile::tempdir().unwrap();
        std::fs::write(foreign.path().join("notes.txt"), "mine").unwrap();
        assert!(matches!(
            prepare_dir(foreign.path()),
            Err(LabError::NotALabDir(_))
        ));
    }

    #[test]
    fn traversal_check_names_the_blocking_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let closed = tmp.path().join("closed");
        let inner = closed.join("inner");
        std::fs::create_dir_all(&inner).unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
        // A uid/gid that owns nothing here.
        let err = check_traversable(&inner, 54_321, 54_321).unwrap_err();
        match err {
            LabError::PostgresCannotReach { blocker, .. } => assert_eq!(blocker, closed),
            other => panic!("unexpected {other}"),
        }
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o711)).unwrap();
        check_traversable(&inner, 54_321, 54_321).unwrap();
    }

    #[test]
    fn free_ports_are_distinct_per_address() {
        let ip = Ipv4Addr::new(127, 0, 1, 1);
        let ports = free_ports(&[ip, ip, ip]).unwrap();
        assert_eq!(ports.len(), 3);
        assert!(ports[0] != ports[1] && ports[1] != ports[2] && ports[0] != ports[2]);
    }
}
