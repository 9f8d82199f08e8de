//! `marklb-echo`: the test image of Services of type LoadBalancer, a tiny TCP and UDP server
//! that says who answered, so tests can see which pod on which node took a connection, and
//! from which address the pod saw it (`externalTrafficPolicy: Local` keeps the client's
//! address; `Cluster` shows a node's).
//!
//! Protocol (the identity is `<pod>@<node>`, from `POD_NAME` and `NODE_NAME`, which the
//! Deployment sets from the downward API):
//! - TCP: on connect, `"<identity> <peer>\n"`; then every line `L` is answered with
//!   `"<identity> L\n"`; the connection stays open until the client closes it. An established
//!   connection thus answers from the same pod for as long as it lives.
//! - UDP: a datagram `P` is answered with `"<identity> <peer> P"`.
//!
//! Usage: `marklb-echo [--port N]` (default 8080, TCP and UDP, IPv6 and IPv4 when the pod
//! has both). Exits 0 on SIGTERM/SIGINT. Built static (musl) into an image by
//! `scripts/image/build.sh`, like the agent's.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
    // SAFETY: _exit is async-signal-safe; connections close with the process.
    unsafe { libc::_exit(0) };
}

fn identity() -> String {
    let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let pod = get("POD_NAME").unwrap_or_else(|| "echo".into());
    let node = get("NODE_NAME").unwrap_or_else(|| "unknown".into());
    format!("{pod}@{node}")
}

/// Binds `[::]:port` (both families where the kernel allows) or, without IPv6, `0.0.0.0`.
fn bind<T>(port: u16, f: impl Fn(SocketAddr) -> std::io::Result<T>) -> std::io::Result<T> {
    f(SocketAddr::from(([0u16; 8], port))).or_else(|_| f(SocketAddr::from(([0u8; 4], port))))
}

/// The peer as a client would write it: IPv4 clients of a dual-stack socket appear as
/// IPv4-mapped IPv6 addresses, shown here as the IPv4 address they are.
fn plain(peer: SocketAddr) -> SocketAddr {
    match peer {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => peer,
        },
        v4 => v4,
    }
}

fn serve_tcp(stream: TcpStream, me: &str) -> std::io::Result<()> {
    let peer = plain(stream.peer_addr()?);
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut out = stream.try_clone()?;
    writeln!(out, "{me} {peer}")?;
    for line in BufReader::new(stream).lines() {
        writeln!(out, "{me} {}", line?)?;
    }
    Ok(())
}

fn main() {
    let mut port: u16 = 8080;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--port" => {
                port = args.next().and_then(|p| p.parse().ok()).unwrap_or_else(|| {
                    eprintln!("marklb-echo: --port needs a port number");
                    std::process::exit(2)
                })
            }
            "--help" | "-h" => {
                println!(
                    "usage: marklb-echo [--port N]   (TCP and UDP; answers with POD_NAME@NODE_NAME)"
                );
                return;
            }
            other => {
                eprintln!("marklb-echo: unknown argument {other:?}");
                std::process::exit(2);
            }
        }
    }
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: installing a plain handler that only calls async-signal-safe functions.
        unsafe { libc::signal(sig, on_stop as *const () as libc::sighandler_t) };
    }
    let me = identity();
    let tcp = bind(port, TcpListener::bind).unwrap_or_else(|e| {
        eprintln!("marklb-echo: TCP port {port}: {e}");
        std::process::exit(1)
    });
    let udp = bind(port, UdpSocket::bind).unwrap_or_else(|e| {
        eprintln!("marklb-echo: UDP port {port}: {e}");
        std::process::exit(1)
    });
    println!("marklb-echo {me} serving TCP and UDP on port {port}");
    let udp_me = me.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !STOP.load(Ordering::SeqCst) {
            if let Ok((n, peer)) = udp.recv_from(&mut buf) {
                let mut reply = format!("{udp_me} {} ", plain(peer)).into_bytes();
                reply.extend_from_slice(&buf[..n]);
                let _ = udp.send_to(&reply, peer);
            }
        }
    });
    for stream in tcp.incoming() {
        match stream {
            Ok(s) => {
                let me = me.clone();
                std::thread::spawn(move || {
                    let _ = serve_tcp(s, &me);
                });
            }
            Err(e) => eprintln!("marklb-echo: accept: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn tcp_greets_then_echoes_lines_and_udp_answers_with_the_identity() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            serve_tcp(s, "web-1@node-2").unwrap();
        });
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(b"hello\nagain\n").unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut text = String::new();
        c.read_to_string(&mut text).unwrap();
        let local = c.local_addr().unwrap();
        assert_eq!(
            text,
            format!("web-1@node-2 {local}\nweb-1@node-2 hello\nweb-1@node-2 again\n")
        );
        assert!(bind(0, TcpListener::bind).is_ok());
        let mapped: SocketAddr = "[::ffff:10.0.0.7]:80".parse().unwrap();
        assert_eq!(plain(mapped), "10.0.0.7:80".parse::<SocketAddr>().unwrap());
        let v6: SocketAddr = "[2001:db8::1]:80".parse().unwrap();
        assert_eq!(plain(v6), v6);
    }
}
