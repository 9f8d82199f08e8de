//! `marklb-agent` as a real process, for the end-to-end tests and the demo.
//!
//! - [`agent_binary`] finds the agent next to the running test or demo executable.
//! - [`Workdir`] is a private directory (under `/run`) holding the manifest, the agent's log
//!   and a bpffs mount point; dropping it unmounts the bpffs (which releases whatever was
//!   pinned there) and removes the directory.
//! - [`Manifest`] builds LoadBalancer manifests from the `marklb-crds` types ([`manifest`]);
//!   [`write_atomic`] replaces a file in one step so a polling agent never reads half of it.
//! - [`Agent`] runs `marklb-agent run` inside a network namespace (the child `setns`es
//!   before `exec`, so it keeps the host's mount namespace and `/sys`), with its output in a
//!   log file; dropping it kills it (`SIGKILL`). [`Agent::get`] talks HTTP to its metrics
//!   address from inside the namespace.
//! - [`Scrape`] parses the Prometheus text format; [`promtool_check`] runs the real
//!   `promtool check metrics` on it.
//! - [`attach_decaps`] decapsulates on every real with the library; [`DecapProc`] runs
//!   `marklb-agent decap` processes instead.

use std::{
    collections::BTreeMap,
    fs::{File, OpenOptions},
    io::{self, Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use marklb_agent::decap::{Decap, interface_addrs};

use crate::netns::{Topology, in_netns, netns_path};

pub mod manifest;
pub use manifest::{Manifest, VipSpec};

/// Where the agent serves `/metrics` inside the load balancer's namespace. Every topology
/// has its own namespace, so the same address never collides between parallel tests.
pub const METRICS_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)), 9464);

// ---------------------------------------------------------------------------------------
// The binary
// ---------------------------------------------------------------------------------------

/// The `marklb-agent` binary of the same build: `target/<profile>/marklb-agent`, found from
/// the current executable (`target/<profile>/deps/<test>-<hash>` for a test,
/// `target/<profile>/marklb-demo` for the demo).
pub fn find_agent_binary() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut tried = Vec::new();
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join("marklb-agent");
        if candidate.is_file() {
            return Ok(candidate);
        }
        tried.push(candidate.display().to_string());
    }
    Err(format!(
        "marklb-agent binary not found (looked for {}). Build it first: \
         `cargo build -p marklb-agent` (or `cargo build --release -p marklb-agent` for a \
         release build); `make test` does that",
        tried.join(", ")
    ))
}

/// [`find_agent_binary`], panicking with the message when it is missing.
pub fn agent_binary() -> PathBuf {
    find_agent_binary().unwrap_or_else(|e| panic!("\n\n*** {e} ***\n"))
}

// ---------------------------------------------------------------------------------------
// Working directory with a bpffs mount point
// ---------------------------------------------------------------------------------------

/// A private directory for one agent setup: `config.yaml`, `agent.log` and `bpffs/` (which
/// the agent mounts a bpf filesystem on). Dropping it unmounts and removes everything.
pub struct Workdir {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    keep: bool,
}

impl Workdir {
    /// Creates one under `/run` (tmpfs, outside `/sys`), falling back to the temp dir.
    pub fn new(prefix: &str) -> io::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in("/run")
            .or_else(|_| tempfile::Builder::new().prefix(prefix).tempdir())?;
        let path = dir.path().to_path_buf();
        std::fs::create_dir_all(path.join("bpffs"))?;
        Ok(Self {
            dir: Some(dir),
            path,
            keep: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The manifest the agent serves.
    pub fn config(&self) -> PathBuf {
        self.path.join("config.yaml")
    }

    /// The agent's log (stdout and stderr of every agent started here, appended).
    pub fn log(&self) -> PathBuf {
        self.path.join("agent.log")
    }

    /// The bpffs mount point (`--bpffs`).
    pub fn bpffs(&self) -> PathBuf {
        self.path.join("bpffs")
    }

    /// Keeps the directory's files (logs) when dropped; the bpffs is still unmounted.
    pub fn keep_files(&mut self) {
        self.keep = true;
    }

    /// Unmounts the bpffs (detaching and freeing what was pinned there). Idempotent.
    pub fn unmount(&self) {
        unmount_all(&self.bpffs());
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        self.unmount();
        if let Some(d) = self.dir.take() {
            if self.keep {
                let _ = d.keep();
            } else {
                let _ = d.close();
            }
        }
    }
}

/// Whether `path` is a mount point (per `/proc/self/mountinfo`).
pub fn is_mounted(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let p = path.to_string_lossy();
    info.lines().any(|l| l.split(' ').nth(4) == Some(&p))
}

/// Unmounts everything mounted on `path` (lazy unmount, repeated for stacked mounts).
pub fn unmount_all(path: &Path) {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return;
    };
    for _ in 0..8 {
        if !is_mounted(path) {
            return;
        }
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            return;
        }
    }
}

