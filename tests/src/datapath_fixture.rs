//! Table-driven fixture for the XDP datapath tests (`tests/tests/datapath_*.rs`), in the
//! spirit of Katran's `{description, input frame, expected action, expected output}`.
//!
//! A [`Fixture`] holds a freshly loaded [`Datapath`] (small maps, so it loads fast), the
//! [`LbConfig`] it runs with and a [`DatapathModel`] programming its VIPs. Expectations come from
//! an independent user-space [`Model`]: it re-implements the datapath's acceptance rules on
//! raw bytes (Ethernet, IPv4/IPv6, TCP/UDP/ICMP, VIP match by address, port and protocol
//! with the all-ports fallback) and picks the real from the VIP's Maglev ring as programmed
//! (`flow_hash(flow) % ring_size`). The output checks ([`check_output`]) verify every outer
//! header field and checksum with their own RFC 1071 code, never with the datapath's.
//!
//! These tests need root and the kernel's BPF: [`require_root_bpf`] fails loudly otherwise,
//! it never skips.

use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use etherparse::PacketBuilder;
use marklb_agent::{
    datapath::{
        CounterSnapshot, Datapath, LoadOptions, Prog, TcProg,
        testrun::{
            RunResult, TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC, XDP_DROP, XDP_PASS, XDP_TX,
        },
    },
    maglev::{self, Backend},
    model::{DatapathModel, RetiringReal},
    packet::{CLIENT_MAC, FrameSpec, LB_MAC},
    vip::VipId,
};
use marklb_common::{
    CFG_F_ENABLED, CFG_F_ICMP_ECHO, CFG_F_ICMP_TOO_BIG, Counter, FlowKey, IPPROTO_ICMP,
    IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, LbConfig, MarkEntry, REAL_F_IPV6, RealDef, VipKey,
    VipMeta, addr_words,
    hash::{encap_src_v4, encap_src_v6, flow_hash},
    words_addr,
};

// ---------------------------------------------------------------------------------------
// Environment
// ---------------------------------------------------------------------------------------

/// Fails (never skips) unless the process is root and the kernel's bpf() works.
pub fn require_root_bpf() {
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "\n\n*** THE DATAPATH TESTS NEED ROOT AND THE KERNEL'S BPF ***\n\
         running as uid {euid}: run `cargo test -p marklb-tests --test 'datapath_*'` as root \
         on a kernel with BPF (BPF_PROG_TEST_RUN, XDP). These tests are never skipped.\n"
    );
    // BPF_MAP_CREATE of a one-entry array: the cheapest proof that bpf() is usable.
    let probe = crate::pins::create_map(marklb_agent::datapath::pin_compat::MapDef {
        map_type: 2, // BPF_MAP_TYPE_ARRAY
        key_size: 4,
        value_size: 4,
        max_entries: 1,
        flags: 0,
    });
    if let Err(err) = probe {
        panic!(
            "\n\n*** THE DATAPATH TESTS NEED ROOT AND THE KERNEL'S BPF ***\n\
             bpf(BPF_MAP_CREATE) failed: {err}. Run as root on a kernel with BPF enabled \
             (not in a sandbox that filters bpf()). These tests are never skipped.\n"
        );
    }
}

/// Pins the calling thread to the CPU it runs on, so per-CPU datapath state (the event
/// limiter, counters) is the same on every run.
pub fn pin_to_current_cpu() -> usize {
    unsafe {
        let cpu = libc::sched_getcpu();
        assert!(cpu >= 0, "sched_getcpu failed");
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        let rc = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(
            rc,
            0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
        cpu as usize
    }
}

/// Seed of the random tests: `DATAPATH_FUZZ_SEED` when set (to replay a failure), else the
/// clock; printed either way so every failure can be rerun.
pub fn fuzz_seed() -> u64 {
    let seed = std::env::var("DATAPATH_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("fuzz seed {seed} (rerun with DATAPATH_FUZZ_SEED={seed})");
    eprintln!("fuzz seed {seed} (rerun with DATAPATH_FUZZ_SEED={seed})");
    seed
}

/// CLOCK_MONOTONIC in ns (the clock of `bpf_ktime_get_ns`).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

// ---------------------------------------------------------------------------------------
// Addresses and configuration
// ---------------------------------------------------------------------------------------

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|e| panic!("bad address {s}: {e}"))
}

pub const NEXT_HOP_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
pub const MTU: u32 = 1500;
/// Maglev table size of the test VIPs (prime, small: fast to program and to read back).
pub const TABLE: u32 = 1021;

pub fn client4() -> IpAddr {
    ip("192.0.2.10")
}
pub fn client6() -> IpAddr {
    ip("2001:db8::10")
}
/// IPv4 VIP: TCP 80 (4 IPv4 reals), UDP 53 (3 IPv4 reals).
pub fn vip4() -> IpAddr {
    ip("10.0.0.10")
}
/// IPv4 VIP served by IPv6 reals: TCP 80 and UDP all ports.
pub fn vip4_v6reals() -> IpAddr {
    ip("10.0.0.11")
}
/// IPv4 VIP with an all-ports TCP entry (reals 0, 1) and an exact TCP 443 entry (real 3).
pub fn vip4_allports() -> IpAddr {
    ip("10.0.0.20")
}
/// IPv4 VIP whose only backend is drained: no reals, drops.
pub fn vip4_empty() -> IpAddr {
    ip("10.0.0.30")
}
/// IPv6 VIP: TCP 80 (4 IPv6 reals), UDP 53 (3 IPv6 reals).
pub fn vip6() -> IpAddr {
    ip("2001:db8:f::10")
}
/// IPv6 VIP misconfigured with an IPv4 real (IPv6-in-IPv4 is not offered): drops.
pub fn vip6_v4real() -> IpAddr {
    ip("2001:db8:f::30")
}
/// Not a VIP.
pub fn other4() -> IpAddr {
    ip("10.0.0.99")
}
pub fn other6() -> IpAddr {
    ip("2001:db8:f::99")
}
pub fn reals4() -> Vec<IpAddr> {
    (1..=6).map(|i| ip(&format!("10.1.0.{i}"))).collect()
}
pub fn reals6() -> Vec<IpAddr> {
    (1..=6).map(|i| ip(&format!("2001:db8:1::{i}"))).collect()
}

/// Every feature on except events; MTU 1500.
pub fn test_config() -> LbConfig {
    LbConfig {
        flags: CFG_F_ENABLED | CFG_F_ICMP_ECHO | CFG_F_ICMP_TOO_BIG,
        mtu: MTU,
        next_hop_mac: NEXT_HOP_MAC,
        encap_src_v4_be: u32::from_be_bytes([172, 16, 0, 0]).to_be(),
        encap_src_v6_be: addr_words(ip("fc00:6d6c:62::")),
        event_interval_ns: 0,
        events_burst: 0,
        ..Default::default()
    }
}

pub fn backends(addrs: &[IpAddr]) -> Vec<Backend> {
    addrs
        .iter()
        .map(|&addr| Backend { addr, weight: 1 })
        .collect()
}

// ---------------------------------------------------------------------------------------
// The fixture
// ---------------------------------------------------------------------------------------

