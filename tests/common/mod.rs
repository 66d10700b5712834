//! What the integration tests share: real `ripple` nodes started as child
//! processes on free loopback ports, a raw WebSocket client, and publishing.
//!
//! Every wait is bounded: a node that does not come up, a message that does
//! not arrive or a close that does not come fails the test with what was
//! expected, instead of hanging it. Nothing here sleeps for a fixed time to
//! let something happen; it polls a condition up to a deadline.
//!
//! A node's log goes to a file in its cluster's temporary folder. The folder
//! is removed when the cluster and its nodes are dropped, unless the test is
//! failing, in which case the tail of each log is printed and the folder
//! kept.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use ripple::config::{Config, NodeConfig};
use serde_json::{json, Value};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

/// How long any single expected event may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(10);
/// How long a node may take to answer `/healthz` after it is spawned.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Between two looks at a condition that is polled.
const POLL: Duration = Duration::from_millis(10);

/// The secrets of every test cluster (not the development ones, so that a
/// test cannot pass by accident on a default).
pub const JWT_SECRET: &str = "ripple-test-jwt-secret";
pub const CLUSTER_SECRET: &str = "ripple-test-cluster-secret";
pub const PUBLISH_KEY: &str = "ripple-test-publish-key";

/// A position as the wire carries it: `[origin, epoch, seq]`.
pub type Pos = (String, u64, u64);

static NEXT_DIR: AtomicU64 = AtomicU64::new(0);

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// A config for the tests: test secrets, and every other field at its
/// default until `tweak` changes it. Nodes are added by [`Cluster`].
pub fn base_config() -> Config {
    let mut config = Config::development();
    config.cluster.secret = CLUSTER_SECRET.into();
    config.cluster.jwt_secret = JWT_SECRET.into();
    config.cluster.publish_keys = vec![PUBLISH_KEY.into()];
    config.cluster.dev = false;
    config.nodes.clear();
    config
}

/// A client token granting `workspaces` for an hour.
pub fn token(workspaces: &[&str]) -> String {
    ripple::auth::mint(JWT_SECRET, workspaces, 3600)
}

/// A client token granting every workspace.
pub fn token_all() -> String {
    token(&["*"])
}

