//! Each site's instances of the proxied service, read from the site's etcd registry
//! (`/services/<service>/<site>/<instance>` → `http://host:port`, see
//! `site_agent::discovery`). The last known list is kept while etcd cannot be read: the data
//! plane never depends on the registry being up. Instances are picked round-robin; one whose
//! connection just failed is skipped for a short while.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;

use crate::metrics::Metrics;

#[derive(Debug, Default)]
struct SiteInstances {
    /// Instance base URLs, sorted by instance name.
    addresses: RwLock<Arc<Vec<String>>>,
    next: AtomicUsize,
    /// Address → until when it is skipped.
    skipped: Mutex<BTreeMap<String, Instant>>,
    /// The last failed read of the registry, cleared by a good one.
    error: Mutex<Option<String>>,
    /// Whether the registry was read at least once.
    read_once: std::sync::atomic::AtomicBool,
}

/// What `/routing` shows of one site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SiteView {
    pub instances: Vec<String>,
    pub skipped: Vec<String>,
    pub registry_error: Option<String>,
    pub registry_read: bool,
}

#[derive(Debug)]
pub struct Upstreams {
    sites: BTreeMap<String, SiteInstances>,
    skip_for: Duration,
}

impl Upstreams {
    pub fn new(sites: &[String], skip_for: Duration) -> Upstreams {
        Upstreams {
            sites: sites
                .iter()
                .map(|s| (s.clone(), SiteInstances::default()))
                .collect(),
            skip_for,
        }
    }

    /// The configured sites.
    pub fn site_names(&self) -> impl Iterator<Item = &String> {
        self.sites.keys()
    }

    /// The next instance of `site` round-robin, passing over skipped ones; `None` when the
    /// site has none (or all are skipped).
    pub fn pick(&self, site: &str, now: Instant) -> Option<String> {
        let s = self.sites.get(site)?;
        let addresses = s
            .addresses
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if addresses.is_empty() {
            return None;
        }
        let skipped = s.skipped.lock().unwrap_or_else(PoisonError::into_inner);
        let start = s.next.fetch_add(1, Ordering::Relaxed);
        (0..addresses.len())
            .map(|i| &addresses[(start + i) % addresses.len()])
            .find(|a| skipped.get(*a).is_none_or(|until| *until <= now))
            .cloned()
    }

    /// An attempt to connect to `address` failed: skip it for a while.
    pub fn mark_failed(&self, site: &str, address: &str, now: Instant) {
        if self.skip_for.is_zero() {
            return;
        }
        if let Some(s) = self.sites.get(site) {
            s.skipped
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(address.to_string(), now + self.skip_for);
        }
    }

    /// Replaces a site's list with what its registry says now.
    pub fn set(&self, site: &str, addresses: Vec<String>) {
        if let Some(s) = self.sites.get(site) {
            {
                let mut skipped = s.skipped.lock().unwrap_or_else(PoisonError::into_inner);
                skipped.retain(|a, _| addresses.contains(a));
            }
            *s.addresses.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(addresses);
            *s.error.lock().unwrap_or_else(PoisonError::into_inner) = None;
            s.read_once.store(true, Ordering::Relaxed);
        }
    }

    /// The registry could not be read: keep the list, remember why.
    pub fn set_error(&self, site: &str, error: String) {
        if let Some(s) = self.sites.get(site) {
            *s.error.lock().unwrap_or_else(PoisonError::into_inner) = Some(error);
        }
    }

    pub fn count(&self, site: &str) -> usize {
        self.sites.get(site).map_or(0, |s| {
            s.addresses
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .len()
        })
    }

    pub fn view(&self, now: Instant) -> BTreeMap<String, SiteView> {
        self.sites
            .iter()
            .map(|(site, s)| {
                let instances = s
                    .addresses
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .as_ref()
                    .clone();
                let skipped = s
                    .skipped
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .iter()
                    .filter(|(_, until)| **until > now)
                    .map(|(a, _)| a.clone())
                    .collect();
                let view = SiteView {
                    instances,
                    skipped,
                    registry_error: s
                        .error
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .clone(),
                    registry_read: s.read_once.load(Ordering::Relaxed),
                };
                (site.clone(), view)
            })
            .collect()
    }
}

