//! The reconnecting client and the `listen` / `publish` commands, against
//! real nodes: the `ripple` binary started as a child process on a free
//! loopback port. Every wait is bounded.

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use ripple::client::{Client, ClientConfig, Event, TokenSource, INITIAL_SUBSCRIBE_ID};
use ripple::codec::Format;
use ripple::config::{DEV_PUBLISH_KEY, DEV_SECRET};
use ripple::interest::Interest;

/// The longest any single expected thing may take.
const WAIT: Duration = Duration::from_secs(20);

/// A node run from the real binary, killed when dropped. Its config and log
/// live in a scratch directory, removed unless the test failed.
struct Node {
    child: Option<Child>,
    port: u16,
    config: PathBuf,
    log: PathBuf,
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().unwrap().port()
}

fn scratch_dir(name: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!(
        "ripple-client-test-{}-{n}-{name}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).expect("a scratch dir");
    dir
}

impl Node {
    /// Starts a development node; `extra` is TOML added to the config (a
    /// `[limits]` section, say).
    async fn start(name: &str, extra: &str) -> Node {
        let port = free_port();
        let dir = scratch_dir(name);
        let config = dir.join("ripple.toml");
        let text = format!(
            "{extra}\n[cluster]\ndev = true\n[[nodes]]\nid = \"n1\"\nhttp = \"127.0.0.1:{port}\"\n"
        );
        std::fs::write(&config, text).expect("config written");
        let mut node = Node {
            child: None,
            port,
            config,
            log: dir.join("node.log"),
        };
        node.spawn().await;
        node
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_ripple"))
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info,ripple=debug")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("ripple starts");
        self.child = Some(child);
        self.wait_ready().await;
    }

    async fn wait_ready(&mut self) {
        let url = format!("{}/healthz", self.http_url());
        let http = reqwest::Client::new();
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(answer) = http.get(&url).send().await {
                if answer.status().is_success() {
                    return;
                }
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("node exited with {status}; see {}", self.log.display());
            }
            assert!(
                Instant::now() < deadline,
                "node not ready in time; see {}",
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/v1/ws", self.port)
    }

    /// Kills the node at once (SIGKILL): no close frames, no goodbye.
    async fn kill(&mut self) {
        let mut child = self.child.take().expect("node running");
        child.kill().expect("kill");
        child.wait().expect("reaped");
    }

    /// Stops the node gracefully (SIGTERM): sessions are closed with 4009.
    async fn stop(&mut self) {
        let mut child = self.child.take().expect("node running");
        // SAFETY: signalling our own child, which has not been reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + WAIT;
        while child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "node did not stop on SIGTERM");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts the node again on the same port: a new epoch, no history.
    async fn restart(&mut self) {
        self.spawn().await;
    }

    async fn publish(&self, changes: serde_json::Value) -> Vec<(String, u64, u64)> {
        #[derive(serde::Deserialize)]
        struct Answer {
            positions: Vec<(String, u64, u64)>,
        }
        let answer = reqwest::Client::new()
            .post(format!("{}/v1/publish", self.http_url()))
            .bearer_auth(DEV_PUBLISH_KEY)
            .json(&changes)
            .send()
            .await
            .expect("publish sent");
        assert!(answer.status().is_success(), "publish: {}", answer.status());
        answer.json::<Answer>().await.expect("positions").positions
    }

    async fn metric(&self, name: &str) -> u64 {
        let text = reqwest::get(format!("{}/metrics", self.http_url()))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text");
        text.lines()
            .find(|line| line.starts_with(name))
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|value| value.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Kept when the test failed: the node's log is in there.
        if !std::thread::panicking() {
            if let Some(dir) = self.config.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

fn dev_token() -> TokenSource {
    TokenSource::Fixed(ripple::auth::mint(DEV_SECRET, &["*"], 3600))
}

fn client_config(url: String, workspace: &str) -> ClientConfig {
    let mut config = ClientConfig::new(vec![url], dev_token());
    config.interests = vec![Interest::workspace(workspace)];
    config
}

/// The next event, or a panic naming what was awaited.
async fn next(client: &mut Client, awaiting: &str) -> Event {
    match tokio::time::timeout(WAIT, client.next()).await {
        Ok(Some(event)) => event,
        Ok(None) => panic!("client closed while awaiting {awaiting}"),
        Err(_) => panic!("timed out awaiting {awaiting}"),
    }
}

/// Reads events until `done` says so; returns every event read.
async fn read_until(
    client: &mut Client,
    awaiting: &str,
    mut done: impl FnMut(&Event) -> bool,
) -> Vec<Event> {
    let mut events = Vec::new();
    loop {
        let event = next(client, awaiting).await;
        let stop = done(&event);
        events.push(event);
        if stop {
            return events;
        }
    }
}

async fn subscribed(client: &mut Client) {
    read_until(
        client,
        "the first subscription",
        |e| matches!(e, Event::Subscribed { id } if *id == INITIAL_SUBSCRIBE_ID),
    )
    .await;
}

/// The positions of the changes among `events`, as (epoch, seq).
fn seqs(events: &[Event]) -> Vec<(u64, u64)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Change(c) => Some((c.pos.epoch, c.pos.seq)),
            _ => None,
        })
        .collect()
}

fn changes(workspace: &str, from: usize, count: usize, payload: usize) -> serde_json::Value {
    let items: Vec<_> = (from..from + count)
        .map(|i| {
            let data = "x".repeat(payload);
            json!({"workspace": workspace, "record": format!("r{i}"), "data": data})
        })
        .collect();
    json!(items)
}

#[tokio::test]
async fn resumes_exactly_after_being_closed_for_being_slow() {
    let node = Node::start(
        "slow",
        "[limits]\noutbound_budget_bytes = 65536\nping_interval_ms = 60000\n\
         idle_timeout_ms = 120000",
    )
    .await;
    let mut config = client_config(node.ws_url(), "w");
    config.buffer = 1;
    let mut client = Client::connect(config).unwrap();
    subscribed(&mut client).await;

    // The caller stops reading: publish until the node gives up on it.
    let mut published = 0;
    let deadline = Instant::now() + WAIT;
    while node.metric("ripple_slow_closes_total").await == 0 {
        assert!(
            Instant::now() < deadline,
            "no 4008 after {published} changes"
        );
        node.publish(changes("w", published, 100, 2000)).await;
        published += 100;
    }
    eprintln!("4008 after {published} changes of 2 kB");
    // These come only through the catch-up.
    node.publish(changes("w", published, 50, 10)).await;
    published += 50;

    let events = read_until(
        &mut client,
        "every change",
        |e| matches!(e, Event::Change(c) if c.pos.seq == published as u64),
    )
    .await;
    let epoch = seqs(&events)[0].0;
    let expected: Vec<_> = (1..=published as u64).map(|s| (epoch, s)).collect();
    assert_eq!(seqs(&events), expected, "every change once, in order");
    let closes: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::Disconnected { code, .. } => Some(*code),
            _ => None,
        })
        .collect();
    assert_eq!(closes.first(), Some(&Some(4008)), "closed as too slow");
    assert!(events.iter().any(|e| matches!(
        e,
        Event::Welcome { recovered: true, missed, .. } if *missed > 0
    )));
    assert!(!events.iter().any(|e| matches!(e, Event::Reset)));
    client.close().await;
}