/// Polls `check` until it returns true, failing with `what` at the deadline.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// A folder of its own under the system's temporary folder, for a cluster's
/// config and its nodes' logs. Removed when the cluster and all its nodes
/// are gone, unless a test failed.
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new() -> Arc<ScratchDir> {
        let dir = std::env::temp_dir().join(format!(
            "ripple-test-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Arc::new(ScratchDir(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {} for inspection", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A cluster config with `n` nodes (`n1`, `n2`, ...) on free ports, written
/// to a file; single-node clusters get no ZeroMQ addresses.
pub struct Cluster {
    pub config: Config,
    pub dir: Arc<ScratchDir>,
    pub config_path: PathBuf,
}

impl Cluster {
    pub fn new(n: usize, tweak: impl FnOnce(&mut Config)) -> Cluster {
        let mut config = base_config();
        for i in 1..=n {
            let zmq = |port: u16| (n > 1).then(|| format!("tcp://127.0.0.1:{port}"));
            config.nodes.push(NodeConfig {
                id: format!("n{i}"),
                http: format!("127.0.0.1:{}", free_port()),
                public_url: None,
                bus: zmq(free_port()),
                repair: zmq(free_port()),
                ingest: zmq(free_port()),
            });
        }
        tweak(&mut config);
        let dir = ScratchDir::new();
        let config_path = dir.path().join("ripple.toml");
        let text = toml::to_string(&config).expect("config serializes");
        std::fs::write(&config_path, text).expect("write config");
        Cluster {
            config,
            dir,
            config_path,
        }
    }

    /// Starts every node of the config and waits until each is ready.
    pub async fn start_all(&self) -> Vec<Node> {
        let mut nodes = Vec::new();
        for node in &self.config.nodes {
            nodes.push(self.spawn(&node.id));
        }
        for node in &mut nodes {
            node.wait_ready().await;
        }
        nodes
    }

    /// Starts one node of the config and waits until it is ready.
    pub async fn start(&self, id: &str) -> Node {
        let mut node = self.spawn(id);
        node.wait_ready().await;
        node
    }

    fn spawn(&self, id: &str) -> Node {
        let node = self.config.node(id).expect("node in config").clone();
        let log_path = self.dir.path().join(format!("{id}.log"));
        let mut node = Node {
            id: id.to_string(),
            http: node.http.parse().expect("http address"),
            config: node,
            config_path: self.config_path.clone(),
            dir: self.dir.clone(),
            log_path,
            child: None,
            http_client: reqwest::Client::new(),
        };
        node.spawn();
        node
    }
}

/// One running `ripple serve` process.
pub struct Node {
    pub id: String,
    pub http: SocketAddr,
    pub config: NodeConfig,
    config_path: PathBuf,
    dir: Arc<ScratchDir>,
    log_path: PathBuf,
    child: Option<Child>,
    http_client: reqwest::Client,
}

impl Node {
    /// Starts a single node with the test config changed by `tweak`. Retries
    /// with new ports if the ones picked were taken meanwhile.
    pub async fn start(tweak: impl Fn(&mut Config)) -> Node {
        for _ in 0..3 {
            let cluster = Cluster::new(1, &tweak);
            let mut node = cluster.spawn("n1");
            if node.try_wait_ready().await.is_ok() {
                return node;
            }
            let log = node.log_tail();
            if !log.contains("cannot listen") {
                panic!("node n1 did not become ready; its log ends with:\n{log}");
            }
        }
        panic!("node n1 could not find a free port in three tries");
    }

    /// A single node with every setting at its default.
    pub async fn start_default() -> Node {
        Node::start(|_| {}).await
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open node log");
        let child = Command::new(env!("CARGO_BIN_EXE_ripple"))
            .arg("serve")
            .arg("--config")
            .arg(&self.config_path)
            .arg("--node")
            .arg(&self.id)
            .env("RUST_LOG", "info,ripple=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .expect("spawn the ripple binary");
        self.child = Some(child);
    }

    async fn try_wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(format!(
                    "node {} exited before it was ready: {status}",
                    self.id
                ));
            }
            if let Ok(response) = self.http_client.get(self.url("/healthz")).send().await {
                if response.status() == 200 {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "node {} not ready after {START_TIMEOUT:?}",
                    self.id
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until the node answers `/healthz` with 200.
    pub async fn wait_ready(&mut self) {
        if let Err(error) = self.try_wait_ready().await {
            panic!("{error}; its log ends with:\n{}", self.log_tail());
        }
    }

    /// Starts the node again (after [`Node::kill`] or an exit), with the same
    /// config and ports, and waits until it is ready.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn();
        self.wait_ready().await;
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.http)
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("node is running").id() as i32
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on the pid of a child this test spawned and has
        // not reaped yet, so the pid cannot name another process.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(rc, 0, "kill({}, {signal}) failed", self.pid());
    }

    /// SIGTERM: the node's graceful shutdown.
    pub fn terminate(&self) {
        self.signal(libc::SIGTERM);
    }

    /// SIGSTOP: the node freezes (a hung process, as its peers see it).
    pub fn stop(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT: a stopped node runs on.
    pub fn cont(&self) {
        self.signal(libc::SIGCONT);
    }

    /// SIGKILL, and reaps the process.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for the process to exit by itself.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            let child = self.child.as_mut().expect("node is running");
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "node {} still running {within:?} after it was told to stop",
                self.id
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// The last lines of the node's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// GET a path; answers the status and the body.
    pub async fn get(&self, path: &str) -> (u16, String) {
        let response = timeout(WAIT, self.http_client.get(self.url(path)).send())
            .await
            .unwrap_or_else(|_| panic!("GET {path} timed out"))
            .unwrap_or_else(|e| panic!("GET {path} failed: {e}"));
        let status = response.status().as_u16();
        (status, response.text().await.expect("response body"))
    }

    /// `/healthz` as JSON.
    pub async fn health(&self) -> Value {
        let (status, body) = self.get("/healthz").await;
        assert_eq!(status, 200, "/healthz answered {status}: {body}");
        serde_json::from_str(&body).expect("/healthz is JSON")
    }

    /// The sum of the samples of a metric in `/metrics` (0 when absent).
    pub async fn metric(&self, name: &str) -> f64 {
        let (status, body) = self.get("/metrics").await;
        assert_eq!(status, 200, "/metrics answered {status}");
        metric_value(&body, name)
    }

    /// POSTs a raw publish request; answers the status and the body.
    pub async fn post_publish(
        &self,
        content_type: Option<&str>,
        key: Option<&str>,
        body: Vec<u8>,
    ) -> (u16, Vec<u8>) {
        let mut request = self.http_client.post(self.url("/v1/publish")).body(body);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        if let Some(key) = key {
            request = request.header("authorization", format!("Bearer {key}"));
        }
        let response = timeout(WAIT, request.send())
            .await
            .expect("publish timed out")
            .expect("publish request failed");
        let status = response.status().as_u16();
        (status, response.bytes().await.expect("body").to_vec())
    }

    /// POSTs a publish with a raw `Authorization` value.
    pub async fn post_publish_with_auth(
        &self,
        content_type: Option<&str>,
        authorization: &str,
        body: Vec<u8>,
    ) -> (u16, Vec<u8>) {
        let mut request = self.http_client.post(self.url("/v1/publish")).body(body);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let request = request.header("authorization", authorization);
        let response = timeout(WAIT, request.send())
            .await
            .expect("publish timed out")
            .expect("publish request failed");
        let status = response.status().as_u16();
        (status, response.bytes().await.expect("body").to_vec())
    }

    /// Publishes one change or an array of them as JSON; expects 200 and
    /// answers the positions.
    pub async fn publish(&self, changes: Value) -> Vec<Pos> {
        let body = serde_json::to_vec(&changes).unwrap();
        let (status, body) = self
            .post_publish(Some("application/json"), Some(PUBLISH_KEY), body)
            .await;
        let text = String::from_utf8_lossy(&body);
        assert_eq!(status, 200, "publish answered {status}: {text}");
        let answer: Value = serde_json::from_slice(&body).expect("publish answer is JSON");
        positions(&answer)
    }

    /// Publishes one change as JSON and answers its position.
    pub async fn publish_one(&self, change: Value) -> Pos {
        let mut positions = self.publish(change).await;
        assert_eq!(positions.len(), 1);
        positions.remove(0)
    }

    /// Publishes a MessagePack body; expects 200 and answers the positions.
    pub async fn publish_msgpack(&self, changes: &rmpv::Value) -> Vec<Pos> {
        let mut body = Vec::new();
        rmpv::encode::write_value(&mut body, changes).unwrap();
        let (status, body) = self
            .post_publish(Some("application/msgpack"), Some(PUBLISH_KEY), body)
            .await;
        assert_eq!(status, 200, "publish answered {status}");
        let answer: rmpv::Value = rmpv::decode::read_value(&mut &body[..]).expect("msgpack");
        positions(&msgpack_to_json(&answer))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- node {} log ({}), last lines ---\n{}",
                self.id,
                self.log_path.display(),
                self.log_tail()
            );
        }
    }
}

/// The sum of the samples of `name` in a Prometheus text exposition.
pub fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn positions(answer: &Value) -> Vec<Pos> {
    answer["positions"]
        .as_array()
        .unwrap_or_else(|| panic!("no positions in {answer}"))
        .iter()
        .map(pos_of_array)
        .collect()
}

fn pos_of_array(pos: &Value) -> Pos {
    (
        pos[0].as_str().expect("origin").to_string(),
        pos[1].as_u64().expect("epoch"),
        pos[2].as_u64().expect("seq"),
    )
}

/// The position of a `change` message.
pub fn pos_of(message: &Value) -> Pos {
    assert_eq!(message["op"], "change", "not a change: {message}");
    pos_of_array(&message["pos"])
}

/// Renders a MessagePack value as JSON for assertions. `bin` becomes
/// `{"$bin": [bytes]}`, unlike the server's `{"$binary": base64}`, so that a
/// test can tell which of the two a client was sent.
pub fn msgpack_to_json(value: &rmpv::Value) -> Value {
    use rmpv::Value as M;
    match value {
        M::Nil => Value::Null,
        M::Boolean(b) => json!(b),
        M::Integer(i) => match (i.as_u64(), i.as_i64()) {
            (Some(u), _) => json!(u),
            (_, Some(i)) => json!(i),
            _ => Value::Null,
        },
        M::F32(f) => json!(f),
        M::F64(f) => json!(f),
        M::String(s) => json!(s.as_str().expect("utf-8 string")),
        M::Binary(bytes) => json!({ "$bin": bytes }),
        M::Array(items) => Value::Array(items.iter().map(msgpack_to_json).collect()),
        M::Map(entries) => Value::Object(
            entries
                .iter()
                .map(|(k, v)| {
                    let key = k.as_str().map_or_else(|| k.to_string(), str::to_string);
                    (key, msgpack_to_json(v))
                })
                .collect(),
        ),
        M::Ext(kind, data) => json!({ "$ext": [kind, data] }),
    }
}

/// The wire format of a client session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    Json,
    MsgPack,
}

impl Wire {
    pub fn protocol(self) -> &'static str {
        match self {
            Wire::Json => "ripple.v1.json",
            Wire::MsgPack => "ripple.v1.msgpack",
        }
    }
}