/// Replaces `path` with `text` atomically (write a sibling, then rename), so an agent
/// polling the file never reads a partial one.
pub fn write_atomic(path: &Path, text: &str) -> io::Result<()> {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

// ---------------------------------------------------------------------------------------
// The agent process
// ---------------------------------------------------------------------------------------

/// How to start `marklb-agent run`.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub binary: PathBuf,
    /// Network namespace to run in.
    pub netns: String,
    pub interface: String,
    pub config: PathBuf,
    pub bpffs: PathBuf,
    pub log: PathBuf,
    pub metrics_addr: SocketAddr,
    /// `emulated` or `none`.
    pub hw_backend: String,
    /// `--reload-interval` (e.g. `200ms`).
    pub reload_interval: String,
    pub remove_on_exit: bool,
    /// More arguments for `run`.
    pub extra_args: Vec<String>,
    /// Kubernetes mode (`--kubernetes` instead of `--config`; no `--interface` when
    /// `interface` is empty: the agent finds it from `HOST_IP`).
    pub kubernetes: bool,
    /// More environment variables (`KUBECONFIG`, `NODE_NAME`, `HOST_IP`).
    pub env: Vec<(String, String)>,
}

impl AgentOptions {
    /// The agent on the topology's load balancer interface, files in `work`, emulated NIC,
    /// reloads checked every 200 ms.
    pub fn for_topology(topo: &Topology, work: &Workdir) -> Self {
        Self {
            binary: agent_binary(),
            netns: topo.lb.ns.clone(),
            interface: topo.lb.port.iface.clone(),
            config: work.config(),
            bpffs: work.bpffs(),
            log: work.log(),
            metrics_addr: METRICS_ADDR,
            hw_backend: "emulated".into(),
            reload_interval: "200ms".into(),
            remove_on_exit: false,
            extra_args: Vec::new(),
            kubernetes: false,
            env: Vec::new(),
        }
    }

    /// The command line (after the binary).
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec!["run".into()];
        if self.kubernetes {
            a.push("--kubernetes".into());
        } else {
            a.extend(["--config".into(), self.config.display().to_string()]);
        }
        if !self.interface.is_empty() {
            a.extend(["--interface".into(), self.interface.clone()]);
        }
        a.extend([
            "--hw-backend".into(),
            self.hw_backend.clone(),
            "--metrics-addr".into(),
            self.metrics_addr.to_string(),
            "--bpffs".into(),
            self.bpffs.display().to_string(),
            "--reload-interval".into(),
            self.reload_interval.clone(),
        ]);
        if self.remove_on_exit {
            a.push("--remove-on-exit".into());
        }
        a.extend(self.extra_args.iter().cloned());
        a
    }
}

/// Spawns `cmd` inside network namespace `ns` (the child enters it between fork and exec)
/// in its own process group (a terminal's Ctrl-C reaches only the parent, which decides
/// the order of teardown).
pub fn spawn_in_netns_process(ns: &str, cmd: &mut Command) -> io::Result<Child> {
    let handle = File::open(netns_path(ns))
        .map_err(|e| io::Error::new(e.kind(), format!("namespace {ns}: {e}")))?;
    let fd = handle.as_raw_fd();
    // SAFETY: setns(2) and sigprocmask(2) are async-signal-safe; `handle` outlives the
    // spawn.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The child inherits the signal mask; a parent that blocks SIGTERM/SIGINT to
            // handle them on one thread (the demo) must not pass that on.
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            if libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.process_group(0);
    let child = cmd.spawn();
    drop(handle);
    child
}

