//! One client connection: a WebSocket actor that checks the client's token,
//! turns its messages into Router requests and writes the frames the Router
//! hands it.
//!
//! Guarantees:
//! - `hello` must come first, within `limits.hello_timeout_ms`, or the
//!   session closes with 4001; at the token's `exp` (within a second: the
//!   Router keeps the time) it closes with 4001.
//! - A catch-up is written before any live change, in chunks of at most
//!   [`CATCH_UP_CHUNK`] bytes per turn, so a long catch-up costs memory
//!   only as fast as the client reads it. Live changes that arrive meanwhile
//!   wait behind it, counted against the outbound budget.
//! - A client silent for `limits.idle_timeout_ms` (no frame, no pong) is
//!   dropped and unregistered.
//!
//! Timers are the Router's, not the session's: it sends every session a
//! heartbeat each `limits.ping_interval_ms` and tells it when its token
//! expires. A timer of its own would cost each idle connection a few hundred
//! bytes, and idle connections are most of a node's memory.
//! - Malformed input closes with 4002 and a reason; an oversized frame with
//!   1009. Neither affects other sessions.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use actix_web_actors::ws;
use log::{debug, warn};

use crate::auth::{AuthError, Grant, TokenVerifier};
use crate::change::Positioned;
use crate::codec::{ClientMessage, Format, Frame, ServerMessage};
use crate::config::Limits;
use crate::connection::Connection;
use crate::interest::Interest;
use crate::metrics::Metrics;
use crate::router::{self, Router};

/// Bytes of catch-up written per turn of the session.
pub const CATCH_UP_CHUNK: usize = 64 * 1024;
/// Pause between catch-up chunks, so the connection gets to send them.
const CATCH_UP_PAUSE: Duration = Duration::from_millis(1);

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// Close codes of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCode {
    Unauthorized,
    Protocol,
    TooSlow,
    GoingAway,
    TooBig,
}

impl CloseCode {
    pub fn code(self) -> u16 {
        match self {
            CloseCode::Unauthorized => 4001,
            CloseCode::Protocol => 4002,
            CloseCode::TooSlow => 4008,
            CloseCode::GoingAway => 4009,
            CloseCode::TooBig => 1009,
        }
    }

    fn default_reason(self) -> &'static str {
        match self {
            CloseCode::Unauthorized => "unauthorized",
            CloseCode::Protocol => "protocol error",
            CloseCode::TooSlow => "too slow: reconnect and resume",
            CloseCode::GoingAway => "node going away: reconnect and resume",
            CloseCode::TooBig => "message too big",
        }
    }
}

/// What every session of a node shares.
pub struct SessionShared {
    pub router: Addr<Router>,
    pub verifier: TokenVerifier,
    pub limits: Limits,
    pub metrics: Arc<Metrics>,
    /// Open connections, against `limits.max_connections`.
    pub connections: AtomicUsize,
}

/// Holds one place in the connection count for as long as it lives.
pub struct ConnectionSlot(Arc<SessionShared>);

impl ConnectionSlot {
    /// Takes a place, or `None` when the node is full.
    pub fn take(shared: &Arc<SessionShared>) -> Option<ConnectionSlot> {
        let max = shared.limits.max_connections;
        let taken = shared
            .connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            });
        taken.ok()?;
        shared.metrics.connections.inc();
        Some(ConnectionSlot(shared.clone()))
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.connections.dec();
    }
}

/// Messages the Router (and the node) send to a session.
#[derive(Message)]
#[rtype(result = "()")]
pub enum ToSession {
    /// The answer to `hello`, and the catch-up to write before anything live.
    Welcome {
        frame: Frame,
        catch_up: Vec<Arc<Positioned>>,
    },
    /// A live change, already counted against the outbound budget.
    Change(Arc<Positioned>),
    /// A control frame (`subscribed`, `error`, ...).
    Frame(Frame),
    Close(CloseCode),
    /// Time to ping the client, or to drop it if it has been silent too long.
    Heartbeat,
    /// The session's token expired.
    Expired,
}

enum Stage {
    /// Upgraded; `hello` not yet received.
    AwaitingHello,
    /// `hello` sent on to the Router; its welcome not yet back.
    Welcoming,
    Live,
}

/// Changes waiting to be written, each with whether it is counted in the
/// outbound budget.
type Pending = VecDeque<(Arc<Positioned>, bool)>;

