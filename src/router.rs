//! The Router: one actor per node that owns the subscription index, the
//! history and this node's sequence, and hands every change to exactly the
//! sessions that want it.
//!
//! Guarantees:
//! - Every change is applied to history and fanned out in one handler, and a
//!   resume is planned, sent and subscribed in one handler, so no change can
//!   fall between a catch-up and the live changes that follow it (the seam),
//!   and none is sent twice.
//! - A session receives a change once, however many of its interests match.
//! - The Router never waits on a client: each session has an outbound budget
//!   in bytes, counted when the Router hands a change over and paid back when
//!   the session writes it. A session over budget is dropped from the index,
//!   told to close with 4008, and its connection is cut if it still has not
//!   gone a few seconds later, so a client that never reads holds at most
//!   its budget.
//!
//! Changes come in two ways: [`Publish`] (accepted here: this node is their
//! origin and gives them positions) and [`Apply`] (positioned elsewhere,
//! arriving over the cluster links).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use log::{debug, info, warn};
use tokio::sync::mpsc::UnboundedSender;

use crate::change::{now_ms, Change, Position, Positioned};
use crate::codec::{Format, Frame, ServerMessage, WireCursor};
use crate::config::Config;
use crate::connection::Connection;
use crate::history::{AppendError, History};
use crate::interest::{Interest, InterestIndex, SessionKey};
use crate::metrics::Metrics;
use crate::session::{CloseCode, Session, ToSession};

/// How often history is trimmed by age, expired tokens are acted on and the
/// gauges refreshed.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);
/// Requests (publishes, state queries) queued at the Router before their
/// senders wait: backpressure on publishers when the Router is saturated.
const ROUTER_MAILBOX: usize = 4096;
/// Heartbeats go to one slice of the sessions at a time (see
/// [`Router::beat`]).
const BEAT_SLICES: u64 = 16;
/// How long a session closed for being slow has to go by itself before its
/// connection is cut.
const SLOW_CLOSE_GRACE: Duration = Duration::from_secs(3);

/// A session as the Router knows it.
struct SessionEntry {
    addr: Addr<Session>,
    /// Unique over the node's life; slab keys are reused.
    id: u64,
    format: Format,
    interests: Vec<Interest>,
    /// Bytes handed to the session and not yet written by it.
    outstanding: Arc<AtomicUsize>,
    /// The last change stamp this session was sent: collapses repeats when
    /// several interests match one change.
    stamp: u64,
    /// Positions the client saw on a node further ahead than this one:
    /// changes up to them are skipped. Empty for nearly every session.
    ahead: Vec<(Arc<str>, u64, u64)>,
    /// The token's expiry, seconds since the Unix epoch.
    expires: u64,
    /// `None` when the request did not say where it came from.
    connection: Option<Box<Connection>>,
    closing: bool,
}

pub struct Router {
    node: Arc<str>,
    epoch: u64,
    seq: u64,
    history: History,
    index: InterestIndex,
    sessions: Vec<Option<SessionEntry>>,
    free: Vec<SessionKey>,
    /// Session id -> slab key.
    keys: HashMap<u64, SessionKey>,
    this: Option<Addr<Router>>,
    stamp: u64,
    budget: usize,
    max_interests: usize,
    metrics: Arc<Metrics>,
    /// Where accepted changes go to reach the peers (the cluster's PUB).
    outbound: Option<UnboundedSender<Arc<Positioned>>>,
    /// Set by [`CloseAll`]: the node is shutting down, and a session that
    /// says hello now is sent away with 4009 too.
    going_away: bool,
    /// How often every session pings its client (see [`ToSession::Heartbeat`]).
    heartbeat: Duration,
    /// Counts heartbeat ticks: each tick beats one of [`BEAT_SLICES`] slices
    /// of the sessions.
    beats: u64,
}

impl Router {
    pub fn new(config: &Config, node: &str, epoch: u64, metrics: Arc<Metrics>) -> Router {
        let node: Arc<str> = node.into();
        let mut history = History::new(
            config.history.max_changes,
            config.history.max_age_secs * 1000,
        );
        history.open_epoch(&node, epoch, 0);
        Router {
            node,
            epoch,
            seq: 0,
            history,
            index: InterestIndex::default(),
            sessions: Vec::new(),
            free: Vec::new(),
            keys: HashMap::new(),
            this: None,
            stamp: 0,
            budget: config.limits.outbound_budget_bytes,
            max_interests: config.limits.max_interests,
            metrics,
            outbound: None,
            going_away: false,
            heartbeat: config.limits.ping_interval(),
            beats: 0,
        }
    }

