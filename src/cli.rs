//! Command-line interface: `ripple serve`, and tools to try a node:
//! `ripple token`, `ripple listen` (prints changes as JSON lines, through
//! the reconnecting [`ripple::client`]) and `ripple publish` (sends changes
//! as MessagePack and prints their positions).

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use log::{info, warn};
use serde::Deserialize;

use ripple::client::{Client, ClientConfig, Event, TokenSource};
use ripple::codec::{json_to_value, Format};
use ripple::config::{Config, DEV_PUBLISH_KEY, DEV_SECRET};
use ripple::interest::Interest;

/// How long one HTTP request of the CLI may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of MessagePack per publish request from standard input, under the
/// node's default `max_publish_bytes` (1 MiB).
const PUBLISH_BATCH_BYTES: usize = 512 * 1024;
/// How long a development token minted by `listen --dev` lasts, in seconds.
const DEV_TOKEN_TTL_SECS: u64 = 24 * 3600;

type Error = Box<dyn std::error::Error>;

#[derive(Parser)]
#[command(name = "ripple", version, about = "A clustered real-time server")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Runs one node. Without --config, a single development node on
    /// 127.0.0.1:8080 with public development secrets.
    Serve {
        /// The cluster config (TOML).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Which node of the config to run; defaults to the first.
        #[arg(long)]
        node: Option<String>,
        /// Overrides the node's HTTP listen address (host:port).
        #[arg(long)]
        listen: Option<String>,
    },
    /// Runs a whole cluster on this machine, for trying it.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Prints a client token signed with a secret.
    Token {
        /// The cluster's jwt_secret; defaults to the development secret.
        #[arg(long, default_value = ripple::config::DEV_SECRET)]
        secret: String,
        /// A workspace the token grants (repeat for more; `*` for all).
        #[arg(long = "workspace", default_value = "*")]
        workspaces: Vec<String>,
        /// Seconds until the token expires.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
    /// Prints every change of a workspace (or of some of its lists or
    /// records) as one line of JSON, reconnecting and resuming as needed.
    Listen {
        /// A node's WebSocket URL (repeat for more; tried in turn).
        #[arg(long = "node", default_value = "ws://127.0.0.1:8080/v1/ws")]
        nodes: Vec<String>,
        /// The client token (see `ripple token`).
        #[arg(long, conflicts_with = "dev", required_unless_present = "dev")]
        token: Option<String>,
        /// Gets a token from a development node's /v1/dev, or mints one with
        /// the development secret.
        #[arg(long)]
        dev: bool,
        #[arg(long)]
        workspace: String,
        /// Only changes in this list (repeat for more).
        #[arg(long = "list")]
        lists: Vec<String>,
        /// Only changes to this record (repeat for more).
        #[arg(long = "record")]
        records: Vec<String>,
        /// Speaks MessagePack on the WebSocket instead of JSON.
        #[arg(long)]
        msgpack: bool,
    },
    /// Publishes one change (from the flags) or many (one JSON object a line
    /// on standard input) and prints each position as a JSON line.
    Publish {
        /// The node's HTTP address.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        /// A publish key of the cluster.
        #[arg(long, default_value = DEV_PUBLISH_KEY)]
        key: String,
        /// Reads changes from standard input (the default without
        /// --workspace).
        #[arg(long, conflicts_with_all = ["workspace", "record", "lists", "kind", "data"])]
        stdin: bool,
        #[arg(long)]
        workspace: Option<String>,
        #[arg(long, requires = "workspace")]
        record: Option<String>,
        /// A list the record is in (repeat for more).
        #[arg(long = "list", requires = "workspace")]
        lists: Vec<String>,
        /// Usually insert, update or delete.
        #[arg(long, requires = "workspace")]
        kind: Option<String>,
        /// The payload, as JSON (`{"$binary": "<base64>"}` for bytes).
        #[arg(long, requires = "workspace")]
        data: Option<String>,
        /// Changes per request when reading standard input.
        #[arg(long, default_value_t = 500)]
        batch: usize,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Starts every node of the config as a child process; Ctrl-C stops all.
    Up {
        /// The cluster config (TOML), e.g. cluster/three-nodes.toml.
        config: PathBuf,
    },
}

pub fn run() -> Result<(), Box<dyn std::error::Error>> {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve {
        config: None,
        node: None,
        listen: None,
    }) {
        Command::Serve {
            config,
            node,
            listen,
        } => {
            let mut config = match &config {
                Some(path) => Config::load(path)?,
                None => {
                    info!("no --config given: running one node with the development defaults");
                    Config::development()
                }
            };
            let node = node.unwrap_or_else(|| config.nodes[0].id.clone());
            if let Some(listen) = listen {
                let index = config.nodes.iter().position(|n| n.id == node);
                let index = index.ok_or_else(|| config.node(&node).unwrap_err())?;
                config.nodes[index].http = listen;
            }
            ripple::server::run(config, &node)?;
        }
        Command::Cluster {
            command: ClusterCommand::Up { config },
        } => {
            ripple::cluster::up::run(&config)?;
        }
        Command::Token {
            secret,
            workspaces,
            ttl,
        } => {
            let workspaces: Vec<&str> = workspaces.iter().map(String::as_str).collect();
            println!("{}", ripple::auth::mint(&secret, &workspaces, ttl));
        }
        Command::Listen {
            nodes,
            token,
            dev,
            workspace,
            lists,
            records,
            msgpack,
        } => {
            let token = match token {
                Some(token) => TokenSource::Fixed(token),
                None if dev => dev_token_source(&nodes),
                None => unreachable!("clap requires --token or --dev"),
            };
            let mut interests: Vec<Interest> = lists
                .iter()
                .map(|list| Interest::list(&workspace, list))
                .chain(records.iter().map(|r| Interest::record(&workspace, r)))
                .collect();
            if interests.is_empty() {
                interests.push(Interest::workspace(&workspace));
            }
            let mut config = ClientConfig::new(nodes, token);
            config.interests = interests;
            config.format = if msgpack {
                Format::MsgPack
            } else {
                Format::Json
            };
            runtime()?.block_on(listen(config))?;
        }
        Command::Publish {
            url,
            key,
            stdin,
            workspace,
            record,
            lists,
            kind,
            data,
            batch,
        } => {
            let publisher = Publisher::new(&url, &key)?;
            let runtime = runtime()?;
            match workspace {
                Some(workspace) if !stdin => {
                    let data: Option<serde_json::Value> = match data {
                        Some(json) => Some(serde_json::from_str(&json).map_err(|e| {
                            format!("--data must be JSON (quote strings: '\"text\"'): {e}")
                        })?),
                        None => None,
                    };
                    let change = serde_json::json!({
                        "workspace": workspace,
                        "record": record,
                        "lists": lists,
                        "kind": kind,
                        "data": data,
                    });
                    runtime.block_on(publisher.send(&[json_to_value(change)], 1))?;
                }
                _ => runtime.block_on(publish_lines(&publisher, batch.max(1)))?,
            }
        }
    }
    Ok(())
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// Prints changes until Ctrl-C, or until standard output is closed.
async fn listen(config: ClientConfig) -> Result<(), Error> {
    let mut client = Client::connect(config)?;
    let mut stdout = std::io::stdout().lock();
    loop {
        let event = tokio::select! {
            event = client.next() => event,
            _ = tokio::signal::ctrl_c() => break,
        };
        let Some(event) = event else { break };
        match event {
            Event::Change(change) => {
                let line = writeln!(stdout, "{}", change.json_frame());
                if line.and_then(|()| stdout.flush()).is_err() {
                    break; // The reader went away (`| head`, say).
                }
            }
            Event::Welcome {
                node,
                recovered,
                missed,
            } => info!("listening node={node} recovered={recovered} missed={missed}"),
            Event::Reset => warn!(
                "the node could not send everything missed while disconnected (it restarted \
                 or trimmed its history): changes may be missing above; listening on"
            ),
            Event::Subscribed { id } => info!("subscribed id={id}"),
            Event::Unsubscribed { id } => info!("unsubscribed id={id}"),
            Event::Disconnected { code, reason } => {
                warn!("disconnected, reconnecting code={code:?} reason={reason:?}")
            }
            Event::Error { id, code, message } => {
                warn!("the node refused a request id={id:?} code={code} message={message:?}")
            }
        }
    }
    client.close().await;
    Ok(())
}

/// Tokens for `listen --dev`: from the first node whose /v1/dev answers,
/// else minted with the development secret (which a development node
/// accepts).
fn dev_token_source(nodes: &[String]) -> TokenSource {
    let urls: Vec<String> = nodes.iter().filter_map(|n| dev_url(n)).collect();
    let http = reqwest::Client::builder()
        .timeout(HTTP_TIMEOUT)
        .build()
        .ok();
    TokenSource::fetch(move || {
        let urls = urls.clone();
        let http = http.clone();
        async move {
            #[derive(Deserialize)]
            struct Dev {
                token: String,
            }
            if let Some(http) = &http {
                for url in &urls {
                    let answer = match http.get(url).send().await {
                        Ok(answer) if answer.status().is_success() => answer.json::<Dev>().await,
                        Ok(answer) => {
                            warn!("no development token status={} url={url}", answer.status());
                            continue;
                        }
                        Err(error) => Err(error),
                    };
                    match answer {
                        Ok(dev) => return Ok(dev.token),
                        Err(error) => warn!("no development token url={url} error={error}"),
                    }
                }
            }
            info!("minting a token with the development secret");
            Ok(ripple::auth::mint(DEV_SECRET, &["*"], DEV_TOKEN_TTL_SECS))
        }
    })
}

/// The /v1/dev URL of the node behind a WebSocket URL:
/// `ws://host:port/v1/ws` -> `http://host:port/v1/dev`.
fn dev_url(ws: &str) -> Option<String> {
    let (scheme, rest) = ws.split_once("://")?;
    let scheme = match scheme {
        "ws" => "http",
        "wss" => "https",
        _ => return None,
    };
    let authority = rest.split('/').next()?;
    Some(format!("{scheme}://{authority}/v1/dev"))
}

/// Sends changes to a node's /v1/publish as MessagePack.
struct Publisher {
    http: reqwest::Client,
    url: String,
    key: String,
}

impl Publisher {
    fn new(url: &str, key: &str) -> Result<Publisher, Error> {
        let url = url.trim_end_matches('/');
        let url = if url.ends_with("/v1/publish") {
            url.to_string()
        } else {
            format!("{url}/v1/publish")
        };
        let http = reqwest::Client::builder().timeout(HTTP_TIMEOUT).build()?;
        Ok(Publisher {
            http,
            url,
            key: key.to_string(),
        })
    }

    /// Publishes `changes` as one request and prints their positions.
    /// `first_line` names where they came from in error messages.
    async fn send(&self, changes: &[rmpv::Value], first_line: usize) -> Result<(), Error> {
        #[derive(Deserialize)]
        struct Answer {
            #[serde(default)]
            positions: Vec<(String, u64, u64)>,
            #[serde(default)]
            error: Option<String>,
        }

        let body = match changes {
            [one] => encode_msgpack(one),
            many => encode_msgpack(&rmpv::Value::Array(many.to_vec())),
        };
        let response = self
            .http
            .post(&self.url)
            .bearer_auth(&self.key)
            .header("Content-Type", "application/msgpack")
            .body(body)
            .send()
            .await
            .map_err(|e| format!("cannot publish to {}: {e}", self.url))?;
        let status = response.status();
        let bytes = response.bytes().await?;
        let answer: Option<Answer> = rmp_serde::from_slice(&bytes).ok();
        if !status.is_success() {
            let detail = match answer.and_then(|a| a.error) {
                Some(error) => error,
                None => String::from_utf8_lossy(&bytes).into_owned(),
            };
            let whence = if changes.len() > 1 {
                format!(" (a batch from line {first_line}; change i is line {first_line} + i)")
            } else {
                String::new()
            };
            return Err(format!("publish refused, {status}: {detail}{whence}").into());
        }
        let answer = answer.ok_or("the node's answer is not MessagePack")?;
        let mut stdout = std::io::stdout().lock();
        for position in answer.positions {
            writeln!(stdout, "{}", serde_json::to_string(&position)?)?;
        }
        stdout.flush()?;
        Ok(())
    }
}

fn encode_msgpack(value: &rmpv::Value) -> Vec<u8> {
    let mut body = Vec::new();
    rmpv::encode::write_value(&mut body, value).expect("writing to a Vec does not fail");
    body
}

/// Publishes one JSON object a line from standard input, in batches of at
/// most `batch` changes and [`PUBLISH_BATCH_BYTES`].
async fn publish_lines(publisher: &Publisher, batch: usize) -> Result<(), Error> {
    let mut changes = Vec::new();
    let mut bytes = 0;
    let mut first_line = 1;
    for (i, line) in std::io::stdin().lock().lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let json: serde_json::Value = serde_json::from_str(&line)
            .map_err(|e| format!("line {}: not a JSON object: {e}", i + 1))?;
        if !json.is_object() {
            return Err(format!("line {}: a change must be a JSON object", i + 1).into());
        }
        let change = json_to_value(json);
        let size = encode_msgpack(&change).len();
        if !changes.is_empty() && (changes.len() >= batch || bytes + size > PUBLISH_BATCH_BYTES) {
            publisher.send(&changes, first_line).await?;
            changes.clear();
            bytes = 0;
        }
        if changes.is_empty() {
            first_line = i + 1;
        }
        changes.push(change);
        bytes += size;
    }
    if !changes.is_empty() {
        publisher.send(&changes, first_line).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::dev_url;

    #[test]
    fn dev_url_comes_from_the_websocket_url() {
        let url = dev_url("ws://127.0.0.1:9000/v1/ws");
        assert_eq!(url.as_deref(), Some("http://127.0.0.1:9000/v1/dev"));
        assert_eq!(dev_url("wss://h/x").as_deref(), Some("https://h/v1/dev"));
        assert_eq!(dev_url("http://h/"), None);
    }
}
