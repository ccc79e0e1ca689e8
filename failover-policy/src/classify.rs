use std::collections::BTreeMap;
use std::fmt;

use invoker_domain::Evidence;
use serde::{Deserialize, Serialize};

use crate::observation::Observer;
use crate::policy::{Policy, Target};

/// What the policy believes about a site, or about one service in a site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Classification {
    Healthy,
    ServiceFailure,
    SiteDown,
    Isolated,
    InterSitePartition,
    GrayFailure,
    Unknown,
}

impl Classification {
    /// Whether traffic (or the writer) should leave a site in this state.
    pub fn is_failed(self) -> bool {
        matches!(
            self,
            Classification::ServiceFailure
                | Classification::SiteDown
                | Classification::Isolated
                | Classification::GrayFailure
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Classification::Healthy => "healthy",
            Classification::ServiceFailure => "service_failure",
            Classification::SiteDown => "site_down",
            Classification::Isolated => "isolated",
            Classification::InterSitePartition => "inter_site_partition",
            Classification::GrayFailure => "gray_failure",
            Classification::Unknown => "unknown",
        }
    }
}

impl fmt::Display for Classification {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The policy's view of one serving site at one instant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteAssessment {
    /// `Healthy` here means "up and reachable": the per-service classes say the rest.
    pub class: Classification,
    pub services: BTreeMap<String, Classification>,
    /// What each observer saw of the site.
    pub evidence: Vec<Evidence>,
}

/// What a remote observer (the peer's agent or the witness's) currently sees of a site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Remote {
    Reach,
    Fail { since_ms: u64 },
    Silent,
}

