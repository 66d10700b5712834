//! A minimal fan-out server, to tell what Ripple costs on top of actix and
//! the kernel: the same bench, the same machine, nothing of Ripple's
//! (history, interests, budgets, auth, cluster).
//!
//! It takes the node's command line (`serve --config FILE ...`, reading only
//! the first `http` address) and speaks what the bench's clients and
//! publishers use: `hello` (any token), `subscribe` to one list, `POST
//! /v1/publish` with MessagePack changes, `/healthz`, and `/metrics` with a
//! deliveries counter. Run it under the bench with
//! `RIPPLE_BENCH_NODE_BIN=benches/baseline/target/release/ripple-baseline`
//! (`cargo build --release` in this folder first) and `fanout` or `idle`.
//! `BASELINE_WORKERS` sets its HTTP workers (default 1).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use actix_web_actors::ws;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

static DELIVERED: AtomicU64 = AtomicU64::new(0);

/// A change's JSON frame, encoded once and shared.
#[derive(Message)]
#[rtype(result = "()")]
struct Frame(Arc<str>);

#[derive(Message)]
#[rtype(result = "()")]
struct Subscribe {
    list: String,
    session: Addr<Session>,
}

/// Frames by list; answers the last seq.
#[derive(Message)]
#[rtype(result = "u64")]
struct Publish {
    frames: Vec<(String, Arc<str>)>,
}

#[derive(Default)]
struct Router {
    lists: HashMap<String, Vec<Addr<Session>>>,
    seq: u64,
}

impl Actor for Router {
    type Context = Context<Self>;
}

impl Handler<Subscribe> for Router {
    type Result = ();

    fn handle(&mut self, msg: Subscribe, _: &mut Context<Self>) {
        self.lists.entry(msg.list).or_default().push(msg.session);
    }
}

impl Handler<Publish> for Router {
    type Result = u64;

    fn handle(&mut self, msg: Publish, _: &mut Context<Self>) -> u64 {
        for (list, frame) in msg.frames {
            self.seq += 1;
            let Some(sessions) = self.lists.get(&list) else {
                continue;
            };
            for session in sessions {
                session.do_send(Frame(frame.clone()));
            }
            DELIVERED.fetch_add(sessions.len() as u64, Ordering::Relaxed);
        }
        self.seq
    }
}

struct Session {
    router: Addr<Router>,
}

impl Actor for Session {
    type Context = ws::WebsocketContext<Self>;
}

impl Handler<Frame> for Session {
    type Result = ();

    fn handle(&mut self, msg: Frame, ctx: &mut Self::Context) {
        ctx.text(&*msg.0);
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for Session {
    fn handle(&mut self, item: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        let Ok(ws::Message::Text(text)) = item else {
            return;
        };
        let message: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        match message["op"].as_str() {
            Some("hello") => ctx.text(
                r#"{"op":"welcome","node":"n1","session":"s","position":{},"recovered":true,"missed":0}"#,
            ),
            Some("subscribe") => {
                let list = message["interests"][0]["list"].as_str().unwrap_or_default();
                self.router.do_send(Subscribe {
                    list: list.to_string(),
                    session: ctx.address(),
                });
                ctx.text(r#"{"op":"subscribed","id":1}"#);
            }
            _ => {}
        }
    }
}

async fn websocket(
    req: HttpRequest,
    stream: web::Payload,
    router: web::Data<Addr<Router>>,
) -> Result<HttpResponse, actix_web::Error> {
    let session = Session {
        router: router.get_ref().clone(),
    };
    ws::WsResponseBuilder::new(session, &req, stream)
        .protocols(&["ripple.v1.json"])
        .start()
}

async fn publish(body: web::Bytes, router: web::Data<Addr<Router>>) -> HttpResponse {
    let Ok(value) = rmpv::decode::read_value(&mut &body[..]) else {
        return HttpResponse::BadRequest().finish();
    };
    let changes = match value {
        rmpv::Value::Array(changes) => changes,
        change => vec![change],
    };
    let frames = changes
        .into_iter()
        .filter_map(|change| {
            let change: serde_json::Value = rmpv::ext::from_value(change).ok()?;
            let list = change["lists"][0].as_str()?.to_string();
            let mut frame = serde_json::Map::new();
            frame.insert("op".into(), "change".into());
            frame.insert("pos".into(), serde_json::json!(["n1", 1, 1]));
            frame.extend(change.as_object()?.clone());
            let text = serde_json::to_string(&frame).ok()?;
            Some((list, Arc::<str>::from(text)))
        })
        .collect();
    let Ok(seq) = router.send(Publish { frames }).await else {
        return HttpResponse::ServiceUnavailable().finish();
    };
    HttpResponse::Ok()
        .content_type("application/json")
        .body(format!(r#"{{"positions":[["n1",1,{seq}]]}}"#))
}

async fn metrics() -> HttpResponse {
    let delivered = DELIVERED.load(Ordering::Relaxed);
    HttpResponse::Ok().body(format!(
        "baseline_deliveries_total {delivered}\nbaseline_slow_closes_total 0\n"
    ))
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let config = args
        .iter()
        .position(|a| a == "--config")
        .and_then(|i| args.get(i + 1))
        .expect("usage: ripple-baseline serve --config FILE");
    let config = std::fs::read_to_string(config)?;
    let http = config
        .lines()
        .find_map(|l| l.strip_prefix("http = "))
        .map(|v| v.trim_matches('"').to_string())
        .expect("the config names no http address");
    let workers = std::env::var("BASELINE_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);

    actix_web::rt::System::new().block_on(async move {
        let router = web::Data::new(Router::default().start());
        HttpServer::new(move || {
            App::new()
                .app_data(router.clone())
                .route("/v1/ws", web::get().to(websocket))
                .route("/v1/publish", web::post().to(publish))
                .route(
                    "/healthz",
                    web::get().to(|| async { HttpResponse::Ok().finish() }),
                )
                .route("/metrics", web::get().to(metrics))
        })
        .workers(workers)
        .backlog(4096)
        .max_connections(25_000)
        .bind(&http)?
        .run()
        .await
    })
}
