use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::DomainError;

/// Number of uid buckets in every routing table. A request's bucket is `uid % BUCKETS`.
pub const BUCKETS: usize = 1024;

/// `count` consecutive buckets served by `site`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BucketRun {
    pub site: String,
    pub count: u32,
}

impl BucketRun {
    pub fn new(site: impl Into<String>, count: u32) -> BucketRun {
        BucketRun {
            site: site.into(),
            count,
        }
    }
}

/// A service's routing: 1024 uid buckets, each served by one site, stored as runs of
/// consecutive buckets (`a` × 512 then `b` × 512). Weights derive from it.
///
/// A table is one to a few runs, so it is tens of bytes in the raft log, snapshots, watch
/// updates and requests, and cheap to copy, where 1024 separate site names were not.
///
/// `version` grows by one at every change, so data-plane caches and compare-and-swap
/// publication can tell tables apart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutingTable {
    pub version: u64,
    /// Normalised runs (see [`normalize_runs`]); their counts add up to [`BUCKETS`].
    pub runs: Vec<BucketRun>,
    /// Sites whose requests the edge admits only up to this rate (requests per second),
    /// because they took over more load than they can carry. Empty in normal operation.
    #[serde(default)]
    pub throttle_max_rps: BTreeMap<String, u64>,
}

/// Merges adjacent runs of the same site and drops empty ones, so that equal tables compare
/// equal whatever runs they were given as.
pub fn normalize_runs(runs: &[BucketRun]) -> Vec<BucketRun> {
    let mut out: Vec<BucketRun> = Vec::with_capacity(runs.len());
    for run in runs.iter().filter(|r| r.count > 0) {
        match out.last_mut() {
            Some(last) if last.site == run.site => last.count += run.count,
            _ => out.push(run.clone()),
        }
    }
    out
}

/// Total buckets the runs cover (u64: untrusted counts cannot overflow it).
pub fn runs_len(runs: &[BucketRun]) -> u64 {
    runs.iter().map(|r| u64::from(r.count)).sum()
}

/// Runs from one site name per bucket.
pub fn runs_from_buckets<S: AsRef<str>>(buckets: &[S]) -> Vec<BucketRun> {
    let mut runs: Vec<BucketRun> = Vec::new();
    for site in buckets {
        match runs.last_mut() {
            Some(last) if last.site == site.as_ref() => last.count += 1,
            _ => runs.push(BucketRun::new(site.as_ref(), 1)),
        }
    }
    runs
}

impl RoutingTable {
    /// Builds runs from weights: sites in id order get contiguous ranges proportional to their
    /// weight; rounding leftovers go to the heaviest site so every bucket is assigned.
    pub fn runs_from_weights(
        service: &str,
        weights: &BTreeMap<String, u32>,
    ) -> Result<Vec<BucketRun>, DomainError> {
        for (site, &weight) in weights {
            if weight as usize > BUCKETS {
                return Err(DomainError::WeightOutOfRange {
                    site: site.clone(),
                    weight,
                });
            }
        }
        let total: u64 = weights.values().map(|&w| u64::from(w)).sum();
        if total == 0 {
            return Err(DomainError::EmptyWeights(service.to_string()));
        }
        let mut runs: Vec<BucketRun> = weights
            .iter()
            .map(|(site, &weight)| {
                BucketRun::new(
                    site.clone(),
                    (u64::from(weight) * BUCKETS as u64 / total) as u32,
                )
            })
            .collect();
        let assigned = runs_len(&runs) as u32;
        if assigned < BUCKETS as u32 {
            let heaviest = weights
                .iter()
                .max_by_key(|(site, &w)| (w, std::cmp::Reverse((*site).clone())))
                .map(|(site, _)| site.clone())
                .ok_or_else(|| DomainError::EmptyWeights(service.to_string()))?;
            if let Some(run) = runs.iter_mut().find(|r| r.site == heaviest) {
                run.count += BUCKETS as u32 - assigned;
            }
        }
        Ok(normalize_runs(&runs))
    }