pub struct Session {
    id: u64,
    shared: Arc<SessionShared>,
    format: Format,
    stage: Stage,
    grant: Option<Grant>,
    outstanding: Arc<AtomicUsize>,
    /// Catch-up, then live changes that arrived while catch-up was written.
    /// The flag says whether the change is counted in `outstanding`. Boxed
    /// and dropped when empty: most sessions hold nothing here.
    pending: Option<Box<Pending>>,
    pumping: bool,
    /// Heartbeats since the client last sent anything (a pong included).
    silent_beats: u32,
    /// A fragmented message being put together: (is text, bytes so far).
    /// Boxed, since nearly every session never sees one.
    fragment: Option<Box<(bool, bytes::BytesMut)>>,
    /// Handed to the Router with `hello`.
    connection: Option<Box<Connection>>,
    _slot: ConnectionSlot,
}

impl Session {
    pub fn new(
        shared: Arc<SessionShared>,
        format: Format,
        connection: Option<Connection>,
        slot: ConnectionSlot,
    ) -> Session {
        Session {
            id: NEXT_SESSION.fetch_add(1, Ordering::Relaxed),
            shared,
            format,
            stage: Stage::AwaitingHello,
            grant: None,
            outstanding: Arc::new(AtomicUsize::new(0)),
            pending: None,
            pumping: false,
            silent_beats: 0,
            fragment: None,
            connection: connection.map(Box::new),
            _slot: slot,
        }
    }

    fn close(&mut self, ctx: &mut ws::WebsocketContext<Self>, code: CloseCode, reason: &str) {
        let reason = if reason.is_empty() {
            code.default_reason()
        } else {
            reason
        };
        // A close reason must fit in a control frame (123 bytes).
        let mut end = reason.len().min(123);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        ctx.close(Some(ws::CloseReason {
            code: ws::CloseCode::Other(code.code()),
            description: Some(reason[..end].to_string()),
        }));
        self.pending = None;
        ctx.stop();
    }

    fn write(&self, ctx: &mut ws::WebsocketContext<Self>, frame: Frame) {
        match frame {
            Frame::Text(text) => ctx.text(text),
            Frame::Binary(bytes) => ctx.binary(bytes),
        }
    }

    fn send(&self, ctx: &mut ws::WebsocketContext<Self>, message: &ServerMessage) {
        self.write(ctx, Frame::encode(message, self.format));
    }

    fn write_change(
        &self,
        ctx: &mut ws::WebsocketContext<Self>,
        change: &Positioned,
        counted: bool,
    ) -> usize {
        let frame = Frame::change(change, self.format);
        let len = frame.len();
        if counted {
            self.outstanding.fetch_sub(len, Ordering::Relaxed);
        }
        self.write(ctx, frame);
        len
    }

    /// Puts a fragmented message together. `Ok(Some)` when complete;
    /// `Err(None)` when it grows past `max_frame_bytes`, `Err(Some)` when the
    /// fragments come out of order.
    #[allow(clippy::type_complexity)]
    fn reassemble(
        &mut self,
        item: actix_http::ws::Item,
    ) -> Result<Option<(bool, Vec<u8>)>, Option<String>> {
        use actix_http::ws::Item;
        let out_of_order = || Some("fragment out of order".to_string());
        let (first, chunk, last) = match item {
            Item::FirstText(chunk) => (Some(true), chunk, false),
            Item::FirstBinary(chunk) => (Some(false), chunk, false),
            Item::Continue(chunk) => (None, chunk, false),
            Item::Last(chunk) => (None, chunk, true),
        };
        match (first, &mut self.fragment) {
            (Some(_), Some(_)) | (None, None) => return Err(out_of_order()),
            (Some(text), slot @ None) => {
                *slot = Some(Box::new((text, bytes::BytesMut::new())));
            }
            (None, Some(_)) => {}
        }
        let fragment = self.fragment.as_mut().expect("started above");
        if fragment.1.len() + chunk.len() > self.shared.limits.max_frame_bytes {
            self.fragment = None;
            return Err(None);
        }
        fragment.1.extend_from_slice(&chunk);
        if !last {
            return Ok(None);
        }
        let (text, bytes) = *self.fragment.take().expect("started above");
        Ok(Some((text, bytes.to_vec())))
    }

    /// Writes pending changes, a chunk per turn.
    fn pump(&mut self, ctx: &mut ws::WebsocketContext<Self>) {
        let Some(mut pending) = self.pending.take() else {
            self.pumping = false;
            return;
        };
        let mut written = 0;
        while written < CATCH_UP_CHUNK {
            let Some((change, counted)) = pending.pop_front() else {
                break;
            };
            written += self.write_change(ctx, &change, counted);
        }
        self.pumping = !pending.is_empty();
        if self.pumping {
            self.pending = Some(pending);
        }
        if self.pumping {
            ctx.run_later(CATCH_UP_PAUSE, |session, ctx| session.pump(ctx));
        }
    }

