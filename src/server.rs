//! Runs one node: the Router, the HTTP server with its sessions and, in a
//! cluster, the links to the peers; and stops it gracefully.
//!
//! Shutdown (SIGINT or SIGTERM): every session is closed with 4009 so its
//! client resumes elsewhere, then the HTTP server stops accepting and lets
//! publishes in flight finish (up to [`SHUTDOWN_GRACE`]).

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use actix::Actor;
use actix_web::{web, App, HttpServer};
use log::{info, warn};

use crate::auth::TokenVerifier;
use crate::change::now_ms;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::http::{self, AppState};
use crate::metrics::Metrics;
use crate::router::{CloseAll, GetState, Router};
use crate::session::SessionShared;

/// How long in-flight requests get to finish at shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How long sessions get to send their 4009 close before the server stops.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Runs the node `node_id` of `config` until SIGINT or SIGTERM.
pub fn run(config: Config, node_id: &str) -> std::io::Result<()> {
    let node = config.node(node_id).map_err(std::io::Error::other)?.clone();
    let config = Arc::new(config);
    // A node keeps no history across restarts, so every start is a new
    // epoch; the clock makes epochs grow across restarts.
    let epoch = now_ms();

    actix_web::rt::System::new().block_on(async move {
        let metrics = Arc::new(Metrics::new(&node.id));
        let mut router = Router::new(&config, &node.id, epoch, metrics.clone());
        let cluster = if config.nodes.len() > 1 {
            let (cluster, outbound) =
                Cluster::prepare(config.clone(), &node.id, epoch, metrics.clone());
            router = router.with_outbound(outbound);
            Some(cluster)
        } else {
            None
        };
        let router = router.start();
        let cluster = match cluster {
            Some(cluster) => Some(cluster.start(router.clone()).await?),
            None => None,
        };
        if let Some(ingest) = &node.ingest {
            crate::cluster::ingest::serve(
                ingest.clone(),
                config.clone(),
                router.clone(),
                metrics.clone(),
            )
            .await?;
        }

        let sessions = Arc::new(SessionShared {
            router: router.clone(),
            verifier: TokenVerifier::new(&config.cluster.jwt_secret),
            limits: config.limits.clone(),
            metrics: metrics.clone(),
            connections: AtomicUsize::new(0),
        });
        let state = web::Data::new(AppState {
            node: node.id.clone(),
            config: config.clone(),
            router: router.clone(),
            metrics: metrics.clone(),
            sessions: sessions.clone(),
            cluster: cluster.clone(),
        });

        let server = HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                .configure(http::configure)
        })
        .workers(config.cluster.http_workers)
        .backlog(4096)
        .max_connections(config.limits.max_connections + 1024)
        .disable_signals()
        .shutdown_timeout(SHUTDOWN_GRACE.as_secs())
        .tcp_nodelay(true)
        .bind(&node.http)
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {}: {e}", node.http)))?
        .run();

        let l = &config.limits;
        info!(
            "node started node={} epoch={epoch} http={} ws={} workers={} nodes={} \
             history_max_changes={} history_max_age_secs={} max_connections={} \
             max_interests={} max_frame_bytes={} max_publish_bytes={} outbound_budget_bytes={}",
            node.id,
            node.http,
            node.ws_url(),
            config.cluster.http_workers,
            config.nodes.len(),
            config.history.max_changes,
            config.history.max_age_secs,
            l.max_connections,
            l.max_interests,
            l.max_frame_bytes,
            l.max_publish_bytes,
            l.outbound_budget_bytes,
        );
        if config.uses_dev_secrets() {
            warn!(
                "this node uses the built-in development secrets: anyone can mint tokens and \
                 publish; give the cluster its own secrets before it serves real users"
            );
        }

        let handle = server.handle();
        let shutdown = async move {
            let signal = wait_for_signal().await;
            info!("shutting down node={} signal={signal}", node.id);
            let closed = router.send(CloseAll).await.unwrap_or(0);
            info!("sessions told to go elsewhere code=4009 sessions={closed}");
            let deadline = tokio::time::Instant::now() + CLOSE_GRACE;
            while sessions
                .connections
                .load(std::sync::atomic::Ordering::Acquire)
                > 0
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if let Some(cluster) = &cluster {
                if let Ok(state) = router.send(GetState).await {
                    let drained = cluster.drain(state.epoch, state.seq, CLOSE_GRACE).await;
                    if drained {
                        info!("peers hold every change accepted here seq={}", state.seq);
                    } else {
                        warn!(
                            "stopping before every peer confirmed the changes accepted here; \
                             peers will repair from each other seq={}",
                            state.seq
                        );
                    }
                }
            }
            handle.stop(true).await;
        };
        let (result, _) = tokio::join!(server, shutdown);
        info!("node stopped");
        result
    })
}

async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}