    /// Buckets per site, for display ("a: 512, b: 512").
    pub fn share(&self) -> BTreeMap<String, usize> {
        let mut share = BTreeMap::new();
        for run in &self.runs {
            *share.entry(run.site.clone()).or_insert(0) += run.count as usize;
        }
        share
    }

    /// The site serving a bucket (`None` past the end).
    pub fn site_for_bucket(&self, bucket: usize) -> Option<&str> {
        let mut start = 0usize;
        for run in &self.runs {
            let end = start + run.count as usize;
            if bucket < end {
                return Some(&run.site);
            }
            start = end;
        }
        None
    }

    /// The site serving a uid.
    pub fn site_for_uid(&self, uid: u64) -> Option<&str> {
        self.site_for_bucket((uid % BUCKETS as u64) as usize)
    }

    /// One site name per bucket (for display and tests).
    pub fn buckets(&self) -> Vec<String> {
        self.runs
            .iter()
            .flat_map(|r| std::iter::repeat_n(r.site.clone(), r.count as usize))
            .collect()
    }

    /// One-line summary for audit and logs, e.g. `v3 a=512 b=512`.
    pub fn summary(&self) -> String {
        let parts: Vec<String> = self
            .share()
            .iter()
            .map(|(site, n)| format!("{site}={n}"))
            .collect();
        let throttles: Vec<String> = self
            .throttle_max_rps
            .iter()
            .map(|(site, rps)| format!(" throttle {site}<={rps}/s"))
            .collect();
        format!(
            "v{} {}{}",
            self.version,
            parts.join(" "),
            throttles.concat()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(pairs: &[(&str, u32)]) -> BTreeMap<String, u32> {
        pairs.iter().map(|(s, w)| (s.to_string(), *w)).collect()
    }

    #[test]
    fn even_split_gives_half_each() {
        let runs =
            RoutingTable::runs_from_weights("svc", &weights(&[("a", 50), ("b", 50)])).unwrap();
        let t = RoutingTable {
            version: 1,
            runs,
            throttle_max_rps: BTreeMap::new(),
        };
        assert_eq!(runs_len(&t.runs), BUCKETS as u64);
        assert_eq!(t.share()["a"], 512);
        assert_eq!(t.share()["b"], 512);
        assert_eq!(t.site_for_uid(0), Some("a"));
        assert_eq!(t.site_for_uid(511), Some("a"));
        assert_eq!(t.site_for_uid(512), Some("b"));
        assert_eq!(t.site_for_uid(1023), Some("b"));
        assert_eq!(t.site_for_uid(1024), Some("a"));
        assert_eq!(t.site_for_bucket(1024), None);
    }

    #[test]
    fn uneven_split_assigns_every_bucket() {
        let runs = RoutingTable::runs_from_weights("svc", &weights(&[("a", 1), ("b", 2)])).unwrap();
        assert_eq!(runs_len(&runs), BUCKETS as u64);
        assert_eq!(runs[0], BucketRun::new("a", 341));
    }

    #[test]
    fn runs_normalise_and_round_trip_through_buckets() {
        let runs = vec![
            BucketRun::new("a", 300),
            BucketRun::new("a", 0),
            BucketRun::new("b", 0),
            BucketRun::new("a", 12),
            BucketRun::new("b", 712),
        ];
        let normal = normalize_runs(&runs);
        assert_eq!(
            normal,
            vec![BucketRun::new("a", 312), BucketRun::new("b", 712)]
        );
        let t = RoutingTable {
            version: 1,
            runs: normal.clone(),
            throttle_max_rps: BTreeMap::new(),
        };
        assert_eq!(runs_from_buckets(&t.buckets()), normal);
    }

    #[test]
    fn zero_weights_are_refused() {
        let err = RoutingTable::runs_from_weights("svc", &weights(&[("a", 0)])).unwrap_err();
        assert_eq!(err, DomainError::EmptyWeights("svc".into()));
        let err = RoutingTable::runs_from_weights("svc", &weights(&[("a", 5000)])).unwrap_err();
        assert!(matches!(err, DomainError::WeightOutOfRange { .. }));
    }
}
