//! A packet capture without tcpdump: an `AF_PACKET` socket bound to one interface (in a
//! network namespace or on the host), which sees every frame the interface sends and receives
//! (`ETH_P_ALL`; frames an XDP program sends back with `XDP_TX` are not seen on the interface
//! that bounced them, so capture on the other end of a veth to see them). Only IPv4 frames are
//! kept, as short summaries ([`Frame`]), so a capture over a whole test phase stays small.
//!
//! Used to prove where packets go: that a Service's replies leave the pods' nodes straight to
//! the client and never cross the balancer node's link.

use std::{
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

/// The IP protocol number of IPv4-in-IPv4.
pub const IPPROTO_IPIP: u8 = 4;
/// The IP protocol number of TCP.
pub const IPPROTO_TCP: u8 = 6;

/// An IPv4 header's addresses and, for TCP and UDP, the ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ip4 {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
}

/// One captured IPv4 frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Sent by the interface (else received).
    pub outgoing: bool,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    /// The (outer) IPv4 header.
    pub ip: Ip4,
    /// The inner header of an IPv4-in-IPv4 frame.
    pub inner: Option<Ip4>,
}

/// Parses an IPv4 header at `b` (no options needed, but honoured).
fn parse_ip4(b: &[u8]) -> Option<(Ip4, &[u8])> {
    if b.len() < 20 || b[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(b[0] & 0x0f) * 4;
    if ihl < 20 || b.len() < ihl {
        return None;
    }
    let proto = b[9];
    let addr = |o: usize| Ipv4Addr::new(b[o], b[o + 1], b[o + 2], b[o + 3]);
    let rest = &b[ihl..];
    let (sport, dport) = if matches!(proto, 6 | 17) && rest.len() >= 4 {
        (
            u16::from_be_bytes([rest[0], rest[1]]),
            u16::from_be_bytes([rest[2], rest[3]]),
        )
    } else {
        (0, 0)
    };
    Some((
        Ip4 {
            src: addr(12),
            dst: addr(16),
            proto,
            sport,
            dport,
        },
        rest,
    ))
}

/// Parses an Ethernet frame carrying IPv4 (else None).
pub fn parse_frame(b: &[u8], outgoing: bool) -> Option<Frame> {
    if b.len() < 14 || b[12..14] != [0x08, 0x00] {
        return None;
    }
    let (ip, rest) = parse_ip4(&b[14..])?;
    let inner = (ip.proto == IPPROTO_IPIP)
        .then(|| parse_ip4(rest).map(|(i, _)| i))
        .flatten();
    let mac = |o: usize| <[u8; 6]>::try_from(&b[o..o + 6]).expect("six bytes");
    Some(Frame {
        outgoing,
        dst_mac: mac(0),
        src_mac: mac(6),
        ip,
        inner,
    })
}

/// A running capture; [`Capture::stop`] ends it.
pub struct Capture {
    stop: Arc<AtomicBool>,
    frames: Arc<Mutex<Vec<Frame>>>,
    thread: Option<JoinHandle<()>>,
    /// What the capture is on, for messages.
    pub what: String,
}

fn os<T: Default + PartialOrd>(r: T) -> io::Result<T> {
    if r < T::default() {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// An `AF_PACKET` socket bound to `iface` (in the calling thread's namespace).
fn packet_socket(iface: &str) -> io::Result<OwnedFd> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd = os(unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(proto),
        )
    })?;
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(iface)?;
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(io::Error::other(format!("no interface {iface}")));
    }
    // SAFETY: a zeroed sockaddr_ll filled below.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = index as i32;
    // SAFETY: bind(2) with a sockaddr_ll of the right size.
    os(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    })?;
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    let rcvbuf: libc::c_int = 4 << 20;
    // SAFETY: setsockopt(2) with values of the sizes given.
    unsafe {
        os(libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        ))?;
        os(libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&rcvbuf as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        ))?;
    }
    Ok(fd)
}

