//! Validation of a [`LoadBalancerSpec`] in Rust, for callers that have no apiserver.
//!
//! The agent runs standalone from a manifest file, and the operator wants to refuse a spec
//! before it fans it out to nodes, so every rule the CRD schema and its CEL rules enforce is
//! repeated here (plus the one CEL cannot express: the Maglev table size being prime). Each
//! message starts with the field path (`spec.vips[1].backends[0].address: ...`) so a user can
//! find the line, and all errors are reported at once rather than the first only.
//!
//! VIP addresses must be in canonical form (as `ip.isCanonical` requires on the apiserver), so
//! that the apiserver's list-map uniqueness of VIPs, which compares text, agrees with the
//! comparison of parsed addresses done here. Backend addresses may be written in any form; two
//! spellings of one backend pass the apiserver's text comparison but are caught here.
//!
//! Imports point one way: this module uses the types, [`limits`](crate::limits) and
//! [`parse`](crate::parse); none of them uses it.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;

use crate::limits::{
    ENCAP_V4_PREFIX_LEN, ENCAP_V6_PREFIX_LEN, MAX_BACKENDS_PER_VIP, MAX_MAGLEV_TABLE_SIZE,
    MAX_MARK_CAPACITY, MAX_MARK_IDLE_TIMEOUT_SECONDS, MAX_MTU, MAX_UDP_PACKETS_BEFORE_MARK,
    MAX_VIPS_PER_LOADBALANCER, MIN_MAGLEV_TABLE_SIZE, MIN_MTU, is_prime,
};
use crate::loadbalancer::{LoadBalancerSpec, Protocol, Vip};
use crate::node_state::LoadBalancerNodeStateSpec;
use crate::parse::{parse_canonical_ip, parse_ip, parse_mac, parse_prefix};

/// One invalid field: where it is and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct FieldError {
    /// Field path from the object root, e.g. `spec.vips[1].backends[0].address`.
    pub path: String,
    /// What is wrong, naming the offending value.
    pub message: String,
}

/// Every problem found in one spec (never empty when returned as an error). Displays one
/// error per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(Vec<FieldError>);

impl ValidationErrors {
    /// The individual errors, in field order.
    pub fn errors(&self) -> &[FieldError] {
        &self.0
    }

    /// Consumes the aggregate into its errors.
    pub fn into_errors(self) -> Vec<FieldError> {
        self.0
    }

    /// Number of errors.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always false for a returned error; present for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether any error is about `path` or a field below it.
    pub fn mentions(&self, path: &str) -> bool {
        self.0.iter().any(|e| {
            e.path == path
                || e.path
                    .strip_prefix(path)
                    .is_some_and(|rest| rest.starts_with(['.', '[']))
        })
    }
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Collects errors while the rules run.
#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }

    fn finish(self) -> Result<(), ValidationErrors> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ValidationErrors(self.0))
        }
    }
}

/// A Linux interface name as the kernel accepts it (`dev_valid_name`): 1 to 15 bytes, not
/// `.` or `..`, no `/`, `:` or whitespace.
fn check_interface(errors: &mut Errors, path: &str, name: &str) {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace());
    if !ok {
        errors.push(
            path,
            format!(
                "{name:?} is not a network interface name (1 to 15 bytes, no '/', ':' or spaces)"
            ),
        );
    }
}

/// A DNS label (RFC 1123): what VIP names must be, so they can be metric labels and parts of
/// object names.
fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// A DNS-1035 label: what Service names must be.
fn is_dns1035_label(s: &str) -> bool {
    is_dns_label(s) && s.as_bytes()[0].is_ascii_lowercase()
}

