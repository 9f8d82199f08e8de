//! The VIP address sets (`marklb_common::addr_set`): the first question the datapath asks
//! of a packet, "is its destination a VIP address?", answered from `VIP_ADDR_SETS`, with
//! the `VIP_ADDRS` hash map behind a set that spilled. What the answer changes is visible
//! at the datapath: a packet with IPv4 options is dropped for a VIP address and passed for
//! any other, and only a VIP address's packets are balanced.

use std::net::IpAddr;

use aya::maps::{Array, MapData};
use marklb_agent::{
    datapath::{
        LoadOptions, Prog,
        testrun::{XDP_PASS, XDP_TX},
    },
    vip::VipId,
};
use marklb_common::{ADDR_WAYS, AddrSet, Counter, addr_set_of, addr_words, map_names as n};
use marklb_tests::{datapath_fixture::*, pins::Bpffs};

/// `n` IPv4 addresses of 10.77.0.0/16 that share one address set.
fn colliding(n: usize) -> Vec<IpAddr> {
    let words = |a: u32| addr_words(IpAddr::from(a.to_be_bytes()));
    let first = 0x0a4d_0001u32;
    let set = addr_set_of(&words(first));
    (first..0x0a4e_0000)
        .filter(|a| addr_set_of(&words(*a)) == set)
        .take(n)
        .map(|a| IpAddr::from(a.to_be_bytes()))
        .collect()
}

/// Asserts the datapath treats `addr` as a VIP address serving TCP 80 (a SYN is balanced to
/// the model's real, a packet with options dropped), or as another host's.
fn assert_ours(fx: &mut Fixture, addr: IpAddr, ours: bool) {
    let syn = tcp(client4(), 4000, addr, 80, true);
    let options = with_ipv4_options(&syn, 2);
    if ours {
        let flow = parse_l3l4(&syn).expect("frame parses").flow();
        let real = fx.model_real(&flow);
        fx.run_case(&Case::forward(
            format!("SYN to VIP {addr}"),
            syn,
            real,
            Counter::NewFlow,
        ));
        fx.run_case(&Case::drop(
            format!("IP options to VIP {addr}"),
            options,
            Counter::DropIpOptions,
        ));
    } else {
        fx.run_case(&Case::pass(
            format!("SYN to {addr}"),
            syn,
            Counter::PassNotVip,
        ));
        fx.run_case(&Case::pass(
            format!("IP options to {addr}"),
            options,
            Counter::PassNotVip,
        ));
    }
}

fn set_of(fx: &Fixture, addr: IpAddr) -> AddrSet {
    fx.dp
        .vip_addr_set(&addr_words(addr))
        .expect("the address set")
}

#[test]
fn addresses_beyond_a_sets_ways_spill_to_the_hash_map_and_come_back() {
    let mut fx = Fixture::new();
    let addrs = colliding(ADDR_WAYS + 3);
    let (vips, bystander) = (&addrs[..ADDR_WAYS + 2], addrs[ADDR_WAYS + 2]);
    for a in vips {
        fx.update_vip(VipId::tcp(*a, 80), &backends(&reals4()[0..3]));
    }
    let set = set_of(&fx, vips[0]);
    assert_eq!(set.spill, 1, "{} addresses in {ADDR_WAYS} ways", vips.len());
    let in_ways = |s: &AddrSet, a: IpAddr| s.addrs.contains(&addr_words(a));
    assert!(vips[..ADDR_WAYS].iter().all(|a| in_ways(&set, *a)));
    // Spilled or not, every VIP address is ours; the set's other address is not.
    for a in vips {
        assert_ours(&mut fx, *a, true);
    }
    assert_ours(&mut fx, bystander, false);

    // Two addresses in the ways leave: both spilled ones take their ways, the third stays
    // where it was, and the spill clears.
    fx.remove_vip(&VipId::tcp(vips[0], 80));
    fx.remove_vip(&VipId::tcp(vips[2], 80));
    let after = set_of(&fx, vips[1]);
    assert_eq!(after.spill, 0);
    assert_eq!(
        after.addrs[1],
        addr_words(vips[1]),
        "an address that stays never moves"
    );
    for a in [vips[1], vips[3], vips[4]] {
        assert!(in_ways(&after, a), "{a} in the ways");
        assert_ours(&mut fx, a, true);
    }
    for a in [vips[0], vips[2], bystander] {
        assert_ours(&mut fx, a, false);
    }
}

