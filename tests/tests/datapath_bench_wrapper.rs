//! What the benchmark's flood rows stand on (`marklb-agent bench`, `agent/src/bench/flood.rs`):
//! the wrapper restores each CPU's own frame, so one CPU can flood while another measures;
//! its handshake mode sends each new flow's SYN and then its ACK; a program runs from
//! another thread through its own descriptor, and the per-CPU counters tell the two CPUs'
//! packets apart; the XDP dispatcher hold attaches the wrapper in a network namespace of
//! its own and lets go of it when dropped.

use std::{
    net::IpAddr,
    os::fd::{FromRawFd, OwnedFd},
};

use marklb_agent::datapath::{Prog, testrun::XDP_TX};
use marklb_common::{BENCH_FRAME_MAX, BenchFrame, CFG_F_EVENTS, Counter};
use marklb_tests::datapath_fixture::*;

/// TCP source port of an IPv4 frame (the wrapper varies it for many flows).
const SPORT_OFF_V4: u32 = 14 + 20;

/// `frame` as the wrapper's frame, padded to a multiple of 8 bytes.
fn bench_frame(frame: &[u8]) -> BenchFrame {
    let len = frame.len().div_ceil(8) * 8;
    assert!(len <= BENCH_FRAME_MAX);
    let mut data = [0u8; BENCH_FRAME_MAX];
    data[..frame.len()].copy_from_slice(frame);
    BenchFrame {
        len: len as u32,
        mark: 0,
        flows: 1,
        sport_off: SPORT_OFF_V4,
        saddr_off: 14 + 12 + 2,
        mark_span: 0,
        seq: 0,
        handshake_tcp_off: 0,
        data,
        _pad: [0; 32],
    }
}

fn input(f: &BenchFrame) -> Vec<u8> {
    f.data[..f.len as usize].to_vec()
}

/// The CPUs this test may run on.
fn allowed_cpus() -> Vec<usize> {
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        assert_eq!(
            libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set),
            0
        );
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

fn pin_to(cpu: usize) {
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "pinning to CPU {cpu}"
        );
    }
}

/// Two CPUs to run on: the flood rows' premise. The machines the tests run on have two.
fn two_cpus() -> (usize, usize) {
    let cpus = allowed_cpus();
    assert!(
        cpus.len() >= 2,
        "these tests need two CPUs (the benchmark floods from one while it measures on \
         another); this process may run on {cpus:?}"
    );
    (cpus[0], cpus[1])
}

fn syn_to(dst: IpAddr, sport: u16) -> Vec<u8> {
    tcp(client4(), sport, dst, 80, true)
}

#[test]
fn each_cpu_restores_its_own_frame() {
    require_root_bpf();
    let (a_cpu, b_cpu) = two_cpus();
    let mut fx = Fixture::standard();
    fx.dp.set_bench_target(Prog::BenchTrivial).unwrap();
    let a = bench_frame(&syn_to(vip4(), 1000));
    let b = bench_frame(&syn_to(other4(), 2000));
    assert_eq!(a.len, b.len);
    fx.dp.set_bench_frame(&a).unwrap();
    fx.dp.set_bench_frame_on(b_cpu, &b).unwrap();
    // Whatever the run is given, the wrapper puts its CPU's frame in place.
    let garbage = vec![0xa5u8; a.len as usize];
    for (cpu, want) in [(a_cpu, &a), (b_cpu, &b)] {
        pin_to(cpu);
        let out = fx.dp.test_run(Prog::BenchRestore, &garbage, None).unwrap();
        assert_eq!(
            out.frame,
            input(want),
            "CPU {cpu} restored another CPU's frame"
        );
    }
}