/// A TCP forwarder whose connections can be cut, and which can refuse new
/// ones for a while.
struct Proxy {
    port: u16,
    refusing: Arc<AtomicBool>,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    async fn start(target: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let refusing = Arc::new(AtomicBool::new(false));
        let links: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = tokio::spawn({
            let (refusing, links) = (refusing.clone(), links.clone());
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if refusing.load(Ordering::SeqCst) {
                        continue; // Dropped: the client sees the connection fail.
                    }
                    let link = tokio::spawn(async move {
                        let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target)).await
                        else {
                            return;
                        };
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    });
                    links.lock().unwrap().push(link);
                }
            }
        });
        Proxy {
            port,
            refusing,
            links,
            accept,
        }
    }

    fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/v1/ws", self.port)
    }

    /// Cuts every open connection and refuses new ones until `admit`.
    fn cut(&self) {
        self.refusing.store(true, Ordering::SeqCst);
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    fn admit(&self) {
        self.refusing.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

#[tokio::test]
async fn resumes_exactly_after_its_connection_is_cut() {
    let node = Node::start("cut", "").await;
    let proxy = Proxy::start(node.port).await;
    let mut config = client_config(proxy.ws_url(), "w");
    config.format = Format::MsgPack;
    let mut client = Client::connect(config).unwrap();
    subscribed(&mut client).await;

    node.publish(changes("w", 0, 5, 10)).await;
    let before = read_until(
        &mut client,
        "5 live changes",
        |e| matches!(e, Event::Change(c) if c.pos.seq == 5),
    )
    .await;

    proxy.cut();
    read_until(&mut client, "the cut", |e| {
        matches!(e, Event::Disconnected { .. })
    })
    .await;
    node.publish(changes("w", 5, 5, 10)).await;
    proxy.admit();
    let after = read_until(
        &mut client,
        "the catch-up",
        |e| matches!(e, Event::Change(c) if c.pos.seq == 10),
    )
    .await;

    let welcome = after.iter().find_map(|e| match e {
        Event::Welcome {
            recovered, missed, ..
        } => Some((*recovered, *missed)),
        _ => None,
    });
    assert_eq!(welcome, Some((true, 5)), "resumed with the 5 missed");
    let all: Vec<_> = seqs(&before).into_iter().chain(seqs(&after)).collect();
    let epoch = all[0].0;
    assert_eq!(all, (1..=10).map(|s| (epoch, s)).collect::<Vec<_>>());
    assert!(!after.iter().any(|e| matches!(e, Event::Reset)));

    node.publish(changes("w", 10, 1, 10)).await;
    let live = read_until(&mut client, "a live change", |e| {
        matches!(e, Event::Change(_))
    })
    .await;
    assert_eq!(
        seqs(&live),
        vec![(epoch, 11)],
        "live again, nothing repeated"
    );
    assert_eq!(client.cursor()["n1"], (epoch, 11));
    client.close().await;
}

#[tokio::test]
async fn reports_reset_when_its_node_restarts_without_history() {
    let mut node = Node::start("restart", "").await;
    let mut client = Client::connect(client_config(node.ws_url(), "w")).unwrap();
    subscribed(&mut client).await;
    node.publish(changes("w", 0, 3, 10)).await;
    let first = read_until(
        &mut client,
        "3 changes",
        |e| matches!(e, Event::Change(c) if c.pos.seq == 3),
    )
    .await;
    let first_epoch = seqs(&first)[0].0;

    // Killed: the connection is cut, and the node comes back with a new
    // epoch and no history, so the resume cannot be proven complete.
    node.kill().await;
    node.restart().await;
    let events = read_until(&mut client, "the reset", |e| matches!(e, Event::Reset)).await;
    assert!(matches!(
        events.first(),
        Some(Event::Disconnected { code: None, .. })
    ));
    assert!(events.iter().any(|e| matches!(
        e,
        Event::Welcome {
            recovered: false,
            ..
        }
    )));
    let positions = node.publish(changes("w", 3, 2, 10)).await;
    let second_epoch = positions[0].1;
    assert!(second_epoch > first_epoch);
    let live = read_until(
        &mut client,
        "live changes after the reset",
        |e| matches!(e, Event::Change(c) if c.pos.seq == 2),
    )
    .await;
    assert_eq!(seqs(&live), vec![(second_epoch, 1), (second_epoch, 2)]);

    // Stopped gracefully: the node says 4009 first.
    node.stop().await;
    let events = read_until(&mut client, "the 4009", |e| {
        matches!(e, Event::Disconnected { .. })
    })
    .await;
    assert!(matches!(
        events.last(),
        Some(Event::Disconnected {
            code: Some(4009),
            ..
        })
    ));
    node.restart().await;
    let events = read_until(&mut client, "the second reset", |e| {
        matches!(e, Event::Reset)
    })
    .await;
    // Before, a client that came back while the node was shutting down was
    // welcomed there, and held the node until its shutdown grace ran out.
    let early = events.iter().find(|e| {
        matches!(
            e,
            Event::Welcome {
                recovered: true,
                ..
            }
        )
    });
    assert!(early.is_none(), "welcomed by a node going away: {events:?}");
    let positions = node.publish(changes("w", 5, 1, 10)).await;
    let live = read_until(&mut client, "a live change", |e| {
        matches!(e, Event::Change(_))
    })
    .await;
    assert_eq!(seqs(&live), vec![(positions[0].1, 1)]);
    client.close().await;
}

#[tokio::test]
async fn fetches_a_fresh_token_after_4001_and_misses_nothing() {
    let node = Node::start("token", "").await;
    let fetched = Arc::new(AtomicUsize::new(0));
    let token = TokenSource::from_fn({
        let fetched = fetched.clone();
        move || {
            fetched.fetch_add(1, Ordering::SeqCst);
            ripple::auth::mint(DEV_SECRET, &["w"], 2)
        }
    });
    let mut config = ClientConfig::new(vec![node.ws_url()], token);
    config.interests = vec![Interest::workspace("w")];
    let mut client = Client::connect(config).unwrap();
    subscribed(&mut client).await;

    // Publishes through at least two token expiries while reading.
    let count = 40;
    let url = format!("{}/v1/publish", node.http_url());
    let publisher = tokio::spawn(async move {
        let http = reqwest::Client::new();
        for i in 0..count {
            let answer = http
                .post(&url)
                .bearer_auth(DEV_PUBLISH_KEY)
                .json(&json!({"workspace": "w", "data": i}))
                .send()
                .await
                .expect("publish");
            assert!(answer.status().is_success());
            tokio::time::sleep(Duration::from_millis(125)).await;
        }
    });
    let events = read_until(
        &mut client,
        "every change",
        |e| matches!(e, Event::Change(c) if c.pos.seq == count),
    )
    .await;
    publisher.await.unwrap();

    let epoch = seqs(&events)[0].0;
    assert_eq!(
        seqs(&events),
        (1..=count).map(|s| (epoch, s)).collect::<Vec<_>>()
    );
    let expiries = events
        .iter()
        .filter(|e| {
            matches!(
                e,
                Event::Disconnected {
                    code: Some(4001),
                    ..
                }
            )
        })
        .count();
    assert!(expiries >= 2, "expected token expiries, saw {expiries}");
    assert!(fetched.load(Ordering::SeqCst) > expiries);
    client.close().await;
}

/// A child process whose output lines arrive on channels.
struct Lines {
    stdout: mpsc::UnboundedReceiver<String>,
    stderr: mpsc::UnboundedReceiver<String>,
    _child: tokio::process::Child,
}

fn ripple(args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_ripple"));
    command
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

fn forward(
    reader: impl tokio::io::AsyncRead + Unpin + Send + 'static,
) -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut lines = BufReader::new(reader).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

impl Lines {
    fn spawn(args: &[&str]) -> Lines {
        let mut child = ripple(args).spawn().expect("ripple starts");
        Lines {
            stdout: forward(child.stdout.take().unwrap()),
            stderr: forward(child.stderr.take().unwrap()),
            _child: child,
        }
    }

    async fn stdout_line(&mut self) -> serde_json::Value {
        let line = tokio::time::timeout(WAIT, self.stdout.recv())
            .await
            .expect("a line in time")
            .expect("the command is still running");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?} is not JSON: {e}"))
    }

    async fn stderr_containing(&mut self, text: &str) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let line = tokio::time::timeout_at(deadline, self.stderr.recv())
                .await
                .unwrap_or_else(|_| panic!("no log line with {text:?} in time"))
                .expect("the command is still running");
            if line.contains(text) {
                return;
            }
        }
    }
}

