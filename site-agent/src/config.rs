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
        Ok(())
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
        ];
        for (bad, needle) in cases {
            match bad.validate() {
                Err(AgentError::Config(m)) => assert!(m.contains(needle), "{m}"),
                other => panic!("expected a config error with {needle:?}, got {other:?}"),
            }
        }
    }
}