impl Capture {
    /// Starts capturing on `iface`, in network namespace `netns` (None: the host's).
    pub fn start(netns: Option<&str>, iface: &str) -> io::Result<Capture> {
        let fd = match netns {
            // Sockets keep the namespace they were made in.
            Some(ns) => crate::netns::in_netns(ns, || packet_socket(iface))??,
            None => packet_socket(iface)?,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let frames = Arc::new(Mutex::new(Vec::new()));
        let (s, f) = (stop.clone(), frames.clone());
        let thread = std::thread::Builder::new()
            .name(format!("capture-{iface}"))
            .spawn(move || {
                let mut buf = vec![0u8; 256];
                while !s.load(Ordering::Relaxed) {
                    // SAFETY: zeroed sockaddr_ll for recvfrom to fill.
                    let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                    let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                    // SAFETY: recvfrom(2) into buffers of the sizes given (frames longer than
                    // the buffer are truncated: the headers are all we read).
                    let n = unsafe {
                        libc::recvfrom(
                            fd.as_raw_fd(),
                            buf.as_mut_ptr().cast(),
                            buf.len(),
                            0,
                            (&mut from as *mut libc::sockaddr_ll).cast(),
                            &mut len,
                        )
                    };
                    if n <= 0 {
                        continue; // timeout (to look at the stop flag) or EINTR
                    }
                    let outgoing = from.sll_pkttype == libc::PACKET_OUTGOING;
                    if let Some(frame) = parse_frame(&buf[..n as usize], outgoing) {
                        f.lock().unwrap().push(frame);
                    }
                }
            })?;
        Ok(Capture {
            stop,
            frames,
            thread: Some(thread),
            what: format!("{}:{iface}", netns.unwrap_or("host")),
        })
    }

    /// The frames so far.
    pub fn frames(&self) -> Vec<Frame> {
        self.frames.lock().unwrap().clone()
    }

    /// Forgets the frames so far.
    pub fn clear(&self) {
        self.frames.lock().unwrap().clear();
    }

    /// Stops; every frame captured.
    pub fn stop(mut self) -> Vec<Frame> {
        self.stop_thread();
        self.frames()
    }

    fn stop_thread(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, payload: &[u8]) -> Vec<u8> {
        let mut h = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, proto, 0, 0];
        h.extend_from_slice(&src);
        h.extend_from_slice(&dst);
        h.extend_from_slice(payload);
        h
    }

    #[test]
    fn frames_parse_to_their_headers_and_ipip_to_both() {
        let tcp = [0x1f, 0x90, 0x00, 0x50, 0, 0, 0, 0];
        let inner = ipv4([10, 203, 0, 201], [10, 97, 0, 1], IPPROTO_TCP, &tcp);
        let outer = ipv4([10, 202, 0, 1], [10, 203, 0, 12], IPPROTO_IPIP, &inner);
        let mut frame = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00];
        frame.extend_from_slice(&outer);
        let f = parse_frame(&frame, true).unwrap();
        assert!(f.outgoing);
        assert_eq!(f.dst_mac, [2, 0, 0, 0, 0, 1]);
        assert_eq!(f.src_mac, [2, 0, 0, 0, 0, 2]);
        assert_eq!(f.ip.proto, IPPROTO_IPIP);
        assert_eq!(f.ip.dst, Ipv4Addr::new(10, 203, 0, 12));
        let i = f.inner.unwrap();
        assert_eq!(
            (i.src, i.dst),
            (
                "10.203.0.201".parse().unwrap(),
                "10.97.0.1".parse().unwrap()
            )
        );
        assert_eq!((i.sport, i.dport), (8080, 80));
        // Not IPv4 (ARP), or too short: nothing.
        frame[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(parse_frame(&frame, false), None);
        assert_eq!(parse_frame(&frame[..10], false), None);
    }
}