/// Counters that mark how a packet left the balancer: every run bumps exactly one.
pub const EXIT_COUNTERS: &[Counter] = &[
    Counter::MarkHit,
    Counter::ConnHit,
    Counter::NewFlow,
    Counter::PassNotVip,
    Counter::PassNotIp,
    Counter::PassMalformed,
    Counter::IcmpEchoReply,
    Counter::IcmpTooBigForwarded,
    Counter::IcmpTooBigSent,
    Counter::DropMtu,
    Counter::DropMalformed,
    Counter::DropIpOptions,
    Counter::DropFragment,
    Counter::DropUnsupported,
    Counter::DropNoReal,
    Counter::DropEncap,
    Counter::PassDisabled,
];

/// The exit counters that moved between two snapshots, with their increments.
pub fn exits(delta: &CounterSnapshot) -> Vec<(Counter, u64)> {
    EXIT_COUNTERS
        .iter()
        .map(|&c| (c, delta.get(c)))
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// Which balancer program a fixture runs: the same maps and paths behind either hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// XDP, the mark in 4 bytes of metadata (`--mark-delivery xdp-metadata`).
    Xdp,
    /// TC ingress, the mark in `skb->mark` (`--mark-delivery skb-mark`).
    Tc,
}

impl Hook {
    /// `MARKLB_DATAPATH_HOOK=tc` runs the XDP tables against the TC program (every
    /// expectation holds for both, except what only metadata can carry: marks above 16 bits).
    pub fn from_env() -> Self {
        match std::env::var("MARKLB_DATAPATH_HOOK").as_deref() {
            Ok("tc") => Hook::Tc,
            _ => Hook::Xdp,
        }
    }
}

/// A TC verdict in XDP terms, so one expectation serves both hooks: `TC_ACT_UNSPEC` (on to
/// the stack) is `XDP_PASS`, `TC_ACT_SHOT` is `XDP_DROP`, `TC_ACT_REDIRECT` (out of the same
/// device) is `XDP_TX`; anything else maps to 100 + the code, which no expectation accepts.
pub fn tc_as_xdp(action: i32) -> u32 {
    match action {
        TC_ACT_UNSPEC => XDP_PASS,
        TC_ACT_SHOT => XDP_DROP,
        TC_ACT_REDIRECT => XDP_TX,
        other => (100 + other) as u32,
    }
}

pub struct Fixture {
    pub dp: Datapath,
    pub lb: DatapathModel,
    pub cfg: LbConfig,
    /// The program `run`/`run_case` exercise.
    pub hook: Hook,
}

impl Fixture {
    /// A loaded datapath with [`test_config`] and no VIPs.
    pub fn new() -> Self {
        Self::with_config(test_config())
    }

    pub fn with_config(cfg: LbConfig) -> Self {
        Self::with_conn_table(cfg, 1 << 14)
    }

    /// [`Fixture::with_config`] with a connection table of `conn_table_size` flows.
    pub fn with_conn_table(cfg: LbConfig, conn_table_size: u32) -> Self {
        Self::with_load_options(
            cfg,
            &LoadOptions {
                ring_capacity: 1 << 18,
                conn_table_size,
                ..Default::default()
            },
        )
    }

    /// [`Fixture::with_config`] loaded with `opts` (sizes, a pin directory).
    pub fn with_load_options(cfg: LbConfig, opts: &LoadOptions) -> Self {
        require_root_bpf();
        let mut dp = Datapath::load(opts).unwrap_or_else(|e| {
            panic!("\n\n*** loading the datapath failed (these tests need root and BPF): {e:#}\n")
        });
        dp.set_config(&cfg).expect("set config");
        let lb = DatapathModel::new(&dp);
        let mut fx = Self {
            dp,
            lb,
            cfg,
            hook: Hook::from_env(),
        };
        // Verify the balancers now rather than inside the first case.
        fx.dp.program(Prog::Balancer).expect("balancer verifies");
        fx.dp
            .tc_program(TcProg::Balancer)
            .expect("TC balancer verifies");
        fx
    }

    /// The standard VIP set (see the address helpers), all Maglev tables of [`TABLE`].
    pub fn standard() -> Self {
        let mut fx = Self::new();
        fx.add_standard_vips();
        fx
    }

    pub fn add_standard_vips(&mut self) {
        let (r4, r6) = (reals4(), reals6());
        self.update_vip(VipId::tcp(vip4(), 80), &backends(&r4[0..4]));
        self.update_vip(VipId::udp(vip4(), 53), &backends(&r4[0..3]));
        self.update_vip(VipId::tcp(vip4_v6reals(), 80), &backends(&r6[0..4]));
        self.update_vip(VipId::udp(vip4_v6reals(), 0), &backends(&r6[0..2]));
        self.update_vip(VipId::tcp(vip4_allports(), 0), &backends(&r4[0..2]));
        self.update_vip(VipId::tcp(vip4_allports(), 443), &backends(&r4[3..4]));
        self.update_vip(
            VipId::tcp(vip4_empty(), 80),
            &[Backend {
                addr: r4[2],
                weight: 0,
            }],
        );
        self.update_vip(VipId::tcp(vip6(), 80), &backends(&r6[0..4]));
        self.update_vip(VipId::udp(vip6(), 53), &backends(&r6[1..4]));
        self.update_vip(VipId::tcp(vip6_v4real(), 80), &backends(&r4[4..5]));
    }

    pub fn set_config(&mut self, cfg: LbConfig) {
        self.dp.set_config(&cfg).expect("set config");
        self.cfg = cfg;
    }

    /// Programs a VIP, checks the ring the datapath holds is the Maglev table of the
    /// backends, and returns the reals that left (not yet retired).
    pub fn set_vip(&mut self, vip: VipId, backends: &[Backend]) -> Vec<RetiringReal> {
        let leaving = self
            .lb
            .set_vip(&mut self.dp, vip, backends, TABLE)
            .expect("set_vip");
        let meta = self.dp.vip(&vip.key()).expect("VIP in the map");
        let table = maglev::build_table(backends, TABLE);
        if table.is_empty() {
            assert_eq!(
                meta.ring_size, 0,
                "{vip:?}: no live backend, ring must be empty"
            );
        } else {
            assert_eq!(meta.ring_size, TABLE);
            let ring = self.dp.read_ring(meta.ring_off, meta.ring_size);
            let want: Vec<u32> = table
                .iter()
                .map(|&i| {
                    self.lb
                        .real_id(&backends[i as usize].addr)
                        .expect("real programmed")
                })
                .collect();
            assert!(
                ring == want,
                "{vip:?}: the datapath's ring is not the Maglev table"
            );
        }
        leaving
    }

    /// [`Fixture::set_vip`], then retires the reals that left.
    pub fn update_vip(&mut self, vip: VipId, backends: &[Backend]) {
        let leaving = self.set_vip(vip, backends);
        self.lb.retire(&mut self.dp, &leaving).expect("retire");
    }

    pub fn remove_vip(&mut self, vip: &VipId) {
        let leaving = self.lb.remove_vip(&mut self.dp, vip).expect("remove_vip");
        self.lb.retire(&mut self.dp, &leaving).expect("retire");
    }

