//! Clients for the tests, recording everything they are sent:
//! - [`Tap`], a raw WebSocket that resumes only when told to, so that what
//!   the node sends is seen as sent (repeats included);
//! - [`Listener`], the reconnecting `ripple::client::Client`, which resumes
//!   by itself over its node list.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

use ripple::client::{Client, ClientConfig, Event, TokenSource};
use ripple::codec::{Format, WireCursor};

use crate::harness::{Pos, Want, JWT_SECRET, WAIT};

/// A welcome as a client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    pub node: String,
    pub recovered: bool,
    pub missed: u64,
}

/// Everything a client was handed, in order.
#[derive(Debug, Default)]
pub struct Seen {
    /// Each change's position and record.
    pub changes: Vec<(Pos, Option<String>)>,
    pub welcomes: Vec<Welcome>,
    /// The changes received before each welcome (so `changes[at..]`
    /// follow welcome `i`).
    pub welcome_at: Vec<usize>,
    pub resets: usize,
    pub disconnects: Vec<Option<u16>>,
    pub subscribed: Vec<u64>,
    pub errors: Vec<String>,
    /// The first connection's `welcome.position`.
    pub position: Option<WireCursor>,
    /// Every position in `changes`.
    index: HashSet<Pos>,
}

impl Seen {
    /// What a client saw over several connections, for the checks.
    pub fn from_positions(positions: &[Pos]) -> Seen {
        let mut seen = Seen::default();
        for pos in positions {
            seen.push(pos.clone(), None);
        }
        seen
    }

    fn push(&mut self, pos: Pos, record: Option<String>) {
        self.index.insert(pos.clone());
        self.changes.push((pos, record));
    }

    pub fn positions(&self) -> Vec<Pos> {
        self.changes.iter().map(|(p, _)| p.clone()).collect()
    }

    /// Repeats, and changes that came after a later one of their origin.
    pub fn disorder(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut last: HashMap<&str, (u64, u64)> = HashMap::new();
        let mut seen = std::collections::HashSet::new();
        for ((origin, epoch, seq), _) in &self.changes {
            if !seen.insert((origin, epoch, seq)) {
                problems.push(format!("repeat of {origin}/{epoch}/{seq}"));
                continue;
            }
            if let Some(prev) = last.get(origin.as_str()) {
                if (*epoch, *seq) <= *prev {
                    problems.push(format!("{origin}/{epoch}/{seq} came after {prev:?}"));
                }
            }
            last.insert(origin, (*epoch, *seq));
        }
        problems
    }

    /// Changes seen of each origin.
    pub fn by_origin(&self) -> BTreeMap<String, Vec<Pos>> {
        let mut map: BTreeMap<String, Vec<Pos>> = BTreeMap::new();
        for (pos, _) in &self.changes {
            map.entry(pos.0.clone()).or_default().push(pos.clone());
        }
        map
    }

    pub fn has(&self, pos: &Pos) -> bool {
        self.index.contains(pos)
    }

    pub fn has_record(&self, record: &str) -> bool {
        self.changes
            .iter()
            .any(|(_, r)| r.as_deref() == Some(record))
    }
}

type Shared = Arc<Mutex<Seen>>;

/// What a test asks of any client: to wait for what it has seen, and to
/// check it.
pub trait Observed {
    fn name(&self) -> &str;
    fn shared(&self) -> &Shared;

    async fn wait(&self, what: &str, done: impl Fn(&Seen) -> bool) {
        wait_seen(self.name(), self.shared(), what, WAIT, done).await
    }

    /// Waits until the client has every one of `positions`.
    async fn wait_for_all(&self, positions: &[Pos]) {
        self.wait_for_all_within(positions, WAIT).await
    }

    async fn wait_for_all_within(&self, positions: &[Pos], limit: Duration) {
        let what = format!("{} changes", positions.len());
        let done = |s: &Seen| positions.iter().all(|p| s.has(p));
        wait_seen(self.name(), self.shared(), &what, limit, done).await
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.shared().lock().unwrap()
    }

