//! A cluster of real nodes for the tests: every node is the `ripple` binary
//! run as a child process on loopback, from a generated config, and can be
//! killed, paused, stopped and started again. Every wait is bounded.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Child;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The longest any single expected thing may take.
pub const WAIT: Duration = Duration::from_secs(30);
/// How often a condition is polled.
const POLL: Duration = Duration::from_millis(25);

pub const SECRET: &str = "cluster-test-secret";
pub const JWT_SECRET: &str = "cluster-test-jwt-secret";
pub const PUBLISH_KEY: &str = "cluster-test-publish-key";

/// Waits until `check` returns `Some`, polling; panics naming `what` after
/// `limit`.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// A port nobody listens on, outside the kernel's ephemeral range so that
/// no outgoing connection (ours or another test's) takes it before the node
/// binds it. Ports are handed out once per test process.
fn free_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        20_000 + (std::process::id() % 55) as u16 * 200,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    loop {
        let port = NEXT.fetch_add(1, Ordering::SeqCst);
        assert!(port < 32_000, "ran out of test ports");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn scratch_dir(name: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!(
        "ripple-cluster-test-{}-{n}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a scratch dir");
    dir
}

/// One node of a test cluster.
pub struct Node {
    pub id: String,
    pub http_port: u16,
    pub bus: String,
    pub repair: String,
    pub ingest: String,
    child: Option<Child>,
    log: PathBuf,
    starts: usize,
}

impl Node {
    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/v1/ws", self.http_port)
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().expect("node running").id() as i32
    }

    fn signal(&self, signal: i32) {
        // SAFETY: signalling our own child, which has not been reaped.
        let status = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(status, 0, "signal {signal} to node {}", self.id);
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }
}

/// What publishing answered: the positions, in order.
#[derive(Debug, Deserialize)]
struct Positions {
    positions: Vec<(String, u64, u64)>,
}

/// A change as a test publishes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pub {
    pub workspace: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub record: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub lists: Vec<String>,
}

impl Pub {
    pub fn new(workspace: &str, record: &str, lists: &[&str]) -> Pub {
        Pub {
            workspace: workspace.into(),
            record: Some(record.into()),
            lists: lists.iter().map(|l| l.to_string()).collect(),
        }
    }
}

/// A position as the tests compare them.
pub type Pos = (String, u64, u64);

/// Every change a node answered 200 for, with its position: what clients
/// are checked against.
#[derive(Clone, Default)]
pub struct Ledger {
    inner: Arc<Mutex<Vec<(Pos, Pub)>>>,
}

impl Ledger {
    pub fn record(&self, positions: Vec<Pos>, changes: &[Pub]) {
        assert_eq!(positions.len(), changes.len(), "a position per change");
        let mut inner = self.inner.lock().unwrap();
        inner.extend(positions.into_iter().zip(changes.iter().cloned()));
    }

    pub fn all(&self) -> Vec<(Pos, Pub)> {
        self.inner.lock().unwrap().clone()
    }

    /// The changes matching `interests`, in per-origin seq order.
    pub fn matching(&self, interests: &[Want]) -> Vec<Pos> {
        let mut picked: Vec<Pos> = self
            .all()
            .into_iter()
            .filter(|(_, change)| interests.iter().any(|w| w.matches(change)))
            .map(|(pos, _)| pos)
            .collect();
        picked.sort();
        picked
    }

    /// The last seq accepted per origin (and its epoch).
    pub fn heads(&self) -> BTreeMap<String, (u64, u64)> {
        let mut heads = BTreeMap::new();
        for ((origin, epoch, seq), _) in self.all() {
            let head = heads.entry(origin).or_insert((epoch, seq));
            if (epoch, seq) > *head {
                *head = (epoch, seq);
            }
        }
        heads
    }
}

/// An interest, as the tests match it (independently of the server's code).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Want {
    Workspace(String),
    List(String, String),
    Record(String, String),
}

impl Want {
    pub fn workspace(w: &str) -> Want {
        Want::Workspace(w.into())
    }
    pub fn list(w: &str, l: &str) -> Want {
        Want::List(w.into(), l.into())
    }
    pub fn record(w: &str, r: &str) -> Want {
        Want::Record(w.into(), r.into())
    }

    pub fn matches(&self, change: &Pub) -> bool {
        match self {
            Want::Workspace(w) => change.workspace == *w,
            Want::List(w, l) => change.workspace == *w && change.lists.contains(l),
            Want::Record(w, r) => change.workspace == *w && change.record.as_ref() == Some(r),
        }
    }

    pub fn json(&self) -> serde_json::Value {
        match self {
            Want::Workspace(w) => serde_json::json!({"workspace": w}),
            Want::List(w, l) => serde_json::json!({"workspace": w, "list": l}),
            Want::Record(w, r) => serde_json::json!({"workspace": w, "record": r}),
        }
    }

    pub fn interest(&self) -> ripple::interest::Interest {
        use ripple::interest::Interest;
        match self {
            Want::Workspace(w) => Interest::workspace(w),
            Want::List(w, l) => Interest::list(w, l),
            Want::Record(w, r) => Interest::record(w, r),
        }
    }
}

