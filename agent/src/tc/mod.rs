//! tc over rtnetlink for the mellanox backend: the requests ([`flower`]), what a filter dump
//! says ([`dump`]), the eswitch mode over devlink ([`devlink`]) and a small synchronous
//! NETLINK_ROUTE socket that sends a request (or a batch of them in one datagram) and waits
//! for each acknowledgement, with the kernel's extended-ack message (what a driver says when
//! it refuses a rule). The backend talks through [`TcTransport`], so tests can stand a fake
//! kernel in for the socket.

pub mod devlink;
pub mod dump;
pub mod flower;

use std::collections::HashMap;

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

/// `NLMSG_ERROR` (also the acknowledgement, with error 0).
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const SOL_NETLINK: libc::c_int = 270;
const NETLINK_EXT_ACK: libc::c_int = 11;
/// `NLMSGERR_ATTR_MSG`: the extended ack's text.
const NLMSGERR_ATTR_MSG: u16 = 1;

/// A refused request: errno and the kernel's message, if it gave one.
#[derive(Debug, thiserror::Error)]
#[error("{}{}", io::Error::from_raw_os_error(*errno), message.as_deref().map(|m| format!(": {m}")).unwrap_or_default())]
pub struct TcError {
    pub errno: i32,
    pub message: Option<String>,
}

impl From<io::Error> for TcError {
    fn from(e: io::Error) -> Self {
        Self {
            errno: e.raw_os_error().unwrap_or(libc::EIO),
            message: Some(e.to_string()),
        }
    }
}

/// Most requests one datagram carries: the kernel answers each with its own ack, and the
/// acks of a batch must fit the socket's receive buffer (set to [`RCVBUF`]) or some are lost.
pub const MAX_BATCH: usize = 64;
/// Receive buffer asked for (acks are small, but each takes an skb's truesize).
const RCVBUF: libc::c_int = 1 << 20;

/// What the mellanox backend talks to the kernel through: the NETLINK_ROUTE socket, or in
/// tests a fake that answers as the kernel would (errors injected per message).
pub trait TcTransport: Send {
    /// The next sequence number for a request.
    fn next_seq(&mut self) -> u32;
    /// Sends one request (built with sequence number `seq`) and waits for its ack.
    fn request(&mut self, seq: u32, msg: &[u8]) -> Result<(), TcError>;
    /// Sends the requests (each built with its sequence number) in one datagram and returns
    /// each one's outcome, in order. `Err`: the datagram as a whole failed, or acks were lost:
    /// the outcome of any request is then unknown.
    fn batch(&mut self, msgs: &[(u32, Vec<u8>)]) -> Result<Vec<Result<(), TcError>>, TcError>;
    /// Sends a dump request and returns every message of the answer (without `NLMSG_DONE`).
    fn dump(&mut self, seq: u32, msg: &[u8]) -> Result<Vec<Vec<u8>>, TcError>;
}

impl TcTransport for TcSocket {
    fn next_seq(&mut self) -> u32 {
        TcSocket::next_seq(self)
    }
    fn request(&mut self, seq: u32, msg: &[u8]) -> Result<(), TcError> {
        TcSocket::request(self, seq, msg)
    }
    fn batch(&mut self, msgs: &[(u32, Vec<u8>)]) -> Result<Vec<Result<(), TcError>>, TcError> {
        TcSocket::batch(self, msgs)
    }
    fn dump(&mut self, seq: u32, msg: &[u8]) -> Result<Vec<Vec<u8>>, TcError> {
        TcSocket::dump(self, seq, msg)
    }
}

/// A NETLINK_ROUTE socket in the calling thread's network namespace.
pub struct TcSocket {
    fd: OwnedFd,
    seq: u32,
}

impl TcSocket {
    pub fn open() -> io::Result<Self> {
        Self::open_protocol(libc::NETLINK_ROUTE)
    }

