//! The mellanox backend's decisions, against a fake kernel that answers as tc would: adopting
//! the rules a previous agent left (filter dumps built as the kernel sends them: our own
//! requests round-tripped through netlink-packet-route with what the kernel adds, `in_hw`
//! and action statistics), batched installs with errors injected per message, backoff, and
//! the devlink eswitch request and replies. No cls_flower or ConnectX needed: what only a
//! card can show is listed in the README.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use marklb_agent::{
    marks::{
        HwBackend, HwBackendError,
        mellanox::{
            Adoption, Mellanox,
            counters::{Backoff, Rejection},
            reconcile::flow_key,
        },
    },
    tc::{
        MAX_BATCH, TcError, TcTransport, devlink,
        dump::{TCA_CLS_FLAGS_IN_HW, parse_filter},
        flower::{self, IPPROTO_TCP, IPPROTO_UDP, Match, RuleId},
    },
};
use marklb_common::FlowKey;
use netlink_packet_core::{NLM_F_MULTIPART, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    tc::{
        TcActionAttribute, TcActionOption, TcAttribute, TcFilterFlowerOption, TcMessage, TcOption,
        TcStats2, TcStatsBasic,
    },
};

const IFINDEX: i32 = 7;

fn v4(sport: u16) -> Match {
    Match {
        src: "192.0.2.10".parse().unwrap(),
        dst: "10.0.0.10".parse().unwrap(),
        proto: IPPROTO_TCP,
        sport,
        dport: 80,
    }
}

fn v6(sport: u16) -> Match {
    Match {
        src: "2001:db8::10".parse().unwrap(),
        dst: "2001:db8:f::10".parse().unwrap(),
        proto: IPPROTO_UDP,
        sport,
        dport: 53,
    }
}

fn rid(prio: u16, handle: u32, v6: bool) -> RuleId {
    RuleId {
        ifindex: IFINDEX,
        chain: 0,
        prio,
        handle,
        v6,
    }
}

fn filter_of(bytes: &[u8]) -> TcMessage {
    let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes).expect("parses");
    match msg.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewTrafficFilter(tc)) => tc,
        p => panic!("not a filter: {p:?}"),
    }
}

/// What the kernel lists for a filter created by `request`: the same keys and action, the
/// flags with `in_hw`, the hardware count and the action's statistics, in a multi-part
/// dump message (emitted by netlink-packet-route).
fn kernel_listing(request: &[u8], packets: u32, edit: impl FnOnce(&mut TcMessage)) -> Vec<u8> {
    let mut tc = filter_of(request);
    for attr in tc.attributes.iter_mut() {
        let TcAttribute::Options(opts) = attr else {
            continue;
        };
        for o in opts.iter_mut() {
            match o {
                TcOption::Flower(TcFilterFlowerOption::Flags(f)) => *f |= TCA_CLS_FLAGS_IN_HW,
                TcOption::Flower(TcFilterFlowerOption::Actions(actions)) => {
                    for a in actions.iter_mut() {
                        let mut basic = TcStatsBasic::default();
                        basic.packets = packets;
                        basic.bytes = packets as u64 * 100;
                        a.attributes
                            .push(TcActionAttribute::Stats(vec![TcStats2::Basic(basic)]));
                    }
                }
                _ => {}
            }
        }
        opts.push(TcOption::Flower(TcFilterFlowerOption::InHwCount(1)));
    }
    edit(&mut tc);
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_MULTIPART;
    let mut msg = NetlinkMessage::new(
        header,
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewTrafficFilter(tc)),
    );
    msg.finalize();
    let mut out = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut out);
    out
}

fn strip_cookie(tc: &mut TcMessage) {
    for_actions(tc, |a| {
        a.retain(|x| !matches!(x, TcActionAttribute::Cookie(_)));
    });
}

fn for_actions(tc: &mut TcMessage, mut f: impl FnMut(&mut Vec<TcActionAttribute>)) {
    for attr in tc.attributes.iter_mut() {
        if let TcAttribute::Options(opts) = attr {
            for o in opts.iter_mut() {
                if let TcOption::Flower(TcFilterFlowerOption::Actions(actions)) = o {
                    for a in actions.iter_mut() {
                        f(&mut a.attributes);
                    }
                }
            }
        }
    }
}

/// The fake kernel's state: filters by (prio, handle) as it would list them, what was
/// asked, and the errors to answer with.
#[derive(Default)]
struct KernelState {
    filters: BTreeMap<(u16, u32), Vec<u8>>,
    deleted: Vec<(u16, u32)>,
    /// Datagrams of installs received (requests per datagram).
    datagrams: Vec<usize>,
    installs_seen: usize,
    /// Install number (1-based, over the whole test) -> errno to answer.
    inject: HashMap<usize, i32>,
    /// The next batch gets no complete answer.
    lose_next_batch: bool,
}