/// Publishes at one node over HTTP.
#[derive(Clone)]
pub struct Publisher {
    url: String,
    http: reqwest::Client,
    ledger: Ledger,
}

impl Publisher {
    /// Publishes `changes` as JSON or MessagePack; returns the positions
    /// (recorded in the ledger), or what went wrong.
    pub async fn publish(&self, changes: &[Pub], msgpack: bool) -> Result<Vec<Pos>, String> {
        let request = self
            .http
            .post(&self.url)
            .bearer_auth(PUBLISH_KEY)
            .timeout(Duration::from_secs(20));
        let request = if msgpack {
            let body = rmp_serde::to_vec_named(changes).expect("encodes");
            request
                .header("Content-Type", "application/msgpack")
                .body(body)
        } else {
            request.json(changes)
        };
        let answer = request.send().await.map_err(|e| e.to_string())?;
        let status = answer.status();
        let body = answer.bytes().await.map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!("{status}: {}", String::from_utf8_lossy(&body)));
        }
        let positions: Positions = if msgpack {
            rmp_serde::from_slice(&body).map_err(|e| e.to_string())?
        } else {
            serde_json::from_slice(&body).map_err(|e| e.to_string())?
        };
        self.ledger.record(positions.positions.clone(), changes);
        Ok(positions.positions)
    }
}

/// A cluster of nodes from one generated config file.
pub struct Cluster {
    pub nodes: Vec<Node>,
    dir: PathBuf,
    config: PathBuf,
    http: reqwest::Client,
    pub ledger: Ledger,
}

impl Cluster {
    /// Writes the config of `count` nodes (`n1`, `n2`, ...) with `extra`
    /// TOML sections appended, starts every node and waits until each
    /// reports every peer up.
    pub async fn start(name: &str, count: usize, extra: &str) -> Cluster {
        let dir = scratch_dir(name);
        let mut text = format!(
            "[cluster]\nsecret = \"{SECRET}\"\njwt_secret = \"{JWT_SECRET}\"\n\
             publish_keys = [\"{PUBLISH_KEY}\"]\n{extra}\n"
        );
        let mut nodes = Vec::new();
        for i in 1..=count {
            let node = Node {
                id: format!("n{i}"),
                http_port: free_port(),
                bus: format!("tcp://127.0.0.1:{}", free_port()),
                repair: format!("tcp://127.0.0.1:{}", free_port()),
                ingest: format!("tcp://127.0.0.1:{}", free_port()),
                child: None,
                log: dir.join(format!("n{i}.log")),
                starts: 0,
            };
            text.push_str(&format!(
                "\n[[nodes]]\nid = \"{}\"\nhttp = \"127.0.0.1:{}\"\nbus = \"{}\"\n\
                 repair = \"{}\"\ningest = \"{}\"\n",
                node.id, node.http_port, node.bus, node.repair, node.ingest
            ));
            nodes.push(node);
        }
        let config = dir.join("cluster.toml");
        std::fs::write(&config, text).expect("config written");
        let mut cluster = Cluster {
            nodes,
            dir,
            config,
            http: reqwest::Client::new(),
            ledger: Ledger::default(),
        };
        for i in 0..count {
            cluster.spawn(i);
        }
        cluster.wait_ready().await;
        cluster
    }

    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    /// Every node's WebSocket URL, starting with node `first`.
    pub fn ws_urls_from(&self, first: usize) -> Vec<String> {
        let n = self.nodes.len();
        (0..n)
            .map(|k| self.nodes[(first + k) % n].ws_url())
            .collect()
    }

    fn spawn(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        assert!(node.child.is_none(), "node {} already running", node.id);
        node.starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .expect("log file");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_ripple"))
            .args(["serve", "--config"])
            .arg(&self.config)
            .args(["--node", &node.id])
            .env(
                "RUST_LOG",
                std::env::var("RIPPLE_TEST_LOG").unwrap_or("info,ripple::cluster=debug".into()),
            )
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("ripple starts");
        node.child = Some(child);
    }

    /// The node's `/healthz`, or `None` when it does not answer.
    pub async fn health(&self, i: usize) -> Option<serde_json::Value> {
        let url = format!("{}/healthz", self.nodes[i].http_url());
        let answer = self
            .http
            .get(url)
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        if !answer.status().is_success() {
            return None;
        }
        answer.json().await.ok()
    }

