//! A reconnecting client: holds a WebSocket to one node of a list, and hands
//! its caller every change matching its interests, once, in per-origin
//! order, across disconnects.
//!
//! ```no_run
//! # async fn example() -> Result<(), ripple::client::ClientError> {
//! use ripple::client::{Client, ClientConfig, Event, TokenSource};
//! use ripple::interest::Interest;
//!
//! let token = TokenSource::Fixed("<JWT>".into());
//! let mut config = ClientConfig::new(vec!["ws://127.0.0.1:8080/v1/ws".into()], token);
//! config.interests = vec![Interest::workspace("acme")];
//! let mut client = Client::connect(config)?;
//! while let Some(event) = client.next().await {
//!     match event {
//!         Event::Change(change) => println!("{}", change.json_frame()),
//!         Event::Reset => { /* reload state from the source of truth */ }
//!         _ => {}
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Guarantees:
//! - The first connection (without [`ClientConfig::cursor`]) says `hello`
//!   without `resume`, starts its cursor from `welcome.position` and then
//!   subscribes. Every later connection resumes with its cursor and the
//!   interests the node confirmed, so the node sends what was missed before
//!   anything live.
//! - The cursor moves an origin forward only as that origin's changes
//!   arrive; it is never taken from `welcome.position` after a resume,
//!   except when the node answers `recovered: false`: then it restarts from
//!   there and the caller gets [`Event::Reset`] (changes may have been lost;
//!   reload your state).
//! - The caller never gets the same position twice: a change whose
//!   `(epoch, seq)` is not after the cursor's for its origin is dropped (a
//!   different epoch counts as new).
//! - On any close or error (4001, 4008, 4009, a cut connection, a node that
//!   stopped answering) it reconnects to the next node of its list, round
//!   robin, after an exponential backoff with full jitter, bounded by
//!   [`Backoff::max`]. After 4001 it fetches a fresh token first. It never
//!   gives up; [`Client::close`] (or dropping the client) stops it.
//!
//! Backpressure: the connection runs in a spawned task that hands events over
//! a bounded channel ([`ClientConfig::buffer`]). When the caller does not
//! keep up, the task stops reading the socket, the node's outbound budget
//! for the session fills, the node closes it with 4008, and the client
//! resumes where its caller stopped (a caller that stops for longer than
//! the node's idle timeout is dropped the same way: pings go unanswered).
//! Nothing is lost; a slow caller costs a reconnect, not memory.
//!
//! Not done: `wss://` (no TLS in this build); no cluster-aware node
//! discovery (the node list is fixed).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use log::{debug, warn};
use rand::Rng;
use rmpv::Value;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::change::{Change, Position, Positioned};
use crate::codec::{decode_change_msgpack, json_to_value, Format, WireCursor};
use crate::interest::Interest;

/// How long a TCP connect plus WebSocket handshake (or a token fetch) may
/// take before the attempt counts as failed.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the node has to answer `hello` with `welcome`.
pub const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`Client::close`] waits for the close frame to go out.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// The request id of the subscription to [`ClientConfig::interests`] made on
/// the first connection; ids from [`Client::subscribe`] start after it.
pub const INITIAL_SUBSCRIBE_ID: u64 = 0;

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A token being fetched: resolves to the token or to why it could not be
/// had.
pub type TokenFuture = Pin<Box<dyn Future<Output = Result<String, String>> + Send>>;

/// Where the client gets the token it says `hello` with.
#[derive(Clone)]
pub enum TokenSource {
    /// The same token every time. When it expires the node closes with 4001
    /// and the client keeps retrying with it, reporting each 4001.
    Fixed(String),
    /// Called for the first connection and after every 4001 (token expired
    /// or refused); a failed fetch counts as a failed connection attempt.
    Fetch(Arc<dyn Fn() -> TokenFuture + Send + Sync>),
}

impl TokenSource {
    /// A source that calls `fetch` (an async function) for each fresh token.
    pub fn fetch<F, Fut>(fetch: F) -> TokenSource
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, String>> + Send + 'static,
    {
        TokenSource::Fetch(Arc::new(move || Box::pin(fetch())))
    }

    /// A source that calls a quick, non-blocking function (minting a token
    /// locally, say) for each fresh token.
    pub fn from_fn(make: impl Fn() -> String + Send + Sync + 'static) -> TokenSource {
        let make = Arc::new(make);
        TokenSource::fetch(move || {
            let token = make();
            async move { Ok(token) }
        })
    }