    pub fn with_outbound(mut self, outbound: UnboundedSender<Arc<Positioned>>) -> Router {
        self.outbound = Some(outbound);
        self
    }

    fn entry(&mut self, key: SessionKey) -> Option<&mut SessionEntry> {
        self.sessions.get_mut(key as usize).and_then(Option::as_mut)
    }

    /// Applies a positioned change to history and hands it to every
    /// interested session.
    fn apply(&mut self, change: Arc<Positioned>) -> Result<(), AppendError> {
        // A change of an epoch its origin has left behind (a repair that came
        // late) is history only: live clients have moved on to the new epoch.
        let superseded = self
            .history
            .latest(&change.pos.origin)
            .is_some_and(|(epoch, _)| epoch > change.pos.epoch);
        self.history.append(change.clone(), now_ms())?;
        self.metrics.changes_applied.inc();
        if !superseded {
            self.fan_out(&change);
        }
        Ok(())
    }

    fn fan_out(&mut self, change: &Arc<Positioned>) {
        self.stamp += 1;
        let stamp = self.stamp;
        let budget = self.budget;
        let sessions = &mut self.sessions;
        let mut delivered = 0u64;
        let mut over_budget: Vec<SessionKey> = Vec::new();

        self.index.for_each_match(&change.change, |key| {
            let Some(entry) = sessions.get_mut(key as usize).and_then(Option::as_mut) else {
                return;
            };
            if entry.stamp == stamp || entry.closing {
                return;
            }
            entry.stamp = stamp;
            if !entry.ahead.is_empty() && skip_ahead(&mut entry.ahead, &change.pos) {
                return;
            }
            let len = change.frame_len(entry.format);
            let outstanding = entry.outstanding.fetch_add(len, Ordering::Relaxed) + len;
            if outstanding > budget {
                over_budget.push(key);
                return;
            }
            entry.addr.do_send(ToSession::Change(change.clone()));
            delivered += 1;
        });

        self.metrics.deliveries.inc_by(delivered);
        for key in over_budget {
            self.close_slow(key);
        }
    }

    /// Drops a session that fell too far behind; see the module header.
    fn close_slow(&mut self, key: SessionKey) {
        let Some(entry) = self.entry(key) else { return };
        entry.closing = true;
        let id = entry.id;
        let interests = std::mem::take(&mut entry.interests);
        entry.addr.do_send(ToSession::Close(CloseCode::TooSlow));
        for interest in &interests {
            self.index.remove(interest, key);
        }
        self.metrics.subscriptions.set(self.index.len() as i64);
        self.metrics.slow_closes.inc();
        if let Some(this) = &self.this {
            schedule_cut(this, key, id);
        }
        warn!(
            "session too slow, closing code=4008 session={id} budget_bytes={}",
            self.budget
        );
    }

    fn leave(&mut self, session: u64) {
        let Some(key) = self.keys.remove(&session) else {
            return;
        };
        let Some(entry) = self.sessions.get_mut(key as usize).and_then(Option::take) else {
            return;
        };
        for interest in &entry.interests {
            self.index.remove(interest, key);
        }
        self.free.push(key);
        self.metrics.sessions.dec();
        self.metrics.subscriptions.set(self.index.len() as i64);
    }

    /// Tells every session whose token has expired to close (4001), and
    /// stops sending it changes. A scan, once a second: a few microseconds
    /// for thousands of sessions, and no per-session schedule to keep.
    fn expire(&mut self, now_secs: u64) {
        for entry in self.sessions.iter_mut().flatten() {
            if entry.expires <= now_secs && !entry.closing {
                entry.closing = true;
                entry.addr.do_send(ToSession::Expired);
            }
        }
    }

    /// Has one slice of the sessions ping their clients (or drop silent
    /// ones). Slices spread the pings over the interval: all at once, every
    /// session's heartbeat and ping would be in memory together, a peak that
    /// the allocator keeps.
    fn beat(&mut self) {
        let slice = (self.beats % BEAT_SLICES) as usize;
        self.beats += 1;
        let slices = BEAT_SLICES as usize;
        for entry in self.sessions.iter().skip(slice).step_by(slices).flatten() {
            if !entry.closing {
                entry.addr.do_send(ToSession::Heartbeat);
            }
        }
    }