    /// Waits until every running node answers and reports every running
    /// peer up.
    pub async fn wait_ready(&mut self) {
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].running())
            .collect();
        let ids: Vec<String> = running.iter().map(|&i| self.nodes[i].id.clone()).collect();
        for &i in &running {
            let what = format!("node {} up with its peers up", self.nodes[i].id);
            let deadline = Instant::now() + WAIT;
            loop {
                self.check_alive(i);
                if let Some(health) = self.health(i).await {
                    let peers = health["peers"].as_array().cloned().unwrap_or_default();
                    let all_up = ids.iter().filter(|id| **id != self.nodes[i].id).all(|id| {
                        peers
                            .iter()
                            .any(|p| p["node"] == id.as_str() && p["up"] == true)
                    });
                    if all_up {
                        break;
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "timed out waiting for {what}; see {}",
                    self.nodes[i].log.display()
                );
                tokio::time::sleep(POLL).await;
            }
        }
    }

    fn check_alive(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        if let Some(child) = node.child.as_mut() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "node {} exited with {status}; see {}",
                    node.id,
                    node.log.display()
                );
            }
        }
    }

    /// Kills node `i` at once (SIGKILL): no goodbye to clients or peers.
    pub fn kill(&mut self, i: usize) {
        let mut child = self.nodes[i].child.take().expect("node running");
        child.kill().expect("kill");
        child.wait().expect("reaped");
    }

    /// Stops node `i` gracefully (SIGTERM) and waits for it to exit.
    pub async fn terminate(&mut self, i: usize) {
        self.nodes[i].signal(libc::SIGTERM);
        let mut child = self.nodes[i].child.take().expect("node running");
        let deadline = Instant::now() + WAIT;
        while child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "node did not stop on SIGTERM");
            tokio::time::sleep(POLL).await;
        }
    }

    /// Freezes node `i` (SIGSTOP): its sockets stay open, nothing is read.
    pub fn pause(&self, i: usize) {
        self.nodes[i].signal(libc::SIGSTOP);
    }

    /// Lets a paused node run again (SIGCONT).
    pub fn resume(&self, i: usize) {
        self.nodes[i].signal(libc::SIGCONT);
    }

    /// Starts a stopped node again (a new epoch, no history) and waits
    /// until it and its peers see each other up.
    pub async fn restart(&mut self, i: usize) {
        self.spawn(i);
        self.wait_ready().await;
    }

    /// Starts a stopped node again and waits only until it answers.
    pub async fn restart_unready(&mut self, i: usize) {
        self.spawn(i);
        let what = format!("node {} to answer", self.nodes[i].id);
        let deadline = Instant::now() + WAIT;
        while self.health(i).await.is_none() {
            self.check_alive(i);
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(POLL).await;
        }
    }

    /// A publisher to node `i` that records into this cluster's ledger.
    pub fn publisher(&self, i: usize) -> Publisher {
        Publisher {
            url: format!("{}/v1/publish", self.nodes[i].http_url()),
            http: self.http.clone(),
            ledger: self.ledger.clone(),
        }
    }

    /// Publishes `changes` at node `i` as JSON or MessagePack; returns the
    /// positions (recorded in the ledger), or what went wrong.
    pub async fn try_publish(
        &self,
        i: usize,
        changes: &[Pub],
        msgpack: bool,
    ) -> Result<Vec<Pos>, String> {
        self.publisher(i).publish(changes, msgpack).await
    }

    /// Publishes and insists on a 200.
    pub async fn publish(&self, i: usize, changes: &[Pub]) -> Vec<Pos> {
        match self.try_publish(i, changes, false).await {
            Ok(positions) => positions,
            Err(error) => panic!("publish at {} failed: {error}", self.nodes[i].id),
        }
    }

    /// Node `i`'s metrics, summed over the lines of `name` that carry every
    /// label of `labels`.
    pub async fn metric(&self, i: usize, name: &str, labels: &[(&str, &str)]) -> u64 {
        let text = self
            .http
            .get(format!("{}/metrics", self.nodes[i].http_url()))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text");
        text.lines()
            .filter(|line| !line.starts_with('#'))
            .filter(|line| {
                line.split(['{', ' ']).next() == Some(name)
                    && labels
                        .iter()
                        .all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
            })
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|v| v as u64)
            .sum()
    }

    /// Node `i`'s position: origin -> (epoch, seq).
    pub async fn position(&self, i: usize) -> BTreeMap<String, (u64, u64)> {
        let health = self.health(i).await.expect("healthz answers");
        serde_json::from_value(health["position"].clone()).expect("a position")
    }

    /// Waits until node `i` holds every change of the ledger.
    pub async fn wait_holds_ledger(&self, i: usize) {
        self.wait_holds_ledger_of(i, &[]).await
    }

    /// Waits until node `i` holds every change of the ledger from
    /// `origins` (all when empty).
    pub async fn wait_holds_ledger_of(&self, i: usize, origins: &[&str]) {
        let mut heads = self.ledger.heads();
        if !origins.is_empty() {
            heads.retain(|origin, _| origins.contains(&origin.as_str()));
        }
        let what = format!("node {} to hold {heads:?}", self.nodes[i].id);
        wait_for(&what, WAIT, || async {
            let position = self.position(i).await;
            heads
                .iter()
                .all(|(origin, head)| position.get(origin).is_some_and(|p| p >= head))
                .then_some(())
        })
        .await
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                // A paused child must run again to die of SIGTERM, but
                // SIGKILL needs no cooperation.
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // Kept when the test failed: the nodes' logs are in there.
        if std::thread::panicking() || std::env::var_os("RIPPLE_TEST_KEEP_LOGS").is_some() {
            eprintln!("node logs kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
