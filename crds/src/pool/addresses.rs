//! The address blocks of a pool (`spec.addresses[]`): a CIDR (`192.0.2.0/28`), an inclusive
//! range (`198.51.100.10-198.51.100.20`) or a single address, IPv4 or IPv6.
//!
//! Invariants: a parsed [`AddressBlock`] has `first <= last`, both of one family; a CIDR has
//! no host bits (what `isCIDR(s) && cidr(s).masked() == cidr(s)` accepts, as elsewhere in the
//! API). Arithmetic is on `u128` for both families, so counting a `/0` of IPv6 saturates only
//! at `u128::MAX` (one address short of 2^128, which no message needs).
//!
//! "Buggy" addresses (MetalLB's `avoidBuggyIPs`): IPv4 addresses ending in `.0` or `.255`,
//! which some old client stacks and routers treat as network or broadcast addresses whatever
//! the prefix length. IPv6 has no such addresses.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::parse::{parse_ip, parse_prefix};

/// IP family of an address or a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The family of `ip`.
    pub fn of(ip: IpAddr) -> Family {
        if ip.is_ipv4() { Family::V4 } else { Family::V6 }
    }

    /// `IPv4` or `IPv6`, as Kubernetes spells `ipFamilies`.
    pub fn as_str(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    /// Parses `IPv4` / `IPv6` (Kubernetes' spelling).
    pub fn parse(text: &str) -> Option<Family> {
        match text {
            "IPv4" => Some(Family::V4),
            "IPv6" => Some(Family::V6),
            _ => None,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An address as a number, so that blocks of both families share one arithmetic.
pub fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// The address numbered `n` in `family` (`n` must fit the family).
pub fn from_u128(family: Family, n: u128) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::from(
            u32::try_from(n).expect("an IPv4 address number fits 32 bits"),
        )),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(n)),
    }
}

/// Whether `ip` is an IPv4 address ending in `.0` or `.255`.
pub fn is_buggy(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => matches!(a.octets()[3], 0 | 255),
        IpAddr::V6(_) => false,
    }
}

/// One block of a pool: every address from `first` to `last`, inclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AddressBlock {
    pub first: IpAddr,
    pub last: IpAddr,
}

impl AddressBlock {
    /// The family of the block.
    pub fn family(&self) -> Family {
        Family::of(self.first)
    }

    /// Whether `ip` lies in the block.
    pub fn contains(&self, ip: IpAddr) -> bool {
        Family::of(ip) == self.family()
            && (to_u128(self.first)..=to_u128(self.last)).contains(&to_u128(ip))
    }

    /// Whether the two blocks share an address.
    pub fn overlaps(&self, other: &AddressBlock) -> bool {
        self.family() == other.family()
            && to_u128(self.first) <= to_u128(other.last)
            && to_u128(other.first) <= to_u128(self.last)
    }

    /// Addresses in the block (saturating at `u128::MAX` for an IPv6 `/0`).
    pub fn size(&self) -> u128 {
        (to_u128(self.last) - to_u128(self.first)).saturating_add(1)
    }

    /// Addresses in the block that end in `.0` or `.255` (IPv4 only).
    pub fn buggy_count(&self) -> u128 {
        if self.family() == Family::V6 {
            return 0;
        }
        let (first, last) = (to_u128(self.first), to_u128(self.last));
        // Multiples of 256 (".0") and numbers one below them (".255") in [first, last].
        let multiples_up_to = |n: u128| n / 256 + 1; // of 0, 256, ... <= n
        let zeros = multiples_up_to(last)
            - if first == 0 {
                0
            } else {
                multiples_up_to(first - 1)
            };
        let up_to_255 = |n: u128| if n < 255 { 0 } else { (n - 255) / 256 + 1 };
        let ones = up_to_255(last) - if first == 0 { 0 } else { up_to_255(first - 1) };
        zeros + ones
    }

    /// Addresses the block can hand out: all of them, or without the buggy ones.
    pub fn usable(&self, avoid_buggy: bool) -> u128 {
        if avoid_buggy {
            self.size() - self.buggy_count()
        } else {
            self.size()
        }
    }

    /// The first address of the block, in order, that is not buggy (when avoided) and for
    /// which `taken` is false. Walks at most the taken and buggy addresses before it.
    pub fn first_free(
        &self,
        avoid_buggy: bool,
        mut taken: impl FnMut(IpAddr) -> bool,
    ) -> Option<IpAddr> {
        let family = self.family();
        let (mut n, last) = (to_u128(self.first), to_u128(self.last));
        loop {
            let ip = from_u128(family, n);
            let avoided = avoid_buggy && is_buggy(ip);
            if !avoided && !taken(ip) {
                return Some(ip);
            }
            if n == last {
                return None;
            }
            n += 1;
        }
    }
}

