//! The edge router's configuration: a TOML file plus `EDGE_ROUTER_*` environment overrides.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::EdgeError;

/// One site the edge sends traffic to: where its instances are registered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    pub site: String,
    /// The site's etcd (client URLs, `http://host:port`).
    pub etcd_endpoints: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    /// The proxy: every path is forwarded, so nothing of the edge's own is served here.
    pub listen_addr: SocketAddr,
    /// `/metrics`, `/healthz`, `/readyz`, `/routing`.
    pub admin_addr: SocketAddr,
    /// The service proxied (its routing table and its registry entries).
    #[serde(default = "default_service")]
    pub service: String,
    /// The edge's own location, as it introduces itself to the invoker (`witness` in the lab).
    pub site: String,
    #[serde(default = "default_agent_id")]
    pub agent_id: String,
    /// Invoker nodes (`host:port`): any of them serves the routing watch; reports follow the
    /// leader.
    pub invoker_endpoints: Vec<String>,
    pub sites: Vec<SiteConfig>,
    /// The last routing table seen, written atomically at every change and read at start.
    pub state_file: PathBuf,
    /// Source address of every outgoing connection (upstreams, etcd, invoker), so that a
    /// partition of the edge's address range cuts them all. Default: the system's choice.
    #[serde(default)]
    pub bind_ip: Option<IpAddr>,
    #[serde(default = "default_report_interval_ms")]
    pub report_interval_ms: u64,
    /// Connecting to an upstream instance; past it the attempt is a connection failure.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// One upstream exchange, from sending the request to the end of the response.
    #[serde(default = "default_upstream_timeout_ms")]
    pub upstream_timeout_ms: u64,
    /// How often each site's registry is re-read.
    #[serde(default = "default_discovery_interval_ms")]
    pub discovery_interval_ms: u64,
    /// Request bodies are buffered (so they can be re-sent) up to this size; larger: 413.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// An instance whose connection failed is not picked again for this long.
    #[serde(default = "default_failed_instance_skip_ms")]
    pub failed_instance_skip_ms: u64,
    /// After SIGTERM, in-flight requests get this long to finish.
    #[serde(default = "default_shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
}

fn default_service() -> String {
    "gift-api".into()
}
fn default_agent_id() -> String {
    "edge".into()
}
fn default_report_interval_ms() -> u64 {
    500
}
fn default_connect_timeout_ms() -> u64 {
    200
}
fn default_upstream_timeout_ms() -> u64 {
    5_000
}
fn default_discovery_interval_ms() -> u64 {
    1_000
}
fn default_max_body_bytes() -> usize {
    1024 * 1024
}
fn default_failed_instance_skip_ms() -> u64 {
    1_000
}
fn default_shutdown_grace_ms() -> u64 {
    10_000
}

fn in_range(name: &str, value: u64, min: u64, max: u64) -> Result<(), EdgeError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(EdgeError::Config(format!(
            "{name} {value} is out of range ({min}..={max})"
        )))
    }
}

impl EdgeConfig {
    pub fn load(path: Option<&Path>) -> Result<EdgeConfig, EdgeError> {
        let config: EdgeConfig =
            telemetry::service::load_config(path, "EDGE_ROUTER_").map_err(EdgeError::Config)?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), EdgeError> {
        let bad = |m: String| Err(EdgeError::Config(m));
        if self.listen_addr == self.admin_addr {
            return bad(format!(
                "listen_addr and admin_addr are both {}: the proxy forwards every path, so the admin endpoints need their own port",
                self.listen_addr
            ));
        }
        invoker_domain::validate_id("service", &self.service)
            .map_err(|e| EdgeError::Config(e.to_string()))?;
        for (name, value) in [("site", &self.site), ("agent_id", &self.agent_id)] {
            if value.is_empty() || value.len() > 64 {
                return bad(format!("{name} must be 1-64 characters"));
            }
        }
        if self.invoker_endpoints.is_empty() {
            return bad("invoker_endpoints must list at least one invoker node".into());
        }
        if self.invoker_endpoints.iter().any(|e| e.trim().is_empty()) {
            return bad("invoker_endpoints has an empty entry".into());
        }
        if self.sites.is_empty() {
            return bad("sites must list at least one site to route to".into());
        }
        let mut seen = BTreeSet::new();
        for s in &self.sites {
            invoker_domain::validate_id("site", &s.site)
                .map_err(|e| EdgeError::Config(format!("sites: {e}")))?;
            if !seen.insert(&s.site) {
                return bad(format!("site {:?} is listed twice in sites", s.site));
            }
            if s.etcd_endpoints.is_empty() {
                return bad(format!("sites.{}.etcd_endpoints is empty", s.site));
            }
            if let Some(e) = s.etcd_endpoints.iter().find(|e| !e.starts_with("http://")) {
                return bad(format!(
                    "sites.{}.etcd_endpoints: {e:?} must be an http:// URL",
                    s.site
                ));
            }
        }
        if self.state_file.as_os_str().is_empty() || self.state_file.file_name().is_none() {
            return bad("state_file must name a file".into());
        }
        in_range("report_interval_ms", self.report_interval_ms, 50, 60_000)?;
        in_range("connect_timeout_ms", self.connect_timeout_ms, 1, 10_000)?;
        in_range("upstream_timeout_ms", self.upstream_timeout_ms, 1, 300_000)?;
        in_range(
            "discovery_interval_ms",
            self.discovery_interval_ms,
            100,
            60_000,
        )?;
        in_range(
            "max_body_bytes",
            u64::try_from(self.max_body_bytes).unwrap_or(u64::MAX),
            1,
            64 * 1024 * 1024,
        )?;
        in_range(
            "failed_instance_skip_ms",
            self.failed_instance_skip_ms,
            0,
            60_000,
        )?;
        in_range("shutdown_grace_ms", self.shutdown_grace_ms, 0, 300_000)?;
        if self.upstream_timeout_ms < self.connect_timeout_ms {
            return bad(format!(
                "upstream_timeout_ms {} must be at least connect_timeout_ms {}",
                self.upstream_timeout_ms, self.connect_timeout_ms
            ));
        }
        Ok(())
    }

