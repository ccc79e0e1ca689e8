use std::collections::{BTreeMap, BTreeSet};

use invoker_domain::{validate_id, ServiceClass};
use serde::{Deserialize, Serialize};

use crate::PolicyError;

/// The policy's configuration, read from TOML with [`PolicyConfig::from_toml_str`].
///
/// ```toml
/// sites = ["a", "b"]                 # default; exactly two serving sites
/// witness = "witness"                # default
/// edge_error_rate_threshold = 0.05   # default
///
/// [services.gift-api]
/// class = "stateless"
/// capacity_rps = { a = 5000, b = 5000 }
/// failback = { automatic = { stable_period_ms = 60000 } }
///
/// [services.wallet]
/// class = "strong"                   # failback stays "manual" (the default)
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    #[serde(default = "default_sites")]
    pub sites: Vec<String>,
    #[serde(default = "default_witness")]
    pub witness: String,
    /// An observer whose last report is older than this is silent. Unset: three times the
    /// largest `probe_interval_ms`, so that one or two lost reports do not count as silence.
    #[serde(default)]
    pub observer_silence_ms: Option<u64>,
    /// Error share (0..=1] of a site's edge traffic for a service above which that service
    /// counts as gray-failing there, once sustained for `gray_failure_window_ms`.
    #[serde(default = "default_edge_error_rate_threshold")]
    pub edge_error_rate_threshold: f64,
    /// Edge samples below this request rate carry no verdict: a handful of requests is noise.
    #[serde(default = "default_edge_min_request_rps")]
    pub edge_min_request_rps: u64,
    #[serde(default = "default_gray_failure_window_ms")]
    pub gray_failure_window_ms: u64,
    pub services: BTreeMap<String, ServiceConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub class: ServiceClass,
    #[serde(default = "default_probe_interval_ms")]
    pub probe_interval_ms: u64,
    #[serde(default = "default_streak")]
    pub failures_to_trip: u32,
    #[serde(default = "default_streak")]
    pub successes_to_clear: u32,
    #[serde(default = "default_hold_down_ms")]
    pub hold_down_ms: u64,
    #[serde(default)]
    pub failback: Failback,
    /// Requests per second each site can serve; a site without an entry is not checked.
    #[serde(default)]
    pub capacity_rps: BTreeMap<String, u64>,
}

/// How a stateless service returns to a site it was shifted away from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Failback {
    /// Only when an operator asks ([`crate::Policy::request_failback`]).
    #[default]
    Manual,
    /// Once the site has been healthy for `stable_period_ms` without a break.
    Automatic { stable_period_ms: u64 },
}

