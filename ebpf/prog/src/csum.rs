// SPDX-License-Identifier: GPL-2.0 OR MIT
//! Internet checksum helpers (RFC 1071). Sums are taken over native-endian 16-bit loads;
//! one's complement addition is byte-order independent, so storing the folded result
//! natively gives the right bytes on the wire.

/// Folds a 64-bit one's complement accumulator into 16 bits.
#[inline(always)]
pub fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Adds `N` 16-bit words starting at `p` (which must be valid for `2 * N` bytes).
#[inline(always)]
pub unsafe fn sum_words<const N: usize>(p: *const u16, mut acc: u64) -> u64 {
    let mut i = 0;
    while i < N {
        acc += unsafe { core::ptr::read_unaligned(p.add(i)) } as u64;
        i += 1;
    }
    acc
}

/// Adds an address (network byte order words) to an accumulator.
#[inline(always)]
pub fn sum_addr(a: &[u32; 4], acc: u64) -> u64 {
    acc + fold_u32(a[0]) as u64
        + fold_u32(a[1]) as u64
        + fold_u32(a[2]) as u64
        + fold_u32(a[3]) as u64
}

#[inline(always)]
fn fold_u32(v: u32) -> u32 {
    (v & 0xffff) + (v >> 16)
}

/// RFC 1624 incremental update (its equation 3): the checksum after one 16-bit word
/// changes `old` -> `new` (all values as loaded from the packet). The result is what a
/// full computation gives (0x0000 rather than 0xffff for data summing to -0), except for
/// data that is all zero, whose checksum is 0xffff: only the caller can tell that case
/// (it returns 0x0000 then), and it matters only where all-zero data is possible (an ICMP
/// echo reply with identifier 0, sequence 0 and no data; never an IP header).
#[inline(always)]
pub fn replace16(check: u16, old: u16, new: u16) -> u16 {
    let sum = (!check) as u64 + (!old) as u64 + new as u64;
    !fold(sum)
}

/// Checksum of an outer IPv4 header with IHL 5, id 0, no fragmentation, TTL 64 and
/// protocol IPIP: only TOS, length and addresses vary, so it is computed from them
/// arithmetically (words in host order), without reading the header back.
#[inline(always)]
pub fn ipv4_header_check(tos: u8, tot_len: u32, saddr_be: u32, daddr_be: u32) -> u16 {
    let s = u32::from_be(saddr_be);
    let d = u32::from_be(daddr_be);
    // Eight terms below 2^16 each: the sum stays below 2^19, two folds are enough.
    let mut sum = 0x4500u32
        + tos as u32
        + (tot_len & 0xffff)
        + ((64u32 << 8) | marklb_common::IPPROTO_IPIP as u32)
        + (s >> 16)
        + (s & 0xffff)
        + (d >> 16)
        + (d & 0xffff);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_be()
}
