//! The routing table in use: validated, expanded to one site per bucket for the request
//! path, swapped atomically, and persisted so that a restarted edge can serve without the
//! control plane.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use invoker_domain::{runs_len, RoutingTable, BUCKETS};
use serde::{Deserialize, Serialize};

use crate::EdgeError;

/// Where the table in use came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The invoker's routing watch.
    Watch,
    /// The state file, at start (the watch has not confirmed it yet).
    Disk,
}

impl Source {
    pub fn label(self) -> &'static str {
        match self {
            Source::Watch => "watch",
            Source::Disk => "disk",
        }
    }
}

/// A usable table: every bucket has a site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub service: String,
    pub table: RoutingTable,
    pub source: Source,
    /// Sites holding at least one bucket, in bucket order.
    sites: Vec<String>,
    /// Index into `sites` per bucket: the request path looks a bucket up without walking runs.
    by_bucket: Vec<u8>,
}

impl Table {
    /// Checks and expands a table; refuses one that leaves a bucket without a site.
    pub fn new(service: &str, table: RoutingTable, source: Source) -> Result<Table, EdgeError> {
        let covered = runs_len(&table.runs);
        if covered != BUCKETS as u64 {
            return Err(EdgeError::InvalidTable(format!(
                "{service} version {}: runs cover {covered} buckets, not {BUCKETS}",
                table.version
            )));
        }
        let mut sites: Vec<String> = Vec::new();
        let mut by_bucket = Vec::with_capacity(BUCKETS);
        for run in &table.runs {
            if run.site.is_empty() {
                return Err(EdgeError::InvalidTable(format!(
                    "{service} version {}: a run has no site",
                    table.version
                )));
            }
            let index = match sites.iter().position(|s| *s == run.site) {
                Some(i) => i,
                None => {
                    sites.push(run.site.clone());
                    sites.len() - 1
                }
            };
            let index = u8::try_from(index).map_err(|_| {
                EdgeError::InvalidTable(format!(
                    "{service} version {}: more than 255 sites",
                    table.version
                ))
            })?;
            by_bucket.extend(std::iter::repeat_n(index, run.count as usize));
        }
        Ok(Table {
            service: service.to_string(),
            table,
            source,
            sites,
            by_bucket,
        })
    }

    pub fn version(&self) -> u64 {
        self.table.version
    }

    /// The site serving `bucket` (taken modulo [`BUCKETS`]).
    pub fn site_for_bucket(&self, bucket: usize) -> &str {
        let index = self.by_bucket[bucket % BUCKETS];
        &self.sites[usize::from(index)]
    }

    /// Sites holding at least one bucket.
    pub fn sites(&self) -> &[String] {
        &self.sites
    }

    /// Same routing and throttles (whatever the source).
    pub fn same_content(&self, other: &Table) -> bool {
        self.table == other.table && self.service == other.service
    }
}

/// What [`Routing::apply`] did with a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// It is the table in use now.
    Installed,
    /// The same table as the one in use, now confirmed by the watch.
    Confirmed,
    /// Nothing to do: the same table from the same source.
    Unchanged,
    /// Older than the table in use (a lagging node): ignored.
    Stale { current: u64 },
}

/// The table in use. Readers clone the `Arc`, so a request keeps the table it started with
/// while a new one is swapped in.
#[derive(Debug, Default)]
pub struct Routing {
    current: RwLock<Option<Arc<Table>>>,
}

impl Routing {
    pub fn current(&self) -> Option<Arc<Table>> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Installs `table` unless it is older than the one in use: versions only grow, so going
    /// back would undo a shift (a node that lags behind the leader still serves the watch).
    pub fn apply(&self, table: Table) -> Applied {
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        let outcome = match current.as_deref() {
            None => Applied::Installed,
            Some(cur) if table.version() > cur.version() => Applied::Installed,
            Some(cur) if table.version() < cur.version() => {
                return Applied::Stale {
                    current: cur.version(),
                }
            }
            Some(cur) if cur.same_content(&table) => {
                if cur.source == table.source || table.source == Source::Disk {
                    return Applied::Unchanged;
                }
                Applied::Confirmed
            }
            // Same version, other content: only a rebuilt control plane does that; the
            // control plane is the authority.
            Some(_) => Applied::Installed,
        };
        *current = Some(Arc::new(table));
        outcome
    }
}

/// The state file's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StateFile {
    service: String,
    table: RoutingTable,
    saved_at_ms: u64,
}