    /// Runs the balancer of [`Fixture::hook`]; a TC run reports its verdict in XDP terms
    /// ([`tc_as_xdp`]) and `mark` is `skb->mark` there.
    pub fn try_run(&mut self, frame: &[u8], mark: Option<u32>) -> Result<RunResult, String> {
        match self.hook {
            Hook::Xdp => self
                .dp
                .test_run(Prog::Balancer, frame, mark)
                .map_err(|e| format!("{e:#}")),
            Hook::Tc => self
                .dp
                .test_run_tc(TcProg::Balancer, frame, mark.unwrap_or(0))
                .map(|r| RunResult {
                    action: tc_as_xdp(r.action),
                    frame: r.frame,
                    ns_per_run: r.ns_per_run,
                })
                .map_err(|e| format!("{e:?}")),
        }
    }

    pub fn run(&mut self, frame: &[u8], mark: Option<u32>) -> RunResult {
        self.try_run(frame, mark)
            .unwrap_or_else(|e| panic!("test_run of {}: {e}", hex(frame)))
    }

    /// Runs the emulated NIC (which tail-calls the balancer) on an unmarked frame.
    pub fn run_nic(&mut self, frame: &[u8]) -> RunResult {
        self.dp
            .test_run(Prog::EmulatedNic, frame, None)
            .unwrap_or_else(|e| panic!("test_run (NIC) of {}: {e:#}", hex(frame)))
    }

    pub fn counters(&self) -> CounterSnapshot {
        self.dp.counters().expect("counters")
    }

    /// A snapshot of what is programmed, for expectations.
    pub fn model(&self) -> Model {
        Model::from_datapath(&self.dp, self.cfg)
    }

    /// The model's pick for a new flow (None: not a VIP flow, or the VIP has no reals).
    pub fn model_pick(&self, flow: &FlowKey) -> Option<Pick> {
        self.model().ring_pick(flow).ok()
    }

    /// The model's real for a frame's flow, as an address.
    pub fn model_real(&self, frame_flow: &FlowKey) -> IpAddr {
        self.model_pick(frame_flow)
            .unwrap_or_else(|| panic!("no model pick for {frame_flow:?}"))
            .addr
    }

    /// The mark entry that sends packets to `real` for `vip`.
    pub fn mark_entry(&self, vip: &VipId, real: &IpAddr) -> MarkEntry {
        let real_id = self.lb.real_id(real).expect("real programmed");
        MarkEntry {
            real_id,
            real_gen: self.dp.real(real_id).expect("real").generation,
            vip_id: self.lb.vip_stats_id(vip).expect("vip programmed"),
            _pad: 0,
        }
    }

    /// Runs one case and asserts its action, output bytes and exit counter.
    pub fn run_case(&mut self, case: &Case) -> RunResult {
        let before = self.counters();
        let r = match self.try_run(&case.frame, case.mark) {
            Ok(r) => r,
            Err(e) => panic!(
                "[{}] test_run failed: {e}\ninput {}",
                case.desc,
                hex(&case.frame)
            ),
        };
        let delta = self.counters().since(&before);
        if let Err(e) = check_output(&self.cfg, &case.expect, &case.frame, r.action, &r.frame) {
            panic!(
                "[{}] {e}\n  expected {:?}, got action {}\n  input  {}\n  output {}",
                case.desc,
                case.expect,
                action_name(r.action),
                hex(&case.frame),
                hex(&r.frame)
            );
        }
        let ex = exits(&delta);
        assert!(
            ex.len() == 1 && ex[0].1 == 1,
            "[{}] exactly one exit counter must move by one, got {ex:?}",
            case.desc
        );
        if let Some(c) = case.counter {
            assert_eq!(ex[0].0, c, "[{}] exit counter", case.desc);
        }
        r
    }

    pub fn run_table(&mut self, cases: &[Case]) {
        for c in cases {
            self.run_case(c);
        }
    }
}

impl Default for Fixture {
    fn default() -> Self {
        Self::new()
    }
}

/// One row of a table: what goes in, what must come out.
#[derive(Clone, Debug)]
pub struct Case {
    pub desc: String,
    pub frame: Vec<u8>,
    /// Mark in XDP metadata.
    pub mark: Option<u32>,
    pub expect: Expect,
    /// The one exit counter that must move (None: any single one).
    pub counter: Option<Counter>,
}

impl Case {
    pub fn new(desc: impl Into<String>, frame: Vec<u8>, expect: Expect, counter: Counter) -> Self {
        Self {
            desc: desc.into(),
            frame,
            mark: None,
            expect,
            counter: Some(counter),
        }
    }

    pub fn pass(desc: impl Into<String>, frame: Vec<u8>, counter: Counter) -> Self {
        Self::new(desc, frame, Expect::Pass, counter)
    }

    pub fn drop(desc: impl Into<String>, frame: Vec<u8>, counter: Counter) -> Self {
        Self::new(desc, frame, Expect::Drop, counter)
    }

    /// Forwarded to `real`; the outer source comes from the frame's own client and port.
    pub fn forward(
        desc: impl Into<String>,
        frame: Vec<u8>,
        real: IpAddr,
        counter: Counter,
    ) -> Self {
        let f = parse_l3l4(&frame).expect("forwarded frame parses");
        let expect = Expect::Forward {
            real,
            client: f.src,
            sport: f.sport,
        };
        Self::new(desc, frame, expect, counter)
    }

    pub fn with_mark(mut self, mark: u32) -> Self {
        self.mark = Some(mark);
        self
    }
}

/// What the datapath must do with a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    /// `XDP_PASS`, frame untouched.
    Pass,
    /// `XDP_DROP`.
    Drop,
    /// `XDP_TX` of the whole frame encapsulated toward `real`; the outer source is chosen
    /// by the flow's client address and port.
    Forward {
        real: IpAddr,
        client: IpAddr,
        sport: u16,
    },
    /// `XDP_TX` of the ICMP echo request turned into its reply.
    EchoReply,
    /// `XDP_TX` of an ICMP "fragmentation needed" / ICMPv6 "packet too big" to the client
    /// advertising `mtu`.
    TooBigSent { mtu: u32 },
}

pub fn action_name(a: u32) -> &'static str {
    match a {
        0 => "XDP_ABORTED",
        XDP_DROP => "XDP_DROP",
        XDP_PASS => "XDP_PASS",
        XDP_TX => "XDP_TX",
        4 => "XDP_REDIRECT",
        _ => "unknown",
    }
}

pub fn hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

pub fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Independent checksums (RFC 1071)
// ---------------------------------------------------------------------------------------

