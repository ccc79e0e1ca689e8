//! The wallet service in each site: configured to write to the primary with epoch 1, and
//! registered in its site's etcd.

use std::collections::BTreeMap;
use std::path::Path;

use super::describe::{ProcessInfo, ProcessKind, LOGS_DIR};
use super::proc::SpawnSpec;
use super::{site_ip, LabError};

/// Host part of the wallet's addresses in its site's range.
const WALLET_HOST: u8 = 4;

#[derive(Debug, Clone)]
pub(crate) struct WalletPlan {
    pub site: String,
    pub grpc: String,
    pub metrics: String,
}

fn free_addr(site: &str) -> Result<String, LabError> {
    let ip = site_ip(site, WALLET_HOST);
    let listener = std::net::TcpListener::bind((ip, 0))
        .map_err(|e| LabError::io(format!("finding a free port on {ip}"), e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| LabError::io(format!("finding a free port on {ip}"), e))?;
    Ok(addr.to_string())
}

impl WalletPlan {
    pub fn new(site: &str) -> Result<WalletPlan, LabError> {
        Ok(WalletPlan {
            site: site.to_string(),
            grpc: free_addr(site)?,
            metrics: free_addr(site)?,
        })
    }

    pub fn name(&self) -> String {
        format!("wallet-{}", self.site)
    }

    /// The etcd key the instance registers under.
    pub fn key(&self) -> String {
        format!("/services/wallet/{}/{}", self.site, self.name())
    }

    /// Writes `DIR/wallet-<site>/wallet.toml`; returns the spawn spec and the description.
    pub fn spec(
        &self,
        dir: &Path,
        bin: &Path,
        database_url: &str,
        etcd: Option<&str>,
    ) -> Result<(SpawnSpec, ProcessInfo), LabError> {
        let name = self.name();
        let home = dir.join(&name);
        std::fs::create_dir_all(&home)
            .map_err(|e| LabError::io(format!("creating {}", home.display()), e))?;
        let mut config = format!(
            "site = {site:?}\nlisten_addr = {grpc:?}\nmetrics_addr = {metrics:?}\n\
             database_url = {database_url:?}\nepoch = 1\nmigrate = true\ninstance = {name:?}\n",
            site = self.site,
            grpc = self.grpc,
            metrics = self.metrics,
        );
        if let Some(etcd) = etcd {
            config.push_str(&format!("etcd_endpoints = [{etcd:?}]\n"));
        }
        let config_path = home.join("wallet.toml");
        std::fs::write(&config_path, config)
            .map_err(|e| LabError::io(format!("writing {}", config_path.display()), e))?;
        let log = dir.join(LOGS_DIR).join(format!("{name}.log"));
        let spec = SpawnSpec {
            name: name.clone(),
            program: bin.to_path_buf(),
            args: vec!["--config".into(), config_path.display().to_string()],
            env: BTreeMap::new(),
            run_as: None,
            cwd: dir.to_path_buf(),
            log: log.clone(),
            lab_dir: dir.to_path_buf(),
        };
        let listen = BTreeMap::from([
            ("grpc".to_string(), self.grpc.clone()),
            ("metrics".to_string(), self.metrics.clone()),
        ]);
        let info = ProcessInfo {
            config: Some(config_path),
            ..ProcessInfo::planned(&spec, ProcessKind::Wallet, &self.site, listen, home)
        };
        Ok((spec, info))
    }

    /// Healthy: the gRPC port accepts connections and the instance is registered.
    pub async fn check(&self, etcd: Option<&str>) -> Result<(), String> {
        tokio::net::TcpStream::connect(&self.grpc)
            .await
            .map_err(|e| format!("{}: {e}", self.grpc))?;
        let Some(etcd) = etcd else {
            return Ok(());
        };
        let mut client = etcd_client::Client::connect([etcd], None)
            .await
            .map_err(|e| format!("{etcd}: {e}"))?;
        let found = client
            .get(self.key(), None)
            .await
            .map_err(|e| format!("{etcd}: {e}"))?;
        if found.kvs().is_empty() {
            return Err(format!("{} not registered in {etcd} yet", self.key()));
        }
        Ok(())
    }
}