#[derive(Clone, Default)]
struct FakeKernel(Arc<Mutex<KernelState>>);

impl FakeKernel {
    fn state(&self) -> std::sync::MutexGuard<'_, KernelState> {
        self.0.lock().unwrap()
    }
    fn with(&self, prio: u16, handle: u32, listing: Vec<u8>) -> &Self {
        self.state().filters.insert((prio, handle), listing);
        self
    }
}

fn header_of(msg: &[u8]) -> (u16, u32, u16) {
    let kind = u16::from_ne_bytes([msg[4], msg[5]]);
    let handle = u32::from_ne_bytes(msg[24..28].try_into().unwrap());
    let info = u32::from_ne_bytes(msg[32..36].try_into().unwrap());
    (kind, handle, (info >> 16) as u16)
}

impl TcTransport for FakeKernel {
    fn next_seq(&mut self) -> u32 {
        static SEQ: AtomicU64 = AtomicU64::new(1);
        SEQ.fetch_add(1, Ordering::Relaxed) as u32
    }

    fn request(&mut self, seq: u32, msg: &[u8]) -> Result<(), TcError> {
        let (kind, handle, prio) = header_of(msg);
        if kind == flower::RTM_NEWTFILTER {
            return self
                .batch(&[(seq, msg.to_vec())])?
                .pop()
                .expect("one answer");
        }
        assert_eq!(kind, flower::RTM_DELTFILTER, "unexpected request {kind}");
        let mut st = self.state();
        st.deleted.push((prio, handle));
        match st.filters.remove(&(prio, handle)) {
            Some(_) => Ok(()),
            None => Err(TcError {
                errno: libc::ENOENT,
                message: None,
            }),
        }
    }

    fn batch(&mut self, msgs: &[(u32, Vec<u8>)]) -> Result<Vec<Result<(), TcError>>, TcError> {
        let mut st = self.state();
        st.datagrams.push(msgs.len());
        let lose = std::mem::take(&mut st.lose_next_batch);
        let mut out = Vec::new();
        for (_, m) in msgs {
            let (kind, handle, prio) = header_of(m);
            assert_eq!(kind, flower::RTM_NEWTFILTER);
            st.installs_seen += 1;
            let n = st.installs_seen;
            if let Some(&errno) = st.inject.get(&n) {
                out.push(Err(TcError {
                    errno,
                    message: Some(format!("injected for install {n}")),
                }));
                continue;
            }
            if st.filters.contains_key(&(prio, handle)) {
                out.push(Err(TcError {
                    errno: libc::EEXIST,
                    message: None,
                }));
                continue;
            }
            st.filters
                .insert((prio, handle), kernel_listing(m, 0, |_| {}));
            out.push(Ok(()));
        }
        if lose {
            return Err(TcError {
                errno: libc::ENOBUFS,
                message: Some("acks lost".into()),
            });
        }
        Ok(out)
    }

    fn dump(&mut self, _seq: u32, msg: &[u8]) -> Result<Vec<Vec<u8>>, TcError> {
        let (kind, _, prio) = header_of(msg);
        assert_eq!(kind, flower::RTM_GETTFILTER);
        Ok(self
            .state()
            .filters
            .iter()
            .filter(|((p, _), _)| *p == prio)
            .map(|(_, m)| m.clone())
            .collect())
    }
}

fn test_clock() -> (Arc<AtomicU64>, Box<dyn Fn() -> Instant + Send>) {
    let base = Instant::now();
    let ms = Arc::new(AtomicU64::new(0));
    let m = ms.clone();
    (
        ms,
        Box::new(move || base + Duration::from_millis(m.load(Ordering::Relaxed))),
    )
}

fn open(kernel: &FakeKernel, live: &dyn Fn(u32) -> bool) -> (Mellanox, Adoption) {
    Mellanox::with_transport(Box::new(kernel.clone()), IFINDEX, live, test_clock().1)
        .expect("adoption")
}

fn add(id: &RuleId, m: &Match, mark: u32) -> Vec<u8> {
    flower::add_rule(1, id, m, mark).unwrap()
}