    async fn get(&self) -> Result<String, String> {
        match self {
            TokenSource::Fixed(token) => Ok(token.clone()),
            TokenSource::Fetch(fetch) => fetch().await,
        }
    }
}

impl fmt::Debug for TokenSource {
    // Never shows the token itself: it would end up in logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::Fixed(_) => f.write_str("TokenSource::Fixed(..)"),
            TokenSource::Fetch(_) => f.write_str("TokenSource::Fetch(..)"),
        }
    }
}

/// Delays between connection attempts: attempt `n` (from 0) waits a random
/// time between zero and `min(max, initial * 2^n)` ("full jitter"), so that
/// many clients dropped at once by a node do not come back at once. The
/// count restarts at every `welcome`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// Default 100 ms.
    pub initial: Duration,
    /// Default 5 s.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
        }
    }
}

impl Backoff {
    /// The upper bound of the wait before attempt `attempt` (from 0).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// A random wait for attempt `attempt`, at most [`Backoff::ceiling`].
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt).as_millis() as u64;
        Duration::from_millis(rand::thread_rng().gen_range(0..=ceiling))
    }
}

/// What [`Client::connect`] needs.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// WebSocket URLs of the nodes, e.g. `ws://127.0.0.1:8080/v1/ws`. The
    /// client starts with the first and moves to the next on each reconnect.
    pub nodes: Vec<String>,
    pub token: TokenSource,
    /// What to receive. Empty is allowed: subscribe later.
    pub interests: Vec<Interest>,
    /// The wire format (the WebSocket subprotocol). Default JSON.
    pub format: Format,
    pub backoff: Backoff,
    /// Where to resume from, e.g. a cursor saved from [`Client::cursor`] by
    /// an earlier run. `None` starts live from the node's current position.
    pub cursor: Option<WireCursor>,
    /// Events held for a caller that is not reading. Default 1,024.
    pub buffer: usize,
    /// How long the node may stay silent (not even a ping) before the
    /// client gives up on the connection and reconnects. Default 60 s;
    /// nodes ping every 25 s by default.
    pub idle_timeout: Duration,
}

impl ClientConfig {
    /// A config with the defaults: JSON, no interests, no cursor.
    pub fn new(nodes: Vec<String>, token: TokenSource) -> ClientConfig {
        ClientConfig {
            nodes,
            token,
            interests: Vec::new(),
            format: Format::Json,
            backoff: Backoff::default(),
            cursor: None,
            buffer: 1024,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("the client needs at least one node URL")]
    NoNodes,
    #[error("{url:?} is not a WebSocket URL (expected ws://host:port/v1/ws): {reason}")]
    BadUrl { url: String, reason: String },
}

/// What the client hands its caller, in the order it happened.
#[derive(Debug)]
pub enum Event {
    /// A change matching the interests, after every earlier one of its
    /// origin. Its `pos` is always after the previous one of that origin.
    /// `change.data` is a MessagePack value in both formats (in JSON,
    /// `{"$binary": ...}` comes back as bytes); `json_frame()` renders the
    /// whole change as the JSON `change` frame.
    Change(Positioned),
    /// Connected to `node`. After a resume, `missed` changes of catch-up
    /// follow; `recovered: false` is followed by [`Event::Reset`].
    Welcome {
        node: String,
        recovered: bool,
        missed: u64,
    },
    /// The node could not prove a complete catch-up (it restarted without
    /// history, or trimmed past the cursor): changes may have been missed.
    /// Reload state from your source of truth; live changes follow.
    Reset,
    /// The node confirmed the subscription request `id` (see
    /// [`INITIAL_SUBSCRIBE_ID`] and [`Client::subscribe`]).
    Subscribed { id: u64 },
    /// The node confirmed the unsubscription request `id`.
    Unsubscribed { id: u64 },
    /// A connection ended, or an attempt failed; the client retries after
    /// its backoff. `code` is the close code when the node sent one (4001,
    /// 4008, 4009, ...), `None` when the connection was cut or never made.
    Disconnected { code: Option<u16>, reason: String },
    /// The node refused a request (`error` op). With an `id`, that
    /// subscription is dropped; without, the listed interests of a resume
    /// were refused and the client no longer holds them.
    Error {
        id: Option<u64>,
        code: String,
        message: String,
    },
}

/// A handle on a running client. Dropping it stops the client.
pub struct Client {
    events: mpsc::Receiver<Delivery>,
    commands: mpsc::UnboundedSender<Command>,
    cursor: WireCursor,
    next_id: u64,
    task: JoinHandle<()>,
}

impl Client {
    /// Starts the client in a task of the current tokio runtime (so call it
    /// from inside one). It connects at once; events arrive through
    /// [`Client::next`].
    pub fn connect(config: ClientConfig) -> Result<Client, ClientError> {
        if config.nodes.is_empty() {
            return Err(ClientError::NoNodes);
        }
        for url in &config.nodes {
            if let Err(error) = url.as_str().into_client_request() {
                return Err(ClientError::BadUrl {
                    url: url.clone(),
                    reason: error.to_string(),
                });
            }
        }

        let (events_tx, events) = mpsc::channel(config.buffer.max(1));
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let cursor = config.cursor.clone().unwrap_or_default();
        let runner = Runner::new(config, events_tx, commands_rx);
        let task = tokio::spawn(runner.run());
        Ok(Client {
            events,
            commands,
            cursor,
            next_id: INITIAL_SUBSCRIBE_ID + 1,
            task,
        })
    }

