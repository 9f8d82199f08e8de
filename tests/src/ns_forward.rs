//! A TCP forwarder from `127.0.0.1:<port>` inside a network namespace to the same port on the
//! host's loopback: an agent running in a test namespace reaches the test's API server (which
//! listens on the host's 127.0.0.1) at the address its kubeconfig names, certificate and all.
//!
//! [`NsForward::cut`] closes every forwarded connection and refuses new ones (the agent loses
//! the API server while the server keeps serving the test); [`NsForward::restore`] forwards
//! again. The listening socket is created inside the namespace (sockets keep the namespace
//! they were made in); the connections to the server are made from the host's.

use std::{
    io,
    net::{Shutdown, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::netns::in_netns;

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    cut: AtomicBool,
    accepted: AtomicU64,
    /// Both ends of every live connection, to close them on a cut.
    open: Mutex<Vec<TcpStream>>,
}

/// A running forwarder; dropping it stops it and closes every connection.
pub struct NsForward {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

fn pump(mut from: TcpStream, mut to: TcpStream) {
    let _ = io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
}

impl NsForward {
    /// Listens on `127.0.0.1:port` in namespace `ns`, forwarding to `127.0.0.1:port` here.
    pub fn start(ns: &str, port: u16) -> io::Result<Self> {
        let listener = in_netns(ns, || TcpListener::bind(("127.0.0.1", port)))??;
        listener.set_nonblocking(true)?;
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("ns-forward-{port}"))
            .spawn(move || {
                while !s.stop.load(Ordering::Relaxed) {
                    let client = match listener.accept() {
                        Ok((c, _)) => c,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(5));
                            continue;
                        }
                        Err(_) => continue,
                    };
                    if s.cut.load(Ordering::Relaxed) {
                        drop(client);
                        continue;
                    }
                    let _ = client.set_nonblocking(false);
                    let Ok(server) = TcpStream::connect(("127.0.0.1", port)) else {
                        drop(client); // the server is down: the client sees the connection close
                        continue;
                    };
                    s.accepted.fetch_add(1, Ordering::Relaxed);
                    let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = (
                        client.try_clone(),
                        server.try_clone(),
                        client.try_clone(),
                        server.try_clone(),
                    ) else {
                        continue;
                    };
                    {
                        let mut open = s.open.lock().unwrap();
                        open.retain(|c| c.peer_addr().is_ok());
                        open.extend([c3, s3]);
                    }
                    std::thread::spawn(move || pump(client, server));
                    std::thread::spawn(move || pump(s2, c2));
                }
            })?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Closes every forwarded connection and refuses new ones until [`restore`](Self::restore).
    pub fn cut(&self) {
        self.shared.cut.store(true, Ordering::SeqCst);
        self.close_all();
    }

    /// Forwards new connections again.
    pub fn restore(&self) {
        self.shared.cut.store(false, Ordering::SeqCst);
    }

    /// Connections forwarded so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    fn close_all(&self) {
        for c in self.shared.open.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for NsForward {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.close_all();
    }
}