/// A previous agent's rules whose marks the pinned map still has are adopted with their
/// flows, marks and handles; marklb's stale, duplicate or malformed rules are deleted; rules
/// without the owner cookie and rules outside marklb's priorities are never touched.
#[test]
fn a_restarted_backend_adopts_live_rules_and_deletes_only_its_stale_ones() {
    let k = FakeKernel::default();
    // prio 1 (IPv4): A live, B stale mark, C a second rule for A's flow, D foreign (no
    // cookie) carrying a live mark, G ours without a mark action.
    k.with(1, 3, kernel_listing(&add(&rid(1, 3, false), &v4(1000), 10), 7, |_| {}))
        .with(1, 4, kernel_listing(&add(&rid(1, 4, false), &v4(1001), 11), 0, |_| {}))
        .with(1, 5, kernel_listing(&add(&rid(1, 5, false), &v4(1000), 12), 0, |_| {}))
        .with(
            1,
            9,
            kernel_listing(&add(&rid(1, 9, false), &v4(2000), 10), 0, strip_cookie),
        )
        .with(
            1,
            6,
            kernel_listing(&add(&rid(1, 6, false), &v4(1002), 14), 0, |tc| {
                for_actions(tc, |a| {
                    for x in a.iter_mut() {
                        if let TcActionAttribute::Options(o) = x {
                            o.retain(|o| !matches!(o, TcActionOption::Other(n) if netlink_packet_core::Nla::kind(n) & 0x3fff == 5));
                        }
                    }
                })
            }),
        )
        // prio 2 (IPv6): E live.
        .with(2, 2, kernel_listing(&add(&rid(2, 2, true), &v6(5353), 13), 3, |_| {}))
        // prio 7: ours by cookie but not in marklb's priorities (never dumped, never touched).
        .with(7, 1, kernel_listing(&add(&rid(7, 1, false), &v4(3000), 11), 0, |_| {}));
    let live: HashSet<u32> = [10, 12, 13].into();
    let (mut nic, adoption) = open(&k, &|m| live.contains(&m));
    println!("adoption: {adoption:?}");
    assert_eq!(
        adoption,
        Adoption {
            kept: 2,
            deleted: 3,
            foreign: 1,
            delete_failed: 0
        }
    );
    let mut deleted = k.state().deleted.clone();
    deleted.sort();
    assert_eq!(
        deleted,
        vec![(1, 4), (1, 5), (1, 6)],
        "deleted B, C, G only"
    );
    let left: Vec<(u16, u32)> = k.state().filters.keys().copied().collect();
    assert_eq!(left, vec![(1, 3), (1, 9), (2, 2), (7, 1)]);

    let mut rules = nic.rules().unwrap();
    rules.sort_by_key(|(_, m)| *m);
    assert_eq!(
        rules,
        vec![(flow_key(&v4(1000)), 10), (flow_key(&v6(5353)), 13)]
    );
    // Hit counts come from the dump of adopted rules (aging goes on where it was).
    let hits = nic.hits().unwrap();
    assert_eq!(hits.get(&flow_key(&v4(1000))), Some(&7));
    assert_eq!(hits.get(&flow_key(&v6(5353))), Some(&3));
    assert_eq!(
        hits.len(),
        2,
        "the foreign rule's count is not ours: {hits:?}"
    );

    // A new rule takes a handle no filter of the priority uses (the foreign one included).
    nic.install(&flow_key(&v4(4000)), 20).unwrap();
    let (_, id, _) = nic
        .installed()
        .find(|(f, _, _)| **f == flow_key(&v4(4000)))
        .unwrap();
    assert!(id.handle > 9, "handle {} collides", id.handle);
    // Removing an adopted rule deletes it by its own handle.
    nic.remove(&flow_key(&v4(1000))).unwrap();
    assert!(!k.state().filters.contains_key(&(1, 3)));
}

/// With nothing pinned (a fresh start or `cleanup`), every rule marklb owns goes and the
/// others stay.
#[test]
fn without_pinned_marks_only_the_owned_rules_go() {
    let k = FakeKernel::default();
    k.with(
        1,
        1,
        kernel_listing(&add(&rid(1, 1, false), &v4(1), 1), 0, |_| {}),
    )
    .with(
        1,
        2,
        kernel_listing(&add(&rid(1, 2, false), &v4(2), 2), 0, strip_cookie),
    )
    .with(
        2,
        1,
        kernel_listing(&add(&rid(2, 1, true), &v6(1), 3), 0, |_| {}),
    );
    let (mut nic, adoption) = open(&k, &|_| false);
    assert_eq!(
        (adoption.kept, adoption.deleted, adoption.foreign),
        (0, 2, 1)
    );
    assert!(nic.rules().unwrap().is_empty());
    assert_eq!(
        k.state().filters.keys().copied().collect::<Vec<_>>(),
        vec![(1, 2)]
    );
}