/// One's complement sum of big-endian 16-bit words (odd length padded with zero).
pub fn ones_sum(data: &[u8], mut acc: u64) -> u64 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u16::from_be_bytes([c[0], c[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        acc += (*last as u64) << 8;
    }
    acc
}

pub fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The checksum to store for `data` whose checksum field is zero.
pub fn checksum(data: &[u8]) -> u16 {
    !fold(ones_sum(data, 0))
}

/// Data including its checksum field sums to all ones.
pub fn sums_to_ones(data: &[u8], acc: u64) -> bool {
    fold(ones_sum(data, acc)) == 0xffff
}

pub fn ipv4_header_valid(hdr: &[u8]) -> bool {
    sums_to_ones(hdr, 0)
}

/// Sum of the IPv6 pseudo-header (RFC 8200 section 8.1).
pub fn ipv6_pseudo(src: &[u8], dst: &[u8], len: u32, next: u8) -> u64 {
    let mut acc = ones_sum(src, 0);
    acc = ones_sum(dst, acc);
    acc += (len >> 16) as u64 + (len & 0xffff) as u64 + next as u64;
    acc
}

/// Recomputes the IPv4 header checksum of a frame (header at 14, IHL from the header;
/// nothing is done when the header is not all there).
pub fn fix_ipv4_checksum(frame: &mut [u8]) {
    let ihl = ((frame[14] & 0xf) as usize) * 4;
    if ihl < 20 || 14 + ihl > frame.len() {
        return; // no complete header to sum
    }
    frame[24] = 0;
    frame[25] = 0;
    let c = checksum(&frame[14..14 + ihl]);
    frame[24..26].copy_from_slice(&c.to_be_bytes());
}

// ---------------------------------------------------------------------------------------
// Frames
// ---------------------------------------------------------------------------------------

pub const PAYLOAD: usize = 16;

pub fn tcp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, syn: bool) -> Vec<u8> {
    FrameSpec::tcp(src, sport, dst, dport, syn)
        .with_payload(PAYLOAD)
        .build()
}

pub fn udp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Vec<u8> {
    FrameSpec::udp(src, sport, dst, dport)
        .with_payload(PAYLOAD)
        .build()
}

pub fn tcp_flow(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> FlowKey {
    FrameSpec::tcp(src, sport, dst, dport, false).flow()
}

pub fn udp_flow(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> FlowKey {
    FrameSpec::udp(src, sport, dst, dport).flow()
}

/// A TCP frame whose IP packet is exactly `ip_len` bytes.
pub fn tcp_sized(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, ip_len: usize) -> Vec<u8> {
    let hdr = if src.is_ipv6() { 40 } else { 20 } + 20;
    let f = FrameSpec::tcp(src, sport, dst, dport, false)
        .with_payload(ip_len - hdr)
        .build();
    assert_eq!(f.len(), 14 + ip_len);
    f
}

/// Sets the IPv4 TOS / IPv6 traffic class (fixing the IPv4 header checksum).
pub fn set_tos(mut frame: Vec<u8>, tos: u8) -> Vec<u8> {
    if frame[12..14] == [0x08, 0x00] {
        frame[15] = tos;
        fix_ipv4_checksum(&mut frame);
    } else {
        frame[14] = (frame[14] & 0xf0) | (tos >> 4);
        frame[15] = (frame[15] & 0x0f) | (tos << 4);
    }
    frame
}

fn eth_ip(
    src: IpAddr,
    dst: IpAddr,
    ttl: u8,
) -> etherparse::PacketBuilderStep<etherparse::IpHeaders> {
    let eth = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), ttl),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), ttl),
        _ => panic!("mixed families"),
    }
}

/// ICMP / ICMPv6 echo request with `payload_len` bytes of data.
pub fn icmp_echo(src: IpAddr, dst: IpAddr, id: u16, seq: u16, payload_len: usize) -> Vec<u8> {
    let payload: Vec<u8> = (0..payload_len).map(|i| (i * 13 + 5) as u8).collect();
    let b = eth_ip(src, dst, 57);
    let mut out = Vec::new();
    if src.is_ipv6() {
        b.icmpv6_echo_request(id, seq)
            .write(&mut out, &payload)
            .expect("frame");
    } else {
        b.icmpv4_echo_request(id, seq)
            .write(&mut out, &payload)
            .expect("frame");
    }
    out
}

/// Any ICMP / ICMPv6 message (checksum valid).
pub fn icmp_raw(
    src: IpAddr,
    dst: IpAddr,
    kind: u8,
    code: u8,
    rest: [u8; 4],
    payload: &[u8],
) -> Vec<u8> {
    let b = eth_ip(src, dst, 64);
    let mut out = Vec::new();
    if src.is_ipv6() {
        b.icmpv6_raw(kind, code, rest)
            .write(&mut out, payload)
            .expect("frame");
    } else {
        b.icmpv4_raw(kind, code, rest)
            .write(&mut out, payload)
            .expect("frame");
    }
    out
}

/// The IP packet a VIP sends to a client (what routers quote in too-big errors).
pub fn vip_reply_packet(
    vip: IpAddr,
    vport: u16,
    client: IpAddr,
    cport: u16,
    tcp: bool,
    payload: usize,
) -> Vec<u8> {
    let spec = if tcp {
        FrameSpec::tcp(vip, vport, client, cport, false)
    } else {
        FrameSpec::udp(vip, vport, client, cport)
    };
    spec.with_payload(payload).build()[14..].to_vec()
}

/// A router's "fragmentation needed" (IPv4) / "packet too big" (IPv6) to `vip`, quoting
/// `quoted` (an IP packet from the VIP).
pub fn icmp_too_big(router: IpAddr, vip: IpAddr, mtu: u32, quoted: &[u8]) -> Vec<u8> {
    if router.is_ipv6() {
        icmp_raw(router, vip, 2, 0, mtu.to_be_bytes(), quoted)
    } else {
        let m = (mtu as u16).to_be_bytes();
        icmp_raw(router, vip, 3, 4, [0, 0, m[0], m[1]], quoted)
    }
}

/// Inserts `words` 4-byte words of IPv4 options (NOPs, then end of list) after the header.
pub fn with_ipv4_options(frame: &[u8], words: usize) -> Vec<u8> {
    assert!(words <= 10);
    let mut f = frame[..34].to_vec();
    let mut opts = vec![1u8; words * 4];
    if let Some(last) = opts.last_mut() {
        *last = 0;
    }
    f.extend_from_slice(&opts);
    f.extend_from_slice(&frame[34..]);
    f[14] = 0x40 | (5 + words as u8);
    let tot = u16::from_be_bytes([f[16], f[17]]) + (words * 4) as u16;
    f[16..18].copy_from_slice(&tot.to_be_bytes());
    fix_ipv4_checksum(&mut f);
    f
}

/// Sets the IPv4 flags/fragment-offset word.
pub fn with_frag(frame: &[u8], frag_word: u16) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[20..22].copy_from_slice(&frag_word.to_be_bytes());
    fix_ipv4_checksum(&mut f);
    f
}

/// Inserts an 8-byte IPv6 extension header of type `kind` (0 hop-by-hop, 43 routing,
/// 44 fragment, 60 destination options, ...) in front of the transport header.
pub fn with_ipv6_ext(frame: &[u8], kind: u8) -> Vec<u8> {
    let mut f = frame[..54].to_vec();
    let next = frame[20];
    let ext: [u8; 8] = match kind {
        44 => [next, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef], // first fragment, no MF
        _ => [next, 0, 1, 4, 0, 0, 0, 0],              // PadN
    };
    f.extend_from_slice(&ext);
    f.extend_from_slice(&frame[54..]);
    f[20] = kind;
    let plen = u16::from_be_bytes([f[18], f[19]]) + 8;
    f[18..20].copy_from_slice(&plen.to_be_bytes());
    f
}

// ---------------------------------------------------------------------------------------
// Independent parse of a frame
// ---------------------------------------------------------------------------------------

pub fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

