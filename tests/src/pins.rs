//! Pinned maps as the kernel sees them, and maps of any definition pinned without an
//! object: what an agent of another version would have left (`datapath_pins`, `agent_e2e`).

use std::{
    os::fd::{FromRawFd, OwnedFd},
    path::Path,
};

use aya::maps::MapData;
use marklb_agent::datapath::pin_compat::{MapDef, UNKNOWN_TYPE};

/// The definition of the map pinned at `path` as the kernel reports it, and its id.
pub fn pinned(path: &Path) -> (MapDef, u32) {
    let info = MapData::from_pin(path)
        .and_then(|m| m.info())
        .unwrap_or_else(|e| panic!("reading the pin {}: {e}", path.display()));
    let def = MapDef {
        map_type: info.map_type().map_or(UNKNOWN_TYPE, |t| t as u32),
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        flags: info.map_flags(),
    };
    (def, info.id())
}

/// Creates a map of `def` (raw `BPF_MAP_CREATE`, no object) and pins it at `path`; its id.
pub fn pin_map(path: &Path, def: MapDef) -> u32 {
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
        _rest: [u8; 108],
    }
    let attr = MapCreate {
        map_type: def.map_type,
        key_size: def.key_size,
        value_size: def.value_size,
        max_entries: def.max_entries,
        map_flags: def.flags,
        _rest: [0; 108],
    };
    // SAFETY: BPF_MAP_CREATE reads `attr` (its size given) and returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            0, // BPF_MAP_CREATE
            &attr as *const MapCreate,
            std::mem::size_of::<MapCreate>() as u32,
        )
    };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE {def:?}: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a fresh fd that nothing else owns.
    let map = MapData::from_fd(unsafe { OwnedFd::from_raw_fd(fd as i32) }).expect("map from fd");
    map.pin(path)
        .unwrap_or_else(|e| panic!("pinning {}: {e}", path.display()));
    pinned(path).1
}
