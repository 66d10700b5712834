//! Ingest: high-rate publishers push changes over ZeroMQ (PUSH to the
//! node's PULL `ingest` address) instead of HTTP.
//!
//! A frame is a three-part message:
//!
//! ```text
//! "ripple.publish.v1" | publish key | body
//! ```
//!
//! where the body is one MessagePack change or an array of them, exactly as
//! for `POST /v1/publish`. PUSH/PULL has no answer: a frame with a wrong key
//! or a bad change is dropped whole, logged and counted
//! (`ripple_refused_total{reason="ingest_key"|"ingest_invalid"}`), and the
//! publisher learns positions only from the changes themselves. Use HTTP
//! where a publisher must know that its change was accepted.

use std::sync::Arc;

use actix::Addr;
use log::{debug, info, warn};
use zeromq::{Socket, SocketRecv};

use crate::auth::publish_key_ok;
use crate::codec::{decode_publish, Format};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::router::{Publish, Router};

/// The first part of every ingest frame.
pub const INGEST_TAG: &[u8] = b"ripple.publish.v1";

pub async fn serve(
    address: String,
    config: Arc<Config>,
    router: Addr<Router>,
    metrics: Arc<Metrics>,
) -> std::io::Result<()> {
    let mut socket = zeromq::PullSocket::new();
    socket
        .bind(&address)
        .await
        .map_err(|e| std::io::Error::other(format!("cannot bind ingest socket {address}: {e}")))?;
    info!("ingest listening address={address}");
    actix::spawn(async move {
        loop {
            let message = match socket.recv().await {
                Ok(message) => message.into_vec(),
                Err(error) => {
                    debug!("ingest receive failed error={error}");
                    continue;
                }
            };
            let refuse = |reason: &'static str, detail: String| {
                metrics.refused.with_label_values(&[reason]).inc();
                warn!("ingest frame refused reason={reason} detail={detail:?}");
            };
            if message.len() != 3 || message[0].as_ref() != INGEST_TAG {
                refuse(
                    "ingest_invalid",
                    "expected \"ripple.publish.v1\" | key | body".into(),
                );
                continue;
            }
            let key = String::from_utf8_lossy(&message[1]);
            if !publish_key_ok(&config.cluster.publish_keys, &key) {
                refuse("ingest_key", "unknown publish key".into());
                continue;
            }
            if message[2].len() > config.limits.max_publish_bytes {
                refuse(
                    "ingest_invalid",
                    format!("body over {} bytes", config.limits.max_publish_bytes),
                );
                continue;
            }
            match decode_publish(&message[2], Format::MsgPack, config.limits.max_batch) {
                Ok(changes) => router.do_send(Publish { changes }),
                Err(error) => refuse("ingest_invalid", error),
            }
        }
    });
    Ok(())
}