/// Writes the table to `path` atomically (temporary file, fsync, rename): a crash leaves the
/// old file or the new one, never half of one.
pub fn save(path: &Path, table: &Table) -> Result<(), EdgeError> {
    let fail = |message: String| EdgeError::StateFile {
        path: path.to_path_buf(),
        message,
    };
    let content = StateFile {
        service: table.service.clone(),
        table: table.table.clone(),
        saved_at_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0),
    };
    let text = serde_json::to_vec_pretty(&content).map_err(|e| fail(e.to_string()))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let mut file = std::fs::File::create(&tmp).map_err(|e| fail(format!("creating: {e}")))?;
    file.write_all(&text)
        .and_then(|()| file.sync_all())
        .map_err(|e| fail(format!("writing {}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(|e| fail(format!("renaming into place: {e}")))?;
    // The rename itself is durable only once the directory is synced.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Reads the table saved for `service`; `None` when there is no state file.
pub fn load(path: &Path, service: &str) -> Result<Option<Table>, EdgeError> {
    let fail = |message: String| EdgeError::StateFile {
        path: path.to_path_buf(),
        message,
    };
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(fail(e.to_string())),
    };
    let content: StateFile = serde_json::from_slice(&text).map_err(|e| fail(e.to_string()))?;
    if content.service != service {
        return Err(fail(format!(
            "holds service {:?}, not {service:?}",
            content.service
        )));
    }
    Table::new(service, content.table, Source::Disk)
        .map(Some)
        .map_err(|e| fail(e.to_string()))
}

/// The table as `/routing` shows it.
pub fn describe(table: &Table) -> serde_json::Value {
    let share: BTreeMap<String, usize> = table.table.share();
    serde_json::json!({
        "version": table.version(),
        "source": table.source,
        "runs": table.table.runs,
        "share": share,
        "throttle_max_rps": table.table.throttle_max_rps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use invoker_domain::BucketRun;

    pub(crate) fn table(version: u64, runs: &[(&str, u32)], source: Source) -> Table {
        Table::new(
            "gift-api",
            RoutingTable {
                version,
                runs: runs.iter().map(|(s, c)| BucketRun::new(*s, *c)).collect(),
                throttle_max_rps: BTreeMap::new(),
            },
            source,
        )
        .unwrap()
    }

    #[test]
    fn tables_must_cover_every_bucket() {
        let t = table(3, &[("a", 512), ("b", 512)], Source::Watch);
        assert_eq!(t.site_for_bucket(0), "a");
        assert_eq!(t.site_for_bucket(511), "a");
        assert_eq!(t.site_for_bucket(512), "b");
        assert_eq!(t.site_for_bucket(1023), "b");
        assert_eq!(t.site_for_bucket(1024), "a", "taken modulo 1024");
        assert_eq!(t.sites(), ["a", "b"]);
        let all_b = table(4, &[("b", 1024)], Source::Watch);
        assert_eq!(all_b.sites(), ["b"]);
        assert!((0..1024).all(|b| all_b.site_for_bucket(b) == "b"));

        for runs in [vec![("a", 512)], vec![("a", 1000), ("b", 100)], vec![]] {
            let bad = Table::new(
                "gift-api",
                RoutingTable {
                    version: 1,
                    runs: runs.iter().map(|(s, c)| BucketRun::new(*s, *c)).collect(),
                    throttle_max_rps: BTreeMap::new(),
                },
                Source::Watch,
            );
            assert!(
                matches!(bad, Err(EdgeError::InvalidTable(ref m)) if m.contains("buckets")),
                "{runs:?}: {bad:?}"
            );
        }
        let nameless = Table::new(
            "gift-api",
            RoutingTable {
                version: 1,
                runs: vec![BucketRun::new("", 1024)],
                throttle_max_rps: BTreeMap::new(),
            },
            Source::Watch,
        );
        assert!(nameless.is_err());
    }

    #[test]
    fn versions_only_move_forward_and_readers_keep_their_table() {
        let routing = Routing::default();
        assert!(routing.current().is_none());
        let half = table(5, &[("a", 512), ("b", 512)], Source::Disk);
        assert_eq!(routing.apply(half.clone()), Applied::Installed);
        let in_flight = routing.current().unwrap();
        assert_eq!(routing.apply(half.clone()), Applied::Unchanged);

        // The watch confirms what the disk said.
        let confirmed = Table {
            source: Source::Watch,
            ..half.clone()
        };
        assert_eq!(routing.apply(confirmed), Applied::Confirmed);
        assert_eq!(routing.current().unwrap().source, Source::Watch);
        // A late disk copy does not demote it.
        assert_eq!(routing.apply(half), Applied::Unchanged);
        assert_eq!(routing.current().unwrap().source, Source::Watch);

        let all_b = table(6, &[("b", 1024)], Source::Watch);
        assert_eq!(routing.apply(all_b), Applied::Installed);
        assert_eq!(routing.current().unwrap().site_for_bucket(0), "b");
        // The request that started before the swap still routes by its own table.
        assert_eq!(in_flight.site_for_bucket(0), "a");

        let older = table(4, &[("a", 1024)], Source::Watch);
        assert_eq!(routing.apply(older), Applied::Stale { current: 6 });
        assert_eq!(routing.current().unwrap().version(), 6);
    }

    #[test]
    fn the_state_file_round_trips_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routing.json");
        assert_eq!(load(&path, "gift-api").unwrap(), None);
        let mut t = table(9, &[("a", 100), ("b", 924)], Source::Watch);
        t.table.throttle_max_rps.insert("b".into(), 250);
        save(&path, &t).unwrap();
        let back = load(&path, "gift-api").unwrap().unwrap();
        assert_eq!(back.source, Source::Disk);
        assert!(back.same_content(&t));
        assert_eq!(back.table.throttle_max_rps["b"], 250);
        assert!(!dir.path().join("routing.json.tmp").exists());

        // Another service's file, a torn or invalid file: errors, never a wrong table.
        assert!(load(&path, "wallet").is_err());
        std::fs::write(&path, b"{\"service\": \"gift-api\", \"tab").unwrap();
        assert!(load(&path, "gift-api").is_err());
        std::fs::write(
            &path,
            br#"{"service":"gift-api","saved_at_ms":1,"table":{"version":1,"runs":[{"site":"a","count":3}]}}"#,
        )
        .unwrap();
        assert!(load(&path, "gift-api").is_err());
    }
}
