//! Parsers of the text forms the API uses for addresses, prefixes and MACs.
//!
//! Each accepts exactly what the CRD's schema pattern or CEL function accepts (`isIP`,
//! `ip.isCanonical`, `isCIDR` + `masked()`, the MAC pattern), so that the Rust validation, the
//! typed accessors of the spec (`Vip::ip`, `Encap::v4_prefix`...) and the apiserver agree on
//! every input. Errors are one-line messages naming the offending text; callers prefix the
//! field path. This module imports nothing of the crate.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An IP prefix (`addr/len`) with no host bits set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpPrefix {
    /// Network address (host bits are zero).
    pub addr: IpAddr,
    /// Prefix length in bits.
    pub len: u8,
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for IpPrefix {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_prefix(s)
    }
}

/// Parses an IP address the way the CRD's `isIP` accepts it: IPv4 (no leading zeros) or IPv6,
/// no zone, no IPv4-mapped IPv6 (`::ffff:10.0.0.1`; write the IPv4 address). Any textual form.
pub fn parse_ip(text: &str) -> Result<IpAddr, String> {
    let ip: IpAddr = text
        .parse()
        .map_err(|_| format!("{text:?} is not an IP address"))?;
    if let IpAddr::V6(v6) = ip
        && v6.to_ipv4_mapped().is_some()
    {
        return Err(format!(
            "{text:?} is an IPv4-mapped IPv6 address; write the IPv4 address instead"
        ));
    }
    Ok(ip)
}

/// Like [`parse_ip`], and the text must be canonical (`ip.isCanonical`: lower case, RFC 5952
/// zero compression), as VIP addresses must be: the apiserver tells VIPs apart by their text.
pub fn parse_canonical_ip(text: &str) -> Result<IpAddr, String> {
    let ip = parse_ip(text)?;
    let canonical = ip.to_string();
    if canonical != text {
        return Err(format!(
            "{text:?} is not in canonical form, write {canonical:?}"
        ));
    }
    Ok(ip)
}

/// Parses `aa:bb:cc:dd:ee:ff` (either case), the syntax the schema's pattern accepts.
pub fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let bad = || format!("{text:?} is not a MAC address (expected aa:bb:cc:dd:ee:ff)");
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().ok_or_else(bad)?;
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(mac)
}

/// Parses `addr/len` with a length within the family and no host bits set (what
/// `isCIDR(s) && cidr(s).masked() == cidr(s)` accepts).
pub fn parse_prefix(text: &str) -> Result<IpPrefix, String> {
    let (addr, len) = text
        .split_once('/')
        .ok_or_else(|| format!("{text:?} is not a CIDR prefix (addr/len)"))?;
    let addr = parse_ip(addr).map_err(|e| format!("{text:?}: {e}"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len: u8 = match len.parse::<u8>() {
        Ok(n) if n <= max && n.to_string() == len => n,
        _ => return Err(format!("{text:?}: prefix length must be 0..={max}")),
    };
    let masked = mask(addr, len);
    if masked != addr {
        return Err(format!(
            "{text:?} has host bits set, write \"{masked}/{len}\""
        ));
    }
    Ok(IpPrefix { addr, len })
}

fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a) & u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4(bits.into())
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a) & u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6(bits.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_prefix_masks_both_families() {
        let p = parse_prefix("0.0.0.0/0").unwrap();
        assert_eq!((p.addr.to_string(), p.len), ("0.0.0.0".into(), 0));
        assert!(parse_prefix("10.0.0.1/32").is_ok());
        assert!(parse_prefix("10.0.0.1/31").is_err());
        assert!(parse_prefix("::/0").is_ok());
        assert!(parse_prefix("2001:db8::1/128").is_ok());
        assert!(parse_prefix("2001:db8::1/127").is_err());
        assert_eq!(
            "fc00:6d6c:62::/96".parse::<IpPrefix>().unwrap().to_string(),
            "fc00:6d6c:62::/96"
        );
    }

    #[test]
    fn macs_and_ips_refuse_near_misses() {
        assert_eq!(
            parse_mac("0a:1B:2c:3D:4e:5F"),
            Ok([0x0a, 0x1b, 0x2c, 0x3d, 0x4e, 0x5f])
        );
        for bad in [
            "",
            "0a:1b:2c:3d:4e",
            "0a:1b:2c:3d:4e:5f:60",
            "0a-1b-2c-3d-4e-5f",
            "0a:1b:2c:3d:4e:5",
            "+a:1b:2c:3d:4e:5f",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad:?}");
        }
        assert!(parse_ip("::ffff:10.0.0.1").is_err());
        assert!(parse_ip("010.0.0.1").is_err());
        assert!(parse_ip("fe80::1%eth0").is_err());
        assert!(parse_canonical_ip("2001:0db8::1").is_err());
        assert!(parse_prefix("10.0.0.0/08").is_err());
        assert!(parse_prefix("10.0.0.0").is_err());
    }
}
