//! The cluster: nodes linked by ZeroMQ, each holding every change.
//!
//! Every node binds a PUB socket (`bus`) and publishes the changes it
//! accepts, plus a heartbeat every [`HEARTBEAT_INTERVAL`]; it subscribes to
//! every other node's PUB. What arrives is checked ([`frame`]), put back in
//! per-origin order ([`intake`]) and handed to the Router, which keeps it in
//! history and forwards it to its own interested sessions. Gaps are filled
//! over request sockets ([`repair`]). High-rate publishers may push changes
//! to a PULL socket ([`ingest`]).
//!
//! Guarantees and limits:
//! - Per origin, every node applies changes in seq order with no gaps; a
//!   range no node holds any more is skipped visibly: the node's sessions
//!   are closed with 4008, and resumes from before it answer
//!   `recovered: false`.
//! - A heartbeat carries the sender's epoch, the last seq it published, and
//!   the last position it applied of every origin. The first lets a peer
//!   notice a lost tail; the last lets a peer repair from a survivor the
//!   changes of an origin that died, and lets a stopping node wait until its
//!   peers hold everything it accepted.
//! - A peer silent for [`PEER_TIMEOUT`] is marked down and its SUB socket is
//!   made anew (the crate's own reconnect backs off up to 30 s).
//! - The `zeromq` crate has no CURVE security, so frames are authenticated by
//!   a MAC but not encrypted: run the bus on a private network.
//! - When an origin restarts into a new epoch, the new epoch waits until
//!   every other peer has said how far it holds the old one and that tail is
//!   repaired: a round trip, or [`repair::REPAIR_TIMEOUT`] while a peer does
//!   not answer. A tail held only by a peer that cannot be reached then is
//!   skipped visibly (as above). An origin that restarted twice meanwhile
//!   has its epochs settled one after the other.
//! - Not done: a restarted node does not fetch its own earlier epochs back
//!   from its peers, so a client resuming on it from a cursor in its old
//!   epoch gets `recovered: false` (resuming on any other node is exact).

pub mod frame;
pub mod ingest;
pub mod intake;
pub mod repair;
pub mod up;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::Addr;
use bytes::Bytes;
use log::{debug, info, warn};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

use crate::change::Positioned;
use crate::codec::{decode_change_msgpack, WireCursor};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::router::{Apply, GetState, OpenEpoch, Router, SkipTo};
use frame::{BusFrame, Kind, Sealer};
use intake::{Action, Intake};
use repair::RepairRequest;

/// How often a node tells its peers it is alive and how far it is.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);
/// Silence after which a peer is marked down and its link made anew.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(3);
/// Changes held per origin while a gap is repaired.
pub const MAX_HELD: usize = 200_000;
/// Frames queued from the SUB sockets towards the intake.
const INTAKE_QUEUE: usize = 16_384;

#[derive(Debug, Serialize, Deserialize)]
pub struct Heartbeat {
    pub epoch: u64,
    /// The last seq this node handed to its PUB socket.
    pub seq: u64,
    /// The node's current cursor: the last position applied of each origin.
    pub applied: WireCursor,
}

/// What this node knows of one peer.
#[derive(Debug, Clone, Default)]
struct PeerStatus {
    up: bool,
    last_heard: Option<Instant>,
    applied: WireCursor,
    refused: u64,
}

type PeerTable = Arc<Mutex<HashMap<String, PeerStatus>>>;

/// The cluster links of one node, before they start.
pub struct Cluster {
    node: String,
    epoch: u64,
    config: Arc<Config>,
    sealer: Sealer,
    metrics: Arc<Metrics>,
    outbound: mpsc::UnboundedReceiver<Arc<Positioned>>,
    peers: PeerTable,
    published: watch::Sender<u64>,
}

/// The running links: what the rest of the node asks of them.
#[derive(Clone)]
pub struct ClusterHandle {
    node: String,
    peers: PeerTable,
    published: watch::Receiver<u64>,
}

