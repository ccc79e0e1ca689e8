use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::DomainError;

/// Number of uid buckets in every routing table. A request's bucket is `uid % BUCKETS`.
pub const BUCKETS: usize = 1024;

/// A service's routing: bucket `i` is served by site `buckets[i]`. Weights derive from it.
///
/// `version` grows by one at every change, so data-plane caches and compare-and-swap
/// publication can tell tables apart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutingTable {
    pub version: u64,
    #[serde(with = "runs")]
    pub buckets: Vec<String>,
}

/// Serialises a bucket table as runs of `(site, count)`: tables are one to a few contiguous
/// ranges, so a 1024-entry table becomes a few dozen bytes in the raft log, snapshots and the
/// raft transport instead of ~9 kB.
pub mod runs {
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::BUCKETS;

    pub fn serialize<S: Serializer>(buckets: &[String], serializer: S) -> Result<S::Ok, S::Error> {
        let mut runs: Vec<(&str, u32)> = Vec::new();
        for site in buckets {
            match runs.last_mut() {
                Some((last, count)) if *last == site.as_str() => *count += 1,
                _ => runs.push((site.as_str(), 1)),
            }
        }
        runs.serialize(serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<String>, D::Error> {
        let runs: Vec<(String, u32)> = Vec::deserialize(deserializer)?;
        let total: u64 = runs.iter().map(|(_, n)| u64::from(*n)).sum();
        // A bound on what is allocated from untrusted input. Larger than BUCKETS is refused by
        // the state machine with a clear error; here it only has to be finite.
        if total > 16 * BUCKETS as u64 {
            return Err(D::Error::custom(format!(
                "bucket table of {total} entries is too large"
            )));
        }
        let mut buckets = Vec::with_capacity(total as usize);
        for (site, n) in runs {
            buckets.extend(std::iter::repeat_n(site, n as usize));
        }
        Ok(buckets)
    }
}

impl RoutingTable {
    /// Builds buckets from weights: sites in id order get contiguous ranges proportional to
    /// their weight; rounding leftovers go to the heaviest site so every bucket is assigned.
    pub fn buckets_from_weights(
        service: &str,
        weights: &BTreeMap<String, u32>,
    ) -> Result<Vec<String>, DomainError> {
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
        let mut buckets = Vec::with_capacity(BUCKETS);
        for (site, &weight) in weights {
            let share = (u64::from(weight) * BUCKETS as u64 / total) as usize;
            buckets.extend(std::iter::repeat_n(site.clone(), share));
        }
        if buckets.len() < BUCKETS {
            let heaviest = weights
                .iter()
                .max_by_key(|(site, &w)| (w, std::cmp::Reverse((*site).clone())))
                .map(|(site, _)| site.clone())
                .ok_or_else(|| DomainError::EmptyWeights(service.to_string()))?;
            let missing = BUCKETS - buckets.len();
            buckets.extend(std::iter::repeat_n(heaviest, missing));
            buckets.sort();
        }
        Ok(buckets)
    }

    /// Buckets per site, for display ("a: 512, b: 512").
    pub fn share(&self) -> BTreeMap<String, usize> {
        let mut share = BTreeMap::new();
        for site in &self.buckets {
            *share.entry(site.clone()).or_insert(0) += 1;
        }
        share
    }

    /// The site serving a uid.
    pub fn site_for_uid(&self, uid: u64) -> Option<&str> {
        self.buckets
            .get((uid % BUCKETS as u64) as usize)
            .map(String::as_str)
    }

    /// One-line summary for audit and logs, e.g. `v3 a=512 b=512`.
    pub fn summary(&self) -> String {
        let parts: Vec<String> = self
            .share()
            .iter()
            .map(|(site, n)| format!("{site}={n}"))
            .collect();
        format!("v{} {}", self.version, parts.join(" "))
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
        let b =
            RoutingTable::buckets_from_weights("svc", &weights(&[("a", 50), ("b", 50)])).unwrap();
        let t = RoutingTable {
            version: 1,
            buckets: b,
        };
        assert_eq!(t.buckets.len(), BUCKETS);
        assert_eq!(t.share()["a"], 512);
        assert_eq!(t.share()["b"], 512);
        assert_eq!(t.site_for_uid(0), Some("a"));
        assert_eq!(t.site_for_uid(1023), Some("b"));
        assert_eq!(t.site_for_uid(1024), Some("a"));
    }

    #[test]
    fn uneven_split_assigns_every_bucket() {
        let b = RoutingTable::buckets_from_weights("svc", &weights(&[("a", 1), ("b", 2)])).unwrap();
        assert_eq!(b.len(), BUCKETS);
        let a = b.iter().filter(|s| *s == "a").count();
        assert_eq!(a, 341);
    }

    #[test]
    fn tables_serialise_as_runs_and_round_trip() {
        let mut buckets = vec!["a".to_string(); 300];
        buckets.extend(vec!["b".to_string(); 700]);
        buckets.extend(vec!["a".to_string(); 24]);
        let t = RoutingTable {
            version: 7,
            buckets,
        };
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(
            json,
            r#"{"version":7,"buckets":[["a",300],["b",700],["a",24]]}"#
        );
        let back: RoutingTable = serde_json::from_str(&json).unwrap();
        assert_eq!(back, t);
        let huge = r#"{"version":1,"buckets":[["a",4294967295]]}"#;
        assert!(serde_json::from_str::<RoutingTable>(huge).is_err());
    }

    #[test]
    fn zero_weights_are_refused() {
        let err = RoutingTable::buckets_from_weights("svc", &weights(&[("a", 0)])).unwrap_err();
        assert_eq!(err, DomainError::EmptyWeights("svc".into()));
        let err = RoutingTable::buckets_from_weights("svc", &weights(&[("a", 5000)])).unwrap_err();
        assert!(matches!(err, DomainError::WeightOutOfRange { .. }));
    }
}
