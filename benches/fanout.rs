//! `cargo bench --bench fanout`: how many changes one Ripple node delivers
//! per second and per CPU second, how late they arrive, and how much memory a
//! connection costs.
//!
//! The bench runs a real node (the release `ripple` binary, which cargo
//! builds for every bench: `CARGO_BIN_EXE_ripple`, or `RIPPLE_BENCH_NODE_BIN`)
//! as a child process with a temporary config, and real WebSocket clients on
//! loopback. The load generator is made of more copies of this binary, each
//! started with `RIPPLE_BENCH_ROLE` set:
//!
//! - `clients`: a current-thread runtime holding up to
//!   `RIPPLE_BENCH_PER_CHILD` connections (a process here may open at most
//!   20,000 files, so many connections need several processes). Each
//!   connection says hello, subscribes one list and then counts the changes
//!   it receives and records their latency.
//! - `publish`: HTTP publishers on keep-alive connections, MessagePack
//!   bodies, each sending its next request as soon as the answer to the last
//!   one is back (or paced, with `RIPPLE_BENCH_RATE`).
//!
//! The parent (no role) starts the node and the workers, waits out the
//! warm-up, then tells every worker over its stdin to `start` counting,
//! sleeps for the measured window, and tells them to `stop`; each answers
//! on stdout with its counters and its latency histogram. CPU time comes from
//! `/proc/<pid>/stat` (utime + stime, every thread) of the node and of each
//! worker, read at the edges of the window; memory from `VmRSS`.
//!
//! Latency is publish to deliver: each change carries `data: {"t": <µs since
//! the Unix epoch>}` stamped by the publisher just before it sends the
//! request, and the client subtracts it from its own clock on arrival (same
//! machine, same clock). Clients find stamps by searching the frame, so a
//! frame carrying several changes counts as several deliveries.
//!
//! Scenarios (all by default; name some as arguments, `cargo bench --bench
//! fanout -- idle`, or in `RIPPLE_BENCH_SCENARIOS=fanout,cluster`):
//!
//! - `fanout`: 10,000 clients over 100 lists, publishers to random lists, 5 s
//!   of warm-up, 20 s measured. Targets: >= 130,000 deliveries per node
//!   CPU-second (<= 7.5 µs of node CPU per delivery), p99 < 50 ms.
//! - `idle`: 19,000 connections that said hello and subscribed one list, and
//!   then do nothing. Target: < 12 KiB of node memory per connection.
//! - `cluster`: the fanout over a cluster of `NODES` (3) nodes linked by
//!   their ZeroMQ bus: 50,000 clients spread round-robin over the nodes,
//!   publishers at every node, the clients in as many processes as needed.
//!   Deliveries per node CPU-second count the CPU of all the nodes. The
//!   publishers are paced at 80 changes/s (40,000 deliveries/s), below what
//!   saturates this 2-core machine: as fast as answers come back, three
//!   nodes and 50,000 clients leave no core idle and p99 is in the hundreds
//!   of ms. A paced node spends more per delivery on waking up and on pings
//!   than a saturated one, so the scenario then runs a reference, one node
//!   alone with the load of one cluster node (a third of the clients, the
//!   same rate). Targets: p99 < 100 ms, and at least 80% of the reference's
//!   deliveries per node CPU-second; the figure against the saturated single
//!   node is printed too when `fanout` ran in the same invocation.
//!
//! `RIPPLE_BENCH_QUICK=1` shrinks every scenario to a smoke run of a few
//! seconds.
//! Other knobs, all environment variables with the `RIPPLE_BENCH_` prefix:
//! `CLIENTS`, `LISTS`, `IDLE` (connections), `PER_CHILD`, `PUBLISHERS`,
//! `BATCH` (changes per request), `RATE` (changes per second over all
//! publishers, 0 for as fast as answers come back), `PAYLOAD` (extra bytes
//! of data per change), `WARMUP_SECS`, `SECS`, `FORMAT` (`json` or
//! `msgpack` frames to clients), `HTTP_WORKERS` (the node's), `PING_MS`
//! (the node's ping interval; in `idle`, holds the connections for `SECS`
//! to show what hours of pings do to memory), `NODES` (of `cluster`),
//! `CLUSTER_CLIENTS`, `CLUSTER_PUBLISHERS`, `CLUSTER_RATE` (0 for as fast
//! as answers come back), and `NODE_CPUS` and `LOAD_CPUS`:
//! CPU lists (`0`, `0,1`) to pin the nodes and the load generator to, so that
//! the two do not preempt each other (unpinned by default).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::rc::Rc;
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

/// The workspace every client reads and every change is published to.
const WORKSPACE: &str = "bench";
/// Seconds the clients' token is valid: longer than any run.
const TOKEN_TTL_SECS: u64 = 6 * 3600;
/// WebSocket handshakes one clients process has in flight at once.
const CONNECT_CONCURRENCY: usize = 64;
/// How long one connection may take to open, say hello and subscribe.
const OPEN_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the node gets to answer `/healthz` after it is started.
const NODE_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long idle connections settle before the node's memory is read: past
/// the node's hello timeout (5 s), whose timers live until then.
const SETTLE: Duration = Duration::from_secs(6);
/// Largest latency the histograms hold, in microseconds (a minute).
const MAX_LATENCY_US: u64 = 60_000_000;

fn main() {
    match std::env::var("RIPPLE_BENCH_ROLE").as_deref() {
        Ok("clients") => worker_runtime(clients_main()),
        Ok("publish") => worker_runtime(publish_main()),
        Ok(other) => panic!("unknown RIPPLE_BENCH_ROLE {other:?}: use clients or publish"),
        Err(_) => orchestrate(),
    }
}

// ---------------------------------------------------------------------------
// Settings

fn env_or<T: FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(text) if !text.is_empty() => text
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text:?} is not a valid value")),
        _ => default,
    }
}

/// Every scenario, in the order they run by default.
const SCENARIOS: [&str; 3] = ["fanout", "idle", "cluster"];