    /// The next event; `None` once the client is closed.
    pub async fn next(&mut self) -> Option<Event> {
        let delivery = self.events.recv().await?;
        if let Some(cursor) = delivery.cursor {
            self.cursor = cursor;
        }
        if let Event::Change(change) = &delivery.event {
            let pos = &change.pos;
            self.cursor
                .insert(pos.origin.to_string(), (pos.epoch, pos.seq));
        }
        Some(delivery.event)
    }

    /// The cursor of the changes handed out so far by [`Client::next`]: save
    /// it and pass it as [`ClientConfig::cursor`] to pick up from there.
    pub fn cursor(&self) -> &WireCursor {
        &self.cursor
    }

    /// Adds interests, now or as soon as the client is connected. The node
    /// answers with [`Event::Subscribed`] or [`Event::Error`] carrying the
    /// returned id. Live from when the node takes it: no catch-up.
    pub fn subscribe(&mut self, interests: Vec<Interest>) -> u64 {
        let id = self.take_id();
        let _ = self.commands.send(Command::Subscribe { id, interests });
        id
    }

    /// Drops interests; [`Event::Unsubscribed`] follows with the returned id
    /// when connected.
    pub fn unsubscribe(&mut self, interests: Vec<Interest>) -> u64 {
        let id = self.take_id();
        let _ = self.commands.send(Command::Unsubscribe { id, interests });
        id
    }

    /// Closes the connection (with a close frame when connected) and stops
    /// the client.
    pub async fn close(mut self) {
        let _ = self.commands.send(Command::Close);
        // A task blocked on a full channel sees it closed and stops.
        self.events.close();
        let wait = CLOSE_TIMEOUT + Duration::from_secs(1);
        let _ = tokio::time::timeout(wait, &mut self.task).await;
    }

    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Close);
    }
}

/// An event, and the cursor the caller's view jumps to with it (the first
/// welcome, a reset).
struct Delivery {
    event: Event,
    cursor: Option<WireCursor>,
}

enum Command {
    Subscribe { id: u64, interests: Vec<Interest> },
    Unsubscribe { id: u64, interests: Vec<Interest> },
    Close,
}

/// The caller is gone or asked to close.
struct Stop;

/// Why a connection ended.
struct Ended {
    code: Option<u16>,
    reason: String,
}

impl Ended {
    fn cut(reason: impl Into<String>) -> Ended {
        Ended {
            code: None,
            reason: reason.into(),
        }
    }
}

/// The connection task.
struct Runner {
    nodes: Vec<String>,
    token_source: TokenSource,
    format: Format,
    backoff: Backoff,
    idle_timeout: Duration,
    events: mpsc::Sender<Delivery>,
    commands: mpsc::UnboundedReceiver<Command>,
    /// `None` until the first welcome (or a cursor given in the config):
    /// then every connection resumes.
    cursor: Option<WireCursor>,
    /// Interests the node confirmed: what a resume asks for.
    held: Vec<Interest>,
    /// Subscriptions asked for and not yet confirmed, sent (again) after
    /// each welcome.
    pending: Vec<(u64, Vec<Interest>)>,
    token: Option<String>,
    node: usize,
    attempt: u32,
}