    fn add_interests(&mut self, key: SessionKey, interests: &[Interest]) -> Result<(), String> {
        let max = self.max_interests;
        let entry = self.entry(key).ok_or("session is gone")?;
        let new: Vec<&Interest> = interests
            .iter()
            .filter(|i| !entry.interests.contains(i))
            .collect();
        if entry.interests.len() + new.len() > max {
            return Err(format!(
                "a connection may hold at most {max} interests; it holds {} and asked for {} more",
                entry.interests.len(),
                new.len()
            ));
        }
        let mut added = Vec::with_capacity(new.len());
        for interest in new {
            if !added.contains(interest) {
                added.push(interest.clone());
            }
        }
        // Exactly the room needed: a session's interests live as long as it
        // does, and the usual growth would give one interest room for four.
        entry.interests.reserve_exact(added.len());
        entry.interests.extend(added.iter().cloned());
        for interest in &added {
            self.index.insert(interest, key);
        }
        self.metrics.subscriptions.set(self.index.len() as i64);
        Ok(())
    }

    fn send_frame(&self, key: SessionKey, message: &ServerMessage) {
        if let Some(entry) = self.sessions.get(key as usize).and_then(Option::as_ref) {
            entry
                .addr
                .do_send(ToSession::Frame(Frame::encode(message, entry.format)));
        }
    }
}

/// True when the client has already seen this change on another node.
fn skip_ahead(ahead: &mut Vec<(Arc<str>, u64, u64)>, pos: &Position) -> bool {
    let Some(i) = ahead
        .iter()
        .position(|(origin, _, _)| *origin == pos.origin)
    else {
        return false;
    };
    let (_, epoch, seq) = ahead[i];
    if pos.epoch < epoch || (pos.epoch == epoch && pos.seq <= seq) {
        return true;
    }
    ahead.swap_remove(i);
    false
}

impl Actor for Router {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(ROUTER_MAILBOX);
        self.this = Some(ctx.address());
        let tick = self.heartbeat / BEAT_SLICES as u32;
        ctx.run_interval(tick.max(Duration::from_millis(1)), |router, _| {
            router.beat()
        });
        ctx.run_interval(HOUSEKEEPING_INTERVAL, |router, _| {
            let now = now_ms();
            router.expire(now / 1000);
            router.history.trim(now);
            let m = &router.metrics;
            m.history_changes.set(router.history.len() as i64);
            m.history_trimmed.set(router.history.trimmed() as i64);
            let age = router
                .history
                .oldest_ts()
                .map_or(0, |ts| now.saturating_sub(ts) / 1000);
            m.history_oldest_age_seconds.set(age as i64);
        });
        info!("router started node={} epoch={}", self.node, self.epoch);
    }
}

/// Changes accepted from a publisher at this node.
#[derive(Message)]
#[rtype(result = "Vec<Position>")]
pub struct Publish {
    pub changes: Vec<Change>,
}

impl Handler<Publish> for Router {
    type Result = MessageResult<Publish>;

    fn handle(&mut self, msg: Publish, _: &mut Context<Self>) -> Self::Result {
        let ts = now_ms();
        let mut positions = Vec::with_capacity(msg.changes.len());
        for change in msg.changes {
            self.seq += 1;
            let pos = Position {
                origin: self.node.clone(),
                epoch: self.epoch,
                seq: self.seq,
            };
            let positioned = Arc::new(Positioned::new(pos.clone(), ts, change));
            self.apply(positioned.clone())
                .expect("own changes are contiguous");
            self.metrics.changes_accepted.inc();
            if let Some(outbound) = &self.outbound {
                let _ = outbound.send(positioned);
            }
            positions.push(pos);
        }
        MessageResult(positions)
    }
}

/// A change positioned by another node, in order for its origin.
#[derive(Message)]
#[rtype(result = "Result<(), AppendError>")]
pub struct Apply {
    pub change: Arc<Positioned>,
}

impl Handler<Apply> for Router {
    type Result = Result<(), AppendError>;

    fn handle(&mut self, msg: Apply, _: &mut Context<Self>) -> Self::Result {
        self.apply(msg.change)
    }
}

/// An epoch of another origin that holds nothing yet (see
/// [`History::open_epoch`]).
#[derive(Message)]
#[rtype(result = "()")]
pub struct OpenEpoch {
    pub origin: Arc<str>,
    pub epoch: u64,
    pub base: u64,
}

impl Handler<OpenEpoch> for Router {
    type Result = ();

    fn handle(&mut self, msg: OpenEpoch, _: &mut Context<Self>) {
        self.history.open_epoch(&msg.origin, msg.epoch, msg.base);
    }
}

/// Changes of another origin that no node holds any more (see
/// [`History::skip_to`]).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SkipTo {
    pub origin: Arc<str>,
    pub epoch: u64,
    pub base: u64,
}

impl Handler<SkipTo> for Router {
    type Result = ();