/// A CPU list such as `0` or `0,1` from the environment.
fn cpu_list(name: &str) -> Option<Vec<usize>> {
    let text = std::env::var(name).ok().filter(|t| !t.is_empty())?;
    let cpus = text
        .split(',')
        .map(|c| {
            c.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{name}={text:?}: give CPU numbers such as 0,1"))
        })
        .collect();
    Some(cpus)
}

struct Settings {
    scenarios: Vec<String>,
    /// Nodes of the `cluster` scenario.
    nodes: usize,
    cluster_clients: usize,
    cluster_publishers: usize,
    /// Changes per second over all the cluster's publishers (0: as fast as
    /// answers come back).
    cluster_rate: u64,
    /// CPUs to pin the nodes and the load generator to.
    node_cpus: Option<Vec<usize>>,
    load_cpus: Option<Vec<usize>>,
    http_workers: usize,
    clients: usize,
    lists: usize,
    idle: usize,
    per_child: usize,
    publishers: usize,
    batch: usize,
    rate: u64,
    payload: usize,
    warmup: Duration,
    window: Duration,
    format: String,
    /// The node's ping interval, when not its default.
    ping_ms: Option<u64>,
}

impl Settings {
    fn from_env() -> Settings {
        let quick = env_or("RIPPLE_BENCH_QUICK", 0u8) != 0;
        let mut scenarios: Vec<String> = std::env::args()
            .skip(1)
            .filter(|a| !a.starts_with("--"))
            .collect();
        if scenarios.is_empty() {
            let listed: String = env_or("RIPPLE_BENCH_SCENARIOS", SCENARIOS.join(","));
            scenarios = listed.split(',').map(|s| s.trim().to_string()).collect();
        }
        for s in &scenarios {
            assert!(
                SCENARIOS.contains(&s.as_str()),
                "unknown scenario {s:?}: the scenarios are {}",
                SCENARIOS.join(", ")
            );
        }
        let format: String = env_or("RIPPLE_BENCH_FORMAT", "json".to_string());
        assert!(
            format == "json" || format == "msgpack",
            "RIPPLE_BENCH_FORMAT must be json or msgpack"
        );
        Settings {
            scenarios,
            nodes: env_or("RIPPLE_BENCH_NODES", 3),
            cluster_clients: env_or(
                "RIPPLE_BENCH_CLUSTER_CLIENTS",
                if quick { 3_000 } else { 50_000 },
            ),
            cluster_publishers: env_or("RIPPLE_BENCH_CLUSTER_PUBLISHERS", 6),
            cluster_rate: env_or("RIPPLE_BENCH_CLUSTER_RATE", 80),
            node_cpus: cpu_list("RIPPLE_BENCH_NODE_CPUS"),
            load_cpus: cpu_list("RIPPLE_BENCH_LOAD_CPUS"),
            http_workers: env_or("RIPPLE_BENCH_HTTP_WORKERS", 1),
            clients: env_or("RIPPLE_BENCH_CLIENTS", if quick { 1_000 } else { 10_000 }),
            lists: env_or("RIPPLE_BENCH_LISTS", 100),
            idle: env_or("RIPPLE_BENCH_IDLE", if quick { 1_000 } else { 19_000 }),
            per_child: env_or("RIPPLE_BENCH_PER_CHILD", 5_000),
            publishers: env_or("RIPPLE_BENCH_PUBLISHERS", 4),
            batch: env_or("RIPPLE_BENCH_BATCH", 1),
            rate: env_or("RIPPLE_BENCH_RATE", 0),
            payload: env_or("RIPPLE_BENCH_PAYLOAD", 0),
            warmup: Duration::from_secs(env_or(
                "RIPPLE_BENCH_WARMUP_SECS",
                if quick { 1 } else { 5 },
            )),
            window: Duration::from_secs(env_or("RIPPLE_BENCH_SECS", if quick { 3 } else { 20 })),
            format,
            ping_ms: std::env::var("RIPPLE_BENCH_PING_MS")
                .ok()
                .and_then(|v| v.parse().ok()),
        }
    }
}

// ---------------------------------------------------------------------------
// The parent: nodes, workers, measurements and the report

