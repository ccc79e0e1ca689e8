//! The agent's configuration: a TOML file plus `SITE_AGENT_*` environment overrides.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::AgentError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Probes its own site closely and the peer site from outside.
    Site,
    /// Runs no services; probes both sites from outside.
    Witness,
}

/// A site as the agent sees it: where its registry is and where its database is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteTarget {
    pub site: String,
    /// The site's etcd (client URLs): its instances are registered there.
    pub etcd_endpoints: Vec<String>,
    /// The site's PostgreSQL, probed for role, WAL positions and the wallet ledger.
    #[serde(default)]
    pub database_url: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This agent's site (`witness` for the witness).
    pub site: String,
    pub role: Role,
    /// Default `agent-<site>`.
    #[serde(default)]
    pub agent_id: Option<String>,
    /// The invoker nodes (`host:port`); the session follows the leader.
    #[serde(default)]
    pub invoker_endpoints: Vec<String>,
    /// Every site this agent probes: its own (for a site agent) and the others.
    pub sites: Vec<SiteTarget>,
    #[serde(default = "default_probe_interval_ms")]
    pub probe_interval_ms: u64,
    /// Each probe's deadline; past it the probe counts as failed.
    #[serde(default = "default_probe_timeout_ms")]
    pub probe_timeout_ms: u64,
    /// How often the instance list is re-read from etcd (the last known list is kept when
    /// etcd cannot be read).
    #[serde(default = "default_discovery_interval_ms")]
    pub discovery_interval_ms: u64,
    /// The source address of probes (the agent's address in its site's range), so that a
    /// partition between the sites' address ranges cuts the agent's probes too. Default: the
    /// system's choice.
    #[serde(default)]
    pub bind_ip: Option<std::net::IpAddr>,
    /// The strong service whose writer lease this agent keeps while its own site's database
    /// is the primary. Its schema and `shadow_<service>` hold the fencing rows.
    #[serde(default = "default_strong_service")]
    pub strong_service: String,
    /// How often the writer lease is renewed (a `LeaseRequest` to the leader).
    #[serde(default = "default_lease_renew_interval_ms")]
    pub lease_renew_interval_ms: u64,
    /// The local primary is fenced when the lease has less than this left and no grant came.
    #[serde(default = "default_fence_margin_ms")]
    pub fence_margin_ms: u64,
    /// The deadline of each statement of the lease loop and of commands (a frozen database
    /// costs this, never blocks the loop).
    #[serde(default = "default_database_timeout_ms")]
    pub database_timeout_ms: u64,
}

fn default_probe_interval_ms() -> u64 {
    250
}
fn default_probe_timeout_ms() -> u64 {
    200
}
fn default_discovery_interval_ms() -> u64 {
    2_000
}
fn default_strong_service() -> String {
    "wallet".to_string()
}
fn default_lease_renew_interval_ms() -> u64 {
    500
}
fn default_fence_margin_ms() -> u64 {
    1_000
}
fn default_database_timeout_ms() -> u64 {
    200
}

impl AgentConfig {
    pub fn load(path: Option<&Path>) -> Result<AgentConfig, AgentError> {
        let config: AgentConfig =
            telemetry::service::load_config(path, "SITE_AGENT_").map_err(AgentError::Config)?;
        config.validate()?;
        Ok(config)
    }

    pub fn agent_id(&self) -> String {
        self.agent_id
            .clone()
            .unwrap_or_else(|| format!("agent-{}", self.site))
    }

    /// How this agent introduces itself to the invoker.
    pub fn identity(&self) -> crate::session::Identity {
        crate::session::Identity {
            agent_id: self.agent_id(),
            site: self.site.clone(),
            role: match self.role {
                Role::Site => invoker_api::pb::AgentRole::Site,
                Role::Witness => invoker_api::pb::AgentRole::Witness,
            },
            invoker_endpoints: self.invoker_endpoints.clone(),
            bind_ip: self.bind_ip,
        }
    }