fn addr_at(b: &[u8], off: usize, v6: bool) -> IpAddr {
    if v6 {
        let o: [u8; 16] = b[off..off + 16].try_into().expect("16 bytes");
        IpAddr::V6(Ipv6Addr::from(o))
    } else {
        let o: [u8; 4] = b[off..off + 4].try_into().expect("4 bytes");
        IpAddr::V4(Ipv4Addr::from(o))
    }
}

/// Layer 3/4 facts of a well-formed IPv4/IPv6 frame (no validation beyond lengths).
#[derive(Clone, Copy, Debug)]
pub struct L3L4 {
    pub v6: bool,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub ip_len: usize,
    pub l4_off: usize,
}

impl L3L4 {
    pub fn flow(&self) -> FlowKey {
        FlowKey::new(self.src, self.sport, self.dst, self.dport, self.proto)
    }
}

pub fn parse_l3l4(f: &[u8]) -> Option<L3L4> {
    if f.len() < 14 {
        return None;
    }
    let (v6, hl) = match be16(f, 12) {
        0x0800 => (false, 20),
        0x86dd => (true, 40),
        _ => return None,
    };
    if f.len() < 14 + hl + 4 {
        return None;
    }
    let (src, dst, proto, ip_len) = if v6 {
        (
            addr_at(f, 22, true),
            addr_at(f, 38, true),
            f[20],
            40 + be16(f, 18) as usize,
        )
    } else {
        (
            addr_at(f, 26, false),
            addr_at(f, 30, false),
            f[23],
            be16(f, 16) as usize,
        )
    };
    let l4_off = 14 + hl;
    Some(L3L4 {
        v6,
        src,
        dst,
        proto,
        sport: be16(f, l4_off),
        dport: be16(f, l4_off + 2),
        ip_len,
        l4_off,
    })
}

/// Whether a frame is a TCP/UDP packet the datapath accepts as a flow, whatever its
/// destination: IPv4 with IHL 5 and no fragment bits, or IPv6 with TCP/UDP as next header;
/// IP length inside the frame and covering the transport header (20 bytes for TCP, 8 for
/// UDP). The acceptance rules of [`Model::classify`] without the VIP match.
pub fn well_formed_flow(f: &[u8]) -> bool {
    if f.len() < 14 {
        return false;
    }
    let (hl, ip_len, proto) = match be16(f, 12) {
        0x0800 if f.len() >= 34 && f[14] == 0x45 && be16(f, 20) & 0x3fff == 0 => {
            (20, be16(f, 16) as usize, f[23])
        }
        0x86dd if f.len() >= 54 && f[14] >> 4 == 6 => (40, 40 + be16(f, 18) as usize, f[20]),
        _ => return false,
    };
    let l4_min = match proto {
        IPPROTO_TCP => 20,
        IPPROTO_UDP => 8,
        _ => return false,
    };
    ip_len >= hl + l4_min && 14 + ip_len <= f.len()
}

// ---------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------

/// A real chosen for a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pick {
    pub real_id: u32,
    pub generation: u32,
    pub addr: IpAddr,
    pub vip_id: u32,
}

/// The model's verdict on one frame.
#[derive(Clone, Debug)]
pub struct Verdict {
    pub expect: Expect,
    /// Exit counters that may move (exactly one of them must).
    pub counters: Vec<Counter>,
    /// The flow and its real, when forwarded.
    pub pick: Option<(FlowKey, Pick)>,
}

fn verdict(expect: Expect, counters: &[Counter]) -> Verdict {
    Verdict {
        expect,
        counters: counters.to_vec(),
        pick: None,
    }
}

/// What is programmed (VIPs, rings, reals), read back from the maps, plus the datapath's
/// acceptance rules re-implemented on raw bytes.
#[derive(Clone, Debug)]
pub struct Model {
    pub cfg: LbConfig,
    pub vips: HashMap<VipKey, VipMeta>,
    pub vip_addrs: HashSet<[u32; 4]>,
    /// Keyed by (ring offset, size).
    pub rings: HashMap<(u32, u32), Vec<u32>>,
    /// Live reals by id.
    pub reals: HashMap<u32, RealDef>,
}

impl Model {
    pub fn from_datapath(dp: &Datapath, cfg: LbConfig) -> Self {
        let mut m = Model {
            cfg,
            vips: HashMap::new(),
            vip_addrs: HashSet::new(),
            rings: HashMap::new(),
            reals: HashMap::new(),
        };
        for (key, meta) in dp.vips().expect("vips") {
            m.vip_addrs.insert(key.addr_be);
            if meta.ring_size > 0 {
                let ring = dp.read_ring(meta.ring_off, meta.ring_size);
                for &id in &ring {
                    if let std::collections::hash_map::Entry::Vacant(e) = m.reals.entry(id) {
                        let def = dp.real(id).expect("real");
                        if def.generation != 0 {
                            e.insert(def);
                        }
                    }
                }
                m.rings.insert((meta.ring_off, meta.ring_size), ring);
            }
            m.vips.insert(key, meta);
        }
        m
    }

    /// Exact (address, port, protocol) entry, else the address's all-ports entry.
    pub fn vip_for(&self, flow: &FlowKey) -> Option<VipMeta> {
        let mut key = VipKey {
            addr_be: flow.dst_be,
            port_be: flow.dport_be,
            proto: flow.proto,
            _pad: 0,
        };
        if let Some(m) = self.vips.get(&key) {
            return Some(*m);
        }
        key.port_be = 0;
        self.vips.get(&key).copied()
    }

    /// The VIP's Maglev ring at `flow_hash(flow) % ring_size`.
    pub fn ring_pick(&self, flow: &FlowKey) -> Result<Pick, Counter> {
        let Some(vip) = self.vip_for(flow) else {
            return Err(Counter::PassNotVip);
        };
        if vip.ring_size == 0 {
            return Err(Counter::DropNoReal);
        }
        let ring = &self.rings[&(vip.ring_off, vip.ring_size)];
        let real_id = ring[(flow_hash(flow) % vip.ring_size) as usize];
        let Some(def) = self.reals.get(&real_id) else {
            return Err(Counter::DropNoReal);
        };
        Ok(Pick {
            real_id,
            generation: def.generation,
            addr: words_addr(&def.addr_be, def.flags & REAL_F_IPV6 != 0),
            vip_id: vip.vip_id,
        })
    }

