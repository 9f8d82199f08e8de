//! Adopting pinned maps across a change of a map's definition (`datapath/pin_compat.rs`):
//! a pin whose type, key size, value size, flags or (for a map of fixed size) entry count
//! differ from the object's is replaced by a fresh map, and the balancer loads; a pin that
//! matches is adopted with its contents, a table sized at load time with its own size; a pin
//! that cannot be read is a clear error and nothing is removed.
//!
//! Each test mounts its own bpffs in a temporary directory (the machine may have none at
//! /sys/fs/bpf), so they run in parallel. The object's real definitions are taken from a
//! reference load, so the tests follow the object when a map changes.

use std::{collections::HashMap, path::Path, time::Instant};

use aya::maps::MapType;
use marklb_agent::datapath::{
    Datapath, DatapathError, LoadOptions, Prog,
    pin_compat::{self, Difference, MapDef},
};
use marklb_common::{LbConfig, RealDef, map_names as n};
use marklb_tests::pins::{Bpffs, create_map, pin_map, pinned};

const BPF_F_NO_COMMON_LRU: u32 = 1 << 1;
const BPF_F_MMAPABLE: u32 = 1 << 10;

fn opts(pin_dir: &Path, conn_table_size: u32) -> LoadOptions {
    LoadOptions {
        ring_capacity: 4096,
        conn_table_size,
        nic_flows: 1024,
        pin_dir: Some(pin_dir.to_path_buf()),
    }
}

/// Every map pinned by a fresh load of the object: its definitions as created.
fn reference_defs(fs: &Bpffs, conn_table_size: u32) -> HashMap<&'static str, MapDef> {
    let dir = fs.pin_dir("reference");
    drop(Datapath::load(&opts(&dir, conn_table_size)).expect("reference load"));
    Datapath::PINNED_MAPS
        .iter()
        .map(|name| (*name, pinned(&dir.join(name)).0))
        .collect()
}

/// The connection table's other generation: today's LRU hash of flow keys if the object
/// has the array of 256-byte sets, the array otherwise (an upgrade or a rollback).
fn other_conn_table(object: MapDef) -> MapDef {
    let lru_hash = MapDef {
        map_type: MapType::LruHash as u32,
        key_size: 40,
        value_size: 16,
        max_entries: 1024,
        flags: BPF_F_NO_COMMON_LRU,
    };
    let set_array = MapDef {
        map_type: MapType::Array as u32,
        key_size: 4,
        value_size: 256,
        max_entries: 1024,
        flags: BPF_F_MMAPABLE,
    };
    if object.map_type == lru_hash.map_type {
        set_array
    } else {
        lru_hash
    }
}

