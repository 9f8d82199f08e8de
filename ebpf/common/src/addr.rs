// SPDX-License-Identifier: GPL-2.0 OR MIT
//! Addresses as the datapath stores them: four `u32` words holding the address bytes in
//! network order (loaded natively from the packet), IPv4 in word 0 with the other words
//! zero. One definition for every user-space caller (agent, decapsulator, tests).

use core::net::IpAddr;

/// Network-order address words as the datapath stores them (IPv4: word 0 only).
pub fn addr_words(addr: IpAddr) -> [u32; 4] {
    match addr {
        IpAddr::V4(a) => [u32::from_ne_bytes(a.octets()), 0, 0, 0],
        IpAddr::V6(a) => {
            let o = a.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            [w(0), w(4), w(8), w(12)]
        }
    }
}

/// The inverse of [`addr_words`]; `v6` says which family the words hold.
pub fn words_addr(w: &[u32; 4], v6: bool) -> IpAddr {
    if v6 {
        let mut o = [0u8; 16];
        for (i, word) in w.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
        IpAddr::from(o)
    } else {
        IpAddr::from(w[0].to_ne_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_hold_the_address_bytes_in_wire_order() {
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        let w = addr_words(v4);
        assert_eq!(w[0].to_ne_bytes(), [10, 1, 2, 3]);
        assert_eq!(w[1..], [0, 0, 0]);
        assert_eq!(words_addr(&w, false), v4);
        let v6: IpAddr = "2001:db8::1:2".parse().unwrap();
        let w = addr_words(v6);
        assert_eq!(w[0].to_ne_bytes(), [0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(w[3].to_ne_bytes(), [0, 1, 0, 2]);
        assert_eq!(words_addr(&w, true), v6);
    }
}
