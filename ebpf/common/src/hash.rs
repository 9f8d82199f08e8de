// SPDX-License-Identifier: GPL-2.0 OR MIT
//! Flow hashing and outer-source selection. One definition serves the XDP program and
//! user space, so tests and tools can predict exactly what the datapath does.

use crate::flow::FlowKey;

const SEED: u64 = 0x6d61_726b_6c62_0001; // "marklb" + version: changes every pick if changed.
const MUL: u64 = 0x9E37_79B9_7F4A_7C15;

#[inline(always)]
const fn absorb(h: u64, w: u64) -> u64 {
    let x = (h ^ w).wrapping_mul(MUL);
    x ^ (x >> 31)
}

/// murmur3's 64-bit finalizer: every input bit affects every output bit.
#[inline(always)]
const fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

#[inline(always)]
const fn pair(hi: u32, lo: u32) -> u64 {
    ((hi as u64) << 32) | lo as u64
}

/// Hash of a flow's 5-tuple, used to pick its slot in the VIP's Maglev ring.
#[inline(always)]
pub const fn flow_hash(k: &FlowKey) -> u32 {
    fold(flow_hash64(k))
}

/// [`flow_hash`] of a flow whose [`flow_hash64`] is `h` (the datapath hashes a flow once
/// for its connection-table set and its Maglev slot).
#[inline(always)]
pub const fn fold(h: u64) -> u32 {
    (h ^ (h >> 32)) as u32
}

/// The 64 bits [`flow_hash`] folds: the connection table takes its set from the low half
/// and its slot check from the high half (`crate::conn`), two independent 32-bit hashes
/// for the price of one.
#[inline(always)]
pub const fn flow_hash64(k: &FlowKey) -> u64 {
    let mut h = SEED;
    h = absorb(h, pair(k.src_be[0], k.src_be[1]));
    h = absorb(h, pair(k.src_be[2], k.src_be[3]));
    h = absorb(h, pair(k.dst_be[0], k.dst_be[1]));
    h = absorb(h, pair(k.dst_be[2], k.dst_be[3]));
    h = absorb(
        h,
        pair(
            ((k.sport_be as u32) << 16) | k.dport_be as u32,
            k.proto as u32,
        ),
    );
    fmix64(h)
}

/// 16 bits that vary with the client (address and port): the low bits of the outer source.
#[inline(always)]
const fn client_bits(client_be: u32, sport_be: u16) -> u32 {
    let c = u32::from_be(client_be);
    let p = u16::from_be(sport_be) as u32;
    (c ^ (c >> 16) ^ p) & 0xffff
}

/// Outer IPv4 source for a flow: the configured /16 prefix plus 16 bits of the client's
/// address and port, so a real's NIC hashes different clients to different queues.
#[inline(always)]
pub const fn encap_src_v4(prefix_be: u32, client_be: u32, sport_be: u16) -> u32 {
    ((u32::from_be(prefix_be) & 0xffff_0000) | client_bits(client_be, sport_be)).to_be()
}

/// Outer IPv6 source for a flow: the configured /96 prefix plus a last word that mixes the
/// client's address and port (for an IPv4 client, its address).
#[inline(always)]
pub const fn encap_src_v6(prefix_be: &[u32; 4], client_be: &[u32; 4], sport_be: u16) -> [u32; 4] {
    let last = client_be[0] ^ client_be[3];
    let low = u32::from_be(last) ^ ((u16::from_be(sport_be) as u32) << 16);
    [prefix_be[0], prefix_be[1], prefix_be[2], low.to_be()]
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::collections::HashSet;

    fn key(src: u32, sport: u16) -> FlowKey {
        let v4 = |a: u32| core::net::IpAddr::from(a.to_be_bytes());
        FlowKey::new(v4(src), sport, v4(0x0a00_0001), 80, 6)
    }

    #[test]
    fn hash_spreads_sequential_ports_evenly() {
        // Clients differing only in the source port must spread over a prime table.
        let size = 251u32;
        let mut buckets = [0u32; 251];
        for p in 0..25_100u32 {
            buckets[(flow_hash(&key(0xc0a8_0001, p as u16)) % size) as usize] += 1;
        }
        let (min, max) = (buckets.iter().min().unwrap(), buckets.iter().max().unwrap());
        assert!(*min > 50 && *max < 160, "uneven: min {min} max {max}");
    }

    #[test]
    fn hash_depends_on_every_field() {
        let base = key(0x0102_0304, 1000);
        let h = flow_hash(&base);
        let mut variants = std::vec::Vec::new();
        let mut k = base;
        k.src_be[3] = 1;
        variants.push(k);
        let mut k = base;
        k.dst_be[2] = 1;
        variants.push(k);
        let mut k = base;
        k.dport_be = 81u16.to_be();
        variants.push(k);
        let mut k = base;
        k.proto = 17;
        variants.push(k);
        for v in variants {
            assert_ne!(flow_hash(&v), h, "{v:?}");
        }
    }

    #[test]
    fn encap_source_keeps_prefix_and_varies_with_client() {
        let prefix = 0xac10_0000u32.to_be(); // 172.16.0.0/16
        let mut seen = HashSet::new();
        for p in 0..1000u16 {
            let s = u32::from_be(encap_src_v4(prefix, 0x0a01_0203u32.to_be(), p.to_be()));
            assert_eq!(s & 0xffff_0000, 0xac10_0000);
            seen.insert(s);
        }
        assert_eq!(seen.len(), 1000);
        let p6 = [0xfc00_0000u32.to_be(), 0, 0, 0];
        let c6 = [1u32.to_be(), 2u32.to_be(), 3u32.to_be(), 4u32.to_be()];
        let a = encap_src_v6(&p6, &c6, 1u16.to_be());
        let b = encap_src_v6(&p6, &c6, 2u16.to_be());
        assert_eq!(a[..3], p6[..3]);
        assert_ne!(a[3], b[3]);
    }
}
