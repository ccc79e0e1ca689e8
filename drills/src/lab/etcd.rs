//! One single-member etcd per site (not a cluster across sites).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use super::describe::{ProcessInfo, ProcessKind, LOGS_DIR};
use super::proc::SpawnSpec;

#[derive(Debug, Clone)]
pub(crate) struct EtcdPlan {
    pub site: String,
    /// `ip:port`
    pub client: String,
    pub peer: String,
}

impl EtcdPlan {
    pub fn name(&self) -> String {
        format!("etcd-{}", self.site)
    }

    pub fn client_url(&self) -> String {
        format!("http://{}", self.client)
    }

    fn peer_url(&self) -> String {
        format!("http://{}", self.peer)
    }

    /// The spawn spec and the description (pid fields still empty).
    pub fn spec(&self, dir: &Path, bin: &Path) -> (SpawnSpec, ProcessInfo) {
        let name = self.name();
        let data_dir = dir.join(&name);
        let log = dir.join(LOGS_DIR).join(format!("{name}.log"));
        let client = self.client_url();
        let peer = self.peer_url();
        let args = vec![
            "--name".to_string(),
            name.clone(),
            "--data-dir".to_string(),
            data_dir.display().to_string(),
            "--listen-client-urls".to_string(),
            client.clone(),
            "--advertise-client-urls".to_string(),
            client,
            "--listen-peer-urls".to_string(),
            peer.clone(),
            "--initial-advertise-peer-urls".to_string(),
            peer.clone(),
            "--initial-cluster".to_string(),
            format!("{name}={peer}"),
            "--initial-cluster-state".to_string(),
            "new".to_string(),
            "--initial-cluster-token".to_string(),
            format!("lab-{name}"),
            "--logger".to_string(),
            "zap".to_string(),
        ];
        let spec = SpawnSpec {
            name: name.clone(),
            program: bin.to_path_buf(),
            args,
            env: BTreeMap::new(),
            run_as: None,
            cwd: dir.to_path_buf(),
            log: log.clone(),
            lab_dir: dir.to_path_buf(),
        };
        let listen = BTreeMap::from([
            ("client".to_string(), self.client.clone()),
            ("peer".to_string(), self.peer.clone()),
        ]);
        let info = ProcessInfo::planned(&spec, ProcessKind::Etcd, &self.site, listen, data_dir);
        (spec, info)
    }
}

/// Healthy = a key can be written and read back.
pub(crate) async fn check(url: &str) -> Result<(), String> {
    let options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(1))
        .with_timeout(Duration::from_secs(2));
    let mut client = etcd_client::Client::connect([url], Some(options))
        .await
        .map_err(|e| format!("{url}: connect: {e}"))?;
    client
        .put("lab/health", "ok", None)
        .await
        .map_err(|e| format!("{url}: put: {e}"))?;
    let got = client
        .get("lab/health", None)
        .await
        .map_err(|e| format!("{url}: get: {e}"))?;
    if got.kvs().first().map(|kv| kv.value()) == Some(b"ok".as_slice()) {
        Ok(())
    } else {
        Err(format!("{url}: lab/health did not read back"))
    }
}