impl Runner {
    fn new(
        config: ClientConfig,
        events: mpsc::Sender<Delivery>,
        commands: mpsc::UnboundedReceiver<Command>,
    ) -> Runner {
        let (held, pending) = match config.cursor {
            Some(_) => (config.interests, Vec::new()),
            None if config.interests.is_empty() => (Vec::new(), Vec::new()),
            None => (Vec::new(), vec![(INITIAL_SUBSCRIBE_ID, config.interests)]),
        };
        Runner {
            nodes: config.nodes,
            token_source: config.token,
            format: config.format,
            backoff: config.backoff,
            idle_timeout: config.idle_timeout,
            events,
            commands,
            cursor: config.cursor,
            held,
            pending,
            token: None,
            node: 0,
            attempt: 0,
        }
    }

    async fn run(mut self) {
        loop {
            let ended = match self.connection().await {
                Ok(ended) => ended,
                Err(Stop) => return,
            };
            if ended.code == Some(4001) {
                self.token = None;
            }
            let url = &self.nodes[self.node];
            debug!(
                "client disconnected node={url} code={:?} reason={:?}",
                ended.code, ended.reason
            );
            let event = Event::Disconnected {
                code: ended.code,
                reason: ended.reason,
            };
            if self.emit(event, None).await.is_err() {
                return;
            }

            self.node = (self.node + 1) % self.nodes.len();
            let delay = self.backoff.delay(self.attempt);
            self.attempt = self.attempt.saturating_add(1);
            let wake = tokio::time::Instant::now() + delay;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(wake) => break,
                    command = self.commands.recv() => {
                        if self.on_command(command, None).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    }

    /// One connection, from connect to its end.
    async fn connection(&mut self) -> Result<Ended, Stop> {
        let url = self.nodes[self.node].clone();

        let token = match &self.token {
            Some(token) => token.clone(),
            None => match tokio::time::timeout(CONNECT_TIMEOUT, self.token_source.get()).await {
                Ok(Ok(token)) => {
                    self.token = Some(token.clone());
                    token
                }
                Ok(Err(error)) => return Ok(Ended::cut(format!("no token: {error}"))),
                Err(_) => return Ok(Ended::cut("no token: the token fetch timed out")),
            },
        };

        let mut request = url
            .as_str()
            .into_client_request()
            .expect("checked in Client::connect");
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static(self.format.protocol()),
        );
        let connect = tokio_tungstenite::connect_async_with_config(request, None, true);
        let mut socket = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok((socket, _))) => socket,
            Ok(Err(error)) => return Ok(Ended::cut(format!("cannot connect: {error}"))),
            Err(_) => return Ok(Ended::cut("cannot connect: timed out")),
        };
        debug!("client connected node={url}");