    fn handle(&mut self, msg: SkipTo, _: &mut Context<Self>) {
        if !self.history.skip_to(&msg.origin, msg.epoch, msg.base) {
            return;
        }
        // A live session would never learn of the gap: send it to resume,
        // which answers `recovered: false` from a cursor before the skip.
        // Sessions that resumed from beyond the skip lost nothing.
        let mut closed = 0;
        for entry in self.sessions.iter_mut().flatten() {
            let past = entry.ahead.iter().any(|(origin, epoch, seq)| {
                *origin == msg.origin && *epoch == msg.epoch && *seq >= msg.base
            });
            if entry.closing || past {
                continue;
            }
            entry.closing = true;
            entry.addr.do_send(ToSession::Close(CloseCode::TooSlow));
            closed += 1;
        }
        warn!(
            "changes no node holds were skipped, sessions sent to resume code=4008 origin={} \
             epoch={} up_to={} sessions={closed}",
            msg.origin, msg.epoch, msg.base
        );
    }
}

/// Changes of one origin's epoch from history, for a peer's repair.
#[derive(Message)]
#[rtype(result = "Option<Found>")]
pub struct Range {
    pub origin: Arc<str>,
    pub epoch: u64,
    pub from: u64,
    pub to: u64,
    /// Most changes to return.
    pub max: usize,
}

/// What history holds of a [`Range`]: every change after `base` up to
/// `last`, and of those the ones asked for.
pub struct Found {
    pub base: u64,
    pub last: u64,
    pub changes: Vec<Arc<Positioned>>,
}

impl Handler<Range> for Router {
    type Result = Option<Found>;

    fn handle(&mut self, msg: Range, _: &mut Context<Self>) -> Option<Found> {
        let (base, last) = self.history.bounds(&msg.origin, msg.epoch)?;
        let from = msg.from.max(base + 1);
        let to = msg
            .to
            .min(last)
            .min(from.saturating_add(msg.max as u64).saturating_sub(1));
        let changes = if from <= to {
            self.history
                .range(&msg.origin, msg.epoch, from, to)
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        Some(Found {
            base,
            last,
            changes,
        })
    }
}

/// A session's `hello`, after its token was checked.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Hello {
    pub session: u64,
    pub addr: Addr<Session>,
    pub format: Format,
    pub outstanding: Arc<AtomicUsize>,
    pub connection: Option<Box<Connection>>,
    /// The token's expiry, seconds since the Unix epoch.
    pub expires: u64,
    /// The cursor and the (already authorized) interests of a resume.
    pub resume: Option<(WireCursor, Vec<Interest>)>,
}

impl Handler<Hello> for Router {
    type Result = ();

    fn handle(&mut self, msg: Hello, _: &mut Context<Self>) {
        if self.going_away {
            msg.addr.do_send(ToSession::Close(CloseCode::GoingAway));
            return;
        }
        let key = match self.free.pop() {
            Some(key) => key,
            None => {
                self.sessions.push(None);
                (self.sessions.len() - 1) as SessionKey
            }
        };
        let id = msg.session;
        self.keys.insert(id, key);
        self.sessions[key as usize] = Some(SessionEntry {
            addr: msg.addr.clone(),
            id,
            format: msg.format,
            interests: Vec::new(),
            outstanding: msg.outstanding,
            stamp: 0,
            ahead: Vec::new(),
            expires: msg.expires,
            connection: msg.connection,
            closing: false,
        });
        self.metrics.sessions.inc();
        let name = format!("{}-{:x}-{id}", self.node, self.epoch);
        let position = self.history.position();

        let Some((cursor, interests)) = msg.resume else {
            let welcome = ServerMessage::Welcome {
                node: &self.node,
                session: &name,
                position: &position,
                recovered: true,
                missed: 0,
            };
            let frame = Frame::encode(&welcome, msg.format);
            msg.addr.do_send(ToSession::Welcome {
                frame,
                catch_up: Vec::new(),
            });
            debug!("session hello session={name}");
            return;
        };

        let plan = self.history.catch_up(&cursor, &interests);
        self.metrics.catch_ups.inc();
        if !plan.recovered {
            self.metrics.catch_ups_unrecovered.inc();
        }
        self.metrics
            .catch_up_changes
            .inc_by(plan.changes.len() as u64);
        let welcome = ServerMessage::Welcome {
            node: &self.node,
            session: &name,
            position: &position,
            recovered: plan.recovered,
            missed: plan.changes.len() as u64,
        };
        let frame = Frame::encode(&welcome, msg.format);
        debug!(
            "session resume session={name} recovered={} missed={} interests={}",
            plan.recovered,
            plan.changes.len(),
            interests.len()
        );
        msg.addr.do_send(ToSession::Welcome {
            frame,
            catch_up: plan.changes,
        });
        if let Some(entry) = self.entry(key) {
            entry.ahead = plan.ahead;
        }
        if let Err(message) = self.add_interests(key, &interests) {
            let error = ServerMessage::Error {
                id: None,
                code: "too_many_interests",
                message: &message,
                interests: None,
            };
            self.send_frame(key, &error);
        }
    }
}