/// A running `marklb-agent run`. Dropping it kills it with `SIGKILL` (the pinned datapath
/// stays until the bpffs is unmounted or the namespace goes).
pub struct Agent {
    pub opts: AgentOptions,
    pub pid: u32,
    child: Option<Child>,
    status: Option<ExitStatus>,
    /// Where this process's output starts in the (shared, appended) log file.
    log_offset: u64,
}

impl Agent {
    /// Starts the agent; returns once the process exists (see [`Agent::wait_ready`]).
    pub fn spawn(opts: AgentOptions) -> io::Result<Self> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&opts.log)?;
        let log_offset = log.metadata()?.len();
        let mut cmd = Command::new(&opts.binary);
        // No NO_COLOR here: the agent must see for itself that its log is not a terminal.
        cmd.args(opts.args())
            .env_remove("NO_COLOR")
            .env("RUST_LOG", "info")
            .envs(opts.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = spawn_in_netns_process(&opts.netns, &mut cmd).map_err(|e| {
            io::Error::new(e.kind(), format!("starting {}: {e}", opts.binary.display()))
        })?;
        Ok(Self {
            pid: child.id(),
            opts,
            child: Some(child),
            status: None,
            log_offset,
        })
    }

    /// Sends a signal.
    pub fn signal(&self, sig: libc::c_int) {
        if self.status.is_none() {
            unsafe { libc::kill(self.pid as libc::pid_t, sig) };
        }
    }

    /// The exit status if the process has exited (reaping it).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none()
            && let Some(c) = self.child.as_mut()
            && let Ok(Some(st)) = c.try_wait()
        {
            self.status = Some(st);
        }
        self.status
    }

    pub fn is_running(&mut self) -> bool {
        self.try_status().is_none()
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_status() {
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `kill -9` and reap.
    pub fn kill9(&mut self) -> ExitStatus {
        self.signal(libc::SIGKILL);
        self.wait_exit(Duration::from_secs(10))
            .expect("process survives SIGKILL")
    }

    /// `SIGTERM`, then waits up to `timeout` for the exit.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.signal(libc::SIGTERM);
        self.wait_exit(timeout)
    }

    /// This process's log so far, as written.
    pub fn raw_log(&self) -> String {
        let mut b = Vec::new();
        if let Ok(mut f) = File::open(&self.opts.log) {
            use std::io::Seek;
            let _ = f.seek(io::SeekFrom::Start(self.log_offset));
            let _ = f.read_to_end(&mut b);
        }
        String::from_utf8_lossy(&b).into_owned()
    }

    /// This process's log so far (ANSI escapes removed).
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(&self.opts.log) {
            use std::io::Seek;
            let _ = f.seek(io::SeekFrom::Start(self.log_offset));
            let mut b = Vec::new();
            let _ = f.read_to_end(&mut b);
            s = strip_ansi(&String::from_utf8_lossy(&b));
        }
        s
    }

    /// The last `n` lines of the log, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Lines of this process's log containing `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_string)
            .collect()
    }

    /// Waits until the log has at least `count` lines containing `needle`.
    pub fn wait_log(&mut self, needle: &str, count: usize, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.log_lines(needle);
            if lines.len() >= count {
                return lines;
            }
            if Instant::now() > deadline || !self.is_running() {
                panic!(
                    "agent log: {count} line(s) with {needle:?} not seen within {timeout:?} \
                     (agent running: {}); log:\n{}",
                    self.is_running(),
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// An HTTP GET to the agent's metrics address, from inside its namespace.
    pub fn get(&self, path: &str) -> io::Result<HttpResponse> {
        http_get_in(&self.opts.netns, self.opts.metrics_addr, path)
    }

    /// Scrapes and parses `/metrics`.
    pub fn scrape(&self) -> Scrape {
        let r = self
            .get("/metrics")
            .unwrap_or_else(|e| panic!("GET /metrics: {e}\nlog:\n{}", self.log_tail(30)));
        assert_eq!(r.status, 200, "GET /metrics: {}", r.body);
        Scrape::parse(&r.body).unwrap_or_else(|e| panic!("parsing /metrics: {e}\n{}", r.body))
    }

    /// Waits until `/readyz` answers 200; panics with the log if the agent exits or the
    /// time runs out.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_status() {
                panic!(
                    "marklb-agent exited ({st}) before it was ready; log:\n{}",
                    self.log_tail(40)
                );
            }
            let last = match self.get("/readyz") {
                Ok(r) if r.status == 200 => return,
                Ok(r) => format!("{} {}", r.status, r.body.trim()),
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                panic!(
                    "marklb-agent not ready within {timeout:?} (last /readyz: {last}); log:\n{}",
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Resident set size in KiB (`VmRSS` of `/proc/<pid>/status`).
    pub fn rss_kib(&self) -> Option<u64> {
        proc_status_kib(self.pid, "VmRSS:")
    }

    /// Peak resident set size in KiB (`VmHWM`).
    pub fn peak_rss_kib(&self) -> Option<u64> {
        proc_status_kib(self.pid, "VmHWM:")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.status.is_none() {
            self.signal(libc::SIGKILL);
            if let Some(c) = self.child.as_mut() {
                let _ = c.wait();
            }
        }
    }
}

/// A `kB` field of `/proc/<pid>/status`.
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Removes ANSI escape sequences (colours) from log text.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for d in chars.by_ref() {
                    if ('@'..='~').contains(&d) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// Runs `marklb-agent <args>` inside `ns` to completion (e.g. `cleanup`); returns
/// (status, stdout + stderr).
pub fn run_agent_command(
    binary: &Path,
    ns: &str,
    args: &[&str],
    timeout: Duration,
) -> io::Result<(ExitStatus, String)> {
    let out = tempfile::tempfile()?;
    let mut cmd = Command::new(binary);
    cmd.args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out.try_clone()?);
    let mut child = spawn_in_netns_process(ns, &mut cmd)?;
    let status =
        crate::netns::wait_with_timeout(&mut child, timeout, &format!("marklb-agent {args:?}"))?;
    let mut f = out;
    use std::io::Seek;
    f.seek(io::SeekFrom::Start(0))?;
    let mut s = String::new();
    f.read_to_string(&mut s)?;
    Ok((status, strip_ansi(&s)))
}

/// Whether an interface carries an XDP program (`ip link show`), and its id.
pub fn xdp_prog_id(ns: &str, iface: &str) -> io::Result<Option<u32>> {
    let out = crate::netns::ip(Some(ns), &["-d", "link", "show", "dev", iface])?;
    // "prog/xdp id 123" (also "xdpgeneric"/"xdpdrv" lines).
    let mut words = out.split_whitespace();
    while let Some(w) = words.next() {
        if w.starts_with("prog/xdp") {
            if words.next() == Some("id") {
                return Ok(words.next().and_then(|n| n.parse().ok()));
            }
            return Ok(Some(0));
        }
    }
    Ok(None)
}

// ---------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------

/// A response: status code and body.
#[derive(Clone, Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A minimal HTTP/1.1 GET (`Connection: close`) from inside namespace `ns`.
pub fn http_get_in(ns: &str, addr: SocketAddr, path: &str) -> io::Result<HttpResponse> {
    in_netns(ns, || http_get(addr, path))?
}

/// A minimal HTTP/1.1 GET (`Connection: close`) in the calling thread's namespace.
pub fn http_get(addr: SocketAddr, path: &str) -> io::Result<HttpResponse> {
    let t = Duration::from_secs(5);
    let mut s = TcpStream::connect_timeout(&addr, t)?;
    s.set_read_timeout(Some(t))?;
    s.set_write_timeout(Some(t))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: text/plain\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_http_response(&raw)
}

fn parse_http_response(raw: &[u8]) -> io::Result<HttpResponse> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or_else(|| bad("empty response"))?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let eol = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .ok_or_else(|| bad("bad chunk"))?;
            let size_text = String::from_utf8_lossy(&rest[..eol]);
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| bad("bad chunk size"))?;
            rest = &rest[eol + 2..];
            if size == 0 {
                break;
            }
            if rest.len() < size + 2 {
                return Err(bad("short chunk"));
            }
            out.extend_from_slice(&rest[..size]);
            rest = &rest[size + 2..];
        }
        body = out;
    }
    Ok(HttpResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

// ---------------------------------------------------------------------------------------
// Prometheus text format
// ---------------------------------------------------------------------------------------

/// One sample line.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed `/metrics` page.
#[derive(Clone, Debug, Default)]
pub struct Scrape {
    pub samples: Vec<Sample>,
    /// `# TYPE` of each metric family.
    pub types: BTreeMap<String, String>,
    pub text: String,
}

fn valid_name(n: &str) -> bool {
    let mut chars = n.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_value(v: &str) -> Option<f64> {
    match v {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => v.parse().ok(),
    }
}

impl Scrape {
    /// Parses the text exposition format (0.0.4): `# HELP`/`# TYPE` lines and
    /// `name{label="value",...} value [timestamp]` samples. Strict: anything else is an error,
    /// and every sample must belong to a family with a `# TYPE`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut s = Scrape {
            text: text.to_string(),
            ..Default::default()
        };
        for (i, line) in text.lines().enumerate() {
            let err = |m: &str| format!("line {}: {m}: {line:?}", i + 1);
            if line.trim().is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix('#') {
                let mut w = rest.split_whitespace();
                match w.next() {
                    Some("TYPE") => {
                        let name = w.next().ok_or_else(|| err("TYPE without name"))?;
                        let ty = w.next().ok_or_else(|| err("TYPE without type"))?;
                        if !matches!(
                            ty,
                            "counter" | "gauge" | "histogram" | "summary" | "untyped"
                        ) {
                            return Err(err("unknown type"));
                        }
                        if s.types.insert(name.to_string(), ty.to_string()).is_some() {
                            return Err(err("second TYPE for the family"));
                        }
                    }
                    Some("HELP") => {
                        let name = w.next().ok_or_else(|| err("HELP without name"))?;
                        if !valid_name(name) {
                            return Err(err("bad metric name"));
                        }
                    }
                    _ => {}
                }
                continue;
            }
            let (name_part, rest) = match line.find(['{', ' ']) {
                Some(i) => line.split_at(i),
                None => return Err(err("no value")),
            };
            if !valid_name(name_part) {
                return Err(err("bad metric name"));
            }
            let mut labels = BTreeMap::new();
            let mut rest = rest;
            if let Some(r) = rest.strip_prefix('{') {
                let mut chars = r.char_indices().peekable();
                let end;
                loop {
                    // label name
                    let start = match chars.peek() {
                        Some((_, '}')) => {
                            end = chars.next().expect("peeked").0;
                            break;
                        }
                        Some((i, _)) => *i,
                        None => return Err(err("unterminated labels")),
                    };
                    let mut eq = None;
                    for (i, c) in chars.by_ref() {
                        if c == '=' {
                            eq = Some(i);
                            break;
                        }
                    }
                    let eq = eq.ok_or_else(|| err("label without ="))?;
                    let lname = &r[start..eq];
                    if !valid_name(lname) || lname.contains(':') {
                        return Err(err("bad label name"));
                    }
                    if chars.next().map(|(_, c)| c) != Some('"') {
                        return Err(err("label value not quoted"));
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next() {
                            Some((_, '\\')) => match chars.next() {
                                Some((_, 'n')) => value.push('\n'),
                                Some((_, '\\')) => value.push('\\'),
                                Some((_, '"')) => value.push('"'),
                                _ => return Err(err("bad escape")),
                            },
                            Some((_, '"')) => break,
                            Some((_, c)) => value.push(c),
                            None => return Err(err("unterminated label value")),
                        }
                    }
                    if labels.insert(lname.to_string(), value).is_some() {
                        return Err(err("duplicate label"));
                    }
                    match chars.next() {
                        Some((_, ',')) => continue,
                        Some((i, '}')) => {
                            end = i;
                            break;
                        }
                        _ => return Err(err("expected , or }")),
                    }
                }
                rest = &r[end + 1..];
            }
            let mut w = rest.split_whitespace();
            let value = w
                .next()
                .and_then(parse_value)
                .ok_or_else(|| err("bad value"))?;
            if let Some(ts) = w.next() {
                ts.parse::<i64>().map_err(|_| err("bad timestamp"))?;
            }
            if w.next().is_some() {
                return Err(err("trailing text"));
            }
            let family = if s.types.contains_key(name_part) {
                name_part.to_string()
            } else {
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .filter_map(|suffix| name_part.strip_suffix(suffix))
                    .find(|stem| {
                        s.types
                            .get(*stem)
                            .is_some_and(|t| t == "histogram" || t == "summary")
                    })
                    .map(str::to_string)
                    .ok_or_else(|| err("sample without # TYPE"))?
            };
            if s.types[&family] == "histogram"
                && name_part.ends_with("_bucket")
                && !labels.contains_key("le")
            {
                return Err(err("histogram bucket without le"));
            }
            s.samples.push(Sample {
                name: name_part.to_string(),
                labels,
                value,
            });
        }
        Ok(s)
    }

    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The value of the one sample of `name` carrying `labels` (others may be present too);
    /// `None` if there is none; panics if several match.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let m: Vec<&Sample> = self.matching(name, labels).collect();
        assert!(m.len() <= 1, "{name}{labels:?} matches {} samples", m.len());
        m.first().map(|s| s.value)
    }

    /// [`Scrape::value`], 0 when absent.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels).unwrap_or(0.0)
    }

    /// Sum over every sample of `name` carrying `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    /// Samples of `name` by the value of label `by`.
    pub fn by_label(&self, name: &str, by: &str) -> BTreeMap<String, f64> {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter_map(|s| s.labels.get(by).map(|l| (l.clone(), s.value)))
            .collect()
    }

    /// A histogram's cumulative buckets (`le` -> count) for the series with `labels`.
    pub fn buckets(&self, name: &str, labels: &[(&str, &str)]) -> Vec<(f64, f64)> {
        let bucket = format!("{name}_bucket");
        let mut b: Vec<(f64, f64)> = self
            .matching(&bucket, labels)
            .filter_map(|s| Some((parse_value(s.labels.get("le")?)?, s.value)))
            .collect();
        b.sort_by(|x, y| x.0.total_cmp(&y.0));
        b
    }

    /// Quantile `q` of a histogram, interpolated within buckets as Prometheus's
    /// `histogram_quantile` does (`None` without observations).
    pub fn quantile(&self, name: &str, labels: &[(&str, &str)], q: f64) -> Option<f64> {
        let b = self.buckets(name, labels);
        let total = b.last()?.1;
        if total <= 0.0 {
            return None;
        }
        let rank = q * total;
        let mut prev = (0.0, 0.0);
        for &(le, count) in &b {
            if count >= rank {
                if le.is_infinite() {
                    return Some(prev.0);
                }
                let in_bucket = count - prev.1;
                let frac = if in_bucket > 0.0 {
                    (rank - prev.1) / in_bucket
                } else {
                    1.0
                };
                return Some(prev.0 + (le - prev.0) * frac);
            }
            prev = (le, count);
        }
        Some(prev.0)
    }
}

