//! One cluster per test binary ([`shared`], [`cluster_or_skip!`](crate::cluster_or_skip)),
//! and the handlers that stop every cluster this process started when it exits (also after
//! failed tests) or is interrupted (SIGINT, SIGTERM, SIGHUP).

use std::sync::{
    Once, OnceLock,
    atomic::{AtomicBool, AtomicI32, Ordering},
};

use super::record::{LIVE, Record, record_path};
use super::teardown::teardown;
use super::{Availability, Cluster, ClusterOptions, NODE_NAME, availability, images};
use crate::kube_harness::{report, skip_or_fail};

/// Set when a test of this process panicked: the cluster's logs are kept then.
pub(crate) static TEST_PANICKED: AtomicBool = AtomicBool::new(false);
static SIGNAL_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_exit() {
    let records: Vec<Record> = match LIVE.lock() {
        Ok(mut l) => l.drain(..).collect(),
        Err(p) => p.into_inner().drain(..).collect(),
    };
    for rec in records {
        let problems = teardown(&rec);
        if record_path().exists() {
            let _ = std::fs::remove_file(record_path());
        }
        if !problems.is_empty() {
            report(&format!("stopping the cluster left: {problems:?}"));
        }
    }
}

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = SIGNAL_FD.load(Ordering::SeqCst);
    let b = sig as u8;
    // SAFETY: write(2) is async-signal-safe.
    unsafe { libc::write(fd, (&b as *const u8).cast(), 1) };
}

/// Installs (once) the exit handler and the SIGINT/SIGTERM/SIGHUP handlers that stop every
/// cluster this process started before it goes.
pub(crate) fn install_handlers() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: registering a plain extern "C" function.
        unsafe { libc::atexit(on_exit) };
        // A failing test keeps the cluster's logs (copied out when the cluster stops).
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            TEST_PANICKED.store(true, Ordering::SeqCst);
            previous(info)
        }));
        let mut fds = [0i32; 2];
        // SAFETY: pipe2 fills two descriptors.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return;
        }
        SIGNAL_FD.store(fds[1], Ordering::SeqCst);
        let read_fd = fds[0];
        std::thread::Builder::new()
            .name("marklb-cluster-signals".into())
            .spawn(move || {
                let mut b = 0u8;
                // SAFETY: reading one byte into a local.
                let n = unsafe { libc::read(read_fd, (&mut b as *mut u8).cast(), 1) };
                if n == 1 {
                    let sig = b as libc::c_int;
                    report(&format!(
                        "signal {sig}: stopping the marklb cluster before exiting"
                    ));
                    on_exit();
                    // SAFETY: back to the default action, then die of the same signal.
                    unsafe {
                        libc::signal(sig, libc::SIG_DFL);
                        libc::raise(sig);
                        libc::_exit(128 + sig);
                    }
                }
            })
            .expect("signal thread");
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // SAFETY: a zeroed sigaction with a plain handler.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_signal as *const () as usize;
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(sig, &sa, std::ptr::null_mut());
            }
        }
    });
}

static SHARED: OnceLock<std::result::Result<&'static Cluster, Skip>> = OnceLock::new();

#[derive(Clone, Debug)]
enum Skip {
    Unavailable(String),
    Failed(String),
}

fn start_shared() -> std::result::Result<&'static Cluster, Skip> {
    let avail = availability().map_err(|e| Skip::Failed(format!("{e:#}")))?;
    if let Availability::Unavailable(why) = avail {
        return Err(Skip::Unavailable(why));
    }
    let images = images().map_err(|e| Skip::Failed(format!("building the images: {e:#}")))?;
    let c = Cluster::start(ClusterOptions {
        pause: images.pause.clone(),
        images: vec![images.agent.clone()],
        detached: false,
    })
    .map_err(|e| Skip::Failed(format!("{e:#}")))?;
    let t = c.times();
    report(&format!(
        "cluster: node {NODE_NAME} Ready {:.1}s after start (etcd {:.1}s, apiserver {:.1}s, containerd {:.1}s, images {:.1}s, registered {:.1}s, Ready {:.1}s); images built/checked in {:.1}s; {}",
        t.total.as_secs_f64(),
        t.etcd.as_secs_f64(),
        t.apiserver.as_secs_f64(),
        t.containerd.as_secs_f64(),
        t.images.as_secs_f64(),
        t.node_registered.as_secs_f64(),
        t.node_ready.as_secs_f64(),
        images.build_time.as_secs_f64(),
        c.api_url()
    ));
    // The exit handler stops it: the cluster lives as long as the process.
    Ok(Box::leak(Box::new(c)))
}

/// The cluster of this test binary, started by the first caller; `None` after printing
/// `SKIP <test>: <reason>` when the machine cannot run it. Panics when it should run but does
/// not start (and when `MARKLB_CLUSTER_REQUIRED=1` and it cannot run).
pub fn shared(test: &str) -> Option<&'static Cluster> {
    match SHARED.get_or_init(start_shared) {
        Ok(c) => Some(c),
        Err(Skip::Unavailable(why)) => {
            skip_or_fail(test, "the test cluster", why);
            None
        }
        Err(Skip::Failed(e)) => panic!("starting the test cluster failed: {e}"),
    }
}

/// The shared cluster, or `return` from the test after a SKIP line.
#[macro_export]
macro_rules! cluster_or_skip {
    () => {
        match $crate::cluster::shared(module_path!()) {
            Some(c) => c,
            None => return,
        }
    };
}
