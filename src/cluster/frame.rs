//! Frames between nodes, authenticated with the cluster secret.
//!
//! A frame is one ZeroMQ multipart message:
//!
//! ```text
//! "RPL1" | kind (1 byte) | sender node id | part 0 | part 1 | ... | mac
//! ```
//!
//! where `mac` is HMAC-SHA256 under `cluster.secret` over the tag, the kind,
//! the sender and every part, each preceded by its length (so parts cannot be
//! shifted from one to the next). A frame whose MAC does not match is
//! refused: a process that can reach the ports but does not hold the secret
//! cannot inject changes. Replaying a genuine frame achieves nothing: its
//! change is a repeat by position and is dropped.
//!
//! The MessagePack `change` frame that clients receive is the body of a
//! change frame, so a change crosses the cluster without re-encoding.

use bytes::Bytes;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use thiserror::Error;
use zeromq::ZmqMessage;

const TAG: &[u8] = b"RPL1";
const MAC_BYTES: usize = 32;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// part 0: a MessagePack change frame.
    Change = b'c' as isize,
    /// part 0: [`Heartbeat`](super::Heartbeat).
    Heartbeat = b'h' as isize,
    /// part 0: [`RepairRequest`](super::repair::RepairRequest).
    RepairRequest = b'q' as isize,
    /// part 0: [`RepairReply`](super::repair::RepairReply) header; then
    /// one MessagePack change frame per part.
    RepairReply = b'r' as isize,
}

impl Kind {
    fn from_byte(byte: u8) -> Option<Kind> {
        Some(match byte {
            b'c' => Kind::Change,
            b'h' => Kind::Heartbeat,
            b'q' => Kind::RepairRequest,
            b'r' => Kind::RepairReply,
            _ => return None,
        })
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("not a Ripple frame (bad tag or too few parts)")]
    NotRipple,
    #[error("unknown frame kind {0:#04x}")]
    UnknownKind(u8),
    #[error("MAC does not match: the sender does not hold this cluster's secret")]
    BadMac,
    #[error("sender id is not UTF-8")]
    BadSender,
}

impl FrameError {
    /// A short label for the refused-frames metric.
    pub fn reason(&self) -> &'static str {
        match self {
            FrameError::NotRipple => "not_ripple",
            FrameError::UnknownKind(_) => "unknown_kind",
            FrameError::BadMac => "bad_mac",
            FrameError::BadSender => "bad_sender",
        }
    }
}

/// A verified frame.
#[derive(Debug, Clone)]
pub struct BusFrame {
    pub kind: Kind,
    pub from: String,
    pub parts: Vec<Bytes>,
}

/// Signs and checks frames with the cluster secret.
#[derive(Clone)]
pub struct Sealer {
    mac: Hmac<Sha256>,
}

impl Sealer {
    pub fn new(secret: &str) -> Sealer {
        Sealer {
            mac: Hmac::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length"),
        }
    }

    fn digest<'a>(
        &self,
        kind: u8,
        from: &[u8],
        parts: impl Iterator<Item = &'a Bytes>,
    ) -> [u8; 32] {
        let mut mac = self.mac.clone();
        mac.update(TAG);
        mac.update(&[kind]);
        mac.update(&(from.len() as u32).to_be_bytes());
        mac.update(from);
        for part in parts {
            mac.update(&(part.len() as u32).to_be_bytes());
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    }

    pub fn seal(&self, kind: Kind, from: &str, parts: Vec<Bytes>) -> ZmqMessage {
        let digest = self.digest(kind as u8, from.as_bytes(), parts.iter());
        let mut message = ZmqMessage::from(Bytes::from_static(TAG));
        message.push_back(Bytes::copy_from_slice(&[kind as u8]));
        message.push_back(Bytes::copy_from_slice(from.as_bytes()));
        for part in parts {
            message.push_back(part);
        }
        message.push_back(Bytes::copy_from_slice(&digest));
        message
    }

    pub fn open(&self, message: ZmqMessage) -> Result<BusFrame, FrameError> {
        let mut frames = message.into_vec();
        if frames.len() < 4 || frames[0].as_ref() != TAG || frames[1].len() != 1 {
            return Err(FrameError::NotRipple);
        }
        let mac = frames.pop().expect("at least four frames");
        let kind_byte = frames[1][0];
        let digest = self.digest(kind_byte, &frames[2], frames[3..].iter());
        let matches = mac.len() == MAC_BYTES
            && mac
                .iter()
                .zip(digest.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if !matches {
            return Err(FrameError::BadMac);
        }
        let kind = Kind::from_byte(kind_byte).ok_or(FrameError::UnknownKind(kind_byte))?;
        let from = String::from_utf8(frames[2].to_vec()).map_err(|_| FrameError::BadSender)?;
        Ok(BusFrame {
            kind,
            from,
            parts: frames.split_off(3),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_and_open() {
        let sealer = Sealer::new("secret");
        let parts = vec![Bytes::from_static(b"ab"), Bytes::from_static(b"c")];
        let frame = sealer
            .open(sealer.seal(Kind::Change, "n1", parts.clone()))
            .unwrap();
        assert_eq!(
            (frame.kind, frame.from.as_str(), frame.parts),
            (Kind::Change, "n1", parts)
        );
    }

    #[test]
    fn forged_or_altered_frames_are_refused() {
        let sealer = Sealer::new("secret");
        let forged = Sealer::new("guess").seal(Kind::Change, "n1", vec![Bytes::from_static(b"x")]);
        assert_eq!(sealer.open(forged).unwrap_err(), FrameError::BadMac);

        // Moving a byte from one part to the next must break the MAC.
        let genuine = sealer.seal(
            Kind::Change,
            "n1",
            vec![Bytes::from_static(b"ab"), Bytes::new()],
        );
        let mut parts = genuine.into_vec();
        parts[3] = Bytes::from_static(b"a");
        parts[4] = Bytes::from_static(b"b");
        let altered = ZmqMessage::try_from(parts).unwrap();
        assert_eq!(sealer.open(altered).unwrap_err(), FrameError::BadMac);

        let junk = ZmqMessage::from(Bytes::from_static(b"hello"));
        assert_eq!(sealer.open(junk).unwrap_err(), FrameError::NotRipple);
    }
}
