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
    pub buckets: Vec<String>,
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
    fn zero_weights_are_refused() {
        let err = RoutingTable::buckets_from_weights("svc", &weights(&[("a", 0)])).unwrap_err();
        assert_eq!(err, DomainError::EmptyWeights("svc".into()));
        let err = RoutingTable::buckets_from_weights("svc", &weights(&[("a", 5000)])).unwrap_err();
        assert!(matches!(err, DomainError::WeightOutOfRange { .. }));
    }
}