    /// What the balancer must do with an unmarked frame, assuming every flow already in
    /// the connection table was put there under the current configuration (so it names
    /// the ring's real).
    pub fn classify(&self, f: &[u8]) -> Verdict {
        use Counter::*;
        let pass = |c| verdict(Expect::Pass, &[c]);
        let drop = |c| verdict(Expect::Drop, &[c]);
        if self.cfg.flags & CFG_F_ENABLED == 0 {
            return pass(PassDisabled);
        }
        if f.len() < 14 {
            return pass(PassMalformed);
        }
        let len = f.len();
        let v6;
        let ip_len;
        let hl;
        let proto;
        let (src, dst): ([u32; 4], [u32; 4]);
        match be16(f, 12) {
            0x0800 => {
                if len < 34 || f[14] >> 4 != 4 {
                    return pass(PassMalformed);
                }
                dst = addr_words(addr_at(f, 30, false));
                if !self.vip_addrs.contains(&dst) {
                    return pass(PassNotVip);
                }
                if f[14] != 0x45 {
                    return drop(DropIpOptions);
                }
                if be16(f, 20) & 0x3fff != 0 {
                    return drop(DropFragment);
                }
                ip_len = be16(f, 16) as usize;
                if ip_len < 28 || 14 + ip_len > len {
                    return drop(DropMalformed);
                }
                src = addr_words(addr_at(f, 26, false));
                proto = f[23];
                v6 = false;
                hl = 20;
            }
            0x86dd => {
                if len < 54 || f[14] >> 4 != 6 {
                    return pass(PassMalformed);
                }
                dst = addr_words(addr_at(f, 38, true));
                if !self.vip_addrs.contains(&dst) {
                    return pass(PassNotVip);
                }
                ip_len = 40 + be16(f, 18) as usize;
                if ip_len < 48 || 14 + ip_len > len {
                    return drop(DropMalformed);
                }
                proto = f[20];
                match proto {
                    IPPROTO_TCP | IPPROTO_UDP | IPPROTO_ICMPV6 => {}
                    44 => return drop(DropFragment),
                    _ => return drop(DropUnsupported),
                }
                src = addr_words(addr_at(f, 22, true));
                v6 = true;
                hl = 40;
            }
            _ => return pass(PassNotIp),
        }
        let l4 = 14 + hl;
        let mut syn = false;
        match proto {
            IPPROTO_TCP => {
                if ip_len < hl + 20 {
                    return drop(DropMalformed);
                }
                syn = f[l4 + 13] & 0x12 == 0x02;
            }
            IPPROTO_UDP => {}
            IPPROTO_ICMP if !v6 => return self.classify_icmp(f, v6, ip_len, dst),
            IPPROTO_ICMPV6 if v6 => return self.classify_icmp(f, v6, ip_len, dst),
            _ => return pass(PassNotVip),
        }
        let flow = FlowKey::new(
            words_addr(&src, v6),
            be16(f, l4),
            words_addr(&dst, v6),
            be16(f, l4 + 2),
            proto,
        );
        let pick = match self.ring_pick(&flow) {
            Ok(p) => p,
            Err(PassNotVip) => return pass(PassNotVip),
            Err(c) => return drop(c),
        };
        let overhead = if pick.addr.is_ipv6() { 40 } else { 20 };
        if ip_len as u32 + overhead > self.cfg.mtu {
            if self.cfg.flags & CFG_F_ICMP_TOO_BIG == 0 {
                return drop(DropMtu);
            }
            return verdict(
                Expect::TooBigSent {
                    mtu: self.cfg.mtu - overhead,
                },
                &[IcmpTooBigSent],
            );
        }
        if v6 && !pick.addr.is_ipv6() {
            return drop(DropNoReal);
        }
        let client = words_addr(&flow.src_be, v6);
        let counters: &[Counter] = if syn { &[NewFlow] } else { &[NewFlow, ConnHit] };
        Verdict {
            expect: Expect::Forward {
                real: pick.addr,
                client,
                sport: u16::from_be(flow.sport_be),
            },
            counters: counters.to_vec(),
            pick: Some((flow, pick)),
        }
    }

    fn classify_icmp(&self, f: &[u8], v6: bool, ip_len: usize, _vip: [u32; 4]) -> Verdict {
        use Counter::*;
        let pass = |c| verdict(Expect::Pass, &[c]);
        let drop = |c| verdict(Expect::Drop, &[c]);
        let hl = if v6 { 40 } else { 20 };
        let l4 = 14 + hl;
        let (kind, code) = (f[l4], f[l4 + 1]);
        let echo = self.cfg.flags & CFG_F_ICMP_ECHO != 0;
        let too_big = if v6 {
            if kind == 128 && echo {
                return verdict(Expect::EchoReply, &[IcmpEchoReply]);
            }
            kind == 2
        } else {
            if kind == 8 && echo {
                return verdict(Expect::EchoReply, &[IcmpEchoReply]);
            }
            kind == 3 && code == 4
        };
        if !too_big {
            return pass(PassNotVip);
        }
        // The quoted packet (VIP -> client) starts after the 8-byte ICMP header and must
        // lie inside the ICMP packet (not in Ethernet padding behind it).
        let q = l4 + 8;
        let end = 14 + ip_len;
        if q + hl > end {
            return drop(DropMalformed);
        }
        let (qsrc, qdst, qproto) = if v6 {
            (addr_at(f, q + 8, true), addr_at(f, q + 24, true), f[q + 6])
        } else {
            if f[q] != 0x45 {
                return drop(DropUnsupported);
            }
            (
                addr_at(f, q + 12, false),
                addr_at(f, q + 16, false),
                f[q + 9],
            )
        };
        if qproto != IPPROTO_TCP && qproto != IPPROTO_UDP {
            return drop(DropUnsupported);
        }
        if q + hl + 4 > end {
            return drop(DropMalformed);
        }
        // The quoted packet runs VIP -> client: its flow is the quote reversed.
        let flow = FlowKey::new(qdst, be16(f, q + hl + 2), qsrc, be16(f, q + hl), qproto);
        let pick = match self.ring_pick(&flow) {
            Ok(p) => p,
            Err(PassNotVip) => return pass(PassNotVip),
            Err(c) => return drop(c),
        };
        let overhead = if pick.addr.is_ipv6() { 40 } else { 20 };
        if ip_len as u32 + overhead > self.cfg.mtu {
            return drop(DropMtu);
        }
        if v6 && !pick.addr.is_ipv6() {
            return drop(DropNoReal);
        }
        Verdict {
            expect: Expect::Forward {
                real: pick.addr,
                client: words_addr(&flow.src_be, v6),
                sport: u16::from_be(flow.sport_be),
            },
            counters: vec![IcmpTooBigForwarded],
            pick: Some((flow, pick)),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Output checks
// ---------------------------------------------------------------------------------------

macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            return Err(format!($($arg)*));
        }
    };
}

/// Checks action and output bytes against an expectation.
pub fn check_output(
    cfg: &LbConfig,
    expect: &Expect,
    input: &[u8],
    action: u32,
    out: &[u8],
) -> Result<(), String> {
    match expect {
        Expect::Pass => {
            ensure!(
                action == XDP_PASS,
                "want XDP_PASS, got {}",
                action_name(action)
            );
            ensure!(out == input, "passed frame was modified");
        }
        Expect::Drop => {
            ensure!(
                action == XDP_DROP,
                "want XDP_DROP, got {}",
                action_name(action)
            );
        }
        Expect::Forward {
            real,
            client,
            sport,
        } => {
            ensure!(
                action == XDP_TX,
                "want XDP_TX (forward to {real}), got {}",
                action_name(action)
            );
            check_encap(cfg, input, out, *real, *client, *sport)?;
        }
        Expect::EchoReply => {
            ensure!(
                action == XDP_TX,
                "want XDP_TX (echo reply), got {}",
                action_name(action)
            );
            check_echo_reply(input, out)?;
        }
        Expect::TooBigSent { mtu } => {
            ensure!(
                action == XDP_TX,
                "want XDP_TX (ICMP too big), got {}",
                action_name(action)
            );
            check_too_big(input, out, *mtu)?;
        }
    }
    Ok(())
}

