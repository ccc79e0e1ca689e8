//! The gift services in each site: the wallet (gRPC, writes to the writer the invoker
//! publishes in the site's etcd; the primary with epoch 1 until then) and gift-api (HTTP,
//! orders on the same writer, reads from the site's own database, wallets of its own site
//! first), each registered in its site's etcd under `/services/<service>/<site>/<instance>`.

use std::collections::BTreeMap;
use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::describe::{ProcessInfo, ProcessKind, LOGS_DIR};
use super::proc::SpawnSpec;
use super::{site_ip, LabError};

pub(crate) fn free_addr(site: &str, host: u8) -> Result<String, LabError> {
    let ip = site_ip(site, host);
    let listener = std::net::TcpListener::bind((ip, 0))
        .map_err(|e| LabError::io(format!("finding a free port on {ip}"), e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| LabError::io(format!("finding a free port on {ip}"), e))?;
    Ok(addr.to_string())
}

/// Where the services of one site find what they depend on.
#[derive(Debug, Clone)]
pub(crate) struct SiteDeps {
    /// The writer (the primary), for every site.
    pub primary_url: String,
    /// The site's own database when it is a replica (reads that tolerate staleness).
    pub replica_url: Option<String>,
    /// The site's etcd (registration).
    pub etcd: Option<String>,
    /// Wallet gRPC addresses, this site's first.
    pub wallets: Vec<String>,
}

#[derive(Debug, Clone)]
pub(crate) struct ServicePlan {
    pub kind: ProcessKind,
    pub site: String,
    /// gRPC (wallet) or HTTP (gift-api) `host:port`.
    pub addr: String,
    /// The wallet's separate metrics endpoint (gift-api serves `/metrics` on `addr`).
    pub metrics: Option<String>,
}

impl ServicePlan {
    pub fn wallet(site: &str) -> Result<ServicePlan, LabError> {
        Ok(ServicePlan {
            kind: ProcessKind::Wallet,
            site: site.to_string(),
            addr: free_addr(site, 4)?,
            metrics: Some(free_addr(site, 4)?),
        })
    }

    pub fn gift_api(site: &str) -> Result<ServicePlan, LabError> {
        Ok(ServicePlan {
            kind: ProcessKind::GiftApi,
            site: site.to_string(),
            addr: free_addr(site, 5)?,
            metrics: None,
        })
    }

    fn service(&self) -> &'static str {
        match self.kind {
            ProcessKind::GiftApi => "gift-api",
            _ => "wallet",
        }
    }

    pub fn name(&self) -> String {
        format!("{}-{}", self.service(), self.site)
    }

    /// gift-api's base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The etcd key the instance registers under.
    pub fn key(&self) -> String {
        format!("/services/{}/{}/{}", self.service(), self.site, self.name())
    }

    fn config(&self, deps: &SiteDeps) -> String {
        let name = self.name();
        let mut config = format!(
            "site = {site:?}\nlisten_addr = {addr:?}\ndatabase_url = {db:?}\nmigrate = true\ninstance = {name:?}\n",
            site = self.site,
            addr = self.addr,
            db = deps.primary_url,
        );
        match self.kind {
            ProcessKind::GiftApi => {
                config.push_str(&format!("wallet_endpoints = {:?}\n", deps.wallets));
                // Two cores for the whole lab: more connections only add context switches.
                config.push_str("pool_size = 16\n");
                if let Some(replica) = &deps.replica_url {
                    config.push_str(&format!("replica_url = {replica:?}\n"));
                }
            }
            _ => {
                config.push_str("epoch = 1\n");
                if let Some(metrics) = &self.metrics {
                    config.push_str(&format!("metrics_addr = {metrics:?}\n"));
                }
            }
        }
        if let Some(etcd) = &deps.etcd {
            config.push_str(&format!("etcd_endpoints = [{etcd:?}]\n"));
            // The writer (and a pending failover) as the invoker publishes it in the site's
            // etcd; the fixed database_url above serves until the first document arrives.
            config.push_str("writer_key = \"/invoker/writers/wallet\"\n");
        }
        config
    }

    /// Writes `DIR/<name>/<service>.toml`; returns the spawn spec and the description.
    pub fn spec(
        &self,
        dir: &Path,
        bin: &Path,
        deps: &SiteDeps,
    ) -> Result<(SpawnSpec, ProcessInfo), LabError> {
        let (spec, config_path, home) = configured_child(
            dir,
            bin,
            &self.name(),
            &format!("{}.toml", self.service()),
            &self.config(deps),
        )?;
        let mut listen =
            BTreeMap::from([(self.kind.main_addr_key().to_string(), self.addr.clone())]);
        if let Some(metrics) = &self.metrics {
            listen.insert("metrics".to_string(), metrics.clone());
        }
        let info = ProcessInfo {
            config: Some(config_path),
            ..ProcessInfo::planned(&spec, self.kind, &self.site, listen, home)
        };
        Ok((spec, info))
    }

    /// Healthy: serving (the wallet's port accepts connections; gift-api's `/readyz` says
    /// ready) and registered in the site's etcd.
    pub async fn check(&self, etcd: Option<&str>) -> Result<(), String> {
        match self.kind {
            ProcessKind::GiftApi => http_ready(&self.addr).await?,
            _ => {
                tokio::net::TcpStream::connect(&self.addr)
                    .await
                    .map_err(|e| format!("{}: {e}", self.addr))?;
            }
        }
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

/// A lab child configured by one TOML file: writes `DIR/<name>/<file_name>` and returns the
/// spawn spec (`<bin> --config <file>`, logging to `DIR/logs/<name>.log`), the config's path
/// and the child's home directory.
pub(crate) fn configured_child(
    dir: &Path,
    bin: &Path,
    name: &str,
    file_name: &str,
    config: &str,
) -> Result<(SpawnSpec, std::path::PathBuf, std::path::PathBuf), LabError> {
    let home = dir.join(name);
    std::fs::create_dir_all(&home)
        .map_err(|e| LabError::io(format!("creating {}", home.display()), e))?;
    let config_path = home.join(file_name);
    std::fs::write(&config_path, config)
        .map_err(|e| LabError::io(format!("writing {}", config_path.display()), e))?;
    let spec = SpawnSpec {
        name: name.to_string(),
        program: bin.to_path_buf(),
        args: vec!["--config".into(), config_path.display().to_string()],
        env: BTreeMap::new(),
        run_as: None,
        cwd: dir.to_path_buf(),
        log: dir.join(LOGS_DIR).join(format!("{name}.log")),
        lab_dir: dir.to_path_buf(),
    };
    Ok((spec, config_path, home))
}

/// A bare HTTP/1.0 GET (the lab needs no HTTP client): the whole response, or why not.
pub(crate) async fn http_get(addr: &str, path: &str) -> Result<String, String> {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    Ok(String::from_utf8_lossy(&response).into_owned())
}

/// `GET /readyz` answers 200.
pub(crate) async fn http_ready(addr: &str) -> Result<(), String> {
    let response = http_get(addr, "/readyz").await?;
    if response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200") {
        Ok(())
    } else {
        Err(format!(
            "{addr}/readyz: {}",
            response.lines().next().unwrap_or("no answer")
        ))
    }
}