impl LoadBalancerSpec {
    /// Checks every rule of the spec; the error lists all problems, each prefixed with its
    /// path below `spec`.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        self.validate_at("spec")
    }

    /// Like [`validate`](Self::validate), with paths below `prefix` (e.g. `spec.lb` for the
    /// spec embedded in a `LoadBalancerNodeState`).
    pub fn validate_at(&self, prefix: &str) -> Result<(), ValidationErrors> {
        let mut errors = Errors::default();
        self.check(&mut errors, prefix);
        errors.finish()
    }

    fn check(&self, errors: &mut Errors, p: &str) {
        let table = self.hashing.maglev_table_size;
        let table_path = format!("{p}.hashing.maglevTableSize");
        if !(MIN_MAGLEV_TABLE_SIZE..=MAX_MAGLEV_TABLE_SIZE).contains(&table) {
            errors.push(
                &table_path,
                format!(
                    "{table} is out of range, must be between {MIN_MAGLEV_TABLE_SIZE} and {MAX_MAGLEV_TABLE_SIZE}"
                ),
            );
        } else if !is_prime(table) {
            errors.push(
                &table_path,
                format!("{table} is not a prime (Maglev needs a prime table size, e.g. 65537)"),
            );
        }

        if self.vips.len() > MAX_VIPS_PER_LOADBALANCER {
            errors.push(
                format!("{p}.vips"),
                format!(
                    "{} VIPs, at most {MAX_VIPS_PER_LOADBALANCER} are allowed",
                    self.vips.len()
                ),
            );
        }
        let mut names: HashMap<&str, usize> = HashMap::new();
        // Key of a VIP: parsed address when it parses (textual otherwise), port, protocol.
        let mut seen: HashMap<(Result<IpAddr, &str>, u16, Protocol), usize> = HashMap::new();
        for (i, vip) in self.vips.iter().enumerate() {
            let vp = format!("{p}.vips[{i}]");
            if let Some(name) = &vip.name {
                if !is_dns_label(name) {
                    errors.push(
                        format!("{vp}.name"),
                        format!(
                            "{name:?} must be a DNS label (lower-case letters, digits and '-', at most 63)"
                        ),
                    );
                }
                if let Some(first) = names.insert(name, i) {
                    errors.push(
                        format!("{vp}.name"),
                        format!("{name:?} is already the name of {p}.vips[{first}]"),
                    );
                    names.insert(name, first);
                }
            }
            let vip_ip = match parse_canonical_ip(&vip.address) {
                Ok(ip) => Some(ip),
                Err(e) => {
                    errors.push(format!("{vp}.address"), e);
                    None
                }
            };
            let key = (vip_ip.ok_or(vip.address.as_str()), vip.port, vip.protocol);
            if let Some(first) = seen.get(&key) {
                errors.push(
                    vp.clone(),
                    format!(
                        "duplicate VIP {}, already defined by {p}.vips[{first}]",
                        vip.endpoint()
                    ),
                );
            } else {
                seen.insert(key, i);
            }
            self.check_backends(errors, &vp, vip_ip, vip);
            if let Some(service) = &vip.backend_service {
                if !is_dns1035_label(&service.name) {
                    errors.push(
                        format!("{vp}.backendService.name"),
                        format!(
                            "{:?} is not a Service name (a DNS-1035 label: lower-case letters, digits and '-', starting with a letter, at most 63)",
                            service.name
                        ),
                    );
                }
                if !vip.backends.is_empty() {
                    errors.push(
                        format!("{vp}.backendService"),
                        "backendService and backends are exclusive: list backends, or name a Service whose endpoints become the backends",
                    );
                }
            }

            if vip.backends.len() >= table as usize {
                errors.push(
                    &table_path,
                    format!(
                        "{table} must exceed the number of backends of {vp} ({})",
                        vip.backends.len()
                    ),
                );
            }
        }

        let marks = &self.flow_marks;
        if !(1..=MAX_MARK_CAPACITY).contains(&marks.capacity) {
            errors.push(
                format!("{p}.flowMarks.capacity"),
                format!(
                    "{} is out of range, must be between 1 and {MAX_MARK_CAPACITY} (marks are 16-bit and 0 means no mark)",
                    marks.capacity
                ),
            );
        }
        if !(1..=MAX_MARK_IDLE_TIMEOUT_SECONDS).contains(&marks.idle_timeout_seconds) {
            errors.push(
                format!("{p}.flowMarks.idleTimeoutSeconds"),
                format!(
                    "{} is out of range, must be between 1 and {MAX_MARK_IDLE_TIMEOUT_SECONDS}",
                    marks.idle_timeout_seconds
                ),
            );
        }
        if !(1..=MAX_UDP_PACKETS_BEFORE_MARK).contains(&marks.udp_packets_before_mark) {
            errors.push(
                format!("{p}.flowMarks.udpPacketsBeforeMark"),
                format!(
                    "{} is out of range, must be between 1 and {MAX_UDP_PACKETS_BEFORE_MARK}",
                    marks.udp_packets_before_mark
                ),
            );
        }

        if !(MIN_MTU..=MAX_MTU).contains(&self.mtu.size) {
            errors.push(
                format!("{p}.mtu.size"),
                format!(
                    "{} is out of range, must be between {MIN_MTU} and {MAX_MTU}",
                    self.mtu.size
                ),
            );
        }

        if let Some(next_hop) = &self.next_hop {
            if let Some(mac) = &next_hop.mac
                && let Err(e) = parse_mac(mac)
            {
                errors.push(format!("{p}.nextHop.mac"), e);
            }
            if let Some(address) = &next_hop.address
                && let Err(e) = parse_ip(address)
            {
                errors.push(format!("{p}.nextHop.address"), e);
            }
        }

        check_encap_prefix(
            errors,
            &format!("{p}.encap.sourcePrefixV4"),
            &self.encap.source_prefix_v4,
            false,
            ENCAP_V4_PREFIX_LEN,
        );
        check_encap_prefix(
            errors,
            &format!("{p}.encap.sourcePrefixV6"),
            &self.encap.source_prefix_v6,
            true,
            ENCAP_V6_PREFIX_LEN,
        );

        if let Some(interface) = &self.interface {
            check_interface(errors, &format!("{p}.interface"), interface);
        }
    }

    fn check_backends(&self, errors: &mut Errors, vp: &str, vip_ip: Option<IpAddr>, vip: &Vip) {
        if vip.backends.len() > MAX_BACKENDS_PER_VIP {
            errors.push(
                format!("{vp}.backends"),
                format!(
                    "{} backends, at most {MAX_BACKENDS_PER_VIP} are allowed per VIP",
                    vip.backends.len()
                ),
            );
        }
        let mut seen: BTreeMap<IpAddr, usize> = BTreeMap::new();
        let (mut v4, mut v6) = (0usize, 0usize);
        let mut total_weight: u64 = 0;
        for (k, backend) in vip.backends.iter().enumerate() {
            let bp = format!("{vp}.backends[{k}].address");
            total_weight += u64::from(backend.weight);
            let ip = match parse_ip(&backend.address) {
                Ok(ip) => ip,
                Err(e) => {
                    errors.push(bp, e);
                    continue;
                }
            };
            if let Some(first) = seen.insert(ip, k) {
                errors.push(
                    &bp,
                    format!("duplicate backend {ip}, already {vp}.backends[{first}]"),
                );
                seen.insert(ip, first);
            }
            if ip.is_ipv4() {
                v4 += 1;
                if vip_ip.is_some_and(|v| v.is_ipv6()) {
                    errors.push(
                        &bp,
                        format!("{ip} is IPv4, but an IPv6 VIP needs IPv6 backends"),
                    );
                }
            } else {
                v6 += 1;
            }
        }
        // An IPv6 VIP with IPv4 backends is reported per backend above.
        if v4 > 0 && v6 > 0 && !vip_ip.is_some_and(|v| v.is_ipv6()) {
            errors.push(
                format!("{vp}.backends"),
                format!(
                    "mixes {v4} IPv4 and {v6} IPv6 backends; backends of one VIP must all be IPv4 or all IPv6"
                ),
            );
        }
        if !vip.backends.is_empty() && total_weight == 0 {
            errors.push(
                format!("{vp}.backends"),
                "total backend weight is 0: give at least one backend a weight > 0 (a VIP without backends is allowed and drops)",
            );
        }
    }
}