impl fmt::Display for AddressBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// Parses one entry of `spec.addresses`: `addr/len` (no host bits), `first-last` (one
/// family, `first <= last`, no spaces) or a single address. IPv4-mapped IPv6 is refused, as
/// everywhere in the API.
pub fn parse_block(text: &str) -> Result<AddressBlock, String> {
    if text.contains('/') {
        let prefix = parse_prefix(text)?;
        let bits: u32 = if prefix.addr.is_ipv4() { 32 } else { 128 };
        let host_bits = bits - u32::from(prefix.len);
        let first = to_u128(prefix.addr);
        let span = if host_bits >= 128 {
            u128::MAX
        } else {
            (1u128 << host_bits) - 1
        };
        return Ok(AddressBlock {
            first: prefix.addr,
            last: from_u128(Family::of(prefix.addr), first + span),
        });
    }
    if let Some((a, b)) = text.split_once('-') {
        let first = parse_ip(a).map_err(|e| format!("{text:?}: {e}"))?;
        let last = parse_ip(b).map_err(|e| format!("{text:?}: {e}"))?;
        if Family::of(first) != Family::of(last) {
            return Err(format!(
                "{text:?}: both ends of a range must be of one IP family"
            ));
        }
        if to_u128(first) > to_u128(last) {
            return Err(format!(
                "{text:?}: the range ends before it starts (write \"{last}-{first}\")"
            ));
        }
        return Ok(AddressBlock { first, last });
    }
    let ip = parse_ip(text).map_err(|_| {
        format!(
            "{text:?} is not a CIDR (192.0.2.0/28), a range (192.0.2.10-192.0.2.20) or an address"
        )
    })?;
    Ok(AddressBlock {
        first: ip,
        last: ip,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn blocks_parse_in_three_forms() {
        let b = parse_block("192.0.2.0/30").unwrap();
        assert_eq!(
            (b.first, b.last, b.size()),
            (ip("192.0.2.0"), ip("192.0.2.3"), 4)
        );
        let r = parse_block("198.51.100.10-198.51.100.20").unwrap();
        assert_eq!(r.size(), 11);
        assert_eq!(r.to_string(), "198.51.100.10-198.51.100.20");
        let one = parse_block("2001:db8::7").unwrap();
        assert_eq!((one.size(), one.family()), (1, Family::V6));
        assert_eq!(parse_block("0.0.0.0/0").unwrap().size(), 1 << 32);
        assert_eq!(parse_block("::/0").unwrap().size(), u128::MAX);
        assert_eq!(
            parse_block("2001:db8::/120").unwrap().last,
            ip("2001:db8::ff")
        );
        for bad in [
            "192.0.2.1/30",
            "192.0.2.9-192.0.2.1",
            "192.0.2.1-2001:db8::1",
            "192.0.2.1 - 192.0.2.9",
            "::ffff:10.0.0.1",
            "10.0.0.0/33",
            "",
            "pool",
            "10.0.0.1-",
        ] {
            assert!(parse_block(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn contains_and_overlaps_respect_families() {
        let a = parse_block("10.0.0.0/24").unwrap();
        assert!(a.contains(ip("10.0.0.255")) && !a.contains(ip("10.0.1.0")));
        assert!(!a.contains(ip("::a00:0")));
        assert!(a.overlaps(&parse_block("10.0.0.255-10.0.1.3").unwrap()));
        assert!(!a.overlaps(&parse_block("10.0.1.0-10.0.1.3").unwrap()));
        assert!(!a.overlaps(&parse_block("::/0").unwrap()));
    }

    #[test]
    fn buggy_addresses_are_counted_and_skipped() {
        // Brute force against the closed form on awkward edges.
        for (first, last) in [
            (0u32, 0u32),
            (0, 255),
            (255, 256),
            (1, 254),
            (250, 1030),
            (u32::MAX - 300, u32::MAX),
        ] {
            let block = AddressBlock {
                first: IpAddr::V4(first.into()),
                last: IpAddr::V4(last.into()),
            };
            let brute = (first..=last)
                .filter(|n| matches!(n % 256, 0 | 255))
                .count() as u128;
            assert_eq!(block.buggy_count(), brute, "{block}");
        }
        let b = parse_block("10.0.0.254-10.0.1.1").unwrap();
        assert_eq!(b.usable(true), 2);
        assert_eq!(b.first_free(true, |_| false), Some(ip("10.0.0.254")));
        assert_eq!(
            b.first_free(true, |a| a == ip("10.0.0.254")),
            Some(ip("10.0.1.1"))
        );
        assert_eq!(
            b.first_free(false, |a| a == ip("10.0.0.254")),
            Some(ip("10.0.0.255"))
        );
        let all = parse_block("10.0.0.255-10.0.1.0").unwrap();
        assert_eq!(all.first_free(true, |_| false), None);
        assert_eq!(parse_block("2001:db8::ff").unwrap().buggy_count(), 0);
    }
}
