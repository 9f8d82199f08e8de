//! Maglev consistent hashing (Eisenbud et al., NSDI 2016) with weights.
//!
//! Each backend walks its own permutation of the table (offset and skip derived from its
//! address) and claims the next free slot on its turn. Weights are honoured by giving a
//! backend a turn each time its accumulated weight reaches the largest weight (Katran's
//! "V2" scheme), so slot shares follow weights while one backend leaving still only moves
//! about its own share of the table. Pure and deterministic: the same inputs give the same
//! table on every run, so a restarted agent rebuilds identical rings.

use std::net::IpAddr;

// Table sizes must be prime, so every skip visits every slot.
use marklb_crds::is_prime;

/// A backend as Maglev sees it: a stable identity (its address) and a weight (0: none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend {
    pub addr: IpAddr,
    pub weight: u32,
}

fn addr_words(addr: &IpAddr) -> [u64; 2] {
    let b = match addr {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    };
    [
        u64::from_be_bytes(b[..8].try_into().expect("8 bytes")),
        u64::from_be_bytes(b[8..].try_into().expect("8 bytes")),
    ]
}

fn mix(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

fn hash_addr(addr: &IpAddr, seed: u64) -> u64 {
    let [a, b] = addr_words(addr);
    mix(mix(a ^ seed) ^ b)
}

/// Builds the lookup table: `table[slot]` is an index into `backends`. Backends with
/// weight 0 get no slots; if no backend has weight, the table is empty.
pub fn build_table(backends: &[Backend], size: u32) -> Vec<u32> {
    assert!(is_prime(size), "Maglev table size {size} is not prime");
    let live: Vec<usize> = (0..backends.len())
        .filter(|&i| backends[i].weight > 0)
        .collect();
    if live.is_empty() {
        return Vec::new();
    }
    let m = size as u64;
    let perm: Vec<(u64, u64)> = live
        .iter()
        .map(|&i| {
            let offset = hash_addr(&backends[i].addr, 0x6f66_6673_6574) % m;
            let skip = hash_addr(&backends[i].addr, 0x736b_6970) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let max_weight = live
        .iter()
        .map(|&i| backends[i].weight as u64)
        .max()
        .unwrap_or(1);
    // Each backend's current position in its permutation: (offset + j * skip) mod m,
    // advanced by adding skip (no division in the loop). Probing, the hot part (about
    // m ln m probes), reads an occupancy bitmap (8 KiB for 65,537 slots: L1-resident);
    // each slot's owner is written once.
    assert!(
        live.len() < u16::MAX as usize,
        "more than 65,534 live backends"
    );
    let mut pos: Vec<u64> = perm.iter().map(|p| p.0).collect();
    let mut credit = vec![0u64; live.len()];
    let mut taken = vec![0u64; (size as usize).div_ceil(64)];
    let mut slots = vec![0u16; size as usize];
    let equal = live
        .iter()
        .all(|&i| backends[i].weight as u64 == max_weight);
    let mut filled = 0u64;
    'fill: loop {
        for k in 0..live.len() {
            if !equal {
                credit[k] += backends[live[k]].weight as u64;
                if credit[k] < max_weight {
                    continue;
                }
                credit[k] -= max_weight;
            }
            let skip = perm[k].1;
            let mut slot = pos[k];
            while taken[(slot >> 6) as usize] & (1 << (slot & 63)) != 0 {
                slot += skip;
                if slot >= m {
                    slot -= m;
                }
            }
            taken[(slot >> 6) as usize] |= 1 << (slot & 63);
            slots[slot as usize] = k as u16;
            slot += skip;
            if slot >= m {
                slot -= m;
            }
            pos[k] = slot;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    let table: Vec<u32> = slots.iter().map(|&k| live[k as usize] as u32).collect();
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn backends(n: u8, weight: u32) -> Vec<Backend> {
        (1..=n)
            .map(|i| Backend {
                addr: IpAddr::V4(Ipv4Addr::new(10, 1, 0, i)),
                weight,
            })
            .collect()
    }

    fn shares(table: &[u32], n: usize) -> Vec<usize> {
        let mut s = vec![0; n];
        for &b in table {
            s[b as usize] += 1;
        }
        s
    }

    #[test]
    fn primes() {
        assert!(is_prime(65_537) && is_prime(7) && is_prime(2));
        assert!(!is_prime(65_536) && !is_prime(1) && !is_prime(0) && !is_prime(9));
    }

    #[test]
    fn equal_weights_share_the_table_evenly() {
        let table = build_table(&backends(10, 1), 65_537);
        assert_eq!(table.len(), 65_537);
        for s in shares(&table, 10) {
            assert!((6_500..=6_600).contains(&s), "share {s}");
        }
    }

    #[test]
    fn shares_follow_weights() {
        let mut b = backends(3, 1);
        b[0].weight = 1;
        b[1].weight = 2;
        b[2].weight = 5;
        let table = build_table(&b, 65_537);
        let s = shares(&table, 3);
        let unit = 65_537.0 / 8.0;
        for (i, w) in [1.0, 2.0, 5.0].iter().enumerate() {
            let ratio = s[i] as f64 / (unit * w);
            assert!(
                (0.98..=1.02).contains(&ratio),
                "backend {i}: {} slots",
                s[i]
            );
        }
    }

    #[test]
    fn drained_backend_gets_nothing_and_empty_when_all_drained() {
        let mut b = backends(3, 1);
        b[1].weight = 0;
        let table = build_table(&b, 1_009);
        assert!(!table.contains(&1));
        assert!(build_table(&backends(3, 0), 1_009).is_empty());
    }

    #[test]
    fn removing_one_of_n_moves_about_one_nth() {
        for n in [5u8, 10, 50] {
            let all = backends(n, 1);
            let before = build_table(&all, 65_537);
            let mut rest = all.clone();
            let gone = rest.remove(2);
            let after = build_table(&rest, 65_537);
            let moved = before
                .iter()
                .zip(&after)
                .filter(|(b, a)| all[**b as usize].addr != rest[**a as usize].addr)
                .count();
            let owned_by_gone = before.iter().filter(|&&b| all[b as usize] == gone).count();
            let ideal = 65_537.0 / n as f64;
            // Every slot of the removed backend must move; Maglev moves a few more.
            assert!(moved >= owned_by_gone);
            assert!(
                (moved as f64) < ideal * 1.35,
                "n={n}: moved {moved}, ideal {ideal:.0}"
            );
        }
    }

    #[test]
    fn deterministic_and_order_independent_identity() {
        let b = backends(7, 1);
        assert_eq!(build_table(&b, 1_009), build_table(&b, 1_009));
        // Each backend's slots depend on its address, not on list position.
        let mut rev = b.clone();
        rev.reverse();
        let t1 = build_table(&b, 1_009);
        let t2 = build_table(&rev, 1_009);
        let same = t1
            .iter()
            .zip(&t2)
            .filter(|(x, y)| b[**x as usize].addr == rev[**y as usize].addr)
            .count();
        assert!(
            same > 1_009 * 8 / 10,
            "only {same} slots kept their backend"
        );
    }
}