/// Where to read one site's registry.
#[derive(Debug, Clone)]
pub struct DiscoverySettings {
    pub service: String,
    pub site: String,
    pub etcd_endpoints: Vec<String>,
    pub interval: Duration,
    pub bind_ip: Option<IpAddr>,
}

/// Reads one site's registry every `interval` until `stop`.
pub async fn run_discovery(
    settings: DiscoverySettings,
    upstreams: Arc<Upstreams>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    // A read must end before the next one is due.
    let timeout = settings.interval.min(Duration::from_secs(2));
    let mut ticker = tokio::time::interval(settings.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<Result<Vec<String>, ()>> = None;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
        let read = tokio::time::timeout(
            timeout + Duration::from_millis(100),
            site_agent::discovery::discover_from(
                &settings.site,
                &settings.etcd_endpoints,
                timeout,
                settings.bind_ip,
            ),
        )
        .await;
        let outcome = match read {
            Ok(Ok(found)) => Ok(found
                .into_values()
                .filter(|i| i.service == settings.service && i.address.starts_with("http://"))
                .map(|i| i.address)
                .collect::<Vec<String>>()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("etcd gave no answer within {timeout:?}")),
        };
        match outcome {
            Ok(addresses) => {
                if last.as_ref() != Some(&Ok(addresses.clone())) {
                    tracing::info!(site = %settings.site, instances = ?addresses, "instances");
                }
                metrics.set_instances(&settings.site, addresses.len());
                upstreams.set(&settings.site, addresses.clone());
                last = Some(Ok(addresses));
            }
            Err(error) => {
                if last.as_ref().is_none_or(Result::is_ok) {
                    tracing::warn!(site = %settings.site, %error, "registry unreadable; keeping the last known instances");
                }
                metrics.registry_errors(&settings.site);
                upstreams.set_error(&settings.site, error);
                last = Some(Err(()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_skips_failed_instances_for_a_while() {
        let u = Upstreams::new(&["a".into(), "b".into()], Duration::from_millis(500));
        let now = Instant::now();
        assert_eq!(u.pick("a", now), None, "nothing discovered yet");
        assert_eq!(u.pick("c", now), None, "unknown site");
        u.set("a", vec!["http://a1".into(), "http://a2".into()]);
        let picks: Vec<String> = (0..4).filter_map(|_| u.pick("a", now)).collect();
        assert_eq!(picks.iter().filter(|p| *p == "http://a1").count(), 2);
        assert_eq!(picks.iter().filter(|p| *p == "http://a2").count(), 2);

        u.mark_failed("a", "http://a1", now);
        for _ in 0..4 {
            assert_eq!(u.pick("a", now).as_deref(), Some("http://a2"));
        }
        assert_eq!(u.view(now)["a"].skipped, vec!["http://a1"]);
        u.mark_failed("a", "http://a2", now);
        assert_eq!(u.pick("a", now), None, "every instance skipped");
        let later = now + Duration::from_millis(501);
        assert!(u.pick("a", later).is_some(), "skips expire");

        // A failed registry read keeps the list.
        u.set_error("a", "etcd down".into());
        assert_eq!(u.count("a"), 2);
        let view = u.view(later);
        assert_eq!(view["a"].registry_error.as_deref(), Some("etcd down"));
        assert!(view["a"].registry_read);
        assert!(!view["b"].registry_read);
        // A good read replaces it and forgets skips of instances that left.
        u.mark_failed("a", "http://a1", later);
        u.set("a", vec!["http://a3".into()]);
        assert_eq!(u.pick("a", later).as_deref(), Some("http://a3"));
        assert!(u.view(later)["a"].skipped.is_empty());
        assert_eq!(u.view(later)["a"].registry_error, None);
    }

    #[test]
    fn zero_skip_never_skips() {
        let u = Upstreams::new(&["a".into()], Duration::ZERO);
        let now = Instant::now();
        u.set("a", vec!["http://a1".into()]);
        u.mark_failed("a", "http://a1", now);
        assert_eq!(u.pick("a", now).as_deref(), Some("http://a1"));
    }
}