/// Runs `promtool check metrics` on `text`: `Ok(output)` when it reports nothing,
/// `Err(output)` when it finds a problem (parse error or lint finding) or cannot run.
pub fn promtool_check(text: &str) -> Result<String, String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            format!(
                "cannot run promtool ({e}); install Debian's `prometheus` package \
                 (scripts/setup.sh does)"
            )
        })?;
    let mut stdin = child.stdin.take().expect("piped");
    let input = text.to_string();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let _ = writer.join();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(report)
    } else {
        Err(format!("promtool check metrics: {}: {report}", out.status))
    }
}

// ---------------------------------------------------------------------------------------
// Decapsulation on the reals
// ---------------------------------------------------------------------------------------

/// Loads `marklb-decap` for every real and attaches it (native XDP) to the real's
/// interface, with the interface's addresses as local ones. Dropping the result detaches.
pub fn attach_decaps(topo: &Topology) -> anyhow::Result<Vec<Decap>> {
    let mut decaps = Vec::new();
    for real in &topo.reals {
        let mut d = Decap::load()?;
        let iface = real.port.iface.clone();
        in_netns(&real.ns, || -> anyhow::Result<()> {
            let addrs = interface_addrs(&iface)?;
            d.set_local_addrs(&addrs)?;
            d.attach_xdp(&iface)?;
            Ok(())
        })??;
        decaps.push(d);
    }
    Ok(decaps)
}

