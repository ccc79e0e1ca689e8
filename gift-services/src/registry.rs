//! Registration of a service instance in its site's etcd under a lease:
//! `/services/<service>/<site>/<instance>` → address.
//!
//! The instance never waits for etcd (the data plane does not block on the control plane):
//! registration runs in the background, retries with capped backoff while etcd is
//! unreachable, keeps the lease alive, and revokes it on shutdown so the key disappears at
//! once rather than after the TTL.

use std::time::Duration;

use etcd_client::{Client, PutOptions};
use tokio::sync::watch;

/// Longest wait between two registration attempts.
const MAX_BACKOFF_MS: u64 = 5_000;

#[derive(Debug, Clone)]
pub struct Registration {
    pub endpoints: Vec<String>,
    pub key: String,
    pub address: String,
    pub ttl_secs: i64,
}

/// Checks the registration settings every service's configuration shares.
pub fn validate_settings(instance: Option<&str>, ttl_secs: i64) -> Result<(), String> {
    if !(1..=300).contains(&ttl_secs) {
        return Err(format!(
            "registration_ttl_secs {ttl_secs} is out of range (1..=300)"
        ));
    }
    if let Some(instance) = instance {
        if instance.is_empty() || instance.contains('/') || instance.len() > 64 {
            return Err("instance must be 1-64 characters without '/'".into());
        }
    }
    Ok(())
}

impl Registration {
    pub fn key_for(service: &str, site: &str, instance: &str) -> String {
        format!("/services/{service}/{site}/{instance}")
    }

    /// The registration a service's configuration asks for: none without etcd endpoints;
    /// the instance name defaults to `<service>-<port>`.
    pub fn from_config(
        service: &str,
        site: &str,
        etcd_endpoints: &[String],
        instance: Option<&str>,
        port: u16,
        address: String,
        ttl_secs: i64,
    ) -> Option<Registration> {
        if etcd_endpoints.is_empty() {
            return None;
        }
        let instance = instance.map_or_else(|| format!("{service}-{port}"), str::to_string);
        Some(Registration {
            endpoints: etcd_endpoints.to_vec(),
            key: Registration::key_for(service, site, &instance),
            address,
            ttl_secs,
        })
    }

    /// Keeps the key registered until `stop` turns true, then revokes it.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut backoff_ms = 100;
        loop {
            let attempt = self.register_and_keep(&mut stop);
            match attempt.await {
                Ok(()) => return, // stopped and revoked
                Err(e) => {
                    tracing::warn!(key = %self.key, "etcd registration: {e}; retrying in {backoff_ms} ms");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(backoff_ms)) => {}
                () = stopped(&mut stop) => return,
            }
            backoff_ms = (backoff_ms * 2).min(MAX_BACKOFF_MS);
        }
    }

    async fn register_and_keep(
        &self,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), etcd_client::Error> {
        let mut client = Client::connect(&self.endpoints, None).await?;
        let lease = client.lease_grant(self.ttl_secs, None).await?.id();
        client
            .put(
                self.key.as_str(),
                self.address.as_str(),
                Some(PutOptions::new().with_lease(lease)),
            )
            .await?;
        tracing::info!(key = %self.key, address = %self.address, lease, "registered in etcd");
        let (mut keeper, mut responses) = client.lease_keep_alive(lease).await?;
        let interval = Duration::from_millis((self.ttl_secs.max(1) as u64) * 1000 / 3);
        loop {
            tokio::select! {
                () = stopped(stop) => {
                    if let Err(e) = client.lease_revoke(lease).await {
                        tracing::warn!(key = %self.key, "revoking the lease at shutdown: {e} (the key expires with its TTL)");
                    } else {
                        tracing::info!(key = %self.key, "deregistered from etcd");
                    }
                    return Ok(());
                }
                _ = tokio::time::sleep(interval) => {
                    keeper.keep_alive().await?;
                    match responses.message().await? {
                        Some(r) if r.ttl() > 0 => {}
                        // The lease expired (etcd was unreachable too long): register anew.
                        _ => return Err(etcd_client::Error::LeaseKeepAliveError("lease expired".into())),
                    }
                }
            }
        }
    }
}

/// Resolves when `stop` turns true (or its sender is gone). The guard `wait_for` returns is
/// dropped inside, so the future stays `Send`.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
