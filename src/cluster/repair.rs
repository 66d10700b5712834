//! Repair: a node that misses changes of an origin asks for them over a
//! request socket, first the origin itself, then every other peer (the
//! origin may be gone), and takes the first answer that covers the gap.
//!
//! Each node answers on its `repair` address (ZeroMQ REP) from its history.
//! A request asks for `from..=to` of one origin's epoch; the answer holds at
//! most [`MAX_REPAIR_BATCH`] changes (the asker comes back for more) and the
//! answering node's `base` for that epoch, below which it holds nothing.
//!
//! A request gets [`REPAIR_TIMEOUT`] per peer: a paused or dead peer costs
//! that much, then the next is asked. Each request uses a fresh REQ socket,
//! since a REQ that never got its answer cannot send again.

use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use bytes::Bytes;
use log::{debug, warn};
use serde::{Deserialize, Serialize};
use zeromq::{Socket, SocketRecv, SocketSend};

use super::frame::{BusFrame, Kind, Sealer};
use super::intake::Repaired;
use crate::change::Positioned;
use crate::codec::decode_change_msgpack;
use crate::metrics::Metrics;
use crate::router::{Range, Router};

/// Most changes in one repair answer.
pub const MAX_REPAIR_BATCH: usize = 5_000;
/// How long one peer gets to answer a repair request.
pub const REPAIR_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Serialize, Deserialize)]
pub struct RepairRequest {
    pub origin: String,
    pub epoch: u64,
    pub from: u64,
    pub to: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RepairReply {
    /// `None` when the answering node knows nothing of that epoch.
    pub base: Option<u64>,
    pub last: u64,
}

/// Answers repair requests from this node's history, until the process ends.
pub async fn serve(
    address: String,
    node: String,
    sealer: Sealer,
    router: Addr<Router>,
    metrics: Arc<Metrics>,
) -> std::io::Result<()> {
    let mut socket = zeromq::RepSocket::new();
    socket
        .bind(&address)
        .await
        .map_err(|e| std::io::Error::other(format!("cannot bind repair socket {address}: {e}")))?;
    actix::spawn(async move {
        loop {
            let message = match socket.recv().await {
                Ok(message) => message,
                Err(error) => {
                    debug!("repair socket receive failed error={error}");
                    continue;
                }
            };
            let reply = match sealer.open(message) {
                Ok(frame) => answer(&node, frame, &router).await,
                Err(error) => {
                    metrics
                        .peer_frames_refused
                        .with_label_values(&[error.reason()])
                        .inc();
                    warn!("repair request refused reason={error}");
                    // A REP socket must answer before it can receive again.
                    vec![Bytes::from(
                        rmp_serde::to_vec_named(&RepairReply {
                            base: None,
                            last: 0,
                        })
                        .unwrap(),
                    )]
                }
            };
            if let Err(error) = socket
                .send(sealer.seal(Kind::RepairReply, &node, reply))
                .await
            {
                debug!("repair answer not sent error={error}");
            }
        }
    });
    Ok(())
}

async fn answer(node: &str, frame: BusFrame, router: &Addr<Router>) -> Vec<Bytes> {
    let unknown = || {
        vec![Bytes::from(
            rmp_serde::to_vec_named(&RepairReply {
                base: None,
                last: 0,
            })
            .unwrap(),
        )]
    };
    let request: RepairRequest = match frame.parts.first().map(|p| rmp_serde::from_slice(p)) {
        Some(Ok(request)) if frame.kind == Kind::RepairRequest => request,
        _ => return unknown(),
    };
    let range = Range {
        origin: request.origin.as_str().into(),
        epoch: request.epoch,
        from: request.from,
        to: request.to,
        max: MAX_REPAIR_BATCH,
    };
    let Ok(Some(found)) = router.send(range).await else {
        return unknown();
    };
    debug!(
        "repair answered node={node} asker={} origin={} epoch={} from={} changes={}",
        frame.from,
        request.origin,
        request.epoch,
        request.from,
        found.changes.len()
    );
    let header = RepairReply {
        base: Some(found.base),
        last: found.last,
    };
    let mut parts = vec![Bytes::from(
        rmp_serde::to_vec_named(&header).expect("encodes"),
    )];
    parts.extend(found.changes.iter().map(|c| c.msgpack_frame().clone()));
    parts
}

/// Asks `peers` in turn (repair addresses with their node ids) for the
/// range; `None` when none answered about that epoch.
pub async fn fetch(
    peers: &[(String, String)],
    node: &str,
    sealer: &Sealer,
    request: &RepairRequest,
) -> Option<Repaired> {
    let mut best: Option<Repaired> = None;
    for (peer, address) in peers {
        let reply = tokio::time::timeout(REPAIR_TIMEOUT, ask(address, node, sealer, request)).await;
        let repaired = match reply {
            Ok(Ok(Some(repaired))) => repaired,
            Ok(Ok(None)) => continue,
            Ok(Err(error)) => {
                debug!("repair from peer failed peer={peer} error={error}");
                continue;
            }
            Err(_) => {
                debug!("repair from peer timed out peer={peer}");
                continue;
            }
        };
        if repaired.base < request.from {
            if !repaired.changes.is_empty() {
                return Some(repaired);
            }
            // It holds the start but lags behind us: no help.
            continue;
        }
        // This peer lacks the start of the gap; another may have it.
        if best.as_ref().is_none_or(|b| repaired.base < b.base) {
            best = Some(repaired);
        }
    }
    best
}

/// Asks every peer of `peers` at once how far it holds `origin`'s `epoch`;
/// the furthest seq any of them holds, `None` when none answered about it.
/// Costs one round trip, or [`REPAIR_TIMEOUT`] when a peer does not answer:
/// the price of settling an epoch whose origin restarted (see the intake).
pub async fn furthest(
    peers: &[(String, String)],
    node: &str,
    sealer: &Sealer,
    origin: &str,
    epoch: u64,
) -> Option<u64> {
    // An empty range: the answer carries the peer's bounds and no changes.
    let request = RepairRequest {
        origin: origin.to_string(),
        epoch,
        from: u64::MAX,
        to: 0,
    };
    let asks = peers.iter().map(|(peer, address)| {
        let request = &request;
        async move {
            match tokio::time::timeout(REPAIR_TIMEOUT, ask(address, node, sealer, request)).await {
                Ok(Ok(repaired)) => repaired.map(|r| r.last),
                Ok(Err(error)) => {
                    debug!("epoch bounds from peer failed peer={peer} error={error}");
                    None
                }
                Err(_) => {
                    debug!("epoch bounds from peer timed out peer={peer}");
                    None
                }
            }
        }
    });
    futures_util::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .max()
}

async fn ask(
    address: &str,
    node: &str,
    sealer: &Sealer,
    request: &RepairRequest,
) -> Result<Option<Repaired>, String> {
    let mut socket = zeromq::ReqSocket::new();
    socket.connect(address).await.map_err(|e| e.to_string())?;
    let body = Bytes::from(rmp_serde::to_vec_named(request).expect("encodes"));
    socket
        .send(sealer.seal(Kind::RepairRequest, node, vec![body]))
        .await
        .map_err(|e| e.to_string())?;
    let message = socket.recv().await.map_err(|e| e.to_string())?;
    let frame = sealer.open(message).map_err(|e| e.to_string())?;
    let header: RepairReply = frame
        .parts
        .first()
        .ok_or("empty repair answer")
        .and_then(|p| rmp_serde::from_slice(p).map_err(|_| "bad repair answer"))?;
    let Some(base) = header.base else {
        return Ok(None);
    };
    let last = header.last;
    let mut changes = Vec::with_capacity(frame.parts.len() - 1);
    for part in &frame.parts[1..] {
        let (pos, ts, change) = decode_change_msgpack(part)?;
        changes.push(Arc::new(Positioned::with_msgpack(
            pos,
            ts,
            change,
            part.clone(),
        )));
    }
    Ok(Some(Repaired {
        base,
        last,
        changes,
    }))
}
