//! The edge router at the witness/edge location (127.0.3.10): the lab's stand-in for the CDN
//! in front of both sites. It watches the invoker's routing, reads both sites' registries,
//! proxies to the gift-api instances and reports real traffic to the invoker leader.

use std::collections::BTreeMap;
use std::path::Path;

use super::describe::{ProcessInfo, ProcessKind};
use super::proc::SpawnSpec;
use super::LabError;

/// The edge's host number in the witness range.
const EDGE_HOST: u8 = 10;
pub(crate) const NAME: &str = "edge-router";
/// The state file, under the edge's home directory.
pub(crate) const STATE_FILE: &str = "routing.json";

#[derive(Debug, Clone)]
pub(crate) struct EdgePlan {
    /// The proxy, `host:port`.
    pub proxy: String,
    /// `/metrics`, `/readyz`, `/routing`, `host:port`.
    pub admin: String,
}

impl EdgePlan {
    pub fn new() -> Result<EdgePlan, LabError> {
        Ok(EdgePlan {
            proxy: super::services::free_addr("witness", EDGE_HOST)?,
            admin: super::services::free_addr("witness", EDGE_HOST)?,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.proxy)
    }

    /// `sites`: (site, etcd client URL).
    fn config(&self, home: &Path, invokers: &[String], sites: &[(String, String)]) -> String {
        let bind_ip = super::site_ip("witness", EDGE_HOST);
        let mut text = format!(
            "listen_addr = {proxy:?}\nadmin_addr = {admin:?}\nsite = \"witness\"\n\
             invoker_endpoints = {invokers:?}\nstate_file = {state:?}\nbind_ip = \"{bind_ip}\"\n",
            proxy = self.proxy,
            admin = self.admin,
            state = home.join(STATE_FILE).display().to_string(),
        );
        for (site, etcd) in sites {
            text.push_str(&format!(
                "[[sites]]\nsite = {site:?}\netcd_endpoints = [{etcd:?}]\n"
            ));
        }
        text
    }

    /// Writes `DIR/edge-router/edge-router.toml`; returns the spawn spec and the description.
    pub fn spec(
        &self,
        dir: &Path,
        bin: &Path,
        invokers: &[String],
        sites: &[(String, String)],
    ) -> Result<(SpawnSpec, ProcessInfo), LabError> {
        let home = dir.join(NAME);
        let (spec, config_path, home) = super::services::configured_child(
            dir,
            bin,
            NAME,
            "edge-router.toml",
            &self.config(&home, invokers, sites),
        )?;
        let listen = BTreeMap::from([
            (
                ProcessKind::Edge.main_addr_key().to_string(),
                self.proxy.clone(),
            ),
            ("admin".to_string(), self.admin.clone()),
        ]);
        let info = ProcessInfo {
            config: Some(config_path),
            ..ProcessInfo::planned(&spec, ProcessKind::Edge, "witness", listen, home)
        };
        Ok((spec, info))
    }
}

/// Healthy: the edge has a routing table (from the watch or its state file; when
/// `need_table`) and knows an instance in every site of `sites`.
pub(crate) async fn check(admin: &str, sites: &[&str], need_table: bool) -> Result<(), String> {
    let response = super::services::http_get(admin, "/routing").await?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .ok_or_else(|| format!("{admin}/routing: no body"))?;
    let routing: serde_json::Value =
        serde_json::from_str(body).map_err(|e| format!("{admin}/routing: {e}"))?;
    if need_table && routing["table"].is_null() {
        return Err(format!("{NAME} has no routing table yet"));
    }
    for site in sites {
        let known = routing["sites"][site]["instances"]
            .as_array()
            .map_or(0, Vec::len);
        if known == 0 {
            return Err(format!("{NAME} knows no instance in site {site} yet"));
        }
    }
    Ok(())
}

/// Ready as the edge itself says (`/readyz`): used after a restart, when the control plane
/// may be down and the table comes from the state file.
pub(crate) async fn ready(admin: &str) -> Result<(), String> {
    super::services::http_ready(admin).await
}