    fn on_message(&mut self, ctx: &mut ws::WebsocketContext<Self>, message: ClientMessage) {
        match (message, &self.stage) {
            (ClientMessage::Hello { token, resume }, Stage::AwaitingHello) => {
                self.on_hello(ctx, &token, resume)
            }
            (ClientMessage::Hello { .. }, _) => {
                self.close(ctx, CloseCode::Protocol, "hello was already received")
            }
            (_, Stage::AwaitingHello) => {
                self.close(ctx, CloseCode::Protocol, "the first message must be hello")
            }
            (ClientMessage::Subscribe { id, interests }, _) => {
                // A subscribe is all or nothing: a refusal refuses it whole.
                let (interests, refused) = self.authorize(ctx, id, interests);
                if !refused {
                    let msg = router::Subscribe {
                        session: self.id,
                        id,
                        interests,
                    };
                    self.shared.router.do_send(msg);
                }
            }
            (ClientMessage::Unsubscribe { id, interests }, _) => {
                self.shared.router.do_send(router::Unsubscribe {
                    session: self.id,
                    id,
                    interests,
                });
            }
        }
    }

    fn on_hello(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        token: &str,
        resume: Option<crate::codec::Resume>,
    ) {
        let grant = match self.shared.verifier.verify(token) {
            Ok(grant) => grant,
            Err(error) => {
                let reason = match error {
                    AuthError::Expired => "refused token",
                    AuthError::BadSignature => "refused token",
                    AuthError::Malformed(_) => "refused token",
                };
                self.shared
                    .metrics
                    .refused
                    .with_label_values(&["token"])
                    .inc();
                warn!(
                    "session refused, bad token session={} reason={error}",
                    self.id
                );
                return self.close(ctx, CloseCode::Unauthorized, &format!("{reason}: {error}"));
            }
        };
        let expires = grant.exp;
        self.grant = Some(grant);
        self.stage = Stage::Welcoming;

        let resume = match resume {
            Some(resume) => {
                // A resume goes on with the interests that are allowed.
                let (interests, _) = self.authorize(ctx, None, resume.interests);
                Some((resume.cursor, interests))
            }
            None => None,
        };
        self.shared.router.do_send(router::Hello {
            session: self.id,
            addr: ctx.address(),
            format: self.format,
            outstanding: self.outstanding.clone(),
            connection: self.connection.take(),
            expires,
            resume,
        });
    }

    /// Pings the client, or drops it when it has been silent for longer than
    /// `limits.idle_timeout_ms`. One beat more than the timeout holds is
    /// allowed, since the first beat after the client's last frame may come
    /// at once.
    fn heartbeat(&mut self, ctx: &mut ws::WebsocketContext<Self>) {
        let limits = &self.shared.limits;
        let allowed = limits
            .idle_timeout_ms
            .div_ceil(limits.ping_interval_ms.max(1));
        if u64::from(self.silent_beats) > allowed {
            debug!("session closed, client silent session={}", self.id);
            // Likely never read, but a client that was merely stalled
            // learns why.
            ctx.close(Some(ws::CloseReason {
                code: ws::CloseCode::Away,
                description: Some("no pong in time".into()),
            }));
            return ctx.stop();
        }
        self.silent_beats = self.silent_beats.saturating_add(1);
        ctx.ping(b"");
    }

