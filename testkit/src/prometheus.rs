//! A Prometheus server of a run's own, Debian's (the package `scripts/promtool` unpacks; `PROMETHEUS` names
//! its binary): the shipped alerting rules evaluated over real scrapes of real relays, so a test sees an alert
//! fire as an on-call person would, and when.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::env::env_var;
use crate::free_port;
use crate::http::http;
use crate::servers::{temp_dir, Spawned};
use crate::wait::poll_every;

/// How long Prometheus may take to answer its API after starting.
const STARTUP: Duration = Duration::from_secs(30);
/// How often [`Prometheus::wait_firing`] asks.
const ASK_EVERY: Duration = Duration::from_millis(500);

/// A relay to scrape: `qx_relay` is its deployment's name, shared by its relays, and the job's.
pub struct Target<'a> {
    pub qx_relay: &'a str,
    /// Its metrics port on 127.0.0.1.
    pub port: u16,
}

/// A running `prometheus`, killed and its data removed on drop.
pub struct Prometheus {
    pub port: u16,
    process: Spawned,
    /// Target files written so far.
    files: usize,
}

impl Prometheus {
    /// Starts one that loads `rules`, scrapes what [`Self::scrape`] adds every `scrape` and evaluates the rules
    /// every `evaluate`.
    pub async fn start(rules: &Path, scrape: Duration, evaluate: Duration) -> Self {
        let (port, dir) = (free_port(), temp_dir("prometheus"));
        fs::create_dir(dir.join("targets")).expect("create the targets directory");
        // One job for every relay, named after its deployment as the PodMonitor names it; targets come from
        // files, so that a test can add a deployment when its outage starts, as a rollout would. YAML is a
        // superset of JSON.
        let config = serde_json::json!({
            "global": {
                "scrape_interval": format!("{}ms", scrape.as_millis()),
                "scrape_timeout": format!("{}ms", scrape.as_millis().min(1000)),
                "evaluation_interval": format!("{}ms", evaluate.as_millis()),
            },
            "rule_files": [rules.canonicalize().expect("the rules file")],
            "scrape_configs": [{
                "job_name": "qx-relay",
                "file_sd_configs": [{ "files": [dir.join("targets/*.json")], "refresh_interval": "1s" }],
                "relabel_configs": [{ "source_labels": ["qx_relay"], "target_label": "job" }],
            }],
        });
        let config_path = dir.join("prometheus.yml");
        fs::write(&config_path, config.to_string()).expect("write prometheus.yml");
        let log = fs::File::create(dir.join("server.log")).expect("create the server log");
        let child = Command::new(env_var("PROMETHEUS"))
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let server = Self { port, process: Spawned { child, dir }, files: 0 };
        let ready = poll_every(ASK_EVERY, STARTUP, || async {
            http(port, "GET", "/-/ready").await.filter(|response| response.status == 200)
        });
        assert!(ready.await.is_some(), "prometheus not ready within {STARTUP:?}:\n{}", server.log());
        server
    }

    /// Scrapes `targets` from now on, and until they are gone.
    pub fn scrape(&mut self, targets: &[Target<'_>]) {
        let groups: Vec<Value> = targets
            .iter()
            .map(|target| {
                serde_json::json!({
                    "targets": [format!("127.0.0.1:{}", target.port)],
                    "labels": { "qx_relay": target.qx_relay },
                })
            })
            .collect();
        self.files += 1;
        // Written whole, then renamed in: the server never reads half a file.
        let path = self.process.dir.join("targets").join(format!("{}.json", self.files));
        let partial = path.with_extension("partial");
        fs::write(&partial, Value::from(groups).to_string()).expect("write the targets");
        fs::rename(&partial, &path).expect("move the targets in place");
    }

    /// The alerts firing now, as `(alertname, qx_relay)`.
    pub async fn firing(&self) -> Vec<(String, String)> {
        let Some(response) = http(self.port, "GET", "/api/v1/alerts").await else { return Vec::new() };
        let body: Value = serde_json::from_str(&response.body).unwrap_or_default();
        let alerts = body["data"]["alerts"].as_array().cloned().unwrap_or_default();
        alerts
            .iter()
            .filter(|alert| alert["state"] == "firing")
            .map(|alert| {
                let label = |name: &str| alert["labels"][name].as_str().unwrap_or_default().to_owned();
                (label("alertname"), label("qx_relay"))
            })
            .collect()
    }

    /// Whether `alert` fires for the relays `qx_relay` now.
    pub async fn is_firing(&self, alert: &str, qx_relay: &str) -> bool {
        self.firing().await.iter().any(|(name, relay)| name == alert && relay == qx_relay)
    }

    /// Waits until `alert` fires for `qx_relay`; whether it did within `limit`.
    pub async fn wait_firing(&self, alert: &str, qx_relay: &str, limit: Duration) -> bool {
        poll_every(ASK_EVERY, limit, || async { self.is_firing(alert, qx_relay).await.then_some(()) })
            .await
            .is_some()
    }

    /// The server's log.
    pub fn log(&self) -> String {
        fs::read_to_string(self.process.dir.join("server.log")).unwrap_or_default()
    }
}