        let served = self.serve(&mut socket, &url, &token).await;
        if served.is_err() {
            close_quietly(&mut socket).await;
        }
        served
    }

    /// Says hello on a new connection and handles it until it ends.
    async fn serve(&mut self, socket: &mut Socket, url: &str, token: &str) -> Result<Ended, Stop> {
        let resume = self.cursor.as_ref().map(|cursor| ResumeOut {
            cursor,
            interests: &self.held,
        });
        let resumed = resume.is_some();
        let hello = Outgoing::Hello { token, resume };
        if let Err(error) = socket.send(encode(&hello, self.format)).await {
            return Ok(Ended::cut(format!("cannot send hello: {error}")));
        }

        let mut welcomed = false;
        loop {
            let wait = if welcomed {
                self.idle_timeout
            } else {
                WELCOME_TIMEOUT
            };
            let message = tokio::select! {
                command = self.commands.recv() => {
                    self.on_command(command, welcomed.then_some(&mut *socket)).await?;
                    continue;
                }
                message = tokio::time::timeout(wait, socket.next()) => message,
            };

            let incoming = match message {
                Err(_) if welcomed => {
                    close_quietly(socket).await;
                    let reason = format!("the node sent nothing for {wait:?}");
                    return Ok(Ended::cut(reason));
                }
                Err(_) => return Ok(Ended::cut("no welcome in time")),
                Ok(None) => return Ok(Ended::cut("connection closed")),
                Ok(Some(Err(error))) => return Ok(Ended::cut(error.to_string())),
                Ok(Some(Ok(message))) => match message {
                    Message::Text(text) => decode_json(text.as_bytes()),
                    Message::Binary(bytes) => decode_msgpack(bytes),
                    Message::Close(frame) => {
                        return Ok(match frame {
                            Some(frame) => Ended {
                                code: Some(frame.code.into()),
                                reason: frame.reason.into_owned(),
                            },
                            None => Ended::cut("closed without a code"),
                        })
                    }
                    // Pings are answered by the socket as it reads.
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
                },
            };
            let incoming = match incoming {
                Ok(Some(incoming)) => incoming,
                Ok(None) => continue,
                Err(error) => {
                    // A change we cannot read would be a silent gap:
                    // reconnect and let the resume send it again.
                    warn!("client got a frame it cannot read node={url} error={error:?}");
                    close_quietly(socket).await;
                    return Ok(Ended::cut(format!("unreadable frame: {error}")));
                }
            };

            if let Incoming::Welcome {
                node,
                position,
                recovered,
                missed,
            } = incoming
            {
                welcomed = true;
                self.attempt = 0;
                self.on_welcome(node, position, resumed, recovered, missed)
                    .await?;
                for (id, interests) in &self.pending {
                    let subscribe = Outgoing::Subscribe { id: *id, interests };
                    if let Err(error) = socket.send(encode(&subscribe, self.format)).await {
                        return Ok(Ended::cut(format!("cannot subscribe: {error}")));
                    }
                }
                continue;
            }
            self.on_incoming(incoming, resumed).await?;
        }
    }

    async fn on_welcome(
        &mut self,
        node: String,
        position: WireCursor,
        resumed: bool,
        recovered: bool,
        missed: u64,
    ) -> Result<(), Stop> {
        debug!(
            "client welcomed node={node} resumed={resumed} recovered={recovered} missed={missed}"
        );
        let welcome = Event::Welcome {
            node,
            recovered,
            missed,
        };
        if !resumed {
            self.cursor = Some(position.clone());
            return self.emit(welcome, Some(position)).await;
        }
        self.emit(welcome, None).await?;
        if !recovered {
            debug!("client resume not recovered: changes may be missing, continuing live");
            self.cursor = Some(position.clone());
            self.emit(Event::Reset, Some(position)).await?;
        }
        Ok(())
    }

    async fn on_incoming(&mut self, incoming: Incoming, resumed: bool) -> Result<(), Stop> {
        match incoming {
            Incoming::Change(change) => self.on_change(change).await,
            Incoming::Changes(changes) => {
                for change in changes {
                    self.on_change(change).await?;
                }
                Ok(())
            }
            Incoming::Subscribed { id } => {
                if let Some(i) = self.pending.iter().position(|(p, _)| *p == id) {
                    let (_, interests) = self.pending.remove(i);
                    for interest in interests {
                        if !self.held.contains(&interest) {
                            self.held.push(interest);
                        }
                    }
                }
                self.emit(Event::Subscribed { id }, None).await
            }
            Incoming::Unsubscribed { id } => self.emit(Event::Unsubscribed { id }, None).await,
            Incoming::Error {
                id,
                code,
                message,
                interests,
            } => {
                warn!("client request refused id={id:?} code={code} message={message:?}");
                match (id, interests) {
                    (Some(id), _) => self.pending.retain(|(p, _)| *p != id),
                    // Only a resume's interests are refused without an id;
                    // the node lists them and resumed the others.
                    (None, Some(refused)) if resumed => self.held.retain(|i| !refused.contains(i)),
                    // A node that does not list them resumed none.
                    (None, None) if resumed => self.held.clear(),
                    (None, _) => {}
                }
                self.emit(Event::Error { id, code, message }, None).await
            }
            // Answered in `connection`; a second one is ignored.
            Incoming::Welcome { .. } => Ok(()),
        }
    }

    async fn on_change(&mut self, change: Positioned) -> Result<(), Stop> {
        let cursor = self.cursor.get_or_insert_with(HashMap::new);
        if !advance(cursor, &change.pos) {
            debug!(
                "client dropped a repeated change origin={} epoch={} seq={}",
                change.pos.origin, change.pos.epoch, change.pos.seq
            );
            return Ok(());
        }
        self.emit(Event::Change(change), None).await
    }

    /// Applies a caller's command; sends it when `live` holds a welcomed
    /// connection.
    async fn on_command(
        &mut self,
        command: Option<Command>,
        live: Option<&mut Socket>,
    ) -> Result<(), Stop> {
        let message = match command {
            None | Some(Command::Close) => return Err(Stop),
            Some(Command::Subscribe { id, interests }) => {
                self.pending.push((id, interests));
                let (id, interests) = self.pending.last().expect("just pushed");
                Outgoing::Subscribe { id: *id, interests }
            }
            Some(Command::Unsubscribe { id, interests }) => {
                self.held.retain(|i| !interests.contains(i));
                for (_, asked) in &mut self.pending {
                    asked.retain(|i| !interests.contains(i));
                }
                let Some(socket) = live else { return Ok(()) };
                let message = Outgoing::Unsubscribe {
                    id,
                    interests: &interests,
                };
                // A failed send shows up as an error on the next read.
                let _ = socket.send(encode(&message, self.format)).await;
                return Ok(());
            }
        };
        if let Some(socket) = live {
            let _ = socket.send(encode(&message, self.format)).await;
        }
        Ok(())
    }

    /// Hands an event to the caller, waiting while the channel is full (see
    /// the module header); `Stop` when the caller is gone.
    async fn emit(&self, event: Event, cursor: Option<WireCursor>) -> Result<(), Stop> {
        self.events
            .send(Delivery { event, cursor })
            .await
            .map_err(|_| Stop)
    }
}

