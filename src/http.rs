//! The HTTP face of a node: publishing, the WebSocket upgrade, health,
//! metrics, and the browser client and demo page.
//!
//! Publish answers are in the request's format (MessagePack or JSON), and so
//! are its errors: `{"error": "<what is wrong and what to do>"}`.

use std::sync::Arc;

use actix::Addr;
use actix_web::http::header::{self, ContentType};
use actix_web::{web, HttpRequest, HttpResponse};
use actix_web_actors::ws;
use futures_util::StreamExt;
use log::{debug, warn};
use serde::Serialize;

use crate::auth::{self, publish_key_ok};
use crate::cluster::ClusterHandle;
use crate::codec::{decode_publish, Format};
use crate::config::{Config, DEV_PUBLISH_KEY};
use crate::connection::Connection;
use crate::metrics::Metrics;
use crate::router::{GetState, Publish, Router};
use crate::session::{ConnectionSlot, Session, SessionShared};

/// The browser client and the demo page, built into the binary.
const CLIENT_JS: &str = include_str!("../clients/js/ripple.js");
const CLIENT_DTS: &str = include_str!("../clients/js/ripple.d.ts");
const DEMO_HTML: &str = include_str!("../clients/demo/index.html");

/// How long a development token from `/v1/dev` lasts, in seconds.
const DEV_TOKEN_TTL_SECS: u64 = 24 * 3600;

/// What the handlers share.
pub struct AppState {
    pub node: String,
    pub config: Arc<Config>,
    pub router: Addr<Router>,
    pub metrics: Arc<Metrics>,
    pub sessions: Arc<SessionShared>,
    /// The cluster links; `None` on a single node.
    pub cluster: Option<ClusterHandle>,
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/publish", web::post().to(publish))
        .route("/v1/ws", web::get().to(websocket))
        .route("/v1/dev", web::get().to(dev))
        .route("/healthz", web::get().to(healthz))
        .route("/metrics", web::get().to(metrics))
        .route("/client/ripple.js", web::get().to(client_js))
        .route("/client/ripple.d.ts", web::get().to(client_dts))
        .route("/", web::get().to(demo))
        .route("/demo", web::get().to(demo));
}

/// Formats an answer (or an error) in the request's format.
fn answer<T: Serialize>(
    status: actix_web::http::StatusCode,
    format: Format,
    body: &T,
) -> HttpResponse {
    let mut response = HttpResponse::build(status);
    match format {
        Format::Json => response
            .content_type(ContentType::json())
            .body(serde_json::to_vec(body).expect("json")),
        Format::MsgPack => response
            .content_type("application/msgpack")
            .body(rmp_serde::to_vec_named(body).expect("msgpack")),
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

fn refuse(
    state: &AppState,
    status: actix_web::http::StatusCode,
    format: Format,
    reason: &'static str,
    message: &str,
) -> HttpResponse {
    state.metrics.refused.with_label_values(&[reason]).inc();
    warn!(
        "publish refused status={} reason={reason} detail={message:?}",
        status.as_u16()
    );
    answer(status, format, &ErrorBody { error: message })
}

fn request_format(req: &HttpRequest) -> Option<Format> {
    let content_type = req.headers().get(header::CONTENT_TYPE)?.to_str().ok()?;
    let mime = content_type.split(';').next()?.trim().to_ascii_lowercase();
    match mime.as_str() {
        "application/msgpack" | "application/x-msgpack" | "application/vnd.msgpack" => {
            Some(Format::MsgPack)
        }
        "application/json" => Some(Format::Json),
        _ => None,
    }
}

/// The key of `Authorization: Bearer <key>`; the scheme is
/// case-insensitive, as in every HTTP authorization header.
fn bearer(req: &HttpRequest) -> Option<&str> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, key) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
}

#[derive(Serialize)]
struct Positions {
    positions: Vec<(String, u64, u64)>,
}