/// Inner IP facts from the input: (IPv6, TOS / traffic class, IP length).
fn inner_ip(input: &[u8]) -> (bool, u8, usize) {
    if be16(input, 12) == 0x86dd {
        (
            true,
            ((input[14] & 0x0f) << 4) | (input[15] >> 4),
            40 + be16(input, 18) as usize,
        )
    } else {
        (false, input[15], be16(input, 16) as usize)
    }
}

/// The output must be the input, untouched after its Ethernet header, behind a new
/// Ethernet header (next hop <- the frame's original destination MAC) and an outer
/// IPv4/IPv6 header toward `real` from the flow's encapsulation source.
pub fn check_encap(
    cfg: &LbConfig,
    input: &[u8],
    out: &[u8],
    real: IpAddr,
    client: IpAddr,
    sport: u16,
) -> Result<(), String> {
    let (inner_v6, tos, ip_len) = inner_ip(input);
    let outer_v6 = real.is_ipv6();
    let olen = if outer_v6 { 40 } else { 20 };
    ensure!(
        out.len() == input.len() + olen,
        "output length {} != input {} + {olen}",
        out.len(),
        input.len()
    );
    ensure!(
        out[0..6] == cfg.next_hop_mac,
        "destination MAC {} != next hop",
        hex(&out[0..6])
    );
    ensure!(
        out[6..12] == input[0..6],
        "source MAC {} != frame's destination MAC {}",
        hex(&out[6..12]),
        hex(&input[0..6])
    );
    let et = be16(out, 12);
    ensure!(
        et == if outer_v6 { 0x86dd } else { 0x0800 },
        "ethertype {et:#06x}"
    );
    let o = &out[14..14 + olen];
    let client_be = addr_words(client);
    if outer_v6 {
        ensure!(o[0] >> 4 == 6, "outer version {}", o[0] >> 4);
        let tc = ((o[0] & 0x0f) << 4) | (o[1] >> 4);
        ensure!(
            tc == tos,
            "outer traffic class {tc:#04x} != inner {tos:#04x}"
        );
        ensure!(
            be16(o, 4) as usize == ip_len,
            "outer payload length {} != inner length {ip_len}",
            be16(o, 4)
        );
        let nh = if inner_v6 { 41 } else { 4 };
        ensure!(o[6] == nh, "outer next header {} != {nh}", o[6]);
        ensure!(o[7] == 64, "outer hop limit {}", o[7]);
        let want_src = encap_src_v6(&cfg.encap_src_v6_be, &client_be, sport.to_be());
        let src = addr_words(addr_at(o, 8, true));
        ensure!(
            src == want_src,
            "outer source {} != {}",
            addr_at(o, 8, true),
            words_addr(&want_src, true)
        );
        ensure!(
            src[..3] == cfg.encap_src_v6_be[..3],
            "outer source outside the /96 prefix"
        );
        ensure!(
            addr_at(o, 24, true) == real,
            "outer destination {} != real {real}",
            addr_at(o, 24, true)
        );
    } else {
        ensure!(!inner_v6, "IPv6 packet inside an IPv4 outer header");
        ensure!(o[0] == 0x45, "outer version/IHL {:#04x}", o[0]);
        ensure!(o[1] == tos, "outer TOS {:#04x} != inner {tos:#04x}", o[1]);
        ensure!(
            be16(o, 2) as usize == ip_len + 20,
            "outer total length {} != {} + 20",
            be16(o, 2),
            ip_len
        );
        ensure!(
            be16(o, 6) & 0xbfff == 0,
            "outer header is a fragment ({:#06x})",
            be16(o, 6)
        );
        ensure!(o[8] == 64, "outer TTL {}", o[8]);
        ensure!(o[9] == 4, "outer protocol {}", o[9]);
        ensure!(
            ipv4_header_valid(o),
            "outer IPv4 checksum {:#06x} invalid (want {:#06x})",
            be16(o, 10),
            {
                let mut h = o.to_vec();
                h[10] = 0;
                h[11] = 0;
                checksum(&h)
            }
        );
        let want_src = encap_src_v4(cfg.encap_src_v4_be, client_be[0], sport.to_be());
        let src = u32::from_ne_bytes(o[12..16].try_into().expect("4"));
        ensure!(
            src == want_src,
            "outer source {} != {}",
            addr_at(o, 12, false),
            Ipv4Addr::from(want_src.to_ne_bytes())
        );
        ensure!(
            o[12..14] == cfg.encap_src_v4_be.to_ne_bytes()[..2],
            "outer source outside the /16 prefix"
        );
        ensure!(
            addr_at(o, 16, false) == real,
            "outer destination {} != real {real}",
            addr_at(o, 16, false)
        );
    }
    ensure!(out[14 + olen..] == input[14..], "inner packet modified");
    Ok(())
}

/// ICMP checksum validity of the message at `l4..14 + ip_len` of a frame.
fn icmp_valid(f: &[u8], v6: bool, ip_len: usize) -> bool {
    if v6 {
        let msg = &f[54..14 + ip_len];
        sums_to_ones(
            msg,
            ipv6_pseudo(&f[22..38], &f[38..54], msg.len() as u32, 58),
        )
    } else {
        let hl = ((f[14] & 0xf) as usize) * 4;
        sums_to_ones(&f[14 + hl..14 + ip_len], 0)
    }
}

/// The echo request turned into its reply in place: MACs and addresses swapped, type 0 /
/// 129, TTL / hop limit reset, checksums updated (a valid checksum stays valid), the rest
/// (identifier, sequence, data, padding) unchanged.
pub fn check_echo_reply(input: &[u8], out: &[u8]) -> Result<(), String> {
    ensure!(
        out.len() == input.len(),
        "echo reply length {} != request {}",
        out.len(),
        input.len()
    );
    ensure!(
        out[0..6] == input[6..12] && out[6..12] == input[0..6],
        "MACs not swapped"
    );
    ensure!(out[12..14] == input[12..14], "ethertype changed");
    let (v6, _, ip_len) = inner_ip(input);
    let l4 = if v6 {
        ensure!(out[14..21] == input[14..21], "IPv6 header changed");
        ensure!(out[21] == 64, "hop limit {}", out[21]);
        ensure!(
            out[22..38] == input[38..54] && out[38..54] == input[22..38],
            "addresses not swapped"
        );
        ensure!(out[54] == 129, "ICMPv6 type {}", out[54]);
        54
    } else {
        ensure!(
            out[14..22] == input[14..22] && out[23] == input[23],
            "IPv4 header changed"
        );
        ensure!(out[22] == 64, "TTL {}", out[22]);
        ensure!(
            out[26..30] == input[30..34] && out[30..34] == input[26..30],
            "addresses not swapped"
        );
        ensure!(
            ipv4_header_valid(&out[14..34]) == ipv4_header_valid(&input[14..34]),
            "IPv4 header checksum validity changed (in {}, out {})",
            ipv4_header_valid(&input[14..34]),
            ipv4_header_valid(&out[14..34])
        );
        ensure!(out[34] == 0, "ICMP type {}", out[34]);
        34
    };
    ensure!(out[l4 + 1] == input[l4 + 1], "ICMP code changed");
    ensure!(
        out[l4 + 4..] == input[l4 + 4..],
        "ICMP identifier, sequence or data changed"
    );
    ensure!(
        icmp_valid(out, v6, ip_len) == icmp_valid(input, v6, ip_len),
        "ICMP checksum validity changed (in {}, out {})",
        icmp_valid(input, v6, ip_len),
        icmp_valid(out, v6, ip_len)
    );
    Ok(())
}