async fn close_quietly(socket: &mut Socket) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, socket.close(None)).await;
}

/// Moves the cursor to `pos` if it is new: after the cursor's seq in the
/// same epoch, or in another epoch. False for a repeat.
fn advance(cursor: &mut WireCursor, pos: &Position) -> bool {
    if let Some(&(epoch, seq)) = cursor.get(&*pos.origin) {
        if epoch == pos.epoch && pos.seq <= seq {
            return false;
        }
    }
    cursor.insert(pos.origin.to_string(), (pos.epoch, pos.seq));
    true
}

#[derive(Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Outgoing<'a> {
    Hello {
        token: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        resume: Option<ResumeOut<'a>>,
    },
    Subscribe {
        id: u64,
        interests: &'a [Interest],
    },
    Unsubscribe {
        id: u64,
        interests: &'a [Interest],
    },
}

#[derive(Serialize)]
struct ResumeOut<'a> {
    cursor: &'a WireCursor,
    interests: &'a [Interest],
}

fn encode(message: &Outgoing, format: Format) -> Message {
    match format {
        Format::Json => Message::Text(serde_json::to_string(message).expect("messages encode")),
        Format::MsgPack => {
            Message::Binary(rmp_serde::to_vec_named(message).expect("messages encode"))
        }
    }
}

/// A frame from the node, as the client acts on it.
#[derive(Debug)]
enum Incoming {
    Welcome {
        node: String,
        position: WireCursor,
        recovered: bool,
        missed: u64,
    },
    Change(Positioned),
    Changes(Vec<Positioned>),
    Subscribed {
        id: u64,
    },
    Unsubscribed {
        id: u64,
    },
    Error {
        id: Option<u64>,
        code: String,
        message: String,
        /// The interests refused, when the node lists them.
        interests: Option<Vec<Interest>>,
    },
}

/// Reads a text frame. `Ok(None)` for an op this client does not know (a
/// newer node's), which it ignores.
fn decode_json(text: &[u8]) -> Result<Option<Incoming>, String> {
    let json: serde_json::Value =
        serde_json::from_slice(text).map_err(|e| format!("not JSON: {e}"))?;
    decode_value(json_to_value(json))
}

/// Reads a binary frame; a `change` frame, the common case, in one pass.
fn decode_msgpack(bytes: Vec<u8>) -> Result<Option<Incoming>, String> {
    if let Ok((pos, ts, change)) = decode_change_msgpack(&bytes) {
        let frame = bytes::Bytes::from(bytes);
        return Ok(Some(Incoming::Change(Positioned::with_msgpack(
            pos, ts, change, frame,
        ))));
    }
    let value = rmpv::decode::read_value(&mut bytes.as_slice())
        .map_err(|e| format!("not MessagePack: {e}"))?;
    decode_value(value)
}

/// The non-change frames, read with serde.
#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Control {
    Welcome {
        node: String,
        #[serde(default)]
        position: WireCursor,
        recovered: bool,
        #[serde(default)]
        missed: u64,
    },
    Subscribed {
        #[serde(default)]
        id: Option<u64>,
    },
    Unsubscribed {
        #[serde(default)]
        id: Option<u64>,
    },
    Error {
        #[serde(default)]
        id: Option<u64>,
        code: String,
        #[serde(default)]
        message: String,
        #[serde(default)]
        interests: Option<Vec<Interest>>,
    },
}

