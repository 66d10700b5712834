//! `ripple cluster up FILE`: every node of a cluster config as a child
//! process of this one, for trying a cluster on one machine. Each node's log
//! lines are prefixed with its id; Ctrl-C (or SIGTERM) stops them all
//! gracefully, and if one node exits on its own the others are stopped too.
//! Real deployments run `ripple serve --config FILE --node ID` per machine.

use std::path::Path;
use std::process::Stdio;

use log::{info, warn};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::config::Config;

pub fn run(path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let config = Config::load(path)?;
    let exe = std::env::current_exe()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let mut children: Vec<(String, Child)> = Vec::new();
        for node in &config.nodes {
            let mut child = Command::new(&exe)
                .arg("serve")
                .arg("--config")
                .arg(path)
                .arg("--node")
                .arg(&node.id)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()?;
            prefix(&node.id, child.stdout.take());
            prefix(&node.id, child.stderr.take());
            info!(
                "node starting node={} http={} ws={}",
                node.id,
                node.http,
                node.ws_url()
            );
            children.push((node.id.clone(), child));
        }

        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let exited = async {
            let waits = children
                .iter_mut()
                .map(|(id, child)| Box::pin(async move { (id.clone(), child.wait().await) }));
            futures_util::future::select_all(waits).await.0
        };
        tokio::select! {
            _ = term.recv() => info!("stopping the cluster signal=SIGTERM"),
            _ = int.recv() => info!("stopping the cluster signal=SIGINT"),
            (id, status) = exited => {
                warn!("a node exited, stopping the others node={id} status={status:?}")
            }
        }
        for (_, child) in &children {
            if let Some(pid) = child.id() {
                // SAFETY: sending a signal to our own child process.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
        }
        for (id, child) in &mut children {
            let status = child.wait().await?;
            info!("node stopped node={id} status={status}");
        }
        Ok(())
    })
}

fn prefix<R: tokio::io::AsyncRead + Unpin + Send + 'static>(id: &str, stream: Option<R>) {
    let Some(stream) = stream else { return };
    let id = id.to_string();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("[{id}] {line}");
        }
    });
}
