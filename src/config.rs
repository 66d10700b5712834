//! The cluster configuration: one TOML file describes every node of a
//! cluster, its secrets, its history and its limits; `ripple serve --config
//! FILE --node ID` runs one node of it.
//!
//! Every field has a default, so a file only states what differs. The
//! built-in defaults ([`Config::development`]) describe a single node on
//! 127.0.0.1 whose secrets are public knowledge: they are for development
//! only, and the node says so when it starts.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Secrets every development node shares. Public, so never for production.
pub const DEV_SECRET: &str = "ripple-development-secret-do-not-use-in-production";
pub const DEV_PUBLISH_KEY: &str = "dev-publish-key";

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {source}")]
    Parse {
        path: String,
        source: toml::de::Error,
    },
    #[error("node {0:?} is not in the config; the config lists: {1}")]
    UnknownNode(String, String),
    #[error("invalid config: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub cluster: ClusterConfig,
    pub history: HistoryConfig,
    pub limits: Limits,
    pub nodes: Vec<NodeConfig>,
}

/// Secrets and switches shared by every node of the cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Key of the MAC over every frame between nodes.
    pub secret: String,
    /// HS256 secret that client tokens (JWT) are signed with.
    pub jwt_secret: String,
    /// Keys a publisher may present as `Authorization: Bearer <key>`.
    pub publish_keys: Vec<String>,
    /// Serves `/v1/dev` (a ready-made token and publish key) for the demo
    /// page and the CLI. Never turn this on where the node is reachable by
    /// anyone but you.
    pub dev: bool,
    /// HTTP worker threads per node. One is the fastest per CPU second: the
    /// Router is one actor on one thread, and sessions on the same thread get
    /// their changes without crossing threads.
    pub http_workers: usize,
}

/// How much history a node keeps so that clients can resume.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// Changes kept, over all origins. Default 100,000.
    pub max_changes: usize,
    /// Seconds a change is kept. Default 3,600 (one hour).
    pub max_age_secs: u64,
}

/// Limits on what clients and publishers may ask of a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest WebSocket frame a client may send, in bytes. Default 64 KiB.
    pub max_frame_bytes: usize,
    /// Interests one connection may hold. Default 1,000.
    pub max_interests: usize,
    /// Open WebSocket connections per node. Default 19,000 (a process here
    /// may open at most 20,000 files).
    pub max_connections: usize,
    /// Largest publish request body, in bytes. Default 1 MiB.
    pub max_publish_bytes: usize,
    /// Changes in one publish request. Default 1,000.
    pub max_batch: usize,
    /// Bytes a session may have queued towards a client that does not read
    /// before it is closed with 4008. Default 1 MiB.
    pub outbound_budget_bytes: usize,
    /// Milliseconds a client has to send `hello` after the upgrade. Default
    /// 5,000.
    pub hello_timeout_ms: u64,
    /// Milliseconds between WebSocket pings. Default 25,000, as Centrifugo and
    /// Socket.IO do: often enough for proxies that drop idle connections
    /// after a minute, and a ping costs a send and a pong per connection, a
    /// load that grows with idle connections, not with traffic (at 10 s,
    /// 50,000 connections cost a node as many sends as 5,000 deliveries/s).
    pub ping_interval_ms: u64,
    /// Milliseconds without any frame from the client before the node
    /// closes the connection. Default 50,000: with the pings' rounding, a
    /// dead connection is gone at most 100 s after its last frame, holding
    /// at most its outbound budget meanwhile.
    pub idle_timeout_ms: u64,
}

/// One node: its id and the addresses it listens on.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub id: String,
    /// HTTP and WebSocket listen address, `host:port`.
    pub http: String,
    /// URL clients should use to reach this node, when it differs from
    /// `ws://{http}/v1/ws` (behind a proxy, say).
    #[serde(default)]
    pub public_url: Option<String>,
    /// ZeroMQ PUB address peers subscribe to, `tcp://host:port`.
    #[serde(default)]
    pub bus: Option<String>,
    /// ZeroMQ REP address peers ask for missing changes.
    #[serde(default)]
    pub repair: Option<String>,
    /// ZeroMQ PULL address high-rate publishers push changes to.
    #[serde(default)]
    pub ingest: Option<String>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            secret: DEV_SECRET.into(),
            jwt_secret: DEV_SECRET.into(),
            publish_keys: vec![DEV_PUBLISH_KEY.into()],
            dev: false,
            http_workers: 1,
        }
    }
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            max_changes: 100_000,
            max_age_secs: 3_600,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: 64 * 1024,
            max_interests: 1_000,
            max_connections: 19_000,
            max_publish_bytes: 1024 * 1024,
            max_batch: 1_000,
            outbound_budget_bytes: 1024 * 1024,
            hello_timeout_ms: 5_000,
            ping_interval_ms: 25_000,
            idle_timeout_ms: 50_000,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config::development()
    }
}

