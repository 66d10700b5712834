//! Command-line interface: `ripple serve`, and tools to try a node.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use log::info;

use ripple::config::Config;

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
    }
    Ok(())
}
