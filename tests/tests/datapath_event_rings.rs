//! The per-CPU event rings (`marklb_common::event`, `datapath/event_rings.rs`): a slot whose
//! contents do not match its check word is never delivered (a torn or half-written event
//! cannot give a flow the wrong real's mark); events not yet read survive a restart on the
//! pins; a full ring loses (and counts) the events beyond it and takes new ones once read.

use std::time::{Duration, Instant};

use aya::maps::{Array, Map, MapData};
use marklb_agent::datapath::{EventReader, LoadOptions};
use marklb_common::{
    CFG_F_EVENTS, Counter, EVENT_SLOTS_PER_CPU, FlowKey, LbConfig, NewFlowEvent, map_names as n,
};
use marklb_tests::{datapath_fixture::*, pins::Bpffs};

/// Events on, no rate limit.
fn events_config() -> LbConfig {
    let mut cfg = test_config();
    cfg.flags |= CFG_F_EVENTS;
    cfg
}

fn fixture(opts: &LoadOptions) -> Fixture {
    let mut fx = Fixture::with_load_options(events_config(), opts);
    fx.hook = Hook::Xdp;
    fx.add_standard_vips();
    fx
}

fn pinned_options(dir: &std::path::Path) -> LoadOptions {
    LoadOptions {
        ring_capacity: 1 << 18,
        conn_table_size: 1 << 14,
        pin_dir: Some(dir.to_path_buf()),
        ..Default::default()
    }
}

/// Opens client port `sport`'s flow to the IPv4 TCP VIP: its SYN, then the packet after
/// it, which raises the flow's event. Returns the flow.
fn raise(fx: &mut Fixture, sport: u16) -> FlowKey {
    let syn = tcp(client4(), sport, vip4(), 80, true);
    let flow = parse_l3l4(&syn).unwrap().flow();
    let real = fx.model_real(&flow);
    fx.run_case(&Case::forward("SYN", syn, real, Counter::NewFlow));
    let ack = tcp(client4(), sport, vip4(), 80, false);
    fx.run_case(&Case::forward("after the SYN", ack, real, Counter::ConnHit));
    flow
}

/// Every event the reader delivers until none is waiting and none has come for a few of its
/// grace periods.
fn drain_settled(reader: &mut EventReader) -> Vec<NewFlowEvent> {
    let mut got = Vec::new();
    let start = Instant::now();
    let mut quiet_since = start;
    // Quiet alone is not enough: on a loaded machine one sleep can outlast the window while
    // a slot still waits out its grace. Nothing waiting is (bounded, so a bug cannot hang).
    while quiet_since.elapsed() < Duration::from_millis(5)
        || (reader.waiting() > 0 && start.elapsed() < Duration::from_secs(5))
    {
        match reader.next_event() {
            Some(ev) => {
                got.push(ev);
                quiet_since = Instant::now();
            }
            None => std::thread::sleep(Duration::from_micros(200)),
        }
    }
    got
}

/// The flows of [`drain_settled`]'s events, in order.
fn drained_flows(reader: &mut EventReader) -> Vec<FlowKey> {
    drain_settled(reader).iter().map(|e| e.flow).collect()
}

#[test]
fn a_slot_changed_after_it_was_written_is_skipped_never_delivered() {
    pin_to_current_cpu();
    let fs = Bpffs::mount();
    let dir = fs.pin_dir("events");
    let mut fx = fixture(&pinned_options(&dir));
    let mut reader = fx.dp.take_events().expect("event reader");
    let flows: Vec<FlowKey> = (0..3).map(|i| raise(&mut fx, 4100 + i)).collect();

    // The middle event's real changed under its check, as a torn write would leave it.
    let mut slots: Array<MapData, NewFlowEvent> = Array::try_from(Map::Array(
        MapData::from_pin(dir.join(n::EVENT_SLOTS)).expect("the slots' pin"),
    ))
    .expect("an array");
    let index = (0..slots.len())
        .find(|&i| slots.get(&i, 0).is_ok_and(|e| e.flow == flows[1]))
        .expect("the middle flow's slot");
    let mut torn = slots.get(&index, 0).unwrap();
    torn.real_id ^= 1;
    slots.set(index, torn, 0).expect("writing the slot");

    let got = drain_settled(&mut reader);
    let delivered: Vec<FlowKey> = got.iter().map(|e| e.flow).collect();
    assert_eq!(delivered, vec![flows[0], flows[2]]);
    assert_eq!(reader.skipped(), 1);
    for ev in &got {
        let conn = fx.dp.conn(&ev.flow).expect("the flow is held");
        assert_eq!(
            (ev.real_id, ev.real_gen),
            (conn.real_id, conn.real_gen),
            "an event names the real its flow was given"
        );
    }
    assert_eq!(reader.waiting(), 0);
}

#[test]
fn events_not_yet_read_survive_a_restart_on_the_pins() {
    pin_to_current_cpu();
    let fs = Bpffs::mount();
    let dir = fs.pin_dir("events");
    let flows: Vec<FlowKey> = {
        let mut fx = fixture(&pinned_options(&dir));
        let mut reader = fx.dp.take_events().expect("event reader");
        let first = raise(&mut fx, 4200);
        assert_eq!(drained_flows(&mut reader), vec![first]);
        (1..4).map(|i| raise(&mut fx, 4200 + i)).collect()
        // The agent stops here with three events unread.
    };
    let mut fx = fixture(&pinned_options(&dir));
    let mut reader = fx.dp.take_events().expect("event reader");
    assert_eq!(reader.waiting(), 3);
    assert_eq!(drained_flows(&mut reader), flows);
    assert_eq!(reader.skipped(), 0);
}

#[test]
fn a_full_ring_loses_and_counts_what_is_beyond_it_and_takes_new_events_once_read() {
    pin_to_current_cpu();
    let mut fx = fixture(&LoadOptions {
        ring_capacity: 1 << 18,
        conn_table_size: 1 << 15,
        ..Default::default()
    });
    let mut reader = fx.dp.take_events().expect("event reader");
    let before = fx.counters();
    let extra = 5;
    let total = EVENT_SLOTS_PER_CPU as u16 + extra;
    for i in 0..total {
        raise(&mut fx, 10_000 + i);
    }
    let d = fx.counters().since(&before);
    assert_eq!(d.get(Counter::EventSent), EVENT_SLOTS_PER_CPU as u64);
    assert_eq!(d.get(Counter::EventLost), extra as u64);
    let got = drain_settled(&mut reader);
    assert_eq!(got.len(), EVENT_SLOTS_PER_CPU as usize);
    assert!(
        got.iter()
            .enumerate()
            .all(|(i, e)| u16::from_be(e.flow.sport_be) == 10_000 + i as u16),
        "the first events, in order"
    );
    let next = raise(&mut fx, 9_000);
    assert_eq!(drained_flows(&mut reader), vec![next]);
}