/// A session's `subscribe`, after its interests were checked and authorized.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Subscribe {
    pub session: u64,
    pub id: Option<u64>,
    pub interests: Vec<Interest>,
}

impl Handler<Subscribe> for Router {
    type Result = ();

    fn handle(&mut self, msg: Subscribe, _: &mut Context<Self>) {
        let Some(&key) = self.keys.get(&msg.session) else {
            return;
        };
        match self.add_interests(key, &msg.interests) {
            Ok(()) => self.send_frame(key, &ServerMessage::Subscribed { id: msg.id }),
            Err(message) => {
                let error = ServerMessage::Error {
                    id: msg.id,
                    code: "too_many_interests",
                    message: &message,
                    interests: None,
                };
                self.send_frame(key, &error)
            }
        }
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Unsubscribe {
    pub session: u64,
    pub id: Option<u64>,
    pub interests: Vec<Interest>,
}

impl Handler<Unsubscribe> for Router {
    type Result = ();

    fn handle(&mut self, msg: Unsubscribe, _: &mut Context<Self>) {
        let Some(&key) = self.keys.get(&msg.session) else {
            return;
        };
        let Some(entry) = self.entry(key) else { return };
        entry.interests.retain(|i| !msg.interests.contains(i));
        for interest in &msg.interests {
            self.index.remove(interest, key);
        }
        self.metrics.subscriptions.set(self.index.len() as i64);
        self.send_frame(key, &ServerMessage::Unsubscribed { id: msg.id });
    }
}

/// A session ended (closed by either side or cut).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Leave {
    pub session: u64,
}

impl Handler<Leave> for Router {
    type Result = ();

    fn handle(&mut self, msg: Leave, _: &mut Context<Self>) {
        self.leave(msg.session);
    }
}

/// Cuts the connection of a slow session that did not go by itself.
struct CutIfStuck {
    key: SessionKey,
    id: u64,
}

impl Message for CutIfStuck {
    type Result = ();
}

impl Handler<CutIfStuck> for Router {
    type Result = ();

    fn handle(&mut self, msg: CutIfStuck, _: &mut Context<Self>) {
        let Some(entry) = self.entry(msg.key) else {
            return;
        };
        if entry.id != msg.id {
            return;
        }
        warn!(
            "slow session did not close in time, cutting its connection session={}",
            msg.id
        );
        match &entry.connection {
            Some(connection) => connection.cut(),
            None => warn!("cannot cut the connection of session={}: not known", msg.id),
        }
    }
}

/// Closes every session with 4009 (node going away), before shutdown, and
/// every session that says hello after it.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct CloseAll;

impl Handler<CloseAll> for Router {
    type Result = usize;

    fn handle(&mut self, _: CloseAll, _: &mut Context<Self>) -> usize {
        self.going_away = true;
        let mut closed = 0;
        for entry in self.sessions.iter_mut().flatten() {
            entry.closing = true;
            entry.addr.do_send(ToSession::Close(CloseCode::GoingAway));
            closed += 1;
        }
        closed
    }
}

/// The node's current cursor, and the position it would give next.
#[derive(Message)]
#[rtype(result = "NodeState")]
pub struct GetState;

#[derive(Debug, Clone)]
pub struct NodeState {
    pub position: WireCursor,
    pub epoch: u64,
    pub seq: u64,
    pub sessions: usize,
    pub history: usize,
}

impl Handler<GetState> for Router {
    type Result = MessageResult<GetState>;

    fn handle(&mut self, _: GetState, _: &mut Context<Self>) -> Self::Result {
        MessageResult(NodeState {
            position: self.history.position(),
            epoch: self.epoch,
            seq: self.seq,
            sessions: self.sessions.iter().flatten().count(),
            history: self.history.len(),
        })
    }
}

/// Schedules the cut of a slow session (see [`CutIfStuck`]).
pub(crate) fn schedule_cut(router: &Addr<Router>, key: SessionKey, id: u64) {
    let router = router.clone();
    actix::spawn(async move {
        tokio::time::sleep(SLOW_CLOSE_GRACE).await;
        router.do_send(CutIfStuck { key, id });
    });
}

impl Router {
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Read access for the cluster links (repair requests).
    pub fn history(&self) -> &History {
        &self.history
    }
}