/// A dump message is read back field by field: the match, the mark, the owner cookie, the
/// flags with `in_hw`, the packets.
#[test]
fn a_kernel_listing_parses_to_the_rule_it_came_from() {
    let req = add(&rid(2, 7, true), &v6(5353), 65_535);
    let f = parse_filter(&kernel_listing(&req, 42, |_| {})).unwrap();
    println!("{f:?}");
    assert_eq!((f.chain, f.prio, f.handle, f.v6), (0, 2, 7, true));
    assert_eq!(f.kind, "flower");
    assert!(f.owned);
    assert_eq!(f.matched, Some(v6(5353)));
    assert_eq!(f.mark, Some(65_535));
    assert_eq!(f.flags, flower::TCA_CLS_FLAGS_SKIP_SW | TCA_CLS_FLAGS_IN_HW);
    assert_eq!(f.packets, 42);
    let foreign = parse_filter(&kernel_listing(&req, 0, strip_cookie)).unwrap();
    assert!(!foreign.owned);
    // A listing that is not a filter is a clear error, not a rule.
    let mut not_filter = req.clone();
    not_filter[4..6].copy_from_slice(&36u16.to_ne_bytes()); // RTM_NEWQDISC
    assert!(parse_filter(&not_filter).is_err());
}

fn flows(n: u16) -> Vec<FlowKey> {
    (0..n).map(|i| flow_key(&v4(10_000 + i))).collect()
}

/// Installs between begin_batch and end_batch go out as one datagram of several requests
/// (at most MAX_BATCH each); the kernel's error for one request fails that rule only, by
/// reason; table full and unsupported start a backoff during which nothing is sent; no
/// rule is lost or left half-known.
#[test]
fn batched_installs_handle_the_kernels_error_per_message() {
    let k = FakeKernel::default();
    let (ms, clock) = test_clock();
    let (mut nic, _) =
        Mellanox::with_transport(Box::new(k.clone()), IFINDEX, &|_| false, clock).unwrap();
    nic.set_backoff(Backoff::new(
        Duration::from_millis(100),
        Duration::from_secs(30),
    ));
    k.state().inject = [(3, libc::ENOSPC), (5, libc::EOPNOTSUPP), (8, libc::EINVAL)].into();

    let fl = flows(10);
    nic.begin_batch();
    for (i, f) in fl.iter().enumerate() {
        nic.install(f, 1 + i as u32).expect("queued");
    }
    assert!(
        k.state().datagrams.is_empty(),
        "nothing sent before end_batch"
    );
    let failed = nic.end_batch();
    println!("datagrams {:?}, failed {failed:?}", k.state().datagrams);
    assert_eq!(k.state().datagrams, vec![10], "one datagram, ten requests");
    let failed_flows: Vec<FlowKey> = failed.iter().map(|(f, _)| *f).collect();
    assert_eq!(failed_flows, vec![fl[2], fl[4], fl[7]]);
    assert!(matches!(failed[0].1, HwBackendError::Full));
    assert!(
        matches!(&failed[1].1, HwBackendError::Device(t) if t.contains("unsupported")),
        "{:?}",
        failed[1].1
    );
    let installed: HashSet<FlowKey> = nic.rules().unwrap().into_iter().map(|(f, _)| f).collect();
    assert_eq!(installed.len(), 7);
    assert!(failed_flows.iter().all(|f| !installed.contains(f)));
    assert_eq!(k.state().filters.len(), 7, "device and backend agree");
    let c = nic.counts().clone();
    assert_eq!(c.installed, 7);
    assert_eq!(c.rejected_for(Rejection::TableFull), 1);
    assert_eq!(c.rejected_for(Rejection::Unsupported), 2);

    // Backing off: refused without a request, counted.
    let sent = k.state().installs_seen;
    let f = flow_key(&v4(20_000));
    let e = nic.install(&f, 100).unwrap_err();
    println!("during backoff: {e}");
    assert_eq!(
        k.state().installs_seen,
        sent,
        "no request while backing off"
    );
    assert_eq!(nic.counts().rejected_for(Rejection::Backoff), 1);
    // Three refusals in a row doubled the delay twice from 100 ms: 400 ms now.
    ms.store(399, Ordering::Relaxed);
    assert!(nic.install(&f, 100).is_err());
    ms.store(400, Ordering::Relaxed);
    nic.install(&f, 100).expect("installed after the backoff");
    assert_eq!(k.state().installs_seen, sent + 1);
    // A success resets the delay: the next refusal waits 100 ms again.
    k.state().inject.insert(sent + 2, libc::ENOMEM);
    let g = flow_key(&v4(20_001));
    assert!(matches!(nic.install(&g, 101), Err(HwBackendError::Full)));
    ms.store(499, Ordering::Relaxed);
    assert!(nic.install(&g, 101).is_err());
    ms.store(500, Ordering::Relaxed);
    nic.install(&g, 101).unwrap();
}