fn orchestrate() {
    let settings = Settings::from_env();
    let bin = node_binary();
    let dir = std::env::temp_dir().join(format!("ripple-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("cannot create the bench's temp dir");
    println!(
        "ripple fanout bench: node {} (http_workers={}), {} cores, scenarios {}, \
         nodes on CPUs {}, load generator on CPUs {}",
        bin.display(),
        settings.http_workers,
        cores(),
        settings.scenarios.join(","),
        cpus_text(&settings.node_cpus),
        cpus_text(&settings.load_cpus)
    );
    if let Some(cpus) = &settings.load_cpus {
        pin(cpus).expect("cannot pin the load generator to RIPPLE_BENCH_LOAD_CPUS");
    }
    let mut single = None;
    for scenario in settings.scenarios.clone() {
        match scenario.as_str() {
            "fanout" => {
                let one = Shape {
                    name: "fanout",
                    nodes: 1,
                    clients: settings.clients,
                    publishers: settings.publishers,
                    rate: settings.rate,
                };
                single = Some(fanout(&settings, &bin, &dir, &one));
            }
            "idle" => idle(&settings, &bin, &dir),
            _ => {
                let shape = Shape {
                    name: "cluster",
                    nodes: settings.nodes.max(2),
                    clients: settings.cluster_clients,
                    publishers: settings.cluster_publishers,
                    rate: settings.cluster_rate,
                };
                let per_cpu = fanout(&settings, &bin, &dir, &shape);
                if let Some(single) = single {
                    println!(
                        "   against one node    {:.0}% of the single node's deliveries per node \
                         CPU-second in `fanout`",
                        per_cpu / single * 100.0
                    );
                }
                if shape.rate == 0 {
                    continue;
                }
                // A paced node pays for waking up and for pings more per
                // delivery than a saturated one: compare with one node doing
                // what each cluster node does, without the cluster.
                let alone = Shape {
                    name: "cluster reference, one node with the load of one cluster node",
                    nodes: 1,
                    clients: shape.clients / shape.nodes,
                    publishers: (shape.publishers / shape.nodes).max(1),
                    rate: shape.rate,
                };
                let alone_per_cpu = fanout(&settings, &bin, &dir, &alone);
                println!(
                    "   cluster against one node at the same load  {:.0}% of its deliveries \
                     per node CPU-second  (target >= 80%)",
                    per_cpu / alone_per_cpu * 100.0
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn node_binary() -> PathBuf {
    let bin = std::env::var_os("RIPPLE_BENCH_NODE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_ripple")));
    assert!(
        bin.exists(),
        "no node binary at {}: run `cargo build --release --bin ripple` or set \
         RIPPLE_BENCH_NODE_BIN",
        bin.display()
    );
    bin
}

/// How many nodes, clients and publishers a fanout run has.
struct Shape {
    /// What the report calls the run.
    name: &'static str,
    nodes: usize,
    clients: usize,
    publishers: usize,
    /// Changes per second over all publishers; 0 for as fast as answers
    /// come back.
    rate: u64,
}

/// Runs one fanout and prints it; returns deliveries per node CPU-second.
fn fanout(settings: &Settings, bin: &Path, dir: &Path, shape: &Shape) -> f64 {
    let clients = shape.clients;
    let lists = settings.lists.max(1);
    let name = shape.name;
    println!();
    println!(
        "== {name}: {clients} clients on {} node(s) over {lists} lists ({} per list), {} frames",
        shape.nodes,
        clients / lists,
        settings.format
    );
    let nodes = start_nodes(settings, shape.nodes, bin, dir);
    let rss_before: u64 = nodes.iter().map(|n| n.rss_kib()).sum();

    let opened = Instant::now();
    let mut workers = spawn_clients(settings, &nodes, clients, lists);
    let (ok, failed) = wait_ready(&mut workers);
    let rss_after: u64 = nodes.iter().map(|n| n.rss_kib()).sum();
    println!(
        "   connected {ok} clients in {:.1} s ({failed} failed) over {} processes",
        opened.elapsed().as_secs_f64(),
        workers.len()
    );

    let http: Vec<String> = nodes.iter().map(|n| n.http.clone()).collect();
    let mut publisher = Worker::spawn(
        "publish",
        &[
            ("RIPPLE_BENCH_HTTP", http.join(",")),
            ("RIPPLE_BENCH_PUBLISHERS", shape.publishers.to_string()),
            ("RIPPLE_BENCH_BATCH", settings.batch.to_string()),
            ("RIPPLE_BENCH_RATE", shape.rate.to_string()),
            ("RIPPLE_BENCH_PAYLOAD", settings.payload.to_string()),
            ("RIPPLE_BENCH_LISTS", lists.to_string()),
        ],
    );
    std::thread::sleep(settings.warmup);

    // The window.
    let node_cpu0: Vec<f64> = nodes.iter().map(NodeProc::cpu).collect();
    let clients_cpu0: f64 = workers.iter().map(Worker::cpu).sum();
    let publish_cpu0 = publisher.cpu();
    let delivered0: f64 = nodes.iter().map(|n| n.metric("deliveries_total")).sum();
    let machine0 = machine_ticks();
    let threads0 = thread_cpu(nodes[0].pid());
    let started = Instant::now();
    for w in workers.iter_mut().chain(std::iter::once(&mut publisher)) {
        w.send("start");
    }
    std::thread::sleep(settings.window);
    for w in workers.iter_mut().chain(std::iter::once(&mut publisher)) {
        w.send("stop");
    }
    let secs = started.elapsed().as_secs_f64();
    let node_cpu = nodes.iter().map(NodeProc::cpu).sum::<f64>() - node_cpu0.iter().sum::<f64>();
    let clients_cpu = workers.iter().map(Worker::cpu).sum::<f64>() - clients_cpu0;
    let publish_cpu = publisher.cpu() - publish_cpu0;
    let delivered_node = nodes
        .iter()
        .map(|n| n.metric("deliveries_total"))
        .sum::<f64>()
        - delivered0;
    let machine = machine_busy(
        machine0,
        machine_ticks(),
        node_cpu + clients_cpu + publish_cpu,
    );
    let threads = thread_report(&threads0, &thread_cpu(nodes[0].pid()));

    let published = publisher.report();
    let mut latency = new_histogram();
    let mut deliveries = 0;
    let mut closed = 0;
    for w in &mut workers {
        let report = w.report();
        deliveries += report.count("deliveries");
        closed += report.count("closed");
        latency
            .add(&report.histogram)
            .expect("histograms of one shape");
    }
    let slow_closes: f64 = nodes.iter().map(|n| n.metric("slow_closes_total")).sum();

    let changes = published.count("published");
    let pacing = if shape.rate == 0 {
        "as fast as answers come back".to_string()
    } else {
        format!("paced at {} changes/s", shape.rate)
    };
    println!(
        "   publishers {} x batch {} ({pacing}), payload +{} B, warm-up {} s, measured {secs:.1} s",
        shape.publishers,
        settings.batch,
        settings.payload,
        settings.warmup.as_secs()
    );
    println!(
        "   published           {:>12} changes/s  (answer p50 {} p99 {}, {} errors)",
        thousands(changes as f64 / secs),
        ms(published.histogram.value_at_quantile(0.5)),
        ms(published.histogram.value_at_quantile(0.99)),
        published.count("errors")
    );
    println!(
        "   delivered           {:>12} deliveries/s  (node counted {}/s; expected {}/s; \
         {closed} connections closed, {slow_closes} slow closes)",
        thousands(deliveries as f64 / secs),
        thousands(delivered_node / secs),
        thousands(changes as f64 * clients as f64 / lists as f64 / secs)
    );
    let (p99_target, cpu_target) = match shape.name {
        "fanout" => ("  (target p99 < 50 ms)", "  (target >= 130,000, <= 7.5 µs)"),
        "cluster" => ("  (target p99 < 100 ms)", ""),
        _ => ("", ""),
    };
    println!(
        "   latency             p50 {}  p90 {}  p99 {}  p99.9 {}  max {}{p99_target}",
        ms(latency.value_at_quantile(0.5)),
        ms(latency.value_at_quantile(0.9)),
        ms(latency.value_at_quantile(0.99)),
        ms(latency.value_at_quantile(0.999)),
        ms(latency.max())
    );
    let per_cpu = deliveries as f64 / node_cpu.max(1e-9);
    println!(
        "   node CPU            {node_cpu:.2} s in {secs:.1} s ({:.0}% of a core): {} deliveries \
         per node CPU-second, {:.2} µs per delivery{cpu_target}",
        node_cpu / secs * 100.0,
        thousands(per_cpu),
        1e6 / per_cpu.max(1e-9)
    );
    if nodes.len() > 1 {
        let each: Vec<String> = nodes
            .iter()
            .zip(&node_cpu0)
            .map(|(n, before)| format!("{} {:.2} s", n.id, n.cpu() - before))
            .collect();
        println!("   CPU per node        {}", each.join(", "));
    }
    println!("   {:<19} {threads}", format!("{} threads", nodes[0].id));
    println!(
        "   node memory         RSS {} before, {} with {ok} clients: {:.1} KiB per connection",
        mib(rss_before),
        mib(rss_after),
        rss_after.saturating_sub(rss_before) as f64 / ok.max(1) as f64
    );
    let generator = clients_cpu + publish_cpu;
    println!(
        "   load generator CPU  {generator:.2} s ({:.0}% of a core): clients {clients_cpu:.2} s \
         in {} processes ({:.2} µs per delivery), publishers {publish_cpu:.2} s",
        generator / secs * 100.0,
        workers.len(),
        clients_cpu * 1e6 / deliveries.max(1) as f64
    );
    println!("   machine             {machine}");

    publisher.finish();
    for w in workers {
        w.finish();
    }
    for n in nodes {
        n.stop();
    }
    per_cpu
}

fn idle(settings: &Settings, bin: &Path, dir: &Path) {
    let count = settings.idle;
    let lists = settings.lists.max(1);
    println!();
    println!("== idle: {count} connections on one node, each said hello and subscribed one list");
    let nodes = start_nodes(settings, 1, bin, dir);
    std::thread::sleep(Duration::from_millis(500));
    let rss_before: u64 = nodes.iter().map(|n| n.rss_kib()).sum();

    let opened = Instant::now();
    let mut workers = spawn_clients(settings, &nodes, count, lists);
    let (ok, failed) = wait_ready(&mut workers);
    let open_secs = opened.elapsed().as_secs_f64();
    std::thread::sleep(SETTLE);
    let rss_after: u64 = nodes.iter().map(|n| n.rss_kib()).sum();
    let per = rss_after.saturating_sub(rss_before) as f64 / ok.max(1) as f64;
    println!(
        "   connected {ok} clients in {open_secs:.1} s ({failed} failed) over {} processes",
        workers.len()
    );
    println!(
        "   node memory         RSS {} before, {} with {ok} idle connections: {per:.2} KiB per \
         connection  (target < 12 KiB)",
        mib(rss_before),
        mib(rss_after)
    );

    // Idle cost: pings every ping_interval_ms (25 s by default). With
    // RIPPLE_BENCH_PING_MS the pings come faster and the whole window is
    // held, which ages the connections: memory after hours of pings.
    let hold = match settings.ping_ms {
        Some(_) => settings.window,
        None => settings.window.min(Duration::from_secs(10)),
    };
    let node_cpu0: f64 = nodes.iter().map(NodeProc::cpu).sum();
    let clients_cpu0: f64 = workers.iter().map(Worker::cpu).sum();
    for w in &mut workers {
        w.send("start");
    }
    std::thread::sleep(hold);
    let node_cpu = nodes.iter().map(NodeProc::cpu).sum::<f64>() - node_cpu0;
    let clients_cpu = workers.iter().map(Worker::cpu).sum::<f64>() - clients_cpu0;
    let mut closed = 0;
    for w in &mut workers {
        w.send("stop");
        closed += w.report().count("closed");
    }
    let rss_held: u64 = nodes.iter().map(|n| n.rss_kib()).sum();
    let ping_ms = settings.ping_ms.unwrap_or(25_000);
    println!(
        "   held {:.0} s          pings every {ping_ms} ms: node CPU {node_cpu:.2} s, clients CPU \
         {clients_cpu:.2} s, {closed} connections closed; RSS {}: {:.2} KiB per connection",
        hold.as_secs_f64(),
        mib(rss_held),
        rss_held.saturating_sub(rss_before) as f64 / ok.max(1) as f64
    );
    for w in workers {
        w.finish();
    }
    for n in nodes {
        n.stop();
    }
}

/// Spreads `count` clients over processes of at most `per_child` each;
/// client `i` takes node `i % nodes` and list `l<i % lists>`.
fn spawn_clients(
    settings: &Settings,
    nodes: &[NodeProc],
    count: usize,
    lists: usize,
) -> Vec<Worker> {
    let token = ripple::auth::mint(ripple::config::DEV_SECRET, &[WORKSPACE], TOKEN_TTL_SECS);
    let urls: Vec<String> = nodes.iter().map(|n| n.http.clone()).collect();
    let per_child = settings.per_child.clamp(1, 19_000);
    let children = count.div_ceil(per_child).max(1);
    let mut workers = Vec::new();
    let mut first = 0;
    for c in 0..children {
        let n = count / children + usize::from(c < count % children);
        workers.push(Worker::spawn(
            "clients",
            &[
                ("RIPPLE_BENCH_HTTP", urls.join(",")),
                ("RIPPLE_BENCH_FIRST", first.to_string()),
                ("RIPPLE_BENCH_COUNT", n.to_string()),
                ("RIPPLE_BENCH_LISTS", lists.to_string()),
                ("RIPPLE_BENCH_TOKEN", token.clone()),
                ("RIPPLE_BENCH_FORMAT", settings.format.clone()),
            ],
        ));
        first += n;
    }
    workers
}

fn wait_ready(workers: &mut [Worker]) -> (u64, u64) {
    let (mut ok, mut failed) = (0, 0);
    for w in workers {
        let line = w.line();
        let mut words = line.split_whitespace();
        assert_eq!(
            words.next(),
            Some("ready"),
            "a clients process said {line:?}"
        );
        ok += words
            .next()
            .and_then(|w| w.parse::<u64>().ok())
            .unwrap_or(0);
        failed += words
            .next()
            .and_then(|w| w.parse::<u64>().ok())
            .unwrap_or(0);
    }
    (ok, failed)
}

/// One node process.
struct NodeProc {
    id: String,
    http: String,
    child: Child,
    log: PathBuf,
}

/// Starts `count` nodes: one with no bus, or a cluster of them linked by
/// their buses, all from one config; returns once every node answers and,
/// in a cluster, sees all its peers up.
fn start_nodes(settings: &Settings, count: usize, bin: &Path, dir: &Path) -> Vec<NodeProc> {
    let mut config = format!(
        "[cluster]\nhttp_workers = {}\n\
         [history]\nmax_changes = 100000\nmax_age_secs = 600\n\
         [limits]\nmax_connections = 19500\n{}",
        settings.http_workers,
        settings
            .ping_ms
            .map_or(String::new(), |ms| format!("ping_interval_ms = {ms}\n"))
    );
    let mut nodes = Vec::new();
    for k in 1..=count {
        let http = format!("127.0.0.1:{}", free_port());
        config.push_str(&format!("[[nodes]]\nid = \"n{k}\"\nhttp = \"{http}\"\n"));
        if count > 1 {
            config.push_str(&format!(
                "bus = \"tcp://127.0.0.1:{}\"\nrepair = \"tcp://127.0.0.1:{}\"\n",
                free_port(),
                free_port()
            ));
        }
        nodes.push((format!("n{k}"), http));
    }
    let path = dir.join(format!("nodes-{}.toml", free_port()));
    std::fs::write(&path, config).expect("cannot write the node config");

    let nodes: Vec<NodeProc> = nodes
        .into_iter()
        .map(|(id, http)| {
            let log = dir.join(format!("{id}-{}.log", free_port()));
            let mut command = Command::new(bin);
            command
                .args(["serve", "--config"])
                .arg(&path)
                .args(["--node", &id])
                .env(
                    "RUST_LOG",
                    std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
                )
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).expect("cannot create the node log"));
            // A pinned load generator would pass its CPUs on: nodes get all
            // of them unless given their own.
            let all = || (0..cores()).collect();
            let cpus =
                (settings.node_cpus.clone()).or_else(|| settings.load_cpus.as_ref().map(|_| all()));
            if let Some(cpus) = cpus {
                pin_child(&mut command, cpus);
            }
            let child = command
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
            NodeProc {
                id,
                http,
                child,
                log,
            }
        })
        .collect();
    for node in &nodes {
        node.wait_healthy(count - 1);
    }
    nodes
}

/// Pins this process (and the threads and children it makes from now on)
/// to `cpus`.
fn pin(cpus: &[usize]) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data, valid when zeroed; CPU_SET writes
    // inside it, and sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &cpu in cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Has a child pin itself to `cpus` before it starts.
fn pin_child(command: &mut Command, cpus: Vec<usize>) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure only calls sched_setaffinity, which is safe
    // between fork and exec.
    unsafe {
        command.pre_exec(move || pin(&cpus));
    }
}

fn cpus_text(cpus: &Option<Vec<usize>>) -> String {
    match cpus {
        Some(cpus) => cpus
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(","),
        None => "any".into(),
    }
}

impl NodeProc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the node answers `/healthz` and reports `peers` peers,
    /// every one of them up.
    fn wait_healthy(&self, peers: usize) {
        let deadline = Instant::now() + NODE_START_TIMEOUT;
        while Instant::now() < deadline {
            if let Some((200, body)) = http_get(&self.http, "/healthz") {
                let health: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                let up = health["peers"].as_array().map_or(0, |p| {
                    p.iter().filter(|p| p["up"].as_bool() == Some(true)).count()
                });
                if up == peers {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        panic!(
            "node {} at {} never answered /healthz with its {peers} peers up; its log:\n{log}",
            self.id, self.http
        );
    }

    fn cpu(&self) -> f64 {
        cpu_secs(self.pid())
    }

    fn rss_kib(&self) -> u64 {
        rss_kib(self.pid())
    }

    /// A counter from `/metrics`, summed over its labels.
    fn metric(&self, suffix: &str) -> f64 {
        let Some((200, body)) = http_get(&self.http, "/metrics") else {
            return f64::NAN;
        };
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once(' '))
            .filter(|(name, _)| name.split('{').next().is_some_and(|n| n.ends_with(suffix)))
            .filter_map(|(_, value)| value.trim().parse::<f64>().ok())
            .sum()
    }

    fn stop(mut self) {
        // SAFETY: signalling a child process we started and have not reaped.
        unsafe { libc::kill(self.pid() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A load generator process and the pipes to talk to it.
struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

/// What a worker reports at `stop`.
struct Report {
    counters: HashMap<String, u64>,
    histogram: Histogram<u64>,
}

impl Report {
    fn count(&self, name: &str) -> u64 {
        self.counters.get(name).copied().unwrap_or(0)
    }
}

impl Worker {
    fn spawn(role: &str, env: &[(&str, String)]) -> Worker {
        let exe = std::env::current_exe().expect("the bench knows its own path");
        let mut command = Command::new(exe);
        command
            .env("RIPPLE_BENCH_ROLE", role)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command
            .spawn()
            .expect("cannot start a load generator process");
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        Worker {
            child,
            stdin,
            stdout,
        }
    }

    fn send(&mut self, command: &str) {
        writeln!(self.stdin, "{command}").expect("a load generator process died");
        self.stdin.flush().expect("a load generator process died");
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        let n = self.stdout.read_line(&mut line).unwrap_or(0);
        assert!(
            n > 0,
            "a load generator process ended early (see its errors above)"
        );
        line.trim_end().to_string()
    }

    fn cpu(&self) -> f64 {
        cpu_secs(self.child.id())
    }

    /// Reads the answer to `stop`.
    fn report(&mut self) -> Report {
        let mut report = Report {
            counters: HashMap::new(),
            histogram: new_histogram(),
        };
        loop {
            let line = self.line();
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["end"] => return report,
                ["count", name, n] => {
                    report
                        .counters
                        .insert(name.to_string(), n.parse().unwrap_or(0));
                }
                ["h", value, n] => {
                    let (value, n) = (value.parse().unwrap_or(1), n.parse().unwrap_or(0));
                    report.histogram.saturating_record_n(value, n);
                }
                _ => panic!("a load generator process said {line:?}"),
            }
        }
    }

    fn finish(mut self) {
        drop(self.stdin);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// /proc, ports, and a tiny HTTP client for the parent

fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// utime + stime of a process, all its threads, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat_cpu_secs(&stat)
}

/// CPU seconds of each thread of a process, by thread id, with its name.
fn thread_cpu(pid: u32) -> HashMap<String, (String, f64)> {
    let mut threads = HashMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return threads;
    };
    for entry in dir.flatten() {
        let tid = entry.file_name().to_string_lossy().to_string();
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let name = match (stat.find('('), stat.rfind(')')) {
            (Some(a), Some(b)) if a < b => stat[a + 1..b].to_string(),
            _ => tid.clone(),
        };
        threads.insert(tid, (name, stat_cpu_secs(&stat)));
    }
    threads
}

/// "name s, name s" for the threads that used CPU between two readings.
fn thread_report(
    before: &HashMap<String, (String, f64)>,
    after: &HashMap<String, (String, f64)>,
) -> String {
    let mut used: Vec<(String, f64)> = after
        .iter()
        .map(|(tid, (name, secs))| {
            let was = before.get(tid).map_or(0.0, |b| b.1);
            (name.clone(), secs - was)
        })
        .filter(|(_, secs)| *secs > 0.0)
        .collect();
    used.sort_by(|a, b| b.1.total_cmp(&a.1));
    let parts: Vec<String> = used.iter().map(|(n, s)| format!("{n} {s:.2} s")).collect();
    parts.join(", ")
}

fn stat_cpu_secs(stat: &str) -> f64 {
    if stat.is_empty() {
        return 0.0;
    }
    // Fields after the command name, which is in parentheses and may hold
    // spaces: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        fields[11].parse::<u64>().unwrap_or(0) + fields[12].parse::<u64>().unwrap_or(0);
    ticks as f64 / clock_ticks()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The whole machine's CPU ticks from `/proc/stat`: user, nice, system,
/// idle, iowait, irq, softirq, steal.
fn machine_ticks() -> [u64; 8] {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let mut ticks = [0; 8];
    if let Some(line) = stat.lines().next() {
        for (t, field) in ticks.iter_mut().zip(line.split_whitespace().skip(1)) {
            *t = field.parse().unwrap_or(0);
        }
    }
    ticks
}

/// How busy the machine was between two readings, and with what.
/// `ours` is the CPU seconds of the node and the load generator: the rest
/// of the busy time went to softirq (loopback TCP) and to other processes.
fn machine_busy(before: [u64; 8], after: [u64; 8], ours: f64) -> String {
    let d: Vec<f64> = (0..8)
        .map(|i| after[i].saturating_sub(before[i]) as f64)
        .collect();
    let total: f64 = d.iter().sum::<f64>().max(1.0);
    let pct = |x: f64| x / total * 100.0;
    let busy = total - d[3] - d[4];
    let ours = ours * clock_ticks();
    format!(
        "{:.0}% of {} cores busy (user {:.0}%, system {:.0}%, softirq {:.0}%, steal {:.0}%); \
         node + load generator {:.0}%, the rest {:.0}% (softirq, other processes)",
        pct(busy),
        cores(),
        pct(d[0] + d[1]),
        pct(d[2] + d[5]),
        pct(d[6]),
        pct(d[7]),
        pct(ours),
        pct((busy - ours).max(0.0))
    )
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("cannot bind a free port");
    listener.local_addr().expect("a bound address").port()
}

/// A GET with `Connection: close`; `None` when nothing answers.
fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Some((status, body))
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds")
}

fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn thousands(x: f64) -> String {
    let digits = format!("{:.0}", x.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

// ---------------------------------------------------------------------------
// Workers: what both roles share

fn worker_runtime<F: std::future::Future<Output = ()>>(main: F) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    tokio::task::LocalSet::new().block_on(&runtime, main);
}

/// Lines from the parent, read on a plain thread (stdin blocks).
fn commands() -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line.trim().to_string()).is_err() {
                break;
            }
        }
    });
    rx
}

/// Counters and a histogram, recorded only between `start` and `stop`.
struct Stats {
    recording: Cell<bool>,
    counters: RefCell<Vec<(&'static str, u64)>>,
    histogram: RefCell<Histogram<u64>>,
}

impl Stats {
    fn new(names: &[&'static str]) -> Rc<Stats> {
        Rc::new(Stats {
            recording: Cell::new(false),
            counters: RefCell::new(names.iter().map(|n| (*n, 0)).collect()),
            histogram: RefCell::new(new_histogram()),
        })
    }

    fn add(&self, name: &str, n: u64) {
        if !self.recording.get() {
            return;
        }
        if let Some(c) = self.counters.borrow_mut().iter_mut().find(|c| c.0 == name) {
            c.1 += n;
        }
    }

    fn record(&self, us: u64) {
        if self.recording.get() {
            self.histogram.borrow_mut().saturating_record(us.max(1));
        }
    }

    fn start(&self) {
        for c in self.counters.borrow_mut().iter_mut() {
            c.1 = 0;
        }
        self.histogram.borrow_mut().reset();
        self.recording.set(true);
    }

    fn stop_and_print(&self) {
        self.recording.set(false);
        let mut out = String::new();
        for (name, n) in self.counters.borrow().iter() {
            out.push_str(&format!("count {name} {n}\n"));
        }
        for v in self.histogram.borrow().iter_recorded() {
            out.push_str(&format!(
                "h {} {}\n",
                v.value_iterated_to(),
                v.count_at_value()
            ));
        }
        out.push_str("end\n");
        let mut stdout = std::io::stdout().lock();
        stdout
            .write_all(out.as_bytes())
            .expect("the parent went away");
        stdout.flush().expect("the parent went away");
    }
}

/// Serves `start` / `stop` until the parent closes stdin or says `exit`.
async fn serve_commands(stats: &Stats) {
    let mut commands = commands();
    while let Some(command) = commands.recv().await {
        match command.as_str() {
            "start" => stats.start(),
            "stop" => stats.stop_and_print(),
            "exit" => break,
            other => eprintln!("bench worker: unknown command {other:?}"),
        }
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn env_list(name: &str) -> Vec<String> {
    let text: String = env_or(name, String::new());
    let list: Vec<String> = text
        .split(',')
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    assert!(!list.is_empty(), "{name} must list at least one address");
    list
}

// ---------------------------------------------------------------------------
// The clients role

struct ClientsConfig {
    nodes: Vec<String>,
    first: usize,
    count: usize,
    lists: usize,
    token: String,
    msgpack: bool,
}

async fn clients_main() {
    let config = Rc::new(ClientsConfig {
        nodes: env_list("RIPPLE_BENCH_HTTP"),
        first: env_or("RIPPLE_BENCH_FIRST", 0),
        count: env_or("RIPPLE_BENCH_COUNT", 1),
        lists: env_or("RIPPLE_BENCH_LISTS", 100usize).max(1),
        token: env_or("RIPPLE_BENCH_TOKEN", String::new()),
        msgpack: env_or("RIPPLE_BENCH_FORMAT", "json".to_string()) == "msgpack",
    });
    let stats = Stats::new(&["deliveries", "closed"]);
    let gate = Rc::new(tokio::sync::Semaphore::new(CONNECT_CONCURRENCY));
    let (opened_tx, mut opened) = tokio::sync::mpsc::unbounded_channel::<bool>();
    for i in 0..config.count {
        let client = client(
            config.first + i,
            config.clone(),
            stats.clone(),
            gate.clone(),
            opened_tx.clone(),
        );
        tokio::task::spawn_local(client);
    }
    drop(opened_tx);

    let (mut ok, mut failed) = (0, 0);
    while let Some(success) = opened.recv().await {
        if success {
            ok += 1;
        } else {
            failed += 1;
        }
    }
    println!("ready {ok} {failed}");
    serve_commands(&stats).await;
}

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

/// One client: opens, then counts what it receives until the end.
async fn client(
    i: usize,
    config: Rc<ClientsConfig>,
    stats: Rc<Stats>,
    gate: Rc<tokio::sync::Semaphore>,
    opened: tokio::sync::mpsc::UnboundedSender<bool>,
) {
    let permit = gate.acquire().await.expect("the gate stays open");
    let ws = tokio::time::timeout(OPEN_TIMEOUT, open(i, &config)).await;
    drop(permit);
    let mut ws = match ws {
        Ok(Ok(ws)) => ws,
        Ok(Err(error)) => {
            eprintln!("bench client {i}: {error}");
            let _ = opened.send(false);
            return;
        }
        Err(_) => {
            eprintln!("bench client {i}: not subscribed within {OPEN_TIMEOUT:?}");
            let _ = opened.send(false);
            return;
        }
    };
    let _ = opened.send(true);
    drop(opened);

    while let Some(message) = ws.next().await {
        match message {
            Ok(Message::Text(text)) => on_frame(&stats, text.as_bytes(), false),
            Ok(Message::Binary(bytes)) => on_frame(&stats, &bytes, true),
            Ok(Message::Close(frame)) => {
                if stats.recording.get() {
                    eprintln!("bench client {i}: closed by the node: {frame:?}");
                }
                break;
            }
            Ok(_) => {}
            Err(error) => {
                eprintln!("bench client {i}: {error}");
                break;
            }
        }
    }
    stats.add("closed", 1);
}

/// Connects, says hello and subscribes list `l<i % lists>`.
async fn open(i: usize, config: &ClientsConfig) -> Result<Ws, String> {
    let node = &config.nodes[i % config.nodes.len()];
    let stream = TcpStream::connect(node.as_str())
        .await
        .map_err(|e| format!("cannot connect to {node}: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut request = format!("ws://{node}/v1/ws")
        .into_client_request()
        .map_err(|e| e.to_string())?;
    let protocol = if config.msgpack {
        "ripple.v1.msgpack"
    } else {
        "ripple.v1.json"
    };
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        protocol.parse().expect("a header value"),
    );
    // Write eagerly: a client sends only its hello and its subscribe.
    let ws_config = WebSocketConfig {
        write_buffer_size: 0,
        ..WebSocketConfig::default()
    };
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(request, stream, Some(ws_config))
        .await
        .map_err(|e| format!("handshake with {node} failed: {e}"))?;

    let list = format!("l{}", i % config.lists);
    let hello = serde_json::json!({"op": "hello", "token": config.token});
    let subscribe = serde_json::json!({"op": "subscribe", "id": 1,
        "interests": [{"workspace": WORKSPACE, "list": list}]});
    for message in [hello, subscribe] {
        let frame = if config.msgpack {
            Message::Binary(rmp_serde::to_vec_named(&message).expect("msgpack"))
        } else {
            Message::Text(message.to_string())
        };
        ws.send(frame).await.map_err(|e| e.to_string())?;
    }

    loop {
        let answer = match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                serde_json::from_str::<serde_json::Value>(&text).map_err(|e| e.to_string())?
            }
            Some(Ok(Message::Binary(bytes))) => {
                rmp_serde::from_slice::<serde_json::Value>(&bytes).map_err(|e| e.to_string())?
            }
            Some(Ok(Message::Close(frame))) => {
                return Err(format!("closed by the node: {frame:?}"))
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("the node hung up".into()),
        };
        match answer["op"].as_str() {
            Some("subscribed") => return Ok(ws),
            Some("error") => return Err(format!("subscribe refused: {answer}")),
            _ => continue,
        }
    }
}

/// Counts the changes in a frame and records their latency, from the
/// publisher's stamp in `data.t`.
fn on_frame(stats: &Stats, frame: &[u8], msgpack: bool) {
    if !stats.recording.get() {
        return;
    }
    let now = now_us();
    let mut found = 0;
    if msgpack {
        // `data` (fixstr 4), a map header, then `t` (fixstr 1) and a uint64.
        let mut rest = frame;
        while let Some(at) = find(rest, b"\xa4data") {
            let after = &rest[at + 5..];
            if after.len() >= 12 && &after[1..4] == b"\xa1t\xcf" {
                let stamp = u64::from_be_bytes(after[4..12].try_into().expect("8 bytes"));
                stats.record(now.saturating_sub(stamp));
                found += 1;
            }
            rest = after;
        }
    } else {
        let text = std::str::from_utf8(frame).unwrap_or("");
        for (at, mark) in text.match_indices("\"data\":{\"t\":") {
            let digits = &text[at + mark.len()..];
            let end = digits
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(digits.len());
            if let Ok(stamp) = digits[..end].parse::<u64>() {
                stats.record(now.saturating_sub(stamp));
                found += 1;
            }
        }
    }
    stats.add("deliveries", found);
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

// ---------------------------------------------------------------------------
// The publish role

struct PublishConfig {
    nodes: Vec<String>,
    publishers: usize,
    batch: usize,
    lists: usize,
    payload: String,
    /// Time between two requests of one publisher; zero for closed loop.
    period: Duration,
}

#[derive(Serialize)]
struct OutChange<'a> {
    workspace: &'a str,
    record: String,
    lists: [String; 1],
    kind: &'a str,
    data: OutData<'a>,
}

/// `t` first: clients look for `"data":{"t":`.
#[derive(Serialize)]
struct OutData<'a> {
    t: u64,
    #[serde(skip_serializing_if = "str::is_empty")]
    pad: &'a str,
}

async fn publish_main() {
    let publishers: usize = env_or("RIPPLE_BENCH_PUBLISHERS", 4usize).max(1);
    let batch: usize = env_or("RIPPLE_BENCH_BATCH", 1usize).max(1);
    let rate: u64 = env_or("RIPPLE_BENCH_RATE", 0);
    let period = if rate == 0 {
        Duration::ZERO
    } else {
        Duration::from_secs_f64(publishers as f64 * batch as f64 / rate as f64)
    };
    let config = Rc::new(PublishConfig {
        nodes: env_list("RIPPLE_BENCH_HTTP"),
        publishers,
        batch,
        lists: env_or("RIPPLE_BENCH_LISTS", 100usize).max(1),
        payload: "x".repeat(env_or("RIPPLE_BENCH_PAYLOAD", 0usize)),
        period,
    });
    let stats = Stats::new(&["published", "requests", "errors"]);
    for k in 0..config.publishers {
        tokio::task::spawn_local(publisher(k, config.clone(), stats.clone()));
    }
    serve_commands(&stats).await;
}

/// One keep-alive connection publishing batches to random lists; records
/// the time to the answer.
async fn publisher(k: usize, config: Rc<PublishConfig>, stats: Rc<Stats>) {
    let node = config.nodes[k % config.nodes.len()].clone();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ ((k as u64 + 1) * 0x2545_f491_4f6c_dd1d);
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    // Paced publishers take turns: publisher k starts k/n of a period
    // late, so that n of them make a steady rate rather than bursts of n.
    let mut pacer = (!config.period.is_zero()).then(|| {
        let offset = config.period.mul_f64(k as f64 / config.publishers as f64);
        let first = tokio::time::Instant::now() + offset;
        let mut p = tokio::time::interval_at(first, config.period);
        p.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        p
    });
    let mut errors_shown = 0;
    'connection: loop {
        let mut stream = match TcpStream::connect(node.as_str()).await {
            Ok(stream) => stream,
            Err(error) => {
                eprintln!("bench publisher {k}: cannot connect to {node}: {error}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let mut buf = Vec::with_capacity(4096);
        loop {
            if let Some(pacer) = &mut pacer {
                pacer.tick().await;
            }
            let t = now_us();
            let changes: Vec<OutChange> = (0..config.batch)
                .map(|_| OutChange {
                    workspace: WORKSPACE,
                    record: format!("r{}", next() % 100_000),
                    lists: [format!("l{}", next() % config.lists as u64)],
                    kind: "update",
                    data: OutData {
                        t,
                        pad: &config.payload,
                    },
                })
                .collect();
            let body = if changes.len() == 1 {
                rmp_serde::to_vec_named(&changes[0])
            } else {
                rmp_serde::to_vec_named(&changes)
            }
            .expect("msgpack");
            let started = Instant::now();
            match post(&mut stream, &mut buf, &node, &body).await {
                Ok(200) => {
                    stats.add("published", config.batch as u64);
                    stats.add("requests", 1);
                    stats.record(started.elapsed().as_micros() as u64);
                }
                Ok(status) => {
                    stats.add("errors", 1);
                    if errors_shown < 5 {
                        errors_shown += 1;
                        eprintln!("bench publisher {k}: answer {status}");
                    }
                }
                Err(error) => {
                    stats.add("errors", 1);
                    eprintln!("bench publisher {k}: {error}; reconnecting");
                    continue 'connection;
                }
            }
        }
    }
}

/// POSTs one publish body on a keep-alive connection and reads the answer;
/// returns its status.
async fn post(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    host: &str,
    body: &[u8],
) -> std::io::Result<u16> {
    let head = format!(
        "POST /v1/publish HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/msgpack\r\nContent-Length: {}\r\n\r\n",
        ripple::config::DEV_PUBLISH_KEY,
        body.len()
    );
    let mut request = Vec::with_capacity(head.len() + body.len());
    request.extend_from_slice(head.as_bytes());
    request.extend_from_slice(body);
    stream.write_all(&request).await?;

    buf.clear();
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let header_end = loop {
        if let Some(at) = find(buf, b"\r\n\r\n") {
            break at + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(bad("the node closed the connection"));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..header_end]).map_err(|_| bad("a non-UTF-8 head"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status"))?;
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .ok_or_else(|| bad("no content-length"))?;
    while buf.len() < header_end + length {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(bad("the node closed the connection"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(status)
}
