//! Limits and defaults of the `marklb.io/v1alpha1` API, in one place.
//!
//! The types ([`loadbalancer`](crate::loadbalancer)) take their defaults and schema bounds from
//! here, the Rust validation ([`validate`](crate::validate)) its ranges, and the agent's Maglev
//! its table size and primality test: one definition each. This module imports nothing of
//! the crate, so no module that uses it can form a cycle through it.
//!
//! A schema bound written as a literal in a `#[schemars(...)]` attribute (attributes cannot name
//! constants) is checked against the constant here by a unit test of `crd`.

/// Most VIPs one LoadBalancer may carry (the datapath of a node holds more: several
/// LoadBalancers share it). Bounds the apiserver's CEL cost estimate (rules that
/// walk `vips` are charged for this many entries) and the size of the datapath's VIP map share.
pub const MAX_VIPS_PER_LOADBALANCER: usize = 256;
/// Most backends one VIP may carry (CEL cost bound, and far above any sane Maglev fan-out).
pub const MAX_BACKENDS_PER_VIP: usize = 1024;
/// Default Maglev table size: prime, and the size Katran uses (good spread up to ~650 reals).
pub const DEFAULT_MAGLEV_TABLE_SIZE: u32 = 65_537;
/// Smallest accepted Maglev table size (smallest prime that still spreads a handful of reals).
pub const MIN_MAGLEV_TABLE_SIZE: u32 = 7;
/// Largest accepted Maglev table size: the first prime above one million; bigger tables only
/// cost memory and rebuild time per VIP.
pub const MAX_MAGLEV_TABLE_SIZE: u32 = 1_000_003;
/// Largest mark capacity: NIC flow marks are 16 bits on mlx5 and mark 0 means "no mark".
pub const MAX_MARK_CAPACITY: u32 = 65_535;
/// Longest accepted idle timeout of a flow mark (one day).
pub const MAX_MARK_IDLE_TIMEOUT_SECONDS: u32 = 86_400;
/// Packets a UDP flow sends before the datapath asks for its mark, by default: a DNS query
/// and its retry never take a mark, a flow that keeps going does.
pub const DEFAULT_UDP_PACKETS_BEFORE_MARK: u32 = 4;
/// Most packets a UDP flow may be asked to send first: the datapath counts them in 8 bits.
pub const MAX_UDP_PACKETS_BEFORE_MARK: u32 = 255;
/// Smallest accepted MTU: the IPv6 minimum link MTU, so IPv6 reals always work.
pub const MIN_MTU: u32 = 1280;
/// Largest accepted MTU: the usual jumbo-frame ceiling of data-centre NICs.
pub const MAX_MTU: u32 = 9216;
/// Required prefix length of `encap.sourcePrefixV4`: the datapath fills the low 16 bits of the
/// outer source address from a hash of the flow (Katran's scheme), so the prefix is exactly /16.
pub const ENCAP_V4_PREFIX_LEN: u8 = 16;
/// Required prefix length of `encap.sourcePrefixV6`: the low 32 bits come from the flow hash.
pub const ENCAP_V6_PREFIX_LEN: u8 = 96;
/// Default `encap.sourcePrefixV4`.
pub const DEFAULT_ENCAP_PREFIX_V4: &str = "172.16.0.0/16";
/// Default `encap.sourcePrefixV6` (`6d6c:62` spells "mlb").
pub const DEFAULT_ENCAP_PREFIX_V6: &str = "fc00:6d6c:62::/96";

/// Whether `n` is prime (trial division: Maglev table sizes are at most ~10^6). Maglev's
/// permutation needs a prime table size; CEL cannot test it, so the Rust validation does, and
/// the agent's Maglev asserts it with this same function.
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    // u64, so that `d * d` cannot overflow for any u32.
    let n = u64::from(n);
    let mut d = 3u64;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_prime_agrees_with_known_values() {
        let primes: Vec<u32> = (0..60).filter(|n| is_prime(*n)).collect();
        assert_eq!(
            primes,
            [
                2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59
            ]
        );
        assert!(is_prime(65_537));
        assert!(is_prime(1_000_003));
        assert!(!is_prime(1_000_001)); // 101 * 9901
        assert!(!is_prime(65_535));
        assert!(!is_prime(999_985)); // 5 * 199997
        assert!(is_prime(999_983));
        assert!(!is_prime(u32::MAX)); // 3 * 5 * 17 * 257 * 65537
        assert!(is_prime(4_294_967_291)); // the largest u32 prime: no overflow in d * d
    }

    #[test]
    fn defaults_are_within_their_limits() {
        assert!(is_prime(DEFAULT_MAGLEV_TABLE_SIZE));
        assert!(is_prime(MIN_MAGLEV_TABLE_SIZE) && is_prime(MAX_MAGLEV_TABLE_SIZE));
        assert!(
            (MIN_MAGLEV_TABLE_SIZE..=MAX_MAGLEV_TABLE_SIZE).contains(&DEFAULT_MAGLEV_TABLE_SIZE)
        );
    }
}
