//! Pinned maps as the kernel sees them, and maps of any definition pinned without an
//! object: what an agent of another version would have left (`datapath_pins`, `agent_e2e`).

use std::{
    os::fd::{FromRawFd, OwnedFd},
    path::{Path, PathBuf},
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

/// A map of `def` made with a raw `BPF_MAP_CREATE` (no object, no aya), or the error.
pub fn create_map(def: MapDef) -> std::io::Result<OwnedFd> {
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
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Creates a map of `def` ([`create_map`]) and pins it at `path`; its id.
pub fn pin_map(path: &Path, def: MapDef) -> u32 {
    let fd = create_map(def).unwrap_or_else(|e| panic!("BPF_MAP_CREATE {def:?}: {e}"));
    let map = MapData::from_fd(fd).expect("map from fd");
    map.pin(path)
        .unwrap_or_else(|e| panic!("pinning {}: {e}", path.display()));
    pinned(path).1
}

/// A bpffs mounted on a temporary directory (the machine may have none at /sys/fs/bpf, and
/// each test its own, so they run in parallel); unmounted (freeing its pins) when dropped.
pub struct Bpffs {
    dir: tempfile::TempDir,
}

impl Bpffs {
    pub fn mount() -> Self {
        crate::datapath_fixture::require_root_bpf();
        let dir = tempfile::Builder::new()
            .prefix("marklb-pins-")
            .tempdir()
            .expect("temporary directory");
        marklb_agent::ensure_bpffs(dir.path())
            .unwrap_or_else(|e| panic!("mounting a bpffs on {}: {e:#}", dir.path().display()));
        Self { dir }
    }

    /// A new directory of pins on this bpffs.
    pub fn pin_dir(&self, name: &str) -> PathBuf {
        let d = self.dir.path().join(name);
        std::fs::create_dir(&d).expect("a directory on the bpffs");
        d
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        crate::agent_proc::unmount_all(self.dir.path());
    }
}