#[test]
fn handshakes_send_each_flow_a_syn_then_an_ack_that_raises_its_event() {
    require_root_bpf();
    let cpu = pin_to_current_cpu();
    let mut cfg = test_config();
    cfg.flags |= CFG_F_EVENTS;
    let mut fx = Fixture::with_config(cfg);
    fx.add_standard_vips();
    let _reader = fx.dp.take_events().expect("event reader");
    fx.dp.set_bench_target(Prog::Balancer).unwrap();
    let handshakes = BenchFrame {
        flows: u32::MAX,
        handshake_tcp_off: SPORT_OFF_V4,
        ..bench_frame(&syn_to(vip4(), 1000))
    };
    fx.dp.set_bench_frame_on(cpu, &handshakes).unwrap();
    let before = fx.dp.counters_on(cpu).unwrap();
    let out = fx
        .dp
        .test_run_repeat(Prog::BenchRestore, &input(&handshakes), None, 6)
        .unwrap();
    assert_eq!(out.action, XDP_TX);
    let d = fx.dp.counters_on(cpu).unwrap().since(&before);
    // Three flows: each SYN a new flow, each ACK found it and raised its event.
    assert_eq!(d.get(Counter::NewFlow), 3, "{d:?}");
    assert_eq!(d.get(Counter::ConnHit), 3, "{d:?}");
    assert_eq!(d.get(Counter::EventSent), 3, "{d:?}");
    for sport in 1000..1003 {
        let flow = parse_l3l4(&syn_to(vip4(), sport)).unwrap().flow();
        assert!(
            fx.dp.conn(&flow).is_some(),
            "flow from port {sport} not learned"
        );
    }
    let fourth = parse_l3l4(&syn_to(vip4(), 1003)).unwrap().flow();
    assert!(fx.dp.conn(&fourth).is_none(), "a fourth flow was sent");
}

#[test]
fn a_runner_on_another_cpu_counts_there_only() {
    require_root_bpf();
    let (here, there) = two_cpus();
    pin_to(here);
    let mut fx = Fixture::standard();
    fx.dp.set_bench_target(Prog::Balancer).unwrap();
    let flood = BenchFrame {
        flows: u32::MAX,
        ..bench_frame(&syn_to(vip4(), 1000))
    };
    fx.dp.set_bench_frame_on(there, &flood).unwrap();
    let runner = fx.dp.xdp_runner(Prog::BenchRestore).unwrap();
    let (here_before, there_before) = (
        fx.dp.counters_on(here).unwrap(),
        fx.dp.counters_on(there).unwrap(),
    );
    let data = input(&flood);
    let (action, _ns) = std::thread::spawn(move || {
        pin_to(there);
        runner.run(&data, 100)
    })
    .join()
    .unwrap()
    .unwrap();
    assert_eq!(action, XDP_TX);
    let there_d = fx.dp.counters_on(there).unwrap().since(&there_before);
    let here_d = fx.dp.counters_on(here).unwrap().since(&here_before);
    assert_eq!(there_d.get(Counter::NewFlow), 100, "{there_d:?}");
    assert_eq!(here_d.get(Counter::NewFlow), 0, "{here_d:?}");
    assert_eq!(
        fx.dp.counters().unwrap().get(Counter::NewFlow),
        100,
        "the sum over CPUs"
    );
}

/// `BPF_LINK_GET_FD_BY_ID`: whether the kernel still has link `id`.
fn link_exists(id: u32) -> bool {
    #[repr(C)]
    struct Attr {
        id: u32,
        next_id: u32,
        open_flags: u32,
    }
    let mut attr = Attr {
        id,
        next_id: 0,
        open_flags: 0,
    };
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            30, // BPF_LINK_GET_FD_BY_ID
            &mut attr as *mut Attr,
            std::mem::size_of::<Attr>() as libc::c_uint,
        )
    };
    if fd >= 0 {
        drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
        return true;
    }
    let err = std::io::Error::last_os_error();
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{err}");
    false
}

#[test]
fn the_dispatcher_hold_attaches_elsewhere_and_lets_go() {
    require_root_bpf();
    pin_to_current_cpu();
    let mut fx = Fixture::standard();
    let prog_id = fx
        .dp
        .program(Prog::BenchRestore)
        .unwrap()
        .info()
        .unwrap()
        .id();
    let lo_before = ip_link_lo();
    let hold = fx.dp.hold_in_xdp_dispatcher(Prog::BenchRestore).unwrap();
    let (link_id, held) = hold.link_ids().unwrap();
    assert_eq!(held, prog_id, "the hold's link holds another program");
    assert!(link_exists(link_id));
    assert_eq!(ip_link_lo(), lo_before, "the host's loopback changed");
    // Test runs go on as before while it is held.
    fx.dp.set_bench_target(Prog::BenchTrivial).unwrap();
    let frame = bench_frame(&syn_to(vip4(), 1000));
    fx.dp.set_bench_frame(&frame).unwrap();
    let out = fx
        .dp
        .test_run_repeat(Prog::BenchRestore, &input(&frame), None, 10)
        .unwrap();
    assert_eq!(out.frame, input(&frame));
    drop(hold);
    assert!(!link_exists(link_id), "the link outlived its hold");
}

/// `ip -d link show lo` of this test's namespace.
fn ip_link_lo() -> String {
    let out = std::process::Command::new("ip")
        .args(["-d", "link", "show", "lo"])
        .output()
        .expect("ip");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).into_owned()
}