    /// The configured site names, in configuration order.
    pub fn site_names(&self) -> Vec<String> {
        self.sites.iter().map(|s| s.site.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> EdgeConfig {
        toml::from_str(
            r#"
            listen_addr = "127.0.3.10:8080"
            admin_addr = "127.0.3.10:8081"
            site = "witness"
            invoker_endpoints = ["127.0.3.1:7000"]
            state_file = "/tmp/edge/routing.json"
            [[sites]]
            site = "a"
            etcd_endpoints = ["http://127.0.1.2:2379"]
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
        c.validate().unwrap();
        assert_eq!(c.service, "gift-api");
        assert_eq!(c.agent_id, "edge");
        assert_eq!(c.report_interval_ms, 500);
        assert_eq!(c.connect_timeout_ms, 200);
        assert_eq!(c.upstream_timeout_ms, 5_000);
        assert_eq!(c.discovery_interval_ms, 1_000);
        assert_eq!(c.max_body_bytes, 1024 * 1024);
        assert_eq!(c.site_names(), vec!["a", "b"]);
        let cases: Vec<(EdgeConfig, &str)> = vec![
            (
                EdgeConfig {
                    admin_addr: c.listen_addr,
                    ..c.clone()
                },
                "own port",
            ),
            (
                EdgeConfig {
                    service: "Gift API".into(),
                    ..c.clone()
                },
                "service",
            ),
            (
                EdgeConfig {
                    invoker_endpoints: vec![],
                    ..c.clone()
                },
                "invoker_endpoints",
            ),
            (
                EdgeConfig {
                    sites: vec![],
                    ..c.clone()
                },
                "at least one site",
            ),
            (
                EdgeConfig {
                    sites: vec![c.sites[0].clone(), c.sites[0].clone()],
                    ..c.clone()
                },
                "twice",
            ),
            (
                EdgeConfig {
                    sites: vec![SiteConfig {
                        site: "a".into(),
                        etcd_endpoints: vec!["127.0.1.2:2379".into()],
                    }],
                    ..c.clone()
                },
                "http://",
            ),
            (
                EdgeConfig {
                    connect_timeout_ms: 0,
                    ..c.clone()
                },
                "connect_timeout_ms",
            ),
            (
                EdgeConfig {
                    upstream_timeout_ms: 100,
                    connect_timeout_ms: 200,
                    ..c.clone()
                },
                "at least connect_timeout_ms",
            ),
            (
                EdgeConfig {
                    max_body_bytes: 0,
                    ..c.clone()
                },
                "max_body_bytes",
            ),
            (
                EdgeConfig {
                    report_interval_ms: 10,
                    ..c.clone()
                },
                "report_interval_ms",
            ),
        ];
        for (bad, needle) in cases {
            match bad.validate() {
                Err(EdgeError::Config(m)) => assert!(m.contains(needle), "{needle}: {m}"),
                other => panic!("expected a config error with {needle:?}, got {other:?}"),
            }
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        let text = "listen_adr = \"127.0.0.1:1\"\n";
        assert!(toml::from_str::<EdgeConfig>(text).is_err());
    }
}