impl Cluster {
    /// Sets up the links; returns the sender the Router hands accepted
    /// changes to.
    pub fn prepare(
        config: Arc<Config>,
        node: &str,
        epoch: u64,
        metrics: Arc<Metrics>,
    ) -> (Cluster, mpsc::UnboundedSender<Arc<Positioned>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let peers = config
            .nodes
            .iter()
            .filter(|n| n.id != node)
            .map(|n| (n.id.clone(), PeerStatus::default()))
            .collect();
        let cluster = Cluster {
            node: node.to_string(),
            epoch,
            sealer: Sealer::new(&config.cluster.secret),
            config,
            metrics,
            outbound: rx,
            peers: Arc::new(Mutex::new(peers)),
            published: watch::channel(0).0,
        };
        (cluster, tx)
    }

    /// Binds the sockets and starts the link tasks on the current arbiter.
    pub async fn start(self, router: Addr<Router>) -> std::io::Result<ClusterHandle> {
        let me = self
            .config
            .node(&self.node)
            .map_err(std::io::Error::other)?
            .clone();
        let bus = me
            .bus
            .clone()
            .expect("validated: cluster nodes have a bus address");
        let repair_address = me
            .repair
            .clone()
            .expect("validated: cluster nodes have repair");

        let mut publisher = zeromq::PubSocket::new();
        publisher
            .bind(&bus)
            .await
            .map_err(|e| std::io::Error::other(format!("cannot bind bus socket {bus}: {e}")))?;
        repair::serve(
            repair_address,
            self.node.clone(),
            self.sealer.clone(),
            router.clone(),
            self.metrics.clone(),
        )
        .await?;

        let handle = ClusterHandle {
            node: self.node.clone(),
            peers: self.peers.clone(),
            published: self.published.subscribe(),
        };
        let (frames_tx, frames_rx) = mpsc::channel(INTAKE_QUEUE);
        for peer in self.config.nodes.iter().filter(|n| n.id != self.node) {
            let address = peer
                .bus
                .clone()
                .expect("validated: cluster nodes have a bus address");
            actix::spawn(subscribe(
                peer.id.clone(),
                address,
                frames_tx.clone(),
                self.peers.clone(),
                self.metrics.clone(),
            ));
        }
        let repair_peers: Vec<(String, String)> = self
            .config
            .nodes
            .iter()
            .filter(|n| n.id != self.node)
            .map(|n| (n.id.clone(), n.repair.clone().expect("validated")))
            .collect();
        actix::spawn(publish(
            publisher,
            self.node.clone(),
            self.epoch,
            self.sealer.clone(),
            self.outbound,
            self.published,
            router.clone(),
        ));
        let links = Links {
            node: self.node.clone(),
            sealer: self.sealer,
            router,
            metrics: self.metrics,
            peers: self.peers,
            repair_peers,
            intake: Intake::new(MAX_HELD),
        };
        actix::spawn(links.run(frames_rx));
        info!(
            "cluster links started node={} bus={bus} peers={}",
            self.node,
            self.config.nodes.len() - 1
        );
        Ok(handle)
    }
}

impl ClusterHandle {
    /// A report of the peers for `/healthz`.
    pub fn report(&self) -> Vec<serde_json::Value> {
        let peers = self.peers.lock().expect("peer table");
        let mut report: Vec<_> = peers
            .iter()
            .map(|(id, status)| {
                serde_json::json!({
                    "node": id,
                    "up": status.up,
                    "last_heard_ms": status.last_heard.map(|t| t.elapsed().as_millis() as u64),
                    "applied": status.applied,
                    "frames_refused": status.refused,
                })
            })
            .collect();
        report.sort_by(|a, b| a["node"].as_str().cmp(&b["node"].as_str()));
        report
    }

    /// Waits until this node's PUB socket has been handed `seq`.
    pub async fn published(&self, seq: u64) {
        let mut published = self.published.clone();
        let _ = published.wait_for(|sent| *sent >= seq).await;
    }