/// Runs `ripple publish ...` to completion and returns its position lines.
async fn publish_cli(args: &[&str], stdin: &str) -> Vec<serde_json::Value> {
    use tokio::io::AsyncWriteExt;
    let mut child = ripple(args).spawn().expect("ripple publish starts");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).await.unwrap();
    drop(input);
    let output = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("publish finished in time")
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "publish failed: {stderr}");
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON position"))
        .collect()
}

#[tokio::test]
async fn listen_prints_what_publish_sends_and_survives_a_restart() {
    let mut node = Node::start("cli", "").await;
    let (http, ws) = (node.http_url(), node.ws_url());
    let mut listen = Lines::spawn(&["listen", "--node", &ws, "--dev", "--workspace", "w"]);
    listen.stderr_containing("subscribed").await;

    let args = [
        "publish",
        "--url",
        &http,
        "--workspace",
        "w",
        "--record",
        "r1",
        "--list",
        "deals",
        "--kind",
        "insert",
        "--data",
        r#"{"price": 5}"#,
    ];
    let positions = publish_cli(&args, "").await;
    assert_eq!(positions.len(), 1);
    let line = listen.stdout_line().await;
    assert_eq!(line["pos"], positions[0]);
    assert_eq!(line["record"], "r1");
    assert_eq!(line["lists"], json!(["deals"]));
    assert_eq!(line["kind"], "insert");
    assert_eq!(line["data"], json!({"price": 5}));

    let input = "{\"workspace\": \"w\", \"data\": 1}\n\n{\"workspace\": \"other\"}\n\
                 {\"workspace\": \"w\", \"data\": {\"$binary\": \"AP8=\"}}\n";
    let positions = publish_cli(&["publish", "--url", &http, "--batch", "2"], input).await;
    assert_eq!(positions.len(), 3, "{positions:?}");
    assert_eq!(listen.stdout_line().await["data"], json!(1));
    assert_eq!(
        listen.stdout_line().await["data"],
        json!({"$binary": "AP8="}),
        "the other workspace is not printed"
    );

    node.kill().await;
    node.restart().await;
    listen.stderr_containing("recovered=false").await;
    let args = [
        "publish",
        "--url",
        &http,
        "--workspace",
        "w",
        "--data",
        "\"again\"",
    ];
    let positions = publish_cli(&args, "").await;
    let line = listen.stdout_line().await;
    assert_eq!(line["pos"], positions[0]);
    assert_eq!(line["data"], "again");
}