/// More than MAX_BATCH queued installs go in several datagrams; a flow removed or
/// re-installed before the batch is sent is sent once, with its last mark.
#[test]
fn large_batches_split_and_queued_changes_collapse() {
    let k = FakeKernel::default();
    let (mut nic, _) = open(&k, &|_| false);
    let fl = flows(150);
    nic.begin_batch();
    for (i, f) in fl.iter().enumerate() {
        nic.install(f, 1 + i as u32).unwrap();
    }
    nic.remove(&fl[149]).unwrap();
    nic.install(&fl[148], 5000).unwrap();
    assert!(nic.end_batch().is_empty());
    let datagrams = k.state().datagrams.clone();
    println!("datagrams: {datagrams:?}");
    assert_eq!(
        datagrams,
        vec![MAX_BATCH, MAX_BATCH, 150 - 2 * MAX_BATCH - 1]
    );
    let rules: HashMap<FlowKey, u32> = nic.rules().unwrap().into_iter().collect();
    assert_eq!(rules.len(), 149);
    assert_eq!(rules[&fl[148]], 5000);
    assert!(!rules.contains_key(&fl[149]));
    assert_eq!(nic.counts().batches, 3);
}

/// A batch whose acks never all came: each rule of it is deleted to be sure and reported as
/// failed, so no mark stays on a rule the agent does not know.
#[test]
fn a_batch_without_a_complete_answer_is_undone() {
    let k = FakeKernel::default();
    let (mut nic, _) = open(&k, &|_| false);
    k.state().lose_next_batch = true;
    let fl = flows(4);
    nic.begin_batch();
    for (i, f) in fl.iter().enumerate() {
        nic.install(f, 1 + i as u32).unwrap();
    }
    let failed = nic.end_batch();
    assert_eq!(failed.len(), 4);
    assert!(nic.rules().unwrap().is_empty());
    assert!(
        k.state().filters.is_empty(),
        "the device holds none of them"
    );
    assert_eq!(k.state().deleted.len(), 4);
    assert_eq!(nic.counts().unknown, 4);
    assert_eq!(nic.counts().rejected_for(Rejection::Other), 4);
}

/// Rejections classify by errno as the README and the metric say.
#[test]
fn errnos_map_to_rejection_reasons() {
    for (e, r) in [
        (libc::ENOSPC, Rejection::TableFull),
        (libc::ENOMEM, Rejection::TableFull),
        (libc::E2BIG, Rejection::TableFull),
        (libc::EOPNOTSUPP, Rejection::Unsupported),
        (libc::EINVAL, Rejection::Unsupported),
        (libc::EPERM, Rejection::Other),
    ] {
        assert_eq!(Rejection::of_errno(e), r, "errno {e}");
    }
}

// ---- devlink ----

/// DEVLINK_CMD_ESWITCH_GET for pci/0000:03:00.0, laid out by hand from the uapi headers
/// (this kernel has no devlink family, so `devlink dev eswitch show` sends nothing to
/// capture): nlmsghdr, genlmsghdr {cmd 29, version 1}, DEVLINK_ATTR_BUS_NAME "pci",
/// DEVLINK_ATTR_DEV_NAME "0000:03:00.0".
#[test]
fn the_eswitch_request_is_the_uapi_layout() {
    let ours = devlink::eswitch_get_request(0x1234, 0x15, "pci", "0000:03:00.0");
    let mut want = Vec::new();
    want.extend_from_slice(&48u32.to_ne_bytes());
    want.extend_from_slice(&0x15u16.to_ne_bytes());
    want.extend_from_slice(&(1u16 | 4).to_ne_bytes()); // NLM_F_REQUEST | NLM_F_ACK
    want.extend_from_slice(&0x1234u32.to_ne_bytes());
    want.extend_from_slice(&0u32.to_ne_bytes());
    want.extend_from_slice(&[29, 1, 0, 0]);
    want.extend_from_slice(&8u16.to_ne_bytes());
    want.extend_from_slice(&1u16.to_ne_bytes());
    want.extend_from_slice(b"pci\0");
    want.extend_from_slice(&17u16.to_ne_bytes());
    want.extend_from_slice(&2u16.to_ne_bytes());
    want.extend_from_slice(b"0000:03:00.0\0\0\0\0");
    assert_eq!(ours, want, "\nours {ours:02x?}\nwant {want:02x?}");

    // The family lookup is CTRL_CMD_GETFAMILY "devlink" to the controller (id 0x10), as
    // `devlink` sends it (captured: 20 00 00 00 10 00 05 00 ... 03 01 00 00 0c 00 02 00
    // "devlink\0"), except the controller version: netlink-packet-generic sends 2 where
    // iproute2 sends 1 (the kernel's controller ignores it).
    let mut fam = devlink::family_request(0x6b102261);
    assert_eq!(fam[17], 2);
    fam[17] = 1;
    assert_eq!(
        fam,
        [
            0x20, 0, 0, 0, 0x10, 0, 0x05, 0, 0x61, 0x22, 0x10, 0x6b, 0, 0, 0, 0, 3, 1, 0, 0, 0x0c,
            0, 2, 0, b'd', b'e', b'v', b'l', b'i', b'n', b'k', 0
        ]
    );
}