fn default_sites() -> Vec<String> {
    vec!["a".into(), "b".into()]
}
fn default_witness() -> String {
    "witness".into()
}
fn default_edge_error_rate_threshold() -> f64 {
    0.05
}
fn default_edge_min_request_rps() -> u64 {
    10
}
fn default_gray_failure_window_ms() -> u64 {
    10_000
}
fn default_probe_interval_ms() -> u64 {
    250
}
fn default_streak() -> u32 {
    3
}
fn default_hold_down_ms() -> u64 {
    30_000
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> PolicyError {
    PolicyError::InvalidConfig {
        key: key.into(),
        reason: reason.into(),
    }
}

fn positive(key: String, value: u64) -> Result<(), PolicyError> {
    if value == 0 {
        return Err(invalid(key, "must be above 0"));
    }
    Ok(())
}

impl PolicyConfig {
    /// Parses and validates a TOML document.
    pub fn from_toml_str(text: &str) -> Result<PolicyConfig, PolicyError> {
        let config: PolicyConfig =
            toml::from_str(text).map_err(|e| PolicyError::ConfigParse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// The silence threshold in force (see `observer_silence_ms`).
    pub fn effective_silence_ms(&self) -> u64 {
        self.observer_silence_ms.unwrap_or_else(|| {
            3 * self
                .services
                .values()
                .map(|s| s.probe_interval_ms)
                .max()
                .unwrap_or_else(default_probe_interval_ms)
        })
    }

    /// Checks the configuration on its own; errors name the offending key.
    pub fn validate(&self) -> Result<(), PolicyError> {
        // The classification reasons about "the peer": it needs exactly two serving sites.
        if self.sites.len() != 2 {
            return Err(invalid("sites", "must name exactly two serving sites"));
        }
        let mut ids = BTreeSet::new();
        for id in self.sites.iter().chain([&self.witness]) {
            validate_id("site id", id).map_err(|e| invalid("sites", e.to_string()))?;
            if !ids.insert(id) {
                return Err(invalid("sites", format!("{id:?} is named twice")));
            }
        }
        if let Some(ms) = self.observer_silence_ms {
            positive("observer_silence_ms".into(), ms)?;
        }
        let threshold = self.edge_error_rate_threshold;
        if !(threshold > 0.0 && threshold <= 1.0) {
            return Err(invalid("edge_error_rate_threshold", "must be in (0, 1]"));
        }
        positive("gray_failure_window_ms".into(), self.gray_failure_window_ms)?;
        if self.services.is_empty() {
            return Err(invalid("services", "must declare at least one service"));
        }
        for (name, service) in &self.services {
            let key = |field: &str| format!("services.{name}.{field}");
            validate_id("service name", name)
                .map_err(|e| invalid(format!("services.{name}"), e.to_string()))?;
            positive(key("probe_interval_ms"), service.probe_interval_ms)?;
            positive(key("failures_to_trip"), u64::from(service.failures_to_trip))?;
            positive(
                key("successes_to_clear"),
                u64::from(service.successes_to_clear),
            )?;
            // Zero would turn the anti-flap guardrail off.
            positive(key("hold_down_ms"), service.hold_down_ms)?;
            match (service.class, service.failback) {
                (ServiceClass::Strong, Failback::Automatic { .. }) => {
                    return Err(invalid(
                        key("failback"),
                        "must be \"manual\" for a strong service: its writer moves only by an approved failover",
                    ))
                }
                (_, Failback::Automatic { stable_period_ms }) => {
                    positive(key("failback.automatic.stable_period_ms"), stable_period_ms)?
                }
                (_, Failback::Manual) => {}
            }
            for site in service.capacity_rps.keys() {
                if !self.sites.contains(site) {
                    return Err(invalid(
                        key("capacity_rps"),
                        format!("names {site:?}, which is not a serving site"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The other serving site.
    pub fn peer_of(&self, site: &str) -> Option<&str> {
        match self.sites.as_slice() {
            [a, b] if a == site => Some(b),
            [a, b] if b == site => Some(a),
            _ => None,
        }
    }

    pub(crate) fn is_site(&self, site: &str) -> bool {
        self.sites.iter().any(|s| s == site)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    const MINIMAL: &str = "[services.gift-api]\nclass = \"stateless\"\n";

    fn key_of(text: &str) -> String {
        match PolicyConfig::from_toml_str(text).unwrap_err() {
            PolicyError::InvalidConfig { key, .. } => key,
            other => panic!("expected InvalidConfig, got {other}"),
        }
    }

    #[test]
    fn defaults_fill_everything_but_the_services() {
        let c = PolicyConfig::from_toml_str(MINIMAL).unwrap();
        assert_eq!(c.sites, ["a", "b"]);
        assert_eq!(c.witness, "witness");
        assert_eq!(c.effective_silence_ms(), 750);
        let s = &c.services["gift-api"];
        assert_eq!(
            (
                s.probe_interval_ms,
                s.failures_to_trip,
                s.successes_to_clear
            ),
            (250, 3, 3)
        );
        assert_eq!(s.hold_down_ms, 30_000);
        assert_eq!(s.failback, Failback::Manual);
        assert_eq!(c.peer_of("a"), Some("b"));
        assert_eq!(c.peer_of("witness"), None);
    }

    #[test]
    fn automatic_failback_and_capacity_parse() {
        let text = format!(
            "{MINIMAL}capacity_rps = {{ a = 10, b = 20 }}\nfailback = {{ automatic = {{ stable_period_ms = 5000 }} }}\n"
        );
        let c = PolicyConfig::from_toml_str(&text).unwrap();
        let s = &c.services["gift-api"];
        assert_eq!(
            s.failback,
            Failback::Automatic {
                stable_period_ms: 5000
            }
        );
        assert_eq!(s.capacity_rps["b"], 20);
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = PolicyConfig::from_toml_str(&format!("{MINIMAL}colour = \"red\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("colour"), "{err}");
        let err = PolicyConfig::from_toml_str(&format!(
            "{MINIMAL}failback = {{ automatic = {{ stable_ms = 1 }} }}\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("stable_ms"), "{err}");
    }

    #[test]
    fn invalid_values_name_their_key() {
        assert_eq!(key_of("services = {}"), "services");
        assert_eq!(key_of(&format!("sites = [\"a\"]\n{MINIMAL}")), "sites");
        assert_eq!(
            key_of(&format!("witness = \"a\"\n{MINIMAL}")),
            "sites",
            "the witness cannot be a serving site"
        );
        assert_eq!(
            key_of(&format!("edge_error_rate_threshold = 1.5\n{MINIMAL}")),
            "edge_error_rate_threshold"
        );
        assert_eq!(
            key_of(&format!("{MINIMAL}failures_to_trip = 0\n")),
            "services.gift-api.failures_to_trip"
        );
        assert_eq!(
            key_of(&format!("{MINIMAL}hold_down_ms = 0\n")),
            "services.gift-api.hold_down_ms"
        );
        assert_eq!(
            key_of(&format!("{MINIMAL}capacity_rps = {{ witness = 1 }}\n")),
            "services.gift-api.capacity_rps"
        );
        assert_eq!(
            key_of(
                "[services.wallet]\nclass = \"strong\"\nfailback = { automatic = { stable_period_ms = 1 } }\n"
            ),
            "services.wallet.failback"
        );
    }
}
