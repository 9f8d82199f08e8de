//! `marklb-pause`: the sandbox ("pause") container of the test cluster, the same job as
//! Kubernetes' `pause.c`: hold the pod's namespaces, reap zombies, exit on SIGINT/SIGTERM.
//! Built static (musl) and packed into an image by `marklb-image pause`, so the cluster needs
//! no registry.

extern "C" fn on_stop(_: libc::c_int) {
    // SAFETY: _exit is async-signal-safe; there is nothing to flush.
    unsafe { libc::_exit(0) };
}

extern "C" fn on_child(_: libc::c_int) {
    // SAFETY: waitpid is async-signal-safe.
    while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
}

fn handle(sig: libc::c_int, f: extern "C" fn(libc::c_int)) {
    // SAFETY: a zeroed sigaction with a plain handler and an empty mask is valid.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = f as *const () as usize;
        sa.sa_flags = libc::SA_RESTART
            | if sig == libc::SIGCHLD {
                libc::SA_NOCLDSTOP
            } else {
                0
            };
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
            eprintln!("marklb-pause: sigaction({sig}) failed");
            std::process::exit(1);
        }
    }
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("-v") {
        println!("marklb-pause {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    if std::process::id() != 1 {
        eprintln!("marklb-pause: warning: not running as PID 1");
    }
    handle(libc::SIGINT, on_stop);
    handle(libc::SIGTERM, on_stop);
    handle(libc::SIGCHLD, on_child);
    loop {
        // SAFETY: pause(2) only waits for a signal.
        unsafe { libc::pause() };
    }
}