/// A reply as the kernel builds it (devlink_nl_eswitch_fill: handle, mode u16, inline mode
/// u8, encap mode u8), hand-built.
fn eswitch_reply(mode: u16) -> Vec<u8> {
    let mut attrs = Vec::new();
    let mut attr = |kind: u16, v: &[u8]| {
        attrs.extend_from_slice(&((4 + v.len()) as u16).to_ne_bytes());
        attrs.extend_from_slice(&kind.to_ne_bytes());
        attrs.extend_from_slice(v);
        attrs.resize(attrs.len().next_multiple_of(4), 0);
    };
    attr(1, b"pci\0");
    attr(2, b"0000:03:00.0\0");
    attr(25, &mode.to_ne_bytes());
    attr(26, &[0]);
    attr(62, &[1]);
    let mut m = Vec::new();
    m.extend_from_slice(&((20 + attrs.len()) as u32).to_ne_bytes());
    m.extend_from_slice(&0x15u16.to_ne_bytes());
    m.extend_from_slice(&0u16.to_ne_bytes());
    m.extend_from_slice(&9u32.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[29, 1, 0, 0]);
    m.extend_from_slice(&attrs);
    m
}

#[test]
fn eswitch_replies_parse_to_the_mode() {
    assert_eq!(
        devlink::parse_eswitch_reply(&eswitch_reply(0)),
        Ok(devlink::EswitchMode::Legacy)
    );
    assert_eq!(
        devlink::parse_eswitch_reply(&eswitch_reply(1)),
        Ok(devlink::EswitchMode::Switchdev)
    );
    assert_eq!(
        devlink::parse_eswitch_reply(&eswitch_reply(7)),
        Ok(devlink::EswitchMode::Other(7))
    );
    let mut truncated = eswitch_reply(0);
    truncated.truncate(28); // headers and the bus name only
    truncated[..4].copy_from_slice(&28u32.to_ne_bytes());
    let e = devlink::parse_eswitch_reply(&truncated).unwrap_err();
    assert!(e.contains("no eswitch mode"), "{e}");
    // The controller's answer to the family lookup.
    let mut fam = vec![0u8; 16];
    fam.extend_from_slice(&[1, 2, 0, 0]); // CTRL_CMD_NEWFAMILY
    fam.extend_from_slice(&6u16.to_ne_bytes());
    fam.extend_from_slice(&1u16.to_ne_bytes()); // CTRL_ATTR_FAMILY_ID
    fam.extend_from_slice(&0x15u16.to_ne_bytes());
    fam.extend_from_slice(&[0, 0]);
    let len = fam.len() as u32;
    fam[..4].copy_from_slice(&len.to_ne_bytes());
    fam[4..6].copy_from_slice(&0x10u16.to_ne_bytes());
    assert_eq!(devlink::parse_family_reply(&fam), Ok(0x15));
}

#[test]
fn devlink_handles_come_from_the_bus_address() {
    assert_eq!(
        devlink::handle_of("0000:03:00.0"),
        Some(("pci", "0000:03:00.0".to_string()))
    );
    assert_eq!(
        devlink::handle_of("mlx5_core.sf.2"),
        Some(("auxiliary", "mlx5_core.sf.2".to_string()))
    );
    assert_eq!(devlink::handle_of(""), None);
    assert_eq!(devlink::handle_of("N/A"), None);
    // This kernel: an absent device (or no devlink family at all) is a clear error.
    let e = devlink::eswitch_mode("pci", "0000:ff:1f.7").unwrap_err();
    println!("devlink on this kernel: {e}");
    assert!(!e.is_empty());
}

// ---- with the mark manager and a real datapath ----

mod with_datapath {
    use std::{collections::BTreeMap, net::IpAddr, time::Duration};