/// A `marklb-agent decap` process on one real; killed (SIGTERM, then SIGKILL) on drop.
pub struct DecapProc {
    pub real: String,
    pub pid: u32,
    child: Child,
}

impl DecapProc {
    /// Starts `marklb-agent decap --interface <iface>` in the real's namespace; output goes
    /// to `log`. Waits until the interface carries the program.
    pub fn start(
        binary: &Path,
        topo: &Topology,
        n: usize,
        log: &Path,
        timeout: Duration,
    ) -> io::Result<Self> {
        let real = topo.real(n);
        let out = OpenOptions::new().create(true).append(true).open(log)?;
        let mut cmd = Command::new(binary);
        cmd.args([
            "decap",
            "--interface",
            &real.port.iface,
            "--stats-interval",
            "60",
        ])
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
        let child = spawn_in_netns_process(&real.ns, &mut cmd)?;
        let mut p = DecapProc {
            real: real.name.clone(),
            pid: child.id(),
            child,
        };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = p.child.try_wait()? {
                return Err(io::Error::other(format!(
                    "marklb-agent decap on {} exited: {st} (log {})",
                    real.name,
                    log.display()
                )));
            }
            if xdp_prog_id(&real.ns, &real.port.iface)?.is_some() {
                return Ok(p);
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("marklb-agent decap on {} did not attach", real.name),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM (the decapsulator detaches), SIGKILL after two seconds.
    pub fn stop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for DecapProc {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prometheus_text() {
        let text = "# HELP a_total A.\n# TYPE a_total counter\na_total{path=\"x\",q=\"a\\\"b\"} 3\n\
                    a_total{path=\"y\"} 4 1700000000\n# TYPE g gauge\ng 1.5\n\
                    # TYPE h_seconds histogram\nh_seconds_bucket{le=\"0.1\"} 1\n\
                    h_seconds_bucket{le=\"1\"} 3\nh_seconds_bucket{le=\"+Inf\"} 4\n\
                    h_seconds_sum 2.5\nh_seconds_count 4\n";
        let s = Scrape::parse(text).unwrap();
        assert_eq!(s.get("a_total", &[("path", "x")]), 3.0);
        assert_eq!(s.value("a_total", &[("q", "a\"b")]), Some(3.0));
        assert_eq!(s.sum("a_total", &[]), 7.0);
        assert_eq!(s.get("g", &[]), 1.5);
        assert_eq!(s.get("h_seconds_count", &[]), 4.0);
        assert_eq!(s.quantile("h_seconds", &[], 0.25), Some(0.1));
        let median = s.quantile("h_seconds", &[], 0.5).unwrap();
        assert!((median - 0.55).abs() < 1e-9, "{median}");
        assert!(Scrape::parse("x 1\n").is_err(), "no TYPE");
        assert!(Scrape::parse("# TYPE x counter\nx{a=b} 1\n").is_err());
        assert!(Scrape::parse("# TYPE x counter\nx one\n").is_err());
    }

    #[test]
    fn http_response_parsing() {
        let r = parse_http_response(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n").unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
        let r = parse_http_response(
            b"HTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: chunked\r\n\r\n3\r\nnot\r\n6\r\n ready\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_str()), (503, "not ready"));
    }

    #[test]
    fn ansi_is_stripped() {
        assert_eq!(
            strip_ansi("\u{1b}[2m2024\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m x"),
            "2024  INFO x"
        );
    }
}