/// How a connection ended, as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// A close frame with this code and reason.
    Closed(u16, String),
    /// The connection ended without a close frame.
    Dropped(String),
}

impl Ended {
    pub fn code(&self) -> Option<u16> {
        match self {
            Ended::Closed(code, _) => Some(*code),
            Ended::Dropped(_) => None,
        }
    }
}

/// A raw WebSocket client speaking the Ripple protocol.
///
/// Messages are kept as JSON values whatever the wire format (see
/// [`msgpack_to_json`]); for a MessagePack session the last message as
/// received is in [`Client::last_raw`]. A `changes` frame is unpacked into
/// its `change` items.
pub struct Client {
    ws: WebSocketStream<TcpStream>,
    pub wire: Wire,
    /// The subprotocol the server picked.
    pub protocol: Option<String>,
    inbox: VecDeque<(Value, Option<rmpv::Value>)>,
    pub last_raw: Option<rmpv::Value>,
}

/// Options of a connection.
#[derive(Default, Clone, Copy)]
pub struct ConnectOptions {
    /// The client's TCP receive buffer, to make a client that stops reading
    /// fill up quickly.
    pub recv_buffer: Option<u32>,
}

impl Client {
    pub async fn connect(node: &Node, wire: Wire) -> Client {
        Client::connect_with(node, Some(wire.protocol()), ConnectOptions::default()).await
    }