/// An ICMP "fragmentation needed" / ICMPv6 "packet too big" from the VIP to the client,
/// quoting the offending packet's IP header and the first 8 bytes after it.
pub fn check_too_big(input: &[u8], out: &[u8], mtu: u32) -> Result<(), String> {
    let v6 = be16(input, 12) == 0x86dd;
    ensure!(
        out[0..6] == input[6..12] && out[6..12] == input[0..6],
        "MACs not swapped"
    );
    ensure!(out[12..14] == input[12..14], "ethertype");
    if v6 {
        ensure!(out.len() == 14 + 40 + 8 + 48, "length {}", out.len());
        let ip = &out[14..54];
        ensure!(ip[0] >> 4 == 6, "version");
        ensure!(be16(ip, 4) == 56, "payload length {}", be16(ip, 4));
        ensure!(ip[6] == 58, "next header {}", ip[6]);
        ensure!(ip[7] > 1, "hop limit {}", ip[7]);
        ensure!(ip[8..24] == input[38..54], "source is not the VIP");
        ensure!(ip[24..40] == input[22..38], "destination is not the client");
        let icmp = &out[54..];
        ensure!(
            icmp[0] == 2 && icmp[1] == 0,
            "type/code {}/{}",
            icmp[0],
            icmp[1]
        );
        let got = u32::from_be_bytes(icmp[4..8].try_into().expect("4"));
        ensure!(got == mtu, "MTU {got} != {mtu}");
        ensure!(
            icmp[8..] == input[14..62],
            "quoted bytes are not the IPv6 header + 8"
        );
        ensure!(
            sums_to_ones(icmp, ipv6_pseudo(&ip[8..24], &ip[24..40], 56, 58)),
            "ICMPv6 checksum invalid"
        );
        ensure!(
            etherparse_icmpv6_ok(&out[14..]),
            "ICMPv6 checksum rejected by etherparse"
        );
    } else {
        ensure!(out.len() == 14 + 20 + 8 + 28, "length {}", out.len());
        let ip = &out[14..34];
        ensure!(ip[0] == 0x45, "version/IHL {:#04x}", ip[0]);
        ensure!(be16(ip, 2) == 56, "total length {}", be16(ip, 2));
        ensure!(be16(ip, 6) & 0x3fff == 0, "fragment");
        ensure!(ip[8] > 1, "TTL {}", ip[8]);
        ensure!(ip[9] == 1, "protocol {}", ip[9]);
        ensure!(ipv4_header_valid(ip), "IPv4 header checksum invalid");
        ensure!(ip[12..16] == input[30..34], "source is not the VIP");
        ensure!(ip[16..20] == input[26..30], "destination is not the client");
        let icmp = &out[34..];
        ensure!(
            icmp[0] == 3 && icmp[1] == 4,
            "type/code {}/{}",
            icmp[0],
            icmp[1]
        );
        ensure!(icmp[4..6] == [0, 0], "unused bytes {}", hex(&icmp[4..6]));
        ensure!(
            be16(icmp, 6) as u32 == mtu,
            "next-hop MTU {} != {mtu}",
            be16(icmp, 6)
        );
        ensure!(
            icmp[8..] == input[14..42],
            "quoted bytes are not the IPv4 header + 8"
        );
        ensure!(sums_to_ones(icmp, 0), "ICMP checksum invalid");
        ensure!(
            etherparse_icmpv4_ok(&out[34..]),
            "ICMP checksum rejected by etherparse"
        );
    }
    Ok(())
}

/// Strict checksum validity of a frame the balancer built itself (an echo reply or a
/// too-big error): the IPv4 header and the ICMP / ICMPv6 message must each verify, by this
/// file's RFC 1071 code and by etherparse's.
pub fn reply_checksums_valid(out: &[u8]) -> Result<(), String> {
    if be16(out, 12) == 0x86dd {
        let plen = be16(out, 18) as usize;
        ensure!(out.len() >= 54 + plen, "IPv6 payload beyond the frame");
        let msg = &out[54..54 + plen];
        ensure!(
            sums_to_ones(
                msg,
                ipv6_pseudo(&out[22..38], &out[38..54], plen as u32, 58)
            ),
            "ICMPv6 checksum {:#06x} invalid",
            be16(msg, 2)
        );
        ensure!(
            etherparse_icmpv6_ok(&out[14..]),
            "etherparse: ICMPv6 checksum"
        );
    } else {
        ensure!(
            ipv4_header_valid(&out[14..34]),
            "IPv4 header checksum {:#06x} invalid",
            be16(out, 24)
        );
        let tot = be16(out, 16) as usize;
        ensure!(out.len() >= 14 + tot, "IPv4 packet beyond the frame");
        ensure!(
            sums_to_ones(&out[34..14 + tot], 0),
            "ICMP checksum {:#06x} invalid",
            be16(out, 36)
        );
        ensure!(
            etherparse_icmpv4_ok(&out[34..14 + tot]),
            "etherparse: ICMP checksum"
        );
    }
    Ok(())
}

/// etherparse's view of an ICMPv6 checksum (`ip` = the IPv6 packet).
pub fn etherparse_icmpv6_ok(ip: &[u8]) -> bool {
    let plen = be16(ip, 4) as usize;
    let Ok(s) = etherparse::Icmpv6Slice::from_slice(&ip[40..40 + plen]) else {
        return false;
    };
    let src: [u8; 16] = ip[8..24].try_into().expect("16");
    let dst: [u8; 16] = ip[24..40].try_into().expect("16");
    s.icmp_type().calc_checksum(src, dst, s.payload()).ok() == Some(s.checksum())
}

/// etherparse's view of an ICMPv4 checksum (`msg` = the ICMP message).
pub fn etherparse_icmpv4_ok(msg: &[u8]) -> bool {
    let Ok(s) = etherparse::Icmpv4Slice::from_slice(msg) else {
        return false;
    };
    s.icmp_type().calc_checksum(s.payload()) == s.checksum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_matches_etherparse() {
        let f = set_tos(tcp(client4(), 1234, vip4(), 80, true), 0xb8);
        let (h, _) = etherparse::Ipv4Header::from_slice(&f[14..]).expect("ipv4");
        assert_eq!(h.calc_header_checksum(), be16(&f, 24));
        assert!(ipv4_header_valid(&f[14..34]));
        let e = icmp_echo(client6(), vip6(), 7, 9, 33);
        assert!(icmp_valid(&e, true, inner_ip(&e).2));
        assert!(etherparse_icmpv6_ok(&e[14..]));
        let e4 = icmp_echo(client4(), vip4(), 7, 9, 33);
        assert!(icmp_valid(&e4, false, inner_ip(&e4).2));
        assert!(etherparse_icmpv4_ok(&e4[34..]));
    }
}