async fn publish(
    req: HttpRequest,
    mut payload: web::Payload,
    state: web::Data<AppState>,
) -> HttpResponse {
    use actix_web::http::StatusCode;

    let format = request_format(&req);
    let reply_format = format.unwrap_or(Format::Json);
    let keys = &state.config.cluster.publish_keys;
    if !bearer(&req).is_some_and(|key| publish_key_ok(keys, key)) {
        let message = "missing or unknown publish key: send `Authorization: Bearer <publish key>`";
        return refuse(
            &state,
            StatusCode::UNAUTHORIZED,
            reply_format,
            "publish_key",
            message,
        );
    }
    let Some(format) = format else {
        let message = "send the body as application/msgpack or application/json";
        return refuse(
            &state,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            reply_format,
            "media_type",
            message,
        );
    };

    let max = state.config.limits.max_publish_bytes;
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let Ok(chunk) = chunk else {
            let message = "the request body could not be read";
            return refuse(&state, StatusCode::BAD_REQUEST, format, "body", message);
        };
        if body.len() + chunk.len() > max {
            let message = format!("the body is over the limit of {max} bytes; split the batch");
            return refuse(
                &state,
                StatusCode::PAYLOAD_TOO_LARGE,
                format,
                "too_large",
                &message,
            );
        }
        body.extend_from_slice(&chunk);
    }

    let changes = match decode_publish(&body, format, state.config.limits.max_batch) {
        Ok(changes) => changes,
        Err(message) => {
            return refuse(&state, StatusCode::BAD_REQUEST, format, "invalid", &message)
        }
    };
    let count = changes.len();
    match state.router.send(Publish { changes }).await {
        Ok(positions) => {
            // A 200 promises the change was handed to the peers' bus.
            if let (Some(cluster), Some(last)) = (&state.cluster, positions.last()) {
                cluster.published(last.seq).await;
            }
            debug!("published changes={count}");
            let positions = positions
                .into_iter()
                .map(|p| (p.origin.to_string(), p.epoch, p.seq))
                .collect();
            answer(StatusCode::OK, format, &Positions { positions })
        }
        Err(_) => {
            let message = "the node is shutting down; publish to another node";
            refuse(
                &state,
                StatusCode::SERVICE_UNAVAILABLE,
                format,
                "shutting_down",
                message,
            )
        }
    }
}

async fn websocket(
    req: HttpRequest,
    stream: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    let Some(slot) = ConnectionSlot::take(&state.sessions) else {
        state
            .metrics
            .refused
            .with_label_values(&["connections"])
            .inc();
        warn!(
            "connection refused, node full max_connections={}",
            state.config.limits.max_connections
        );
        return Ok(HttpResponse::ServiceUnavailable()
            .content_type(ContentType::json())
            .body(r#"{"error":"this node holds its maximum of connections; try another node"}"#));
    };
    let protocols = [Format::JSON_PROTOCOL, Format::MSGPACK_PROTOCOL];
    let mut response = ws::handshake_with_protocols(&req, &protocols)?;
    // The same pick as the handshake's: the first offered protocol we know.
    let offered = req
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|h| h.to_str().ok());
    let chosen = offered.and_then(|o| o.split(',').map(str::trim).find(|p| protocols.contains(p)));
    let format = match chosen {
        Some(Format::MSGPACK_PROTOCOL) => Format::MsgPack,
        _ => Format::Json,
    };
    let local_port = req.app_config().local_addr().port();
    let connection = req
        .peer_addr()
        .map(|peer| Connection::current(peer, local_port));
    let session = Session::new(state.sessions.clone(), format, connection, slot);
    let codec = actix_http::ws::Codec::new().max_size(state.config.limits.max_frame_bytes);
    Ok(response.streaming(ws::WebsocketContext::with_codec(session, stream, codec)))
}

async fn healthz(state: web::Data<AppState>) -> HttpResponse {
    let node = state.router.send(GetState).await;
    let Ok(node) = node else {
        return HttpResponse::ServiceUnavailable().json(serde_json::json!({"status": "stopping"}));
    };
    HttpResponse::Ok().json(serde_json::json!({
        "status": "ok",
        "node": state.node,
        "epoch": node.epoch,
        "seq": node.seq,
        "sessions": node.sessions,
        "history": node.history,
        "position": node.position,
        "peers": state.cluster.as_ref().map(|c| c.report()).unwrap_or_default(),
    }))
}

async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render())
}

/// A ready-made token and publish key for the demo page and the CLI, served
/// only with `cluster.dev = true` (the built-in development defaults).
async fn dev(state: web::Data<AppState>) -> HttpResponse {
    let cluster = &state.config.cluster;
    if !cluster.dev {
        return HttpResponse::NotFound().json(serde_json::json!({
            "error": "development endpoints are off; set cluster.dev = true to use them"
        }));
    }
    let token = auth::mint(&cluster.jwt_secret, &["*"], DEV_TOKEN_TTL_SECS);
    let publish_key = cluster
        .publish_keys
        .iter()
        .find(|k| *k == DEV_PUBLISH_KEY)
        .or(cluster.publish_keys.first())
        .cloned()
        .unwrap_or_default();
    let nodes: Vec<String> = {
        // This node first, so a client starts where the page came from.
        let mut nodes: Vec<_> = state.config.nodes.iter().collect();
        nodes.sort_by_key(|n| n.id != state.node);
        nodes.iter().map(|n| n.ws_url()).collect()
    };
    HttpResponse::Ok().json(serde_json::json!({
        "token": token,
        "publish_key": publish_key,
        "nodes": nodes,
        "node": state.node,
    }))
}

async fn client_js() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/javascript; charset=utf-8")
        .body(CLIENT_JS)
}

async fn client_dts() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; charset=utf-8")
        .body(CLIENT_DTS)
}

async fn demo() -> HttpResponse {
    HttpResponse::Ok()
        .content_type(ContentType::html())
        .body(DEMO_HTML)
}