    /// Checks interests against the rules and the token, and answers the
    /// refused ones with one `error` that lists them (the first refusal's
    /// code and message). Returns the accepted interests and whether any was
    /// refused.
    fn authorize(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        id: Option<u64>,
        interests: Vec<Interest>,
    ) -> (Vec<Interest>, bool) {
        let Some(grant) = self.grant.as_ref() else {
            return (Vec::new(), !interests.is_empty());
        };
        let mut first: Option<(&'static str, String)> = None;
        let mut refused = Vec::new();
        let mut accepted = Vec::with_capacity(interests.len());
        for interest in interests {
            let refusal = match interest.validate() {
                Err(error) => Some(("invalid", error.to_string())),
                Ok(()) if !grant.allows(&interest.workspace) => Some((
                    "forbidden",
                    format!(
                        "interest {interest}: the token does not grant workspace {:?}",
                        interest.workspace
                    ),
                )),
                Ok(()) => None,
            };
            match refusal {
                Some(refusal) => {
                    first.get_or_insert(refusal);
                    refused.push(interest);
                }
                None => accepted.push(interest),
            }
        }
        let Some((code, message)) = first else {
            return (accepted, false);
        };
        self.shared.metrics.refused.with_label_values(&[code]).inc();
        debug!(
            "interests refused session={} code={code} refused={}",
            self.id,
            refused.len()
        );
        let error = ServerMessage::Error {
            id,
            code,
            message: &message,
            interests: Some(&refused),
        };
        self.send(ctx, &error);
        (accepted, true)
    }
}

impl Actor for Session {
    type Context = ws::WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let limits = &self.shared.limits;
        ctx.run_later(limits.hello_timeout(), |session, ctx| {
            if matches!(session.stage, Stage::AwaitingHello) {
                debug!("session closed, no hello in time session={}", session.id);
                session.close(ctx, CloseCode::Unauthorized, "no hello in time");
            }
        });
        debug!("session open session={} format={:?}", self.id, self.format);
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.shared
            .router
            .do_send(router::Leave { session: self.id });
        debug!("session closed session={}", self.id);
    }
}

impl Handler<ToSession> for Session {
    type Result = ();

    fn handle(&mut self, msg: ToSession, ctx: &mut Self::Context) {
        match msg {
            ToSession::Welcome { frame, catch_up } => {
                self.stage = Stage::Live;
                self.write(ctx, frame);
                if catch_up.is_empty() {
                    return;
                }
                self.pending
                    .get_or_insert_with(Default::default)
                    .extend(catch_up.into_iter().map(|c| (c, false)));
                if !self.pumping {
                    self.pump(ctx);
                }
            }
            ToSession::Change(change) => match &mut self.pending {
                Some(pending) => pending.push_back((change, true)),
                None => {
                    self.write_change(ctx, &change, true);
                }
            },
            ToSession::Frame(frame) => self.write(ctx, frame),
            ToSession::Close(code) => self.close(ctx, code, ""),
            ToSession::Heartbeat => self.heartbeat(ctx),
            ToSession::Expired => {
                debug!("session token expired session={}", self.id);
                let reason = "token expired: resume with a fresh one";
                self.close(ctx, CloseCode::Unauthorized, reason);
            }
        }
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for Session {
    fn handle(&mut self, item: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        self.silent_beats = 0;
        let parsed = match item {
            Ok(ws::Message::Text(text)) => ClientMessage::from_json(text.as_bytes()),
            Ok(ws::Message::Binary(bytes)) => ClientMessage::from_msgpack(&bytes),
            Ok(ws::Message::Ping(payload)) => return ctx.pong(&payload),
            Ok(ws::Message::Pong(_)) | Ok(ws::Message::Nop) => return,
            Ok(ws::Message::Close(_)) => {
                ctx.close(None);
                return ctx.stop();
            }
            Ok(ws::Message::Continuation(item)) => match self.reassemble(item) {
                Ok(None) => return,
                Ok(Some((true, text))) => ClientMessage::from_json(&text),
                Ok(Some((false, bytes))) => ClientMessage::from_msgpack(&bytes),
                Err(Some(reason)) => Err(reason),
                Err(None) => {
                    let max = self.shared.limits.max_frame_bytes;
                    let reason = format!("messages may be at most {max} bytes");
                    return self.close(ctx, CloseCode::TooBig, &reason);
                }
            },
            Err(ws::ProtocolError::Overflow) => {
                self.shared
                    .metrics
                    .refused
                    .with_label_values(&["frame_too_big"])
                    .inc();
                let max = self.shared.limits.max_frame_bytes;
                warn!(
                    "session sent an oversized frame session={} max_bytes={max}",
                    self.id
                );
                let reason = format!("frames may be at most {max} bytes");
                return self.close(ctx, CloseCode::TooBig, &reason);
            }
            Err(ws::ProtocolError::Io(error)) => {
                // The connection broke (the client went away, or the node is
                // stopping): nothing to answer.
                debug!("session connection ended session={} error={error}", self.id);
                return ctx.stop();
            }
            Err(error) => Err(format!("bad WebSocket frame: {error}")),
        };
        match parsed {
            Ok(message) => self.on_message(ctx, message),
            Err(reason) => {
                self.shared
                    .metrics
                    .refused
                    .with_label_values(&["protocol"])
                    .inc();
                warn!(
                    "session sent a bad message session={} reason={reason:?}",
                    self.id
                );
                self.close(ctx, CloseCode::Protocol, &reason);
            }
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        ctx.stop();
    }
}
