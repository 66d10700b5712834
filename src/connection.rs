//! The TCP connection under a session, kept so that the Router can cut a
//! connection whose client stopped reading: that session's actor then never
//! runs (its writes wait on the socket), so it cannot close itself.
//!
//! A connection is named by its two ends, the client's address and the port
//! it reached, which no other open socket of the node shares. The node does
//! not keep the descriptor itself: recording it at accept time costs every
//! connection a map of connection data (about 200 bytes each, most of an
//! idle connection's budget beyond actix-http's own buffers), while a cut is
//! rare. So the cut looks the descriptor up among the process's open files,
//! on the worker thread that owns the socket (the only thread that could
//! close it meanwhile): a few milliseconds for 20,000 files, once per stuck
//! client.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::RawFd;

use log::debug;

pub struct Connection {
    /// The client's end.
    peer: SocketAddr,
    /// The node's port the client connected to.
    local_port: u16,
    /// The worker thread that owns the socket.
    arbiter: actix::ArbiterHandle,
}

impl Connection {
    /// The connection of a request being handled on this thread.
    pub fn current(peer: SocketAddr, local_port: u16) -> Connection {
        Connection {
            peer,
            local_port,
            arbiter: actix::Arbiter::current(),
        }
    }

    /// Shuts the socket down (both ways) if it is still open; the session
    /// then sees its connection end and stops. Does not close it: the
    /// descriptor stays with its owner.
    pub fn cut(&self) {
        let (peer, local_port) = (self.peer, self.local_port);
        self.arbiter.spawn(async move {
            match find_socket(peer, local_port) {
                // SAFETY: shutdown on a socket of this process that is still
                // this connection (checked on the thread that owns it, so it
                // cannot have been closed and reused since); it closes nothing.
                Some(fd) => unsafe {
                    libc::shutdown(fd, libc::SHUT_RDWR);
                },
                None => debug!("connection to cut is already gone peer={peer}"),
            }
        });
    }
}

/// The descriptor of the open TCP socket from `peer` to our `local_port`.
fn find_socket(peer: SocketAddr, local_port: u16) -> Option<RawFd> {
    let open = std::fs::read_dir("/proc/self/fd").ok()?;
    open.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<RawFd>().ok())
        .find(|&fd| {
            let same = |a: Option<SocketAddr>, b: SocketAddr| {
                a.is_some_and(|a| a.ip() == b.ip() && a.port() == b.port())
            };
            socket_end(fd, libc::getsockname).is_some_and(|a| a.port() == local_port)
                && same(socket_end(fd, libc::getpeername), peer)
        })
}

type EndFn = unsafe extern "C" fn(RawFd, *mut libc::sockaddr, *mut libc::socklen_t) -> i32;

/// One end of a socket (`getsockname` or `getpeername`), if `fd` is an
/// IPv4 or IPv6 socket.
fn socket_end(fd: RawFd, end: EndFn) -> Option<SocketAddr> {
    // SAFETY: sockaddr_storage is plain data, valid when zeroed.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: the pointers are valid for writes of `len` bytes.
    let rc = unsafe { end(fd, &mut storage as *mut _ as *mut libc::sockaddr, &mut len) };
    if rc != 0 {
        return None;
    }
    match storage.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let a = unsafe { &*(&storage as *const _ as *const libc::sockaddr_in) };
            let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::from((ip, u16::from_be(a.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let a = unsafe { &*(&storage as *const _ as *const libc::sockaddr_in6) };
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::from((ip, u16::from_be(a.sin6_port))))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    #[test]
    fn finds_the_accepted_socket_by_its_two_ends() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (accepted, peer) = listener.accept().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        assert_eq!(find_socket(peer, port), Some(accepted.as_raw_fd()));
        // The client's own socket has the ends the other way round.
        let wrong = SocketAddr::from(([127, 0, 0, 1], port));
        assert_eq!(find_socket(wrong, peer.port()), Some(client.as_raw_fd()));
        drop(accepted);
        assert_eq!(find_socket(peer, port), None);
    }
}