fn decode_value(value: Value) -> Result<Option<Incoming>, String> {
    let op = field(&value, "op").and_then(Value::as_str).unwrap_or("");
    let op = op.to_string();
    match op.as_str() {
        "change" => Ok(Some(Incoming::Change(change_from_value(value)?))),
        "changes" => {
            let Some(Value::Array(items)) = field(&value, "items") else {
                return Err("a changes frame needs an `items` array".into());
            };
            let changes = items
                .iter()
                .cloned()
                .map(change_from_value)
                .collect::<Result<_, _>>()?;
            Ok(Some(Incoming::Changes(changes)))
        }
        "welcome" | "subscribed" | "unsubscribed" | "error" => {
            let control: Control =
                rmpv::ext::from_value(value).map_err(|e| format!("bad {op} frame: {e}"))?;
            Ok(Some(match control {
                Control::Welcome {
                    node,
                    position,
                    recovered,
                    missed,
                } => Incoming::Welcome {
                    node,
                    position,
                    recovered,
                    missed,
                },
                Control::Subscribed { id } => Incoming::Subscribed {
                    id: id.unwrap_or(INITIAL_SUBSCRIBE_ID),
                },
                Control::Unsubscribed { id } => Incoming::Unsubscribed {
                    id: id.unwrap_or(INITIAL_SUBSCRIBE_ID),
                },
                Control::Error {
                    id,
                    code,
                    message,
                    interests,
                } => Incoming::Error {
                    id,
                    code,
                    message,
                    interests,
                },
            }))
        }
        _ => {
            debug!("client ignored a frame with an unknown op op={op:?}");
            Ok(None)
        }
    }
}

fn field<'a>(value: &'a Value, key: &str) -> Option<&'a Value> {
    let Value::Map(entries) = value else {
        return None;
    };
    entries
        .iter()
        .find(|(k, _)| k.as_str() == Some(key))
        .map(|(_, v)| v)
}

