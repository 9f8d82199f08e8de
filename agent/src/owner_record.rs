//! Which LoadBalancer owns each programmed VIP, pinned next to the datapath so that
//! `marklb-agent status` can name owners when no agent runs.
//!
//! The datapath's maps know VIPs by address, port and protocol only; owners live in the
//! agent's memory. The record is one small BPF hash map that userspace alone uses (the
//! programs never see it), created by the agent and pinned at `<pin dir>/owners`: a bpffs
//! holds BPF objects, not files, and the bpffs is the one place that outlives the agent's
//! pod and goes with `cleanup` (the whole pin directory is removed). Key: the VIP's
//! `VipKey`; value: `namespace/name`, NUL-padded. `BPF_F_NO_PREALLOC`: memory only for
//! the VIPs present. The agent rewrites it after every successful apply.

use std::{
    collections::BTreeMap,
    io,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use marklb_common::{MAX_VIPS, VipKey};

use crate::xdp_link::{bpf, obj_get, pin_object};

/// Room for `namespace/name` (Kubernetes: 63 + 1 + 253 bytes).
pub const OWNER_BYTES: usize = 320;
const KEY_BYTES: usize = std::mem::size_of::<VipKey>();

const BPF_MAP_CREATE: libc::c_int = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_int = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_int = 2;
const BPF_MAP_DELETE_ELEM: libc::c_int = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_int = 4;
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_F_NO_PREALLOC: u32 = 1;

/// `union bpf_attr` for `BPF_MAP_CREATE`, up to the name.
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
}

/// `union bpf_attr` for the element commands (`next_key` is `value` for lookups/updates).
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn key_bytes(key: &VipKey) -> [u8; KEY_BYTES] {
    // SAFETY: VipKey is repr(C), 20 bytes, no padding (`_pad` is a field).
    unsafe { std::mem::transmute_copy(key) }
}

fn key_of(bytes: &[u8; KEY_BYTES]) -> VipKey {
    // SAFETY: every byte pattern is a valid VipKey.
    unsafe { std::mem::transmute_copy(bytes) }
}

fn owner_bytes(owner: &str) -> [u8; OWNER_BYTES] {
    let mut v = [0u8; OWNER_BYTES];
    let mut end = owner.len().min(OWNER_BYTES);
    while !owner.is_char_boundary(end) {
        end -= 1;
    }
    v[..end].copy_from_slice(&owner.as_bytes()[..end]);
    v
}

fn owner_of(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// The pinned owner record of one interface's datapath.
pub struct OwnerRecord {
    fd: OwnedFd,
}

impl OwnerRecord {
    /// Opens the record pinned at `path`, creating and pinning it if there is none.
    pub fn open_or_create(path: &Path) -> io::Result<Self> {
        if path.exists() {
            return Self::open(path);
        }
        let mut name = [0u8; 16];
        name[..6].copy_from_slice(b"owners");
        let mut attr = MapCreateAttr {
            map_type: BPF_MAP_TYPE_HASH,
            key_size: KEY_BYTES as u32,
            value_size: OWNER_BYTES as u32,
            max_entries: MAX_VIPS,
            map_flags: BPF_F_NO_PREALLOC,
            map_name: name,
            ..Default::default()
        };
        let fd = bpf(BPF_MAP_CREATE, &mut attr)?;
        // SAFETY: a new descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
        pin_object(fd.as_fd(), path)?;
        Ok(Self { fd })
    }

    /// Opens the record pinned at `path` (read or write; `status` only reads).
    pub fn open(path: &Path) -> io::Result<Self> {
        Ok(Self { fd: obj_get(path)? })
    }

    /// Pins the record at `path` again if its pin went.
    pub fn repin(&self, path: &Path) -> io::Result<()> {
        if path.exists() {
            return Ok(());
        }
        pin_object(self.fd.as_fd(), path)
    }

    fn elem(&self, cmd: libc::c_int, key: u64, value: u64) -> io::Result<()> {
        let mut attr = ElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            key,
            value,
            ..Default::default()
        };
        bpf(cmd, &mut attr).map(drop)
    }

    fn keys(&self) -> io::Result<Vec<[u8; KEY_BYTES]>> {
        let mut keys = Vec::new();
        let mut next = [0u8; KEY_BYTES];
        loop {
            // First call without a key: the first key of the map.
            let prev = keys
                .last()
                .map_or(0, |k: &[u8; KEY_BYTES]| k.as_ptr() as u64);
            match self.elem(BPF_MAP_GET_NEXT_KEY, prev, next.as_mut_ptr() as u64) {
                Ok(()) => keys.push(next),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(keys),
                Err(e) => return Err(e),
            }
        }
    }

    /// Every VIP's owner, as recorded.
    pub fn read(&self) -> io::Result<BTreeMap<VipKey, String>> {
        let mut out = BTreeMap::new();
        for k in self.keys()? {
            let mut v = [0u8; OWNER_BYTES];
            match self.elem(
                BPF_MAP_LOOKUP_ELEM,
                k.as_ptr() as u64,
                v.as_mut_ptr() as u64,
            ) {
                Ok(()) => {
                    out.insert(key_of(&k), owner_of(&v));
                }
                // Removed since listed.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Makes the record say exactly `owners`: entries written, stale ones deleted.
    pub fn write(&self, owners: &[(VipKey, String)]) -> io::Result<()> {
        let wanted: BTreeMap<[u8; KEY_BYTES], &str> = owners
            .iter()
            .map(|(k, o)| (key_bytes(k), o.as_str()))
            .collect();
        for (k, owner) in &wanted {
            let v = owner_bytes(owner);
            self.elem(BPF_MAP_UPDATE_ELEM, k.as_ptr() as u64, v.as_ptr() as u64)?;
        }
        for k in self.keys()? {
            if !wanted.contains_key(&k) {
                match self.elem(BPF_MAP_DELETE_ELEM, k.as_ptr() as u64, 0) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_are_nul_padded_and_cut_on_a_character() {
        assert_eq!(owner_of(&owner_bytes("lb/web")), "lb/web");
        let long = "é".repeat(200);
        let cut = owner_of(&owner_bytes(&long));
        assert_eq!(cut.len(), OWNER_BYTES);
        assert!(long.starts_with(&cut));
    }

    #[test]
    fn keys_round_trip() {
        let k = crate::vip::VipId::tcp("10.0.0.1".parse().unwrap(), 80).key();
        assert_eq!(key_of(&key_bytes(&k)), k);
    }
}