#[test]
fn an_address_stays_ours_while_any_of_its_vips_does() {
    let mut fx = Fixture::new();
    let a = colliding(1)[0];
    fx.update_vip(VipId::tcp(a, 80), &backends(&reals4()[0..2]));
    fx.update_vip(VipId::udp(a, 53), &backends(&reals4()[0..2]));
    fx.remove_vip(&VipId::udp(a, 53));
    assert!(set_of(&fx, a).addrs.contains(&addr_words(a)));
    assert_ours(&mut fx, a, true);
    fx.remove_vip(&VipId::tcp(a, 80));
    assert_eq!(set_of(&fx, a), AddrSet::default(), "the set is empty again");
    assert_ours(&mut fx, a, false);
}

/// A load rebuilds the sets from the pinned `VIP_ADDRS`: after an upgrade from a tree
/// without them (no pin: a fresh, empty map) and over a pin whose sets say something else.
#[test]
fn a_load_rebuilds_the_sets_from_the_pinned_addresses() {
    let fs = Bpffs::mount();
    let dir = fs.pin_dir("agent");
    let opts = LoadOptions {
        ring_capacity: 1 << 16,
        conn_table_size: 1 << 12,
        pin_dir: Some(dir.clone()),
        ..Default::default()
    };
    let addrs = colliding(ADDR_WAYS + 2);
    let (vips, stale) = (&addrs[..ADDR_WAYS + 1], addrs[ADDR_WAYS + 1]);
    let mut fx = Fixture::with_load_options(test_config(), &opts);
    for a in vips {
        fx.update_vip(VipId::tcp(*a, 80), &backends(&reals4()[0..2]));
    }
    drop(fx);

    let syn_action = |fx: &mut Fixture, a: IpAddr| {
        fx.dp
            .test_run(Prog::Balancer, &tcp(client4(), 4000, a, 80, true), None)
            .expect("test run")
            .action
    };

    // An agent of a tree before the sets left none.
    std::fs::remove_file(dir.join(n::VIP_ADDR_SETS)).expect("remove the pin");
    let mut fx = Fixture::with_load_options(test_config(), &opts);
    // Which three take the ways follows the hash map's iteration order; the fourth spills.
    let rebuilt = set_of(&fx, vips[0]);
    let held = vips
        .iter()
        .filter(|a| rebuilt.addrs.contains(&addr_words(**a)))
        .count();
    assert_eq!(
        (held, rebuilt.spill),
        (ADDR_WAYS, 1),
        "rebuilt: {rebuilt:?}"
    );
    for a in vips {
        assert_eq!(syn_action(&mut fx, *a), XDP_TX, "{a} balanced");
    }
    drop(fx);

    // A pinned set that names an address without VIPs and lost the spill flag.
    let idx = addr_set_of(&addr_words(stale));
    {
        let map = MapData::from_pin(dir.join(n::VIP_ADDR_SETS)).expect("the pin");
        let mut sets: Array<MapData, AddrSet> =
            Array::try_from(aya::maps::Map::Array(map)).expect("an array");
        let mut wrong = AddrSet::default();
        wrong.addrs[0] = addr_words(stale);
        sets.set(idx, wrong, 0).expect("write the set");
    }
    let mut fx = Fixture::with_load_options(test_config(), &opts);
    let rebuilt = set_of(&fx, stale);
    assert!(!rebuilt.addrs.contains(&addr_words(stale)));
    assert_eq!(rebuilt.spill, 1);
    assert_eq!(syn_action(&mut fx, stale), XDP_PASS);
    for a in vips {
        assert_eq!(syn_action(&mut fx, *a), XDP_TX, "{a} balanced");
    }
}
