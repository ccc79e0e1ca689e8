//! Which instances run where: read from each site's etcd, where every instance registers
//! `/services/<service>/<site>/<instance>` → address under a lease (so a dead instance
//! disappears when its lease ends).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions};
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

use crate::AgentError;

/// The registry's prefix.
pub const SERVICES_PREFIX: &str = "/services/";

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Instance {
    pub service: String,
    pub site: String,
    pub instance: String,
    /// `http://host:port` (HTTP services) or `host:port` (gRPC services).
    pub address: String,
}

/// Parses one registry entry; `None` for keys of another shape (skipped, not fatal).
pub fn parse_entry(key: &str, value: &str) -> Option<Instance> {
    let rest = key.strip_prefix(SERVICES_PREFIX)?;
    let mut parts = rest.split('/');
    let (service, site, instance) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some()
        || [service, site, instance, value]
            .iter()
            .any(|p| p.is_empty())
    {
        return None;
    }
    Some(Instance {
        service: service.to_string(),
        site: site.to_string(),
        instance: instance.to_string(),
        address: value.to_string(),
    })
}

/// The instances registered in one site's etcd for that site, by (service, instance).
pub async fn discover(
    site: &str,
    endpoints: &[String],
    timeout: Duration,
) -> Result<BTreeMap<(String, String), Instance>, AgentError> {
    discover_from(site, endpoints, timeout, None).await
}

/// [`discover`], connecting from `bind_ip` when given (the caller's address in its own
/// location's range, so that a partition of that range cuts these reads too).
pub async fn discover_from(
    site: &str,
    endpoints: &[String],
    timeout: Duration,
    bind_ip: Option<IpAddr>,
) -> Result<BTreeMap<(String, String), Instance>, AgentError> {
    let fail = |message: String| AgentError::Etcd {
        endpoints: endpoints.join(","),
        message,
    };
    let options = ConnectOptions::new()
        .with_connect_timeout(timeout)
        .with_timeout(timeout);
    let mut client = match bind_ip {
        None => Client::connect(endpoints, Some(options))
            .await
            .map_err(|e| fail(e.to_string()))?,
        Some(ip) => {
            // etcd-client cannot bind a source address itself; a channel built here can.
            let mut channels = Vec::with_capacity(endpoints.len());
            for endpoint in endpoints {
                let e = Endpoint::from_shared(endpoint.clone())
                    .map_err(|e| fail(format!("{endpoint}: {e}")))?
                    .connect_timeout(timeout)
                    .timeout(timeout)
                    .tcp_nodelay(true)
                    .local_address(Some(ip));
                channels.push(e);
            }
            if channels.is_empty() {
                return Err(fail("no endpoints".into()));
            }
            let channel = Channel::balance_list(channels.into_iter());
            Client::from_channel(etcd_client::Channel::Tonic(channel), Some(options))
                .await
                .map_err(|e| fail(e.to_string()))?
        }
    };
    let found = client
        .get(SERVICES_PREFIX, Some(GetOptions::new().with_prefix()))
        .await
        .map_err(|e| fail(e.to_string()))?;
    let mut instances = BTreeMap::new();
    for kv in found.kvs() {
        let (Ok(key), Ok(value)) = (kv.key_str(), kv.value_str()) else {
            continue;
        };
        match parse_entry(key, value) {
            // A site's registry lists that site's instances; anything else is ignored.
            Some(i) if i.site == site => {
                instances.insert((i.service.clone(), i.instance.clone()), i);
            }
            Some(_) => {}
            None => tracing::debug!(key, "not a service registration"),
        }
    }
    Ok(instances)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_keys_parse_strictly() {
        let i = parse_entry("/services/gift-api/a/gift-api-a", "http://127.0.1.5:1");
        assert_eq!(
            i,
            Some(Instance {
                service: "gift-api".into(),
                site: "a".into(),
                instance: "gift-api-a".into(),
                address: "http://127.0.1.5:1".into(),
            })
        );
        for (key, value) in [
            ("/services/gift-api/a", "x"),
            ("/services/gift-api/a/i/extra", "x"),
            ("/other/gift-api/a/i", "x"),
            ("/services//a/i", "x"),
            ("/services/gift-api/a/i", ""),
        ] {
            assert_eq!(parse_entry(key, value), None, "{key}");
        }
    }
}
