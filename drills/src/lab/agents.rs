//! The site agents: one in site a, one in site b, one at the witness, each reporting to the
//! invoker leader. Site agents probe their own site's instances and database closely and the
//! other site from outside; the witness probes both sites (and both databases) from outside.

use std::collections::BTreeMap;
use std::path::Path;

use super::describe::{ProcessInfo, ProcessKind};
use super::proc::SpawnSpec;
use super::LabError;

/// One site as an agent's configuration names it.
#[derive(Debug, Clone)]
pub(crate) struct SiteRef {
    pub site: String,
    pub etcd: String,
    pub database_url: String,
}

#[derive(Debug, Clone)]
pub(crate) struct AgentPlan {
    /// `a`, `b` or `witness`.
    pub site: String,
}

impl AgentPlan {
    pub fn name(&self) -> String {
        format!("agent-{}", self.site)
    }

    fn config(&self, invokers: &[String], sites: &[SiteRef]) -> String {
        let role = if self.site == "witness" {
            "witness"
        } else {
            "site"
        };
        // Probes leave from the agent's own address in its site's range (host 6), so that a
        // partition between the ranges cuts them like the site's other traffic.
        let bind_ip = super::site_ip(&self.site, 6);
        let mut text = format!(
            "site = {site:?}\nrole = {role:?}\ninvoker_endpoints = {invokers:?}\nbind_ip = \"{bind_ip}\"\n",
            site = self.site
        );
        for s in sites {
            text.push_str(&format!(
                "[[sites]]\nsite = {:?}\netcd_endpoints = [{:?}]\n",
                s.site, s.etcd
            ));
            // A site agent reads its own database; the witness reads both.
            if role == "witness" || s.site == self.site {
                text.push_str(&format!("database_url = {:?}\n", s.database_url));
            }
        }
        text
    }

    /// Writes `DIR/agent-<site>/site-agent.toml`; returns the spawn spec and the description.
    pub fn spec(
        &self,
        dir: &Path,
        bin: &Path,
        invokers: &[String],
        sites: &[SiteRef],
    ) -> Result<(SpawnSpec, ProcessInfo), LabError> {
        let (spec, config_path, home) = super::services::configured_child(
            dir,
            bin,
            &self.name(),
            "site-agent.toml",
            &self.config(invokers, sites),
        )?;
        let info = ProcessInfo {
            config: Some(config_path),
            ..ProcessInfo::planned(&spec, ProcessKind::Agent, &self.site, BTreeMap::new(), home)
        };
        Ok((spec, info))
    }
}

/// Healthy: some invoker node has accepted a report from this agent's site (the agents
/// listen on nothing; the leader's metrics are where their reports show).
pub(crate) async fn reported(site: &str, invoker_metrics: &[String]) -> Result<(), String> {
    let needle = format!("invoker_agent_reports_total{{site=\"{site}\",result=\"accepted\"}} ");
    for addr in invoker_metrics {
        let Ok(text) = super::services::http_get(addr, "/metrics").await else {
            continue;
        };
        if text.lines().any(|l| l.starts_with(&needle)) {
            return Ok(());
        }
    }
    Err(format!(
        "no invoker has accepted a report from site {site} yet"
    ))
}