fn load_timed(opts: &LoadOptions) -> Result<Datapath, DatapathError> {
    let t = Instant::now();
    let dp = Datapath::load(opts);
    println!(
        "Datapath::load with pins: {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    dp
}

#[test]
fn pins_of_another_type_key_value_or_flags_are_replaced_and_the_balancer_loads() {
    const CONN: u32 = 2048;
    let fs = Bpffs::mount();
    let reference = reference_defs(&fs, CONN);
    let dir = fs.pin_dir("maps");

    // COUNTERS as a plain array of 16-byte values (type and value size differ).
    let counters = MapDef {
        map_type: MapType::Array as u32,
        value_size: 16,
        ..reference[n::COUNTERS]
    };
    // CONN_TABLE of the other generation (type, key, value and flags differ).
    let conn_table = other_conn_table(reference[n::CONN_TABLE]);
    // REALS mmapable (only the flags differ).
    let reals = MapDef {
        flags: reference[n::REALS].flags | BPF_F_MMAPABLE,
        ..reference[n::REALS]
    };
    let old: Vec<(&str, u32)> = [
        (n::COUNTERS, counters),
        (n::CONN_TABLE, conn_table),
        (n::REALS, reals),
    ]
    .into_iter()
    .map(|(name, def)| (name, pin_map(&dir.join(name), def)))
    .collect();

    let mut dp = load_timed(&opts(&dir, CONN)).expect("loading over incompatible pins");
    for (name, old_id) in &old {
        let (def, id) = pinned(&dir.join(name));
        println!("{name}: pin replaced (map id {old_id} -> {id}), now {def:?}");
        assert_eq!(
            def, reference[name],
            "{name}: the pin has the object's definition"
        );
        assert_ne!(id, *old_id, "{name}: a fresh map, not the old one");
    }
    dp.program(Prog::Balancer)
        .expect("the balancer verifies against the fresh maps");
    let counters = dp.counters().expect("COUNTERS reads as a per-CPU array");
    assert_eq!(counters.get(marklb_common::Counter::ALL[0]), 0);
    assert_eq!(dp.conn_count(), 0, "the fresh connection table is empty");
}

#[test]
fn a_fixed_size_map_pinned_with_another_size_is_replaced_a_sized_table_keeps_its_own() {
    let fs = Bpffs::mount();
    let reference = reference_defs(&fs, 4096);
    let dir = fs.pin_dir("maps");

    // COUNTERS as an agent with one counter fewer pinned it.
    let smaller_counters = MapDef {
        max_entries: reference[n::COUNTERS].max_entries - 1,
        ..reference[n::COUNTERS]
    };
    let counters_id = pin_map(&dir.join(n::COUNTERS), smaller_counters);
    // CONN_TABLE as an agent run with --conn-table-size 8192 pinned it (2048 sets).
    let smaller_table = MapDef {
        max_entries: 2048,
        ..reference[n::CONN_TABLE]
    };
    let table_id = pin_map(&dir.join(n::CONN_TABLE), smaller_table);

    let mut dp = load_timed(&opts(&dir, 4096)).expect("loading over the pins");
    let (def, id) = pinned(&dir.join(n::COUNTERS));
    println!(
        "COUNTERS: {} -> {} entries (map id {counters_id} -> {id})",
        smaller_counters.max_entries, def.max_entries
    );
    assert_eq!(def, reference[n::COUNTERS]);
    assert_ne!(id, counters_id);
    let (def, id) = pinned(&dir.join(n::CONN_TABLE));
    println!(
        "CONN_TABLE: adopted (map id {id}), {} entries",
        def.max_entries
    );
    assert_eq!(
        (def, id),
        (smaller_table, table_id),
        "a table sized at load time is adopted with its own size"
    );
    dp.program(Prog::Balancer).expect("the balancer loads");
}

#[test]
fn compatible_pins_are_adopted_with_their_contents() {
    let fs = Bpffs::mount();
    let dir = fs.pin_dir("maps");
    let real = RealDef {
        addr_be: [u32::from_be_bytes([10, 1, 2, 3]).to_be(), 0, 0, 0],
        flags: 0,
        generation: 7,
    };
    let config = LbConfig {
        mtu: 1400,
        ..LbConfig::default()
    };
    {
        let mut first = Datapath::load(&opts(&dir, 2048)).expect("first load");
        first.set_real(3, &real).expect("writing a real");
        first.set_config(&config).expect("writing the config");
    }
    let ids: Vec<(&str, u32)> = Datapath::PINNED_MAPS
        .iter()
        .map(|name| (*name, pinned(&dir.join(name)).1))
        .collect();

    // Nothing the object itself pinned is taken for incompatible (ring buffer, program
    // arrays, per-CPU arrays, LRU tables included).
    let t = Instant::now();
    let replaced = pin_compat::replace_incompatible(&dir).expect("checking the pins");
    println!(
        "checking {} pins against the object: {:.1} ms",
        ids.len(),
        t.elapsed().as_secs_f64() * 1e3
    );
    assert!(replaced.is_empty(), "replaced: {replaced:?}");

    // A restart with a larger connection table setting keeps the pinned table and contents.
    let mut second = load_timed(&opts(&dir, 4096)).expect("second load");
    for (name, id) in &ids {
        assert_eq!(
            pinned(&dir.join(name)).1,
            *id,
            "{name}: the pinned map is adopted"
        );
    }
    println!("{} pins adopted, none replaced", ids.len());
    assert_eq!(second.real(3).expect("reading the real"), real);
    assert_eq!(second.config().expect("reading the config"), config);
    assert_eq!(
        pinned(&dir.join(n::CONN_TABLE)).0.max_entries,
        marklb_common::conn_sets(2048)
    );
    second.program(Prog::Balancer).expect("the balancer loads");
}

#[test]
fn a_pin_that_is_not_a_map_is_a_clear_error_and_nothing_is_removed() {
    let fs = Bpffs::mount();
    let reference = reference_defs(&fs, 2048);
    let dir = fs.pin_dir("maps");
    // An incompatible pin that would be replaced ...
    let reals = MapDef {
        flags: reference[n::REALS].flags | BPF_F_MMAPABLE,
        ..reference[n::REALS]
    };
    let reals_id = pin_map(&dir.join(n::REALS), reals);
    // ... and, at a map's pin path, a directory.
    std::fs::create_dir(dir.join(n::COUNTERS)).expect("a directory on the bpffs");

    let err = match Datapath::load(&opts(&dir, 2048)) {
        Ok(_) => panic!("loading over a directory at COUNTERS's pin path succeeded"),
        Err(e) => e.to_string(),
    };
    println!("error: {err}");
    assert!(
        err.contains("pinned map COUNTERS") && err.contains("cannot be read"),
        "the error names the map and the cause: {err}"
    );
    assert_eq!(
        pinned(&dir.join(n::REALS)),
        (reals, reals_id),
        "no pin is removed when one cannot be read"
    );
    assert!(dir.join(n::COUNTERS).is_dir());

    // What the check reports, directly, once the directory is gone.
    std::fs::remove_dir(dir.join(n::COUNTERS)).unwrap();
    let replaced = pin_compat::replace_incompatible(&dir).expect("checking the pins");
    assert_eq!(replaced.len(), 1, "{replaced:?}");
    assert_eq!(replaced[0].name, n::REALS);
    assert_eq!(
        replaced[0].differences,
        [Difference::Flags {
            pinned: reals.flags,
            object: reference[n::REALS].flags
        }]
    );
    assert!(!dir.join(n::REALS).exists(), "the incompatible pin is gone");
}

/// A map of another kind where the loader needs an array is named for what it is (the
/// error used to call it missing).
#[test]
fn a_map_of_the_wrong_kind_is_named_for_what_it_is() {
    marklb_tests::datapath_fixture::require_root_bpf();
    let def = |map_type: MapType| MapDef {
        map_type: map_type as u32,
        key_size: 4,
        value_size: 8,
        max_entries: 4,
        flags: 0,
    };
    let data = |t| aya::maps::MapData::from_fd(create_map(def(t)).unwrap()).unwrap();
    let hash = aya::maps::Map::HashMap(data(MapType::Hash));
    assert_eq!(marklb_agent::datapath::map_kind(&hash), "HashMap");
    let per_cpu = aya::maps::Map::PerCpuArray(data(MapType::PerCpuArray));
    assert_eq!(marklb_agent::datapath::map_kind(&per_cpu), "PerCpuArray");
    let err = DatapathError::NotAnArray {
        name: n::CONN_TABLE,
        kind: marklb_agent::datapath::map_kind(&hash),
    };
    assert_eq!(
        err.to_string(),
        "map CONN_TABLE is a HashMap, not the array the datapath needs"
    );
}