    /// A netlink socket of another protocol (NETLINK_GENERIC for devlink).
    pub fn open_protocol(protocol: libc::c_int) -> io::Result<Self> {
        // SAFETY: plain socket(2); the descriptor is owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let one: libc::c_int = 1;
        // SAFETY: a valid int option; failure only loses the error texts.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                SOL_NETLINK,
                NETLINK_EXT_ACK,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            );
            // Room for the acks of a whole batch; the kernel caps it at rmem_max (a smaller
            // buffer shows as lost acks, which the batch reports as unknown outcomes).
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&RCVBUF as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            );
        }
        Ok(Self { fd, seq: 1 })
    }

    /// The next sequence number for a request.
    pub fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends one request (built with the sequence number `seq`) and waits for its ack.
    pub fn request(&mut self, seq: u32, msg: &[u8]) -> Result<(), TcError> {
        self.send(msg)?;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = self.recv(&mut buf)?;
            for (msg, kind, mseq) in messages(&buf[..n]) {
                if mseq == seq && kind == NLMSG_ERROR {
                    return ack_result(msg);
                }
            }
        }
    }

    /// Sends the requests in one datagram (several netlink messages: the kernel handles them
    /// one after another and acks each, errors included) and returns each one's outcome.
    pub fn batch(&mut self, msgs: &[(u32, Vec<u8>)]) -> Result<Vec<Result<(), TcError>>, TcError> {
        if msgs.is_empty() {
            return Ok(Vec::new());
        }
        let mut datagram = Vec::with_capacity(msgs.iter().map(|(_, m)| m.len() + 3).sum());
        let mut slot = HashMap::with_capacity(msgs.len());
        for (i, (seq, m)) in msgs.iter().enumerate() {
            slot.insert(*seq, i);
            datagram.extend_from_slice(m);
            datagram.resize(datagram.len().next_multiple_of(4), 0);
        }
        self.send(&datagram)?;
        let mut out: Vec<Option<Result<(), TcError>>> = (0..msgs.len()).map(|_| None).collect();
        let mut left = msgs.len();
        let mut buf = vec![0u8; 64 * 1024];
        while left > 0 {
            let n = self.recv(&mut buf)?;
            for (msg, kind, mseq) in messages(&buf[..n]) {
                if kind == NLMSG_ERROR
                    && let Some(&i) = slot.get(&mseq)
                    && out[i].is_none()
                {
                    out[i] = Some(ack_result(msg));
                    left -= 1;
                }
            }
        }
        Ok(out
            .into_iter()
            .map(|r| r.expect("every slot answered"))
            .collect())
    }

    /// Sends a dump request and returns every message of the answer (without `NLMSG_DONE`).
    pub fn dump(&mut self, seq: u32, msg: &[u8]) -> Result<Vec<Vec<u8>>, TcError> {
        self.send(msg)?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = self.recv(&mut buf)?;
            for (msg, kind, mseq) in messages(&buf[..n]) {
                if mseq == seq {
                    match kind {
                        NLMSG_DONE => return Ok(out),
                        NLMSG_ERROR => {
                            ack_result(msg)?;
                            return Ok(out);
                        }
                        _ => out.push(msg.to_vec()),
                    }
                }
            }
        }
    }

    fn send(&self, msg: &[u8]) -> io::Result<()> {
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: `msg` and `addr` are valid for the lengths given.
        let rc = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for its length.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

/// The netlink messages of one received datagram: each whole message (header included) with its
/// type and sequence number; stops at a truncated or malformed header.
fn messages(buf: &[u8]) -> impl Iterator<Item = (&[u8], u16, u32)> + '_ {
    let mut off = 0;
    std::iter::from_fn(move || {
        let hdr = buf.get(off..off + 16)?;
        let len = u32::from_ne_bytes(hdr[0..4].try_into().expect("4")) as usize;
        let kind = u16::from_ne_bytes(hdr[4..6].try_into().expect("2"));
        let seq = u32::from_ne_bytes(hdr[8..12].try_into().expect("4"));
        let msg = buf.get(off..off + len).filter(|_| len >= 16)?;
        off += (len + 3) & !3;
        Some((msg, kind, seq))
    })
}

/// The outcome in an `NLMSG_ERROR` message: error 0 is the ack; otherwise errno and the
/// extended ack's text (attributes after the echoed request header).
fn ack_result(m: &[u8]) -> Result<(), TcError> {
    if m.len() < 20 {
        return Err(TcError {
            errno: libc::EIO,
            message: Some("short netlink error message".into()),
        });
    }
    let err = i32::from_ne_bytes(m[16..20].try_into().expect("4"));
    if err == 0 {
        return Ok(());
    }
    // Without NLM_F_CAPPED the whole request is echoed; with it (ext ack on), only its
    // header: the TLVs start after the echoed header (16 bytes) or the echoed message.
    let flags = u16::from_ne_bytes(m[6..8].try_into().expect("2"));
    let capped = flags & 0x100 != 0;
    let echoed = if capped || m.len() < 24 {
        16
    } else {
        u32::from_ne_bytes(m[20..24].try_into().expect("4")) as usize
    };
    let mut off = 20 + echoed;
    let mut message = None;
    while off + 4 <= m.len() {
        let len = u16::from_ne_bytes(m[off..off + 2].try_into().expect("2")) as usize;
        let kind = u16::from_ne_bytes(m[off + 2..off + 4].try_into().expect("2")) & 0x3fff;
        if len < 4 || off + len > m.len() {
            break;
        }
        if kind == NLMSGERR_ATTR_MSG {
            let text = &m[off + 4..off + len];
            let text = text.split(|b| *b == 0).next().unwrap_or_default();
            message = Some(String::from_utf8_lossy(text).into_owned());
        }
        off += (len + 3) & !3;
    }
    Err(TcError {
        errno: -err,
        message,
    })
}