    /// Waits (up to `limit`) until every peer that is up reports holding
    /// this node's changes up to `(epoch, seq)`: at shutdown, so that what
    /// was accepted here survives the node.
    pub async fn drain(&self, epoch: u64, seq: u64, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            let done = {
                let peers = self.peers.lock().expect("peer table");
                peers.values().filter(|p| p.up).all(|p| {
                    p.applied
                        .get(&self.node)
                        .is_some_and(|&(e, s)| e > epoch || (e == epoch && s >= seq))
                })
            };
            if done {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Sends accepted changes and heartbeats on the PUB socket.
async fn publish(
    mut socket: zeromq::PubSocket,
    node: String,
    epoch: u64,
    sealer: Sealer,
    mut outbound: mpsc::UnboundedReceiver<Arc<Positioned>>,
    published: watch::Sender<u64>,
    router: Addr<Router>,
) {
    let mut heartbeat = tokio::time::interval(HEARTBEAT_INTERVAL);
    let mut last_seq = 0;
    loop {
        tokio::select! {
            change = outbound.recv() => {
                let Some(change) = change else { break };
                let body = change.msgpack_frame().clone();
                let frame = sealer.seal(Kind::Change, &node, vec![body]);
                if let Err(error) = socket.send(frame).await {
                    let seq = change.pos.seq;
                    warn!("bus send failed, peers will repair seq={seq} error={error}");
                }
                last_seq = change.pos.seq;
                published.send_replace(last_seq);
            }
            _ = heartbeat.tick() => {
                let Ok(state) = router.send(GetState).await else { break };
                let beat = Heartbeat { epoch, seq: last_seq, applied: state.position };
                let body = Bytes::from(rmp_serde::to_vec_named(&beat).expect("encodes"));
                let frame = sealer.seal(Kind::Heartbeat, &node, vec![body]);
                if let Err(error) = socket.send(frame).await {
                    debug!("heartbeat not sent error={error}");
                }
            }
        }
    }
}

/// Receives one peer's PUB stream, remaking the socket when the peer falls
/// silent.
async fn subscribe(
    peer: String,
    address: String,
    frames: mpsc::Sender<(String, ZmqMessage)>,
    peers: PeerTable,
    metrics: Arc<Metrics>,
) {
    loop {
        let mut socket = zeromq::SubSocket::new();
        if let Err(error) = socket.subscribe("").await {
            warn!("cannot subscribe to peer peer={peer} error={error}");
        }
        if let Err(error) = socket.connect(&address).await {
            debug!("peer not reachable yet peer={peer} address={address} error={error}");
            tokio::time::sleep(PEER_TIMEOUT / 3).await;
            continue;
        }
        debug!("peer link connected peer={peer} address={address}");
        let connected = Instant::now();
        let mut next_check = connected + HEARTBEAT_INTERVAL;
        loop {
            match tokio::time::timeout(PEER_TIMEOUT, socket.recv()).await {
                Ok(Ok(message)) => {
                    if frames.send((peer.clone(), message)).await.is_err() {
                        return;
                    }
                }
                Ok(Err(error)) => debug!("peer link receive error peer={peer} error={error}"),
                Err(_) => break,
            }
            // Traffic alone is no sign of life: a process that took the
            // peer's address without the secret must not keep it up.
            if Instant::now() >= next_check {
                next_check = Instant::now() + HEARTBEAT_INTERVAL;
                if silent(&peers, &peer, connected) {
                    break;
                }
            }
        }
        let was_up = {
            let mut table = peers.lock().expect("peer table");
            let status = table.entry(peer.clone()).or_default();
            std::mem::replace(&mut status.up, false)
        };
        if was_up {
            metrics.peer_up.with_label_values(&[&peer]).set(0);
            warn!(
                "peer down, no heartbeat peer={peer} silent_ms={}",
                PEER_TIMEOUT.as_millis()
            );
        }
    }
}

/// True when no frame of `peer` passed the MAC for [`PEER_TIMEOUT`] since
/// `since` (see [`Links::heard`]).
fn silent(peers: &PeerTable, peer: &str, since: Instant) -> bool {
    let table = peers.lock().expect("peer table");
    let heard = table.get(peer).and_then(|s| s.last_heard);
    heard.map_or(since, |t| t.max(since)).elapsed() > PEER_TIMEOUT
}

/// The intake loop: frames from peers and repair answers in, Router
/// messages out.
struct Links {
    node: String,
    sealer: Sealer,
    router: Addr<Router>,
    metrics: Arc<Metrics>,
    peers: PeerTable,
    repair_peers: Vec<(String, String)>,
    intake: Intake,
}

/// What a repair task found out, for the intake.
enum Answer {
    Repaired {
        origin: Arc<str>,
        epoch: u64,
        repaired: Option<intake::Repaired>,
    },
    Settled {
        origin: Arc<str>,
        epoch: u64,
        end: Option<u64>,
    },
}

impl Links {
    async fn run(mut self, mut frames: mpsc::Receiver<(String, ZmqMessage)>) {
        let (answers_tx, mut answers) = mpsc::unbounded_channel::<Answer>();
        loop {
            let actions = tokio::select! {
                frame = frames.recv() => {
                    let Some((peer, message)) = frame else { break };
                    self.on_frame(&peer, message)
                }
                answer = answers.recv() => match answer {
                    None => break,
                    Some(Answer::Repaired { origin, epoch, repaired }) => {
                        if let Some(r) = &repaired {
                            let count = self.metrics.peer_repaired.with_label_values(&[&origin]);
                            count.inc_by(r.changes.len() as u64);
                        }
                        self.intake.on_repaired(&origin, epoch, repaired)
                    }
                    Some(Answer::Settled { origin, epoch, end }) => {
                        debug!("epoch settled origin={origin} epoch={epoch} end={end:?}");
                        self.intake.on_settled(&origin, epoch, end)
                    }
                },
            };
            self.act(actions, &answers_tx);
        }
    }

    fn refuse(&self, peer: &str, reason: &'static str, detail: &str) {
        self.metrics
            .peer_frames_refused
            .with_label_values(&[reason])
            .inc();
        if let Some(status) = self.peers.lock().expect("peer table").get_mut(peer) {
            status.refused += 1;
        }
        warn!("frame from peer refused peer={peer} reason={reason} detail={detail:?}");
    }

    fn on_frame(&mut self, peer: &str, message: ZmqMessage) -> Vec<Action> {
        let frame: BusFrame = match self.sealer.open(message) {
            Ok(frame) => frame,
            Err(error) => {
                self.refuse(peer, error.reason(), &error.to_string());
                return Vec::new();
            }
        };
        if frame.from != peer {
            self.refuse(peer, "wrong_sender", &frame.from);
            return Vec::new();
        }
        self.heard(peer);
        match frame.kind {
            Kind::Change => {
                let Some(part) = frame.parts.first() else {
                    return Vec::new();
                };
                match decode_change_msgpack(part) {
                    Ok((pos, ts, change)) if *pos.origin == *peer => {
                        let positioned = Positioned::with_msgpack(pos, ts, change, part.clone());
                        self.intake.on_change(Arc::new(positioned))
                    }
                    Ok(_) => {
                        self.refuse(
                            peer,
                            "wrong_origin",
                            "a change of another origin on its bus",
                        );
                        Vec::new()
                    }
                    Err(error) => {
                        self.refuse(peer, "bad_change", &error);
                        Vec::new()
                    }
                }
            }
            Kind::Heartbeat => {
                let beat: Heartbeat = match frame.parts.first().map(|p| rmp_serde::from_slice(p)) {
                    Some(Ok(beat)) => beat,
                    _ => {
                        self.refuse(peer, "bad_heartbeat", "undecodable heartbeat");
                        return Vec::new();
                    }
                };
                let origin: Arc<str> = peer.into();
                let mut actions = self.intake.on_heartbeat(&origin, beat.epoch, beat.seq);
                // What the peer holds of a third node whose link is down
                // here: how the changes of a node that died reach the nodes
                // that missed them. (While the link is up, the third node's
                // own heartbeats say the same without the race of a peer
                // that got a change a moment before us.)
                let down: Vec<(String, u64, u64)> = {
                    let table = self.peers.lock().expect("peer table");
                    beat.applied
                        .iter()
                        .filter(|(other, _)| **other != self.node && *other != peer)
                        .filter(|(other, _)| !table.get(*other).is_some_and(|s| s.up))
                        .map(|(other, &(epoch, seq))| (other.clone(), epoch, seq))
                        .collect()
                };
                for (other, epoch, seq) in down {
                    actions.extend(self.intake.on_heartbeat(&other.as_str().into(), epoch, seq));
                }
                if let Some(status) = self.peers.lock().expect("peer table").get_mut(peer) {
                    status.applied = beat.applied;
                }
                actions
            }
            Kind::RepairRequest | Kind::RepairReply => {
                self.refuse(peer, "unexpected_kind", "repair frame on the bus");
                Vec::new()
            }
        }
    }

    fn heard(&self, peer: &str) {
        let mut table = self.peers.lock().expect("peer table");
        let status = table.entry(peer.to_string()).or_default();
        status.last_heard = Some(Instant::now());
        if !status.up {
            status.up = true;
            self.metrics.peer_up.with_label_values(&[peer]).set(1);
            info!("peer up peer={peer}");
        }
    }

    fn act(&mut self, actions: Vec<Action>, answers: &mpsc::UnboundedSender<Answer>) {
        for action in actions {
            match action {
                Action::Apply(change) => {
                    let origin = change.pos.origin.clone();
                    let seq = change.pos.seq;
                    self.router.do_send(Apply { change });
                    self.metrics
                        .peer_last_seq
                        .with_label_values(&[&origin])
                        .set(seq as i64);
                }
                Action::Open {
                    origin,
                    epoch,
                    base,
                } => {
                    self.router.do_send(OpenEpoch {
                        origin,
                        epoch,
                        base,
                    });
                }
                Action::SkipTo {
                    origin,
                    epoch,
                    base,
                } => {
                    warn!(
                        "changes no node holds any more were skipped \
                         origin={origin} epoch={epoch} up_to={base}"
                    );
                    self.router.do_send(SkipTo {
                        origin,
                        epoch,
                        base,
                    });
                }
                Action::Repair {
                    origin,
                    epoch,
                    from,
                    to,
                } => {
                    self.metrics.peer_gaps.with_label_values(&[&origin]).inc();
                    debug!("gap seen, repairing origin={origin} epoch={epoch} from={from} to={to}");
                    // Ask the origin first: it holds its own changes longest.
                    let mut peers = self.repair_peers.clone();
                    peers.sort_by_key(|(id, _)| **id != *origin);
                    let node = self.node.clone();
                    let sealer = self.sealer.clone();
                    let answers = answers.clone();
                    actix::spawn(async move {
                        let request = RepairRequest {
                            origin: origin.to_string(),
                            epoch,
                            from,
                            to,
                        };
                        let repaired = repair::fetch(&peers, &node, &sealer, &request).await;
                        let _ = answers.send(Answer::Repaired {
                            origin,
                            epoch,
                            repaired,
                        });
                    });
                }
                Action::Settle { origin, epoch } => {
                    info!(
                        "origin has a new epoch, settling its last one \
                         origin={origin} epoch={epoch}"
                    );
                    // The origin forgot its old epochs when it restarted.
                    let peers: Vec<_> = self
                        .repair_peers
                        .iter()
                        .filter(|(id, _)| **id != *origin)
                        .cloned()
                        .collect();
                    let node = self.node.clone();
                    let sealer = self.sealer.clone();
                    let answers = answers.clone();
                    actix::spawn(async move {
                        let end = repair::furthest(&peers, &node, &sealer, &origin, epoch).await;
                        let _ = answers.send(Answer::Settled { origin, epoch, end });
                    });
                }
            }
        }
    }
}