impl Config {
    /// A single node on 127.0.0.1:8080 with public development secrets.
    pub fn development() -> Config {
        Config {
            cluster: ClusterConfig {
                dev: true,
                ..ClusterConfig::default()
            },
            history: HistoryConfig::default(),
            limits: Limits::default(),
            nodes: vec![NodeConfig {
                id: "n1".into(),
                http: "127.0.0.1:8080".into(),
                public_url: None,
                bus: None,
                repair: None,
                ingest: None,
            }],
        }
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        let config: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: shown,
            source,
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.nodes.is_empty() {
            return Err(ConfigError::Invalid("the config lists no [[nodes]]".into()));
        }
        let mut seen = std::collections::HashSet::new();
        for node in &self.nodes {
            if node.id.is_empty() || node.id.len() > 256 {
                return Err(ConfigError::Invalid(format!(
                    "node id {:?} must be 1 to 256 bytes",
                    node.id
                )));
            }
            if !seen.insert(&node.id) {
                return Err(ConfigError::Invalid(format!(
                    "node id {:?} appears twice",
                    node.id
                )));
            }
            if self.nodes.len() > 1 && (node.bus.is_none() || node.repair.is_none()) {
                return Err(ConfigError::Invalid(format!(
                    "node {:?} needs `bus` and `repair` addresses in a cluster of {} nodes",
                    node.id,
                    self.nodes.len()
                )));
            }
        }
        if self.cluster.jwt_secret.is_empty() || self.cluster.secret.is_empty() {
            return Err(ConfigError::Invalid(
                "cluster.secret and cluster.jwt_secret must be set".into(),
            ));
        }
        if self.cluster.http_workers == 0 {
            return Err(ConfigError::Invalid(
                "cluster.http_workers must be at least 1".into(),
            ));
        }
        if self.limits.ping_interval_ms == 0 || self.limits.idle_timeout_ms == 0 {
            return Err(ConfigError::Invalid(
                "limits.ping_interval_ms and limits.idle_timeout_ms must be at least 1".into(),
            ));
        }
        if self.history.max_changes == 0 {
            return Err(ConfigError::Invalid(
                "history.max_changes must be at least 1".into(),
            ));
        }
        Ok(())
    }

    pub fn node(&self, id: &str) -> Result<&NodeConfig, ConfigError> {
        self.nodes.iter().find(|n| n.id == id).ok_or_else(|| {
            let ids: Vec<&str> = self.nodes.iter().map(|n| n.id.as_str()).collect();
            ConfigError::UnknownNode(id.to_string(), ids.join(", "))
        })
    }

    /// True when the secrets are the public development ones.
    pub fn uses_dev_secrets(&self) -> bool {
        self.cluster.secret == DEV_SECRET
            || self.cluster.jwt_secret == DEV_SECRET
            || self
                .cluster
                .publish_keys
                .iter()
                .any(|k| k == DEV_PUBLISH_KEY)
    }
}

impl NodeConfig {
    /// The WebSocket URL clients use to reach this node.
    pub fn ws_url(&self) -> String {
        match &self.public_url {
            Some(url) => url.clone(),
            None => format!("ws://{}/v1/ws", self.http),
        }
    }
}

impl Limits {
    pub fn hello_timeout(&self) -> Duration {
        Duration::from_millis(self.hello_timeout_ms)
    }
    pub fn ping_interval(&self) -> Duration {
        Duration::from_millis(self.ping_interval_ms)
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_file_takes_defaults() {
        let config: Config = toml::from_str(
            "[[nodes]]\nid = \"a\"\nhttp = \"127.0.0.1:1\"\n[history]\nmax_changes = 5\n",
        )
        .unwrap();
        config.validate().unwrap();
        assert_eq!(config.history.max_changes, 5);
        assert_eq!(config.history.max_age_secs, 3_600);
        assert_eq!(config.limits, Limits::default());
    }

    #[test]
    fn unknown_node_lists_known_ones() {
        let err = Config::development().node("zz").unwrap_err().to_string();
        assert!(err.contains("n1"), "{err}");
    }
}