pub(crate) fn ms_i64(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

pub(crate) fn evidence(observer: &Observer, probe: String, detail: String, at_ms: u64) -> Evidence {
    Evidence {
        observer: observer.to_string(),
        probe,
        detail,
        observed_at_ms: ms_i64(at_ms),
    }
}

impl Policy {
    /// Classifies every serving site and each service in it, as of `now_ms`.
    pub fn assess(&self, now_ms: u64) -> BTreeMap<String, SiteAssessment> {
        self.config
            .sites
            .iter()
            .map(|site| (site.clone(), self.assess_site(site, now_ms)))
            .collect()
    }

    fn assess_site(&self, site: &str, now_ms: u64) -> SiteAssessment {
        let local = Observer::Agent(site.to_string());
        let peer = Observer::Agent(self.config.peer_of(site).unwrap_or_default().to_string());
        let witness = Observer::Agent(self.config.witness.clone());
        let silence_ms = self.config.effective_silence_ms();
        let w = self.remote(&witness, site, now_ms);
        let p = match (self.remote(&peer, site, now_ms), w) {
            // The witness reaches this site but not the peer's: the peer is the one cut off,
            // and its failing probes say nothing about this site.
            (Remote::Fail { .. }, Remote::Reach)
                if matches!(
                    self.remote(&witness, peer.site(), now_ms),
                    Remote::Fail { .. }
                ) =>
            {
                Remote::Silent
            }
            (p, _) => p,
        };
        let mut evidence: Vec<Evidence> = [&local, &peer, &witness]
            .into_iter()
            .map(|o| self.observer_evidence(o, site, now_ms))
            .collect();
        let local_run = self
            .observers
            .get(&local)
            .filter(|o| now_ms.saturating_sub(o.last_at_ms) <= silence_ms);
        let class = match (local_run, p, w) {
            // The site's agent is silent and neither remote reaches any of its service
            // instances, though something there (its database) still answers: its application
            // tier is down. Two independent observers agree, and the witness's failing too
            // rules out a mere inter-site partition. First: a witness that reaches only the
            // site's database does not make this a partition.
            (None, _, _)
                if self.instances_unreachable(&peer, site, now_ms)
                    && self.instances_unreachable(&witness, site, now_ms) =>
            {
                evidence.push(Evidence {
                    observer: "policy".into(),
                    probe: format!("site {site}"),
                    detail: "application tier down: no instance of the site answers the peer or the witness".into(),
                    observed_at_ms: ms_i64(now_ms),
                });
                match self.edge_serving(site, now_ms) {
                    Some(served) => {
                        evidence.push(served);
                        Classification::Isolated
                    }
                    None => Classification::SiteDown,
                }
            }
            // The witness reaching the site proves it alive: only the link to the peer is down.
            (_, Remote::Fail { .. }, Remote::Reach) => Classification::InterSitePartition,
            (None, Remote::Fail { .. }, Remote::Fail { .. }) => {
                match self.edge_serving(site, now_ms) {
                    Some(served) => {
                        evidence.push(served);
                        Classification::Isolated
                    }
                    None => Classification::SiteDown,
                }
            }
            // A dying site's last reports arrive after its probes start failing; only an agent
            // that was reporting when both remotes lost the site, and kept reporting for a
            // whole silence window after, proves the site alive but cut off.
            (Some(run), Remote::Fail { since_ms: ps }, Remote::Fail { since_ms: ws }) => {
                let lost_ms = ps.max(ws);
                if run.since_ms <= lost_ms && run.last_at_ms >= lost_ms.saturating_add(silence_ms) {
                    Classification::Isolated
                } else {
                    Classification::Unknown
                }
            }
            (Some(_), Remote::Reach, _) | (Some(_), Remote::Silent, Remote::Reach) => {
                Classification::Healthy
            }
            _ => Classification::Unknown,
        };
        let services = self
            .config
            .services
            .keys()
            .map(|service| {
                let c = if class == Classification::Healthy {
                    self.classify_service(site, service, now_ms)
                } else {
                    class
                };
                (service.clone(), c)
            })
            .collect();
        SiteAssessment {
            class,
            services,
            evidence,
        }
    }

    fn remote(&self, observer: &Observer, site: &str, now_ms: u64) -> Remote {
        let silence_ms = self.config.effective_silence_ms();
        match self.views.get(&(observer.clone(), site.to_string())) {
            Some(v) if now_ms.saturating_sub(v.at_ms) <= silence_ms => {
                if v.reachable {
                    Remote::Reach
                } else {
                    Remote::Fail {
                        since_ms: v.since_ms,
                    }
                }
            }
            _ => Remote::Silent,
        }
    }

    /// The observer's latest report (within the silence window) probed instances in `site`
    /// and none answered.
    fn instances_unreachable(&self, observer: &Observer, site: &str, now_ms: u64) -> bool {
        let silence_ms = self.config.effective_silence_ms();
        match self.views.get(&(observer.clone(), site.to_string())) {
            Some(v) => {
                now_ms.saturating_sub(v.at_ms) <= silence_ms
                    && v.instances_total > 0
                    && v.instances_ok == 0
            }
            None => false,
        }
    }

    fn observer_evidence(&self, observer: &Observer, site: &str, now_ms: u64) -> Evidence {
        let probe = format!("site {site}");
        let silence_ms = self.config.effective_silence_ms();
        let Some(state) = self.observers.get(observer) else {
            return evidence(observer, probe, "no report yet".into(), 0);
        };
        let age_ms = now_ms.saturating_sub(state.last_at_ms);
        if age_ms > silence_ms {
            let detail = format!("silent: last report {age_ms} ms ago (threshold {silence_ms} ms)");
            return evidence(observer, probe, detail, state.last_at_ms);
        }
        match self.views.get(&(observer.clone(), site.to_string())) {
            Some(v) if now_ms.saturating_sub(v.at_ms) <= silence_ms => {
                let verdict = if v.reachable {
                    "reachable"
                } else {
                    "unreachable"
                };
                let detail = format!(
                    "{}/{} probes ok; {verdict} for {} ms",
                    v.ok,
                    v.total,
                    now_ms.saturating_sub(v.since_ms)
                );
                evidence(observer, probe, detail, v.at_ms)
            }
            _ => evidence(
                observer,
                probe,
                "reporting, without probes of this site".into(),
                state.last_at_ms,
            ),
        }
    }

    /// Per service in a site that is up and reachable: the local agent's probes decide
    /// `ServiceFailure`; the edge decides `GrayFailure`.
    fn classify_service(&self, site: &str, service: &str, now_ms: u64) -> Classification {
        let silence_ms = self.config.effective_silence_ms();
        let (mut seen, mut instances, mut instances_up, mut database_down) = (false, 0, 0, false);
        for ((_, _, target), streak) in self.streaks_of(site, service) {
            if now_ms.saturating_sub(streak.seen_at_ms) > silence_ms {
                continue;
            }
            seen = true;
            match target {
                Target::Instance(_) => {
                    instances += 1;
                    instances_up += usize::from(streak.up);
                }
                Target::Database => database_down |= !streak.up,
            }
        }
        let gray = self
            .edge
            .get(&(site.to_string(), service.to_string()))
            .and_then(|e| e.above_since_ms)
            .is_some_and(|t| now_ms.saturating_sub(t) >= self.config.gray_failure_window_ms);
        if !seen {
            Classification::Unknown
        } else if database_down || (instances > 0 && instances_up == 0) {
            Classification::ServiceFailure
        } else if gray {
            Classification::GrayFailure
        } else {
            Classification::Healthy
        }
    }

    fn streaks_of<'a>(
        &'a self,
        site: &'a str,
        service: &'a str,
    ) -> impl Iterator<Item = (&'a (String, String, Target), &'a crate::policy::Streak)> + 'a {
        self.probes
            .iter()
            .filter(move |((s, svc, _), _)| s == site && svc == service)
    }

    /// The local agent's probes, the edge's rates and the last database positions behind a
    /// service's classification in a site.
    pub(crate) fn service_evidence(&self, site: &str, service: &str, now_ms: u64) -> Vec<Evidence> {
        let silence_ms = self.config.effective_silence_ms();
        let local = Observer::Agent(site.to_string());
        let mut out = Vec::new();
        for ((_, _, target), streak) in self.streaks_of(site, service) {
            if now_ms.saturating_sub(streak.seen_at_ms) > silence_ms {
                continue;
            }
            let probe = match target {
                Target::Instance(name) => format!("{service}/{name} readyz"),
                Target::Database => format!("{service} database"),
            };
            let last = if streak.last_ok { "ok" } else { "failed" };
            let detail = format!(
                "{}: last {} probes {last}",
                if streak.up { "up" } else { "down" },
                streak.run
            );
            out.push(evidence(&local, probe, detail, streak.last_probed_at_ms));
        }
        let key = (site.to_string(), service.to_string());
        if let Some(db) = self.databases.get(&key) {
            let p = &db.probe;
            let detail = format!(
                "{:?}: wal lsn {}, receive lsn {}, replay lsn {}, ledger seq {}",
                p.role, p.current_wal_lsn, p.receive_lsn, p.replay_lsn, p.ledger_sequence
            );
            out.push(evidence(
                &db.observer,
                format!("{service} database positions in {site}"),
                detail,
                db.at_ms,
            ));
        }
        if let Some(e) = self.edge.get(&key) {
            let since = e.above_since_ms.map_or("below threshold".to_string(), |t| {
                format!("above threshold for {} ms", now_ms.saturating_sub(t))
            });
            let detail = format!(
                "{} of {} rps failed; {since}",
                e.sample.error_rps, e.sample.request_rps
            );
            out.push(evidence(
                &Observer::Edge,
                format!("{service} at {site}"),
                detail,
                e.at_ms,
            ));
        }
        out
    }

    /// Users still getting answers from a site proves it alive when nobody else can reach it.
    fn edge_serving(&self, site: &str, now_ms: u64) -> Option<Evidence> {
        let silence_ms = self.config.effective_silence_ms();
        self.edge
            .iter()
            .filter(|((s, _), e)| {
                s == site
                    && now_ms.saturating_sub(e.at_ms) <= silence_ms
                    && e.sample.request_rps >= self.config.edge_min_request_rps
                    && !self.error_rate_above(e.sample.error_rps, e.sample.request_rps)
            })
            .map(|((_, service), e)| {
                let detail = format!(
                    "users still served: {} of {} rps failed",
                    e.sample.error_rps, e.sample.request_rps
                );
                evidence(
                    &Observer::Edge,
                    format!("{service} at {site}"),
                    detail,
                    e.at_ms,
                )
            })
            .next()
    }

    pub(crate) fn error_rate_above(&self, error_rps: u64, request_rps: u64) -> bool {
        error_rps as f64 > self.config.edge_error_rate_threshold * request_rps as f64
    }
}