fn check_encap_prefix(errors: &mut Errors, path: &str, text: &str, v6: bool, want_len: u8) {
    let family = if v6 { "IPv6" } else { "IPv4" };
    match parse_prefix(text) {
        Err(e) => errors.push(path, e),
        Ok(prefix) if prefix.addr.is_ipv6() != v6 => {
            errors.push(path, format!("{text:?} is not an {family} prefix"))
        }
        Ok(prefix) if prefix.len != want_len => errors.push(
            path,
            format!(
                "{text:?} must have prefix length {want_len}, not {}",
                prefix.len
            ),
        ),
        Ok(_) => {}
    }
}

impl LoadBalancerNodeStateSpec {
    /// Checks the node state spec: names present, interface valid, and the embedded
    /// LoadBalancer spec (paths below `spec.lb`), which must be resolved: no VIP may still
    /// name a `backendService` (the operator replaces it with the Service's backends).
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errors = Errors::default();
        if self.node_name.is_empty() {
            errors.push("spec.nodeName", "must not be empty");
        }
        if self.load_balancer.is_empty() {
            errors.push("spec.loadBalancer", "must not be empty");
        }
        if let Some(interface) = &self.interface {
            check_interface(&mut errors, "spec.interface", interface);
        }
        self.lb.check(&mut errors, "spec.lb");
        for (i, vip) in self.lb.vips.iter().enumerate() {
            if vip.backend_service.is_some() {
                errors.push(
                    format!("spec.lb.vips[{i}].backendService"),
                    "must be resolved into backends by the operator before it reaches a node",
                );
            }
        }
        errors.finish()
    }
}

#[cfg(test)]
mod tests;