    use marklb_agent::{
        apply,
        datapath::{Datapath, LoadOptions, Prog, testrun::XDP_TX},
        desired::{Desired, MarkPolicy, NextHop, NodeSettings, Owner, VipPlan},
        maglev::Backend,
        marks::MarkManager,
        model::DatapathModel,
        packet::FrameSpec,
        plan,
        vip::VipId,
    };
    use marklb_common::NewFlowEvent;
    use marklb_crds::loadbalancer::MarkScope;
    use marklb_tests::datapath_fixture::require_root_bpf;

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    fn desired() -> Desired {
        let mut vips = BTreeMap::new();
        vips.insert(
            VipId::tcp(ip("10.99.0.1"), 80),
            VipPlan {
                label: "web".into(),
                backends: ["10.201.1.2", "10.201.2.2"]
                    .iter()
                    .map(|r| Backend {
                        addr: ip(r),
                        weight: 1,
                    })
                    .collect(),
                table_size: 1_009,
                owner: Owner::new("test", "lb"),
            },
        );
        Desired {
            vips,
            settings: NodeSettings {
                interface: None,
                next_hop: NextHop::default(),
                marks: MarkPolicy {
                    scope: MarkScope::PerFlow,
                    capacity: 1_000,
                    idle_timeout: Duration::from_secs(60),
                },
                mtu: 1500,
                icmp_too_big: true,
                icmp_echo: true,
                encap_src_v4_be: u32::from_be_bytes([172, 16, 0, 0]).to_be(),
                encap_src_v6_be: [0; 4],
                udp_packets_before_mark: marklb_common::DEFAULT_UDP_EVENT_PACKETS,
            },
        }
    }

    fn forward(dp: &mut Datapath, frame: &FrameSpec) -> IpAddr {
        let r = dp
            .test_run(Prog::Balancer, &frame.build(), None)
            .expect("test run");
        assert_eq!(r.action, XDP_TX, "not forwarded");
        IpAddr::from(<[u8; 4]>::try_from(&r.frame[30..34]).expect("outer daddr"))
    }

    /// A batch of new-flow events whose rules the NIC partly refuses (table full): the
    /// refused flow's mark is released (its map entry cleared, counted as an install
    /// failure), its packets keep going to the same real on the software path, and once the
    /// backoff is over a later event for it gets its rule.
    #[test]
    fn refused_rules_leave_their_flows_on_the_software_path() {
        require_root_bpf();
        let want = desired();
        let mut dp = Datapath::load(&LoadOptions {
            ring_capacity: 1 << 16,
            conn_table_size: 1 << 12,
            nic_flows: 1 << 10,
            pin_dir: None,
        })
        .expect("load datapath");
        dp.set_config(&want.lb_config([2, 0, 0, 0, 0, 0xfe]))
            .expect("config");
        let mut lb = DatapathModel::new(&dp);
        let k = FakeKernel::default();
        k.state().inject = [(2, libc::ENOSPC)].into();
        let (ms, clock) = test_clock();
        let (nic, _) =
            Mellanox::with_transport(Box::new(k.clone()), IFINDEX, &|_| false, clock).unwrap();
        let mut marks = MarkManager::new(Box::new(nic), want.settings.marks);
        plan::check_capacity(&lb, &want).expect("fits");
        apply::apply(&mut dp, &mut lb, &mut marks, &want).expect("apply");

        let mut events = Vec::new();
        let mut reals = Vec::new();
        for port in [40_001u16, 40_002, 40_003] {
            let syn = FrameSpec::tcp(ip("192.0.2.7"), port, ip("10.99.0.1"), 80, true);
            reals.push(forward(&mut dp, &syn));
            let flow = syn.flow();
            let conn = dp.conn(&flow).expect("learned");
            events.push(NewFlowEvent {
                flow,
                vip_id: u32::from(conn.vip_id),
                real_id: conn.real_id,
                real_gen: conn.real_gen,
                check: 0,
                ts_ns: 0,
            });
        }
        marks.begin_batch();
        for ev in &events {
            marks.on_event(&mut dp, ev);
        }
        let refused = marks.end_batch(&mut dp);
        println!(
            "refused {refused}, stats {:?}, datagrams {:?}",
            marks.stats,
            k.state().datagrams
        );
        assert_eq!(refused, 1);
        assert_eq!(k.state().datagrams, vec![3], "one datagram for the batch");
        assert_eq!(marks.stats.installed, 2);
        assert_eq!(marks.stats.install_failures, 1);
        assert_eq!(marks.in_use(), 2);
        assert_eq!(marks.rules(), 2);
        // Every mark the device holds is live in the map; no other mark is.
        let device_marks: Vec<u32> = k
            .state()
            .filters
            .values()
            .map(|m| parse_filter(m).unwrap().mark.unwrap())
            .collect();
        for m in 1..=3u32 {
            let live = dp.mark(m).unwrap().real_id != 0;
            assert_eq!(
                live,
                device_marks.contains(&m),
                "mark {m}: {device_marks:?}"
            );
        }
        // The refused flow still reaches its real (normal path, connection table).
        let refused_flow = FrameSpec::tcp(ip("192.0.2.7"), 40_002, ip("10.99.0.1"), 80, false);
        assert_eq!(forward(&mut dp, &refused_flow), reals[1]);

        // Backing off: a second chance right away is refused without a request...
        let seen = k.state().installs_seen;
        marks.begin_batch();
        marks.on_event(&mut dp, &events[1]);
        assert_eq!(marks.end_batch(&mut dp), 0);
        assert_eq!(
            k.state().installs_seen,
            seen,
            "nothing sent while backing off"
        );
        assert_eq!(marks.stats.install_failures, 2);
        // ...and after it, the flow earns its rule.
        ms.store(10_000, Ordering::Relaxed);
        marks.begin_batch();
        marks.on_event(&mut dp, &events[1]);
        assert_eq!(marks.end_batch(&mut dp), 0);
        assert_eq!(marks.rules(), 3);
        assert_eq!(k.state().filters.len(), 3);
    }
}