    /// Connects offering `protocol` (or none); the session's format is the
    /// one the server picked.
    pub async fn connect_with(
        node: &Node,
        protocol: Option<&str>,
        options: ConnectOptions,
    ) -> Client {
        Client::try_connect(node, protocol, options)
            .await
            .unwrap_or_else(|e| panic!("websocket handshake failed: {e}"))
    }

    /// Connects, answering a refused handshake as an error.
    pub async fn try_connect(
        node: &Node,
        protocol: Option<&str>,
        options: ConnectOptions,
    ) -> Result<Client, WsError> {
        let mut request = node.ws_url().into_client_request().unwrap();
        if let Some(protocol) = protocol {
            request.headers_mut().insert(
                "sec-websocket-protocol",
                HeaderValue::from_str(protocol).unwrap(),
            );
        }
        let socket = TcpSocket::new_v4().unwrap();
        if let Some(size) = options.recv_buffer {
            socket.set_recv_buffer_size(size).unwrap();
        }
        let connect = async {
            let stream = socket.connect(node.http).await.expect("tcp connect");
            tokio_tungstenite::client_async(request, stream).await
        };
        let (ws, response) = timeout(WAIT, connect).await.expect("connect timed out")?;
        let protocol = response
            .headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap().to_string());
        let wire = match protocol.as_deref() {
            Some("ripple.v1.msgpack") => Wire::MsgPack,
            _ => Wire::Json,
        };
        Ok(Client {
            ws,
            wire,
            protocol,
            inbox: VecDeque::new(),
            last_raw: None,
        })
    }

    /// Connects and says hello with a token for every workspace.
    pub async fn connect_hello(node: &Node, wire: Wire) -> Client {
        let mut client = Client::connect(node, wire).await;
        client.hello(&token_all(), None).await;
        client
    }

    /// Sends a message in the session's format.
    pub async fn send(&mut self, message: Value) {
        let frame = match self.wire {
            Wire::Json => Message::Text(message.to_string()),
            Wire::MsgPack => Message::Binary(rmp_serde::to_vec_named(&message).unwrap()),
        };
        self.send_raw(frame).await;
    }

    pub async fn send_raw(&mut self, frame: Message) {
        timeout(WAIT, self.ws.send(frame))
            .await
            .expect("send timed out")
            .expect("send failed");
    }

    /// Says hello; answers the welcome.
    pub async fn hello(&mut self, token: &str, resume: Option<Value>) -> Value {
        let mut hello = json!({"op": "hello", "token": token});
        if let Some(resume) = resume {
            hello["resume"] = resume;
        }
        self.send(hello).await;
        let welcome = self.next().await;
        assert_eq!(welcome["op"], "welcome", "expected a welcome: {welcome}");
        welcome
    }

    /// Resumes from `cursor` with `interests`; answers the welcome.
    pub async fn resume(&mut self, token: &str, cursor: Value, interests: Value) -> Value {
        let resume = json!({"cursor": cursor, "interests": interests});
        self.hello(token, Some(resume)).await
    }

    /// Subscribes and waits for `subscribed`; changes that arrive meanwhile
    /// stay in the inbox, in order.
    pub async fn subscribe(&mut self, id: u64, interests: Value) {
        self.send(json!({"op": "subscribe", "id": id, "interests": interests}))
            .await;
        let answer = self.reply(id).await;
        assert_eq!(
            answer["op"], "subscribed",
            "subscribe {id} refused: {answer}"
        );
    }

    pub async fn unsubscribe(&mut self, id: u64, interests: Value) {
        self.send(json!({"op": "unsubscribe", "id": id, "interests": interests}))
            .await;
        let answer = self.reply(id).await;
        assert_eq!(answer["op"], "unsubscribed", "unsubscribe {id}: {answer}");
    }

    /// The answer to request `id` (`subscribed`, `unsubscribed` or `error`);
    /// everything before it stays in the inbox.
    pub async fn reply(&mut self, id: u64) -> Value {
        let mut skipped = VecDeque::new();
        let answer = loop {
            let (message, raw) = self.next_raw().await;
            let op = message["op"].as_str().unwrap_or_default();
            let is_reply = matches!(op, "subscribed" | "unsubscribed" | "error");
            if is_reply && message["id"] == json!(id) {
                break message;
            }
            skipped.push_back((message, raw));
        };
        skipped.append(&mut self.inbox);
        self.inbox = skipped;
        answer
    }

    /// The next message, or a failure after [`WAIT`].
    pub async fn next(&mut self) -> Value {
        self.next_raw().await.0
    }

    async fn next_raw(&mut self) -> (Value, Option<rmpv::Value>) {
        match self.next_within(WAIT).await {
            Ok(message) => message,
            Err(ended) => panic!("expected a message, the connection ended: {ended:?}"),
        }
    }

    /// The next message, or how the connection ended; fails the test if
    /// neither comes within `within`.
    pub async fn next_within(
        &mut self,
        within: Duration,
    ) -> Result<(Value, Option<rmpv::Value>), Ended> {
        if let Some((message, raw)) = self.inbox.pop_front() {
            self.last_raw = raw.clone();
            return Ok((message, raw));
        }
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = timeout(left, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("no message within {within:?}"));
            let (message, raw) = match frame {
                None => return Err(Ended::Dropped("end of stream".into())),
                Some(Err(WsError::ConnectionClosed)) => {
                    return Err(Ended::Dropped("connection closed".into()))
                }
                Some(Err(error)) => return Err(Ended::Dropped(error.to_string())),
                Some(Ok(Message::Close(frame))) => return Err(closed(frame)),
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Ok(Message::Text(text))) => {
                    assert_eq!(self.wire, Wire::Json, "text frame on a msgpack session");
                    let value: Value = serde_json::from_str(&text)
                        .unwrap_or_else(|e| panic!("server sent bad JSON {text:?}: {e}"));
                    (value, None)
                }
                Some(Ok(Message::Binary(bytes))) => {
                    assert_eq!(self.wire, Wire::MsgPack, "binary frame on a JSON session");
                    let raw = rmpv::decode::read_value(&mut &bytes[..])
                        .unwrap_or_else(|e| panic!("server sent bad MessagePack: {e}"));
                    (msgpack_to_json(&raw), Some(raw))
                }
            };
            if message["op"] == "changes" {
                let items = message["items"].as_array().expect("changes items").clone();
                let raws: Vec<Option<rmpv::Value>> = match &raw {
                    Some(rmpv::Value::Map(entries)) => entries
                        .iter()
                        .find(|(k, _)| k.as_str() == Some("items"))
                        .and_then(|(_, v)| v.as_array())
                        .map(|a| a.iter().cloned().map(Some).collect())
                        .unwrap_or_default(),
                    _ => vec![None; items.len()],
                };
                let mut raws = raws.into_iter();
                for item in items {
                    self.inbox.push_back((item, raws.next().flatten()));
                }
                if let Some((message, raw)) = self.inbox.pop_front() {
                    self.last_raw = raw.clone();
                    return Ok((message, raw));
                }
                continue;
            }
            self.last_raw = raw.clone();
            return Ok((message, raw));
        }
    }

    /// The next message, which must be a change.
    pub async fn next_change(&mut self) -> Value {
        let message = self.next().await;
        assert_eq!(message["op"], "change", "expected a change: {message}");
        message
    }

    /// Changes up to and including the one at `fence`; fails on anything
    /// that is not a change.
    pub async fn changes_until(&mut self, fence: &Pos) -> Vec<Value> {
        let mut changes = Vec::new();
        loop {
            let change = self.next_change().await;
            let done = pos_of(&change) == *fence;
            changes.push(change);
            if done {
                return changes;
            }
        }
    }

    /// Positions of the changes up to and including `fence`.
    pub async fn positions_until(&mut self, fence: &Pos) -> Vec<Pos> {
        self.changes_until(fence).await.iter().map(pos_of).collect()
    }

    /// Expects the next change to be the one at `pos`, and nothing before.
    pub async fn expect_only(&mut self, pos: &Pos) {
        let got = self.positions_until(pos).await;
        assert_eq!(got, std::slice::from_ref(pos), "expected only {pos:?}");
    }

    /// Reads until the connection ends; answers how, and how many messages
    /// were read before.
    pub async fn ended(&mut self) -> (Ended, usize) {
        let mut read = 0;
        loop {
            match self.next_within(WAIT).await {
                Ok(_) => read += 1,
                Err(ended) => return (ended, read),
            }
        }
    }

    /// Expects the next thing to be a close frame with `code`; answers its
    /// reason.
    pub async fn expect_close(&mut self, code: u16) -> String {
        match self.next_within(WAIT).await {
            Err(Ended::Closed(got, reason)) => {
                assert_eq!(got, code, "closed with {got} ({reason}), expected {code}");
                reason
            }
            other => panic!("expected a close with {code}, got {other:?}"),
        }
    }

    /// Closes the connection from the client side, politely.
    pub async fn close(mut self) {
        let _ = timeout(WAIT, self.ws.close(None)).await;
    }
}

fn closed(frame: Option<CloseFrame<'_>>) -> Ended {
    match frame {
        Some(frame) => Ended::Closed(u16::from(frame.code), frame.reason.to_string()),
        None => Ended::Closed(1005, String::new()),
    }
}