    /// Each of `expected` once, each origin in order, nothing else.
    fn assert_exact(&self, expected: &[Pos]) {
        assert_exact(self.name(), &self.seen(), expected);
    }
}

impl Observed for Tap {
    fn name(&self) -> &str {
        &self.name
    }
    fn shared(&self) -> &Shared {
        &self.seen
    }
}

impl Observed for Listener {
    fn name(&self) -> &str {
        &self.name
    }
    fn shared(&self) -> &Shared {
        &self.seen
    }
}

/// Waits until `done` holds for what `client` has seen.
async fn wait_seen(
    name: &str,
    seen: &Shared,
    what: &str,
    limit: Duration,
    done: impl Fn(&Seen) -> bool,
) {
    let deadline = Instant::now() + limit;
    loop {
        {
            let seen = seen.lock().unwrap();
            if done(&seen) {
                return;
            }
            if Instant::now() >= deadline {
                let got = seen.changes.len();
                panic!(
                    "client {name}: timed out waiting for {what}; it has {got} changes, \
                     welcomes {:?}, disconnects {:?}, errors {:?}",
                    seen.welcomes, seen.disconnects, seen.errors
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Checks that `seen` holds `expected` exactly: each once, each origin in
/// order, and nothing else.
fn assert_exact(name: &str, seen: &Seen, expected: &[Pos]) {
    let disorder = seen.disorder();
    assert!(disorder.is_empty(), "client {name}: {disorder:?}");
    let mut got = seen.positions();
    got.sort();
    let mut want = expected.to_vec();
    want.sort();
    if got != want {
        let (got_set, want_set): (HashSet<&Pos>, HashSet<&Pos>) =
            (got.iter().collect(), want.iter().collect());
        let mut missing: Vec<_> = want_set.difference(&got_set).collect();
        let mut extra: Vec<_> = got_set.difference(&want_set).collect();
        missing.sort();
        extra.sort();
        missing.truncate(20);
        extra.truncate(20);
        panic!(
            "client {name}: {} changes, expected {}; missing {missing:?}; unexpected {extra:?}",
            got.len(),
            want.len()
        );
    }
}

pub fn token() -> String {
    ripple::auth::mint(JWT_SECRET, &["*"], 3600)
}

/// A raw WebSocket client: one connection, no reconnect.
pub struct Tap {
    pub name: String,
    pub wants: Vec<Want>,
    seen: Shared,
    /// The cursor the connection began with (resume) or was given
    /// (`welcome.position`); moved on by each change.
    start_cursor: WireCursor,
    outgoing: mpsc::UnboundedSender<Message>,
    closed: Arc<Mutex<Option<Option<u16>>>>,
    task: JoinHandle<()>,
}

impl Tap {
    /// Connects to `url`, says hello (resuming from `resume` with `wants`,
    /// or fresh and then subscribing to `wants`) and waits for the welcome
    /// (and the subscription).
    pub async fn open(
        name: &str,
        url: &str,
        wants: &[Want],
        resume: Option<&WireCursor>,
        msgpack: bool,
    ) -> Tap {
        let mut request = url.into_client_request().unwrap();
        let protocol = if msgpack {
            "ripple.v1.msgpack"
        } else {
            "ripple.v1.json"
        };
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_static(protocol));
        let connect = tokio_tungstenite::connect_async(request);
        let (socket, _) = match tokio::time::timeout(WAIT, connect).await {
            Ok(Ok(connected)) => connected,
            Ok(Err(error)) => panic!("tap {name}: cannot connect to {url}: {error}"),
            Err(_) => panic!("tap {name}: connect to {url} timed out"),
        };
        let (mut write, mut read) = socket.split();

        let (outgoing, mut outgoing_rx) = mpsc::unbounded_channel::<Message>();
        let seen: Shared = Arc::default();
        let closed: Arc<Mutex<Option<Option<u16>>>> = Arc::default();
        let task = tokio::spawn({
            let (seen, closed) = (seen.clone(), closed.clone());
            async move {
                loop {
                    tokio::select! {
                        out = outgoing_rx.recv() => {
                            let Some(out) = out else { break };
                            let close = matches!(out, Message::Close(_));
                            let _ = write.send(out).await;
                            if close {
                                // Read on until the node's close answer.
                                continue;
                            }
                        }
                        incoming = read.next() => {
                            let code = match incoming {
                                Some(Ok(Message::Close(frame))) => frame.map(|f| u16::from(f.code)),
                                Some(Ok(message)) => {
                                    record(&seen, message);
                                    continue;
                                }
                                Some(Err(_)) | None => None,
                            };
                            *closed.lock().unwrap() = Some(code);
                            seen.lock().unwrap().disconnects.push(code);
                            break;
                        }
                    }
                }
            }
        });

        let hello = match resume {
            Some(cursor) => serde_json::json!({"op": "hello", "token": token(),
                "resume": {"cursor": cursor,
                           "interests": wants.iter().map(Want::json).collect::<Vec<_>>()}}),
            None => serde_json::json!({"op": "hello", "token": token()}),
        };
        let tap = Tap {
            name: name.into(),
            wants: wants.to_vec(),
            seen,
            start_cursor: resume.cloned().unwrap_or_default(),
            outgoing,
            closed,
            task,
        };
        tap.send(&hello, msgpack);
        tap.wait("a welcome", |s| !s.welcomes.is_empty()).await;
        if resume.is_none() {
            let position = tap.seen.lock().unwrap().position.clone().unwrap();
            let mut tap = tap;
            tap.start_cursor = position;
            let subscribe = serde_json::json!({"op": "subscribe", "id": 1,
                "interests": wants.iter().map(Want::json).collect::<Vec<_>>()});
            tap.send(&subscribe, msgpack);
            tap.wait("subscribed", |s| s.subscribed.contains(&1)).await;
            return tap;
        }
        tap
    }

    fn send(&self, message: &serde_json::Value, msgpack: bool) {
        let message = if msgpack {
            Message::Binary(rmp_serde::to_vec_named(message).unwrap())
        } else {
            Message::Text(message.to_string())
        };
        let _ = self.outgoing.send(message);
    }

    /// The cursor after every change received.
    pub fn cursor(&self) -> WireCursor {
        let mut cursor = self.start_cursor.clone();
        for ((origin, epoch, seq), _) in &self.seen().changes {
            cursor.insert(origin.clone(), (*epoch, *seq));
        }
        cursor
    }

    /// The close code, once the connection ended (`Some(None)`: cut).
    pub fn closed(&self) -> Option<Option<u16>> {
        *self.closed.lock().unwrap()
    }

    pub async fn wait_closed(&self) -> Option<u16> {
        wait_seen(&self.name, &self.seen, "the connection to end", WAIT, |s| {
            !s.disconnects.is_empty()
        })
        .await;
        self.closed().flatten()
    }

    /// Says goodbye and waits until the node closed too.
    pub async fn close(mut self) {
        let _ = self.outgoing.send(Message::Close(None));
        let _ = tokio::time::timeout(WAIT, &mut self.task).await;
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Decodes one frame from the node into `seen`.
fn record(seen: &Shared, message: Message) {
    let value: serde_json::Value = match message {
        Message::Text(text) => serde_json::from_str(&text).expect("a JSON frame"),
        Message::Binary(bytes) => {
            if let Ok((pos, _, change)) = ripple::codec::decode_change_msgpack(&bytes) {
                let pos = (pos.origin.to_string(), pos.epoch, pos.seq);
                seen.lock().unwrap().push(pos, change.record);
                return;
            }
            rmp_serde::from_slice(&bytes).expect("a MessagePack frame")
        }
        _ => return,
    };
    let mut seen = seen.lock().unwrap();
    match value["op"].as_str().unwrap_or("") {
        "change" => {
            let (pos, record) = change_of(&value);
            seen.push(pos, record);
        }
        "changes" => {
            for item in value["items"].as_array().expect("items") {
                let (pos, record) = change_of(item);
                seen.push(pos, record);
            }
        }
        "welcome" => {
            let at = seen.changes.len();
            seen.welcome_at.push(at);
            seen.welcomes.push(Welcome {
                node: value["node"].as_str().unwrap().into(),
                recovered: value["recovered"].as_bool().unwrap(),
                missed: value["missed"].as_u64().unwrap(),
            });
            if seen.position.is_none() {
                seen.position = serde_json::from_value(value["position"].clone()).ok();
            }
        }
        "subscribed" => seen.subscribed.push(value["id"].as_u64().unwrap_or(0)),
        "error" => seen.errors.push(value.to_string()),
        op => seen.errors.push(format!("unexpected op {op}: {value}")),
    }
}

fn change_of(value: &serde_json::Value) -> (Pos, Option<String>) {
    let pos = &value["pos"];
    let pos = (
        pos[0].as_str().expect("origin").to_string(),
        pos[1].as_u64().expect("epoch"),
        pos[2].as_u64().expect("seq"),
    );
    (pos, value["record"].as_str().map(String::from))
}

/// The reconnecting client, driven in a task that records its events.
pub struct Listener {
    pub name: String,
    pub wants: Vec<Want>,
    seen: Shared,
    cursor: Arc<Mutex<WireCursor>>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Listener {
    /// Starts a client over `urls` (first one first) and waits until it is
    /// subscribed (or, with a cursor, welcomed).
    pub async fn start(
        name: &str,
        urls: Vec<String>,
        wants: &[Want],
        cursor: Option<WireCursor>,
        format: Format,
    ) -> Listener {
        let mut config = ClientConfig::new(urls, TokenSource::Fixed(token()));
        config.interests = wants.iter().map(Want::interest).collect();
        config.format = format;
        config.cursor = cursor.clone();
        config.backoff.max = Duration::from_millis(500);
        let resuming = cursor.is_some();
        let mut client = Client::connect(config).expect("a client");
        let seen: Shared = Arc::default();
        let cursor = Arc::new(Mutex::new(cursor.unwrap_or_default()));
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn({
            let (seen, cursor) = (seen.clone(), cursor.clone());
            async move {
                loop {
                    let event = tokio::select! {
                        _ = &mut stopped => break,
                        event = client.next() => event,
                    };
                    let Some(event) = event else { break };
                    let mut seen = seen.lock().unwrap();
                    match event {
                        Event::Change(change) => {
                            let pos = &change.pos;
                            let pos = (pos.origin.to_string(), pos.epoch, pos.seq);
                            seen.push(pos, change.change.record.clone());
                        }
                        Event::Welcome {
                            node,
                            recovered,
                            missed,
                        } => {
                            let at = seen.changes.len();
                            seen.welcome_at.push(at);
                            seen.welcomes.push(Welcome {
                                node,
                                recovered,
                                missed,
                            });
                        }
                        Event::Reset => seen.resets += 1,
                        Event::Subscribed { id } => seen.subscribed.push(id),
                        Event::Unsubscribed { .. } => {}
                        Event::Disconnected { code, .. } => seen.disconnects.push(code),
                        Event::Error { code, message, .. } => {
                            seen.errors.push(format!("{code}: {message}"))
                        }
                    }
                    *cursor.lock().unwrap() = client.cursor().clone();
                }
                client.close().await;
            }
        });
        let listener = Listener {
            name: name.into(),
            wants: wants.to_vec(),
            seen,
            cursor,
            stop: Some(stop),
            task,
        };
        if resuming {
            listener.wait("a welcome", |s| !s.welcomes.is_empty()).await;
        } else {
            let first = ripple::client::INITIAL_SUBSCRIBE_ID;
            listener
                .wait("subscribed", |s| s.subscribed.contains(&first))
                .await;
        }
        listener
    }

    pub fn cursor(&self) -> WireCursor {
        self.cursor.lock().unwrap().clone()
    }

    pub async fn close(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(WAIT, &mut self.task).await;
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}