/// A kernel that acks every request at once: what remains is the backend's own cost.
struct AckingKernel(u32);

impl TcTransport for AckingKernel {
    fn next_seq(&mut self) -> u32 {
        self.0 = self.0.wrapping_add(1);
        self.0
    }
    fn request(&mut self, _: u32, _: &[u8]) -> Result<(), TcError> {
        Ok(())
    }
    fn batch(&mut self, msgs: &[(u32, Vec<u8>)]) -> Result<Vec<Result<(), TcError>>, TcError> {
        let datagram: Vec<u8> = msgs.iter().flat_map(|(_, m)| m.iter().copied()).collect();
        std::hint::black_box(&datagram);
        Ok(msgs.iter().map(|_| Ok(())).collect())
    }
    fn dump(&mut self, _: u32, _: &[u8]) -> Result<Vec<Vec<u8>>, TcError> {
        Ok(Vec::new())
    }
}

/// A whole 16-bit table of rules goes through the backend path (handle, encoding, batching
/// into datagrams, bookkeeping) in full datagrams; the rate is printed (the release figure is
/// `marklb-agent bench --control-plane`'s: speed is a benchmark's business, not a test's).
#[test]
fn a_full_table_of_rules_goes_out_in_full_datagrams() {
    let (mut nic, _) = Mellanox::with_transport(
        Box::new(AckingKernel(0)),
        IFINDEX,
        &|_| false,
        Box::new(Instant::now),
    )
    .unwrap();
    let n = 65_535u32;
    let t = Instant::now();
    let mut i = 0u32;
    while i < n {
        nic.begin_batch();
        for _ in 0..256 {
            if i == n {
                break;
            }
            let f = flow_key(&Match {
                sport: (i & 0xffff) as u16,
                dport: 80 + (i >> 16) as u16,
                ..v4(0)
            });
            nic.install(&f, 1 + i).unwrap();
            i += 1;
        }
        assert!(nic.end_batch().is_empty());
    }
    let per_s = n as f64 / t.elapsed().as_secs_f64();
    println!(
        "{n} rules through the mellanox backend in {:?}: {per_s:.0} rules/s ({} datagrams)",
        t.elapsed(),
        nic.counts().batches
    );
    assert_eq!(nic.counts().installed, n as u64);
    assert_eq!(nic.counts().batches, n.div_ceil(MAX_BATCH as u32) as u64);
}

/// A dump message netlink-packet-route cannot read is never judged ours: it stays, and its
/// handle is not handed to a new rule.
#[test]
fn an_unreadable_listing_is_left_alone_and_its_handle_kept() {
    let k = FakeKernel::default();
    let mut garbled = kernel_listing(&add(&rid(1, 40, false), &v4(1), 1), 0, |_| {});
    // Break the TCA_OPTIONS nest's length so the attributes cannot be parsed.
    let len = garbled.len();
    garbled[len - 4..].copy_from_slice(&[0xff, 0xff, 0xff, 0xff]);
    let at = 36 + 8 + 12; // chain, kind: the options nest's length
    garbled[at..at + 2].copy_from_slice(&0xfff0u16.to_ne_bytes());
    assert!(parse_filter(&garbled).is_err(), "still parses");
    k.with(1, 40, garbled);
    let (mut nic, adoption) = open(&k, &|_| true);
    assert_eq!(
        (adoption.kept, adoption.deleted, adoption.foreign),
        (0, 0, 1)
    );
    nic.install(&flow_key(&v4(2)), 2).unwrap();
    let (_, id, _) = nic.installed().next().unwrap();
    assert!(id.handle > 40, "handle {} reused", id.handle);
    assert!(k.state().deleted.is_empty());
}