    pub fn validate(&self) -> Result<(), AgentError> {
        let bad = |m: String| Err(AgentError::Config(m));
        if self.site.is_empty() || self.site.len() > 64 {
            return bad("site must be 1-64 characters".into());
        }
        if self.sites.is_empty() {
            return bad("sites must list at least one site to probe".into());
        }
        let own = self.sites.iter().any(|s| s.site == self.site);
        match self.role {
            Role::Site if !own => {
                return bad(format!(
                    "a site agent must list its own site {:?} in sites",
                    self.site
                ))
            }
            Role::Witness if own => {
                return bad(format!(
                    "the witness agent's site {:?} runs no services: do not list it in sites",
                    self.site
                ))
            }
            _ => {}
        }
        let mut seen = std::collections::BTreeSet::new();
        for s in &self.sites {
            if !seen.insert(&s.site) {
                return bad(format!("site {:?} is listed twice in sites", s.site));
            }
            if s.etcd_endpoints.is_empty() {
                return bad(format!("sites.{}.etcd_endpoints is empty", s.site));
            }
            if let Some(url) = &s.database_url {
                if !url.starts_with("postgres://") && !url.starts_with("postgresql://") {
                    return bad(format!(
                        "sites.{}.database_url must be a postgres:// URL",
                        s.site
                    ));
                }
            }
        }
        if !(10..=60_000).contains(&self.probe_interval_ms) {
            return bad(format!(
                "probe_interval_ms {} is out of range (10..=60000)",
                self.probe_interval_ms
            ));
        }
        if self.probe_timeout_ms == 0 || self.probe_timeout_ms > self.probe_interval_ms {
            return bad(format!(
                "probe_timeout_ms {} must be 1..=probe_interval_ms ({}): a round must end before the next",
                self.probe_timeout_ms, self.probe_interval_ms
            ));
        }
        if self.discovery_interval_ms < self.probe_interval_ms {
            return bad("discovery_interval_ms must be at least probe_interval_ms".into());
        }
        let service = &self.strong_service;
        let identifier = service.len() <= 40
            && service.starts_with(|c: char| c.is_ascii_lowercase())
            && service
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !identifier {
            return bad(format!(
                "strong_service {service:?} must be a lowercase SQL identifier (a-z, 0-9, _; at most 40)"
            ));
        }
        if !(50..=10_000).contains(&self.lease_renew_interval_ms) {
            return bad(format!(
                "lease_renew_interval_ms {} is out of range (50..=10000)",
                self.lease_renew_interval_ms
            ));
        }
        if !(10..=5_000).contains(&self.database_timeout_ms) {
            return bad(format!(
                "database_timeout_ms {} is out of range (10..=5000)",
                self.database_timeout_ms
            ));
        }
        // A fence is up to a few statements; started at the margin it must end before expiry.
        if self.fence_margin_ms < 3 * self.database_timeout_ms || self.fence_margin_ms > 60_000 {
            return bad(format!(
                "fence_margin_ms {} must be 3 x database_timeout_ms ({}) ..= 60000: a fence started at the margin must end before the lease expires",
                self.fence_margin_ms,
                3 * self.database_timeout_ms
            ));
        }
        Ok(())
    }

    /// The database of this agent's own site (a site agent's; the witness has none).
    pub fn own_database_url(&self) -> Option<&str> {
        if self.role != Role::Site {
            return None;
        }
        self.sites
            .iter()
            .find(|s| s.site == self.site)
            .and_then(|s| s.database_url.as_deref())
    }

    /// Is `site` probed closely (this agent's own site)?
    pub fn is_local(&self, site: &str) -> bool {
        self.role == Role::Site && site == self.site
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn config() -> AgentConfig {
        toml::from_str(
            r#"
            site = "a"
            role = "site"
            [[sites]]
            site = "a"
            etcd_endpoints = ["http://127.0.1.2:2379"]
            database_url = "postgres://postgres@127.0.1.3:5432/gift"
            [[sites]]
            site = "b"
            etcd_endpoints = ["http://127.0.2.2:2379"]
            "#,
        )
        .unwrap()
    }

    #[test]
    fn defaults_and_validation() {
        let c = config();
        assert!(c.validate().is_ok());
        assert_eq!(c.probe_interval_ms, 250);
        assert_eq!(c.agent_id(), "agent-a");
        assert_eq!(c.strong_service, "wallet");
        assert_eq!(c.lease_renew_interval_ms, 500);
        assert_eq!(c.fence_margin_ms, 1_000);
        assert_eq!(
            c.own_database_url(),
            Some("postgres://postgres@127.0.1.3:5432/gift")
        );
        assert!(c.is_local("a") && !c.is_local("b"));
        let cases: Vec<(AgentConfig, &str)> = vec![
            (
                AgentConfig {
                    probe_timeout_ms: 300,
                    ..c.clone()
                },
                "probe_timeout_ms",
            ),
            (
                AgentConfig {
                    probe_interval_ms: 5,
                    ..c.clone()
                },
                "probe_interval_ms",
            ),
            (
                AgentConfig {
                    role: Role::Witness,
                    ..c.clone()
                },
                "witness",
            ),
            (
                AgentConfig {
                    site: "c".into(),
                    ..c.clone()
                },
                "own site",
            ),
            (
                AgentConfig {
                    sites: vec![],
                    ..c.clone()
                },
                "at least one",
            ),
            (
                AgentConfig {
                    sites: vec![c.sites[0].clone(), c.sites[0].clone()],
                    ..c.clone()
                },
                "twice",
            ),
            (
                AgentConfig {
                    strong_service: "wallet; drop table x".into(),
                    ..c.clone()
                },
                "strong_service",
            ),
            (
                AgentConfig {
                    lease_renew_interval_ms: 10,
                    ..c.clone()
                },
                "lease_renew_interval_ms",
            ),
            (
                AgentConfig {
                    fence_margin_ms: 500,
                    ..c.clone()
                },
                "fence_margin_ms",
            ),
            (
                AgentConfig {
                    database_timeout_ms: 0,
                    ..c.clone()
                },
                "database_timeout_ms",
            ),
        ];
        for (bad, needle) in cases {
            match bad.validate() {
                Err(AgentError::Config(m)) => assert!(m.contains(needle), "{m}"),
                other => panic!("expected a config error with {needle:?}, got {other:?}"),
            }
        }
    }
}