/// Reads one change (a `change` frame, or an item of `changes`). Fields it
/// does not know are ignored, so newer nodes can add some.
fn change_from_value(value: Value) -> Result<Positioned, String> {
    let Value::Map(entries) = value else {
        return Err("a change must be a map".into());
    };
    let text = |v: Value, name: &str| -> Result<String, String> {
        match v {
            Value::String(s) => s.into_str().ok_or_else(|| format!("`{name}` is not UTF-8")),
            _ => Err(format!("`{name}` must be a string")),
        }
    };
    let mut pos = None;
    let mut ts = 0;
    let mut workspace = None;
    let mut change = Change {
        workspace: String::new(),
        record: None,
        lists: Vec::new(),
        kind: None,
        data: None,
    };
    for (key, v) in entries {
        match key.as_str() {
            Some("pos") => {
                let Value::Array(parts) = v else {
                    return Err("`pos` must be [origin, epoch, seq]".into());
                };
                let [origin, epoch, seq] = <[Value; 3]>::try_from(parts)
                    .map_err(|_| "`pos` must be [origin, epoch, seq]".to_string())?;
                let (Some(epoch), Some(seq)) = (epoch.as_u64(), seq.as_u64()) else {
                    return Err("`pos` epoch and seq must be unsigned integers".into());
                };
                pos = Some(Position {
                    origin: text(origin, "pos")?.into(),
                    epoch,
                    seq,
                });
            }
            Some("ts") => ts = v.as_u64().ok_or("`ts` must be an unsigned integer")?,
            Some("workspace") => workspace = Some(text(v, "workspace")?),
            Some("record") if !v.is_nil() => change.record = Some(text(v, "record")?),
            Some("kind") if !v.is_nil() => change.kind = Some(text(v, "kind")?),
            Some("lists") if !v.is_nil() => {
                let Value::Array(items) = v else {
                    return Err("`lists` must be an array".into());
                };
                change.lists = items
                    .into_iter()
                    .map(|l| text(l, "lists"))
                    .collect::<Result<_, _>>()?;
            }
            Some("data") => change.data = Some(v),
            _ => {}
        }
    }
    change.workspace = workspace.ok_or("a change needs a `workspace`")?;
    let pos = pos.ok_or("a change needs a `pos`")?;
    Ok(Positioned::new(pos, ts, change))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(origin: &str, epoch: u64, seq: u64) -> Position {
        Position {
            origin: origin.into(),
            epoch,
            seq,
        }
    }

    #[test]
    fn cursor_drops_repeats_and_takes_new_epochs() {
        let mut cursor = WireCursor::new();
        assert!(advance(&mut cursor, &pos("n1", 5, 1)));
        assert!(advance(&mut cursor, &pos("n1", 5, 2)));
        assert!(!advance(&mut cursor, &pos("n1", 5, 2)), "a repeat");
        assert!(!advance(&mut cursor, &pos("n1", 5, 1)), "an older one");
        assert!(advance(&mut cursor, &pos("n2", 1, 9)), "another origin");
        assert!(advance(&mut cursor, &pos("n1", 6, 1)), "a new epoch");
        assert_eq!(cursor["n1"], (6, 1));
    }

    #[test]
    fn backoff_doubles_up_to_its_bound() {
        let backoff = Backoff::default();
        assert_eq!(backoff.ceiling(0), Duration::from_millis(100));
        assert_eq!(backoff.ceiling(3), Duration::from_millis(800));
        assert_eq!(backoff.ceiling(10), Duration::from_secs(5));
        assert_eq!(backoff.ceiling(u32::MAX), Duration::from_secs(5));
        for attempt in 0..40 {
            assert!(backoff.delay(attempt) <= backoff.ceiling(attempt));
        }
    }

    #[test]
    fn reads_change_frames_in_both_formats() {
        let change = Change {
            workspace: "acme".into(),
            record: Some("r1".into()),
            lists: vec!["deals".into()],
            kind: None,
            data: Some(Value::Binary(vec![0, 255])),
        };
        let sent = Positioned::new(pos("n1", 7, 3), 99, change);

        let Some(Incoming::Change(json)) = decode_json(sent.json_frame().as_bytes()).unwrap()
        else {
            panic!("a change")
        };
        assert_eq!((json.pos.clone(), json.ts), (sent.pos.clone(), 99));
        assert_eq!(json.change, sent.change, "$binary comes back as bytes");

        let frame = sent.msgpack_frame().to_vec();
        let Some(Incoming::Change(packed)) = decode_msgpack(frame).unwrap() else {
            panic!("a change")
        };
        assert_eq!(packed.change, sent.change);
    }

    #[test]
    fn reads_batches_controls_and_skips_unknown_ops() {
        let batch = serde_json::json!({"op": "changes", "items": [
            {"op": "change", "pos": ["n1", 1, 1], "ts": 5, "workspace": "w"},
            {"op": "change", "pos": ["n1", 1, 2], "ts": 6, "workspace": "w", "lists": ["l"]},
        ]});
        let bytes = rmp_serde::to_vec_named(&batch).unwrap();
        let Some(Incoming::Changes(items)) = decode_msgpack(bytes).unwrap() else {
            panic!("a batch")
        };
        assert_eq!(items[1].pos, pos("n1", 1, 2));
        assert_eq!(items[1].change.lists, vec!["l"]);

        let welcome = br#"{"op":"welcome","node":"n1","session":"s","position":{"n1":[4,2]},
            "recovered":false,"missed":0}"#;
        let Some(Incoming::Welcome {
            position,
            recovered,
            ..
        }) = decode_json(welcome).unwrap()
        else {
            panic!("a welcome")
        };
        assert_eq!((position["n1"], recovered), ((4, 2), false));

        let error = br#"{"op":"error","id":3,"code":"forbidden","message":"no"}"#;
        assert!(matches!(
            decode_json(error).unwrap(),
            Some(Incoming::Error { id: Some(3), .. })
        ));
        assert!(decode_json(br#"{"op":"novelty"}"#).unwrap().is_none());
        assert!(decode_json(br#"{"op":"change","pos":["n1"]}"#).is_err());
    }

    #[test]
    fn hello_and_subscribe_read_as_the_node_expects() {
        use crate::codec::ClientMessage;
        let cursor: WireCursor = [("n1".to_string(), (4, 2))].into();
        let interests = [Interest::list("w", "l")];
        let hello = Outgoing::Hello {
            token: "t",
            resume: Some(ResumeOut {
                cursor: &cursor,
                interests: &interests,
            }),
        };
        for format in [Format::Json, Format::MsgPack] {
            let parsed = match encode(&hello, format) {
                Message::Text(text) => ClientMessage::from_json(text.as_bytes()),
                Message::Binary(bytes) => ClientMessage::from_msgpack(&bytes),
                _ => unreachable!(),
            };
            let Ok(ClientMessage::Hello {
                resume: Some(resume),
                ..
            }) = parsed
            else {
                panic!("{parsed:?}")
            };
            assert_eq!(resume.cursor, cursor);
            assert_eq!(resume.interests, interests);
        }
        let Message::Binary(bytes) = encode(
            &Outgoing::Subscribe {
                id: 4,
                interests: &interests,
            },
            Format::MsgPack,
        ) else {
            panic!()
        };
        assert!(matches!(
            ClientMessage::from_msgpack(&bytes),
            Ok(ClientMessage::Subscribe { id: Some(4), .. })
        ));
    }
}
