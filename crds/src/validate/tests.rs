use super::*;
use crate::loadbalancer::{Backend, LoadBalancerSpec, Vip};
use crate::parse::{parse_canonical_ip, parse_ip, parse_mac};

/// A spec from the YAML of its body (what sits under `spec:`).
fn spec(yaml: &str) -> LoadBalancerSpec {
    serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("test spec does not parse: {e}\n{yaml}"))
}

fn ok(yaml: &str) {
    if let Err(e) = spec(yaml).validate() {
        panic!("expected valid, got:\n{e}\n--- spec:\n{yaml}");
    }
}

/// Asserts the spec is refused with an error at `path` whose message contains `needle`.
fn refused(yaml: &str, path: &str, needle: &str) {
    let errors = match spec(yaml).validate() {
        Ok(()) => panic!("expected an error at {path}, spec is valid:\n{yaml}"),
        Err(e) => e,
    };
    assert!(
        errors
            .errors()
            .iter()
            .any(|e| e.path == path && e.message.contains(needle)),
        "expected `{path}: ...{needle}...`, got:\n{errors}"
    );
}

fn vip(address: &str, backends: &[&str]) -> Vip {
    Vip {
        name: None,
        address: address.into(),
        port: 80,
        protocol: Protocol::Tcp,
        backends: backends
            .iter()
            .map(|a| Backend {
                address: (*a).into(),
                weight: 1,
            })
            .collect(),
        backend_service: None,
    }
}

const ONE_VIP: &str = "
vips:
  - address: 10.0.0.10
    port: 80
    backends:
      - address: 10.1.0.1
      - address: 10.1.0.2
";

#[test]
fn default_and_typical_specs_are_valid() {
    assert_eq!(LoadBalancerSpec::default().validate(), Ok(()));
    ok("{}");
    ok(ONE_VIP);
}

// ---- addresses ----

#[test]
fn vip_and_backend_addresses_must_parse() {
    refused(
        "vips: [{address: 10.0.0.300, backends: [{address: 10.1.0.1}]}]",
        "spec.vips[0].address",
        r#""10.0.0.300" is not an IP address"#,
    );
    let text = "
vips:
  - address: 10.0.0.1
  - address: 10.0.0.2
    backends: [{address: 10.1.0.1}, {address: 10.0.0.300}]
";
    let errors = spec(text).validate().unwrap_err();
    assert_eq!(
        errors.to_string(),
        r#"spec.vips[1].backends[1].address: "10.0.0.300" is not an IP address"#
    );
    refused(
        "vips: [{address: web.example.com}]",
        "spec.vips[0].address",
        "is not an IP address",
    );
    refused(
        "vips: [{address: ''}]",
        "spec.vips[0].address",
        "is not an IP address",
    );
    refused(
        "vips: [{address: 'fe80::1%eth0'}]",
        "spec.vips[0].address",
        "is not an IP address",
    );
}

#[test]
fn vip_addresses_must_be_canonical_and_no_address_ipv4_mapped() {
    refused(
        "vips: [{address: '2001:DB8::1'}]",
        "spec.vips[0].address",
        r#"write "2001:db8::1""#,
    );
    refused(
        "vips: [{address: '2001:db8:0:0:0:0:0:1'}]",
        "spec.vips[0].address",
        "not in canonical form",
    );
    refused(
        "vips: [{address: 10.0.0.1, backends: [{address: '::ffff:10.1.0.1'}]}]",
        "spec.vips[0].backends[0].address",
        "IPv4-mapped",
    );
    refused(
        "vips: [{address: '::ffff:10.0.0.1'}]",
        "spec.vips[0].address",
        "IPv4-mapped",
    );
    refused(
        "vips: [{address: 010.0.0.1}]",
        "spec.vips[0].address",
        "010.0.0.1",
    );
    ok("vips: [{address: '2001:db8::1', backends: [{address: '2001:db8:1::a'}]}]");
}

#[test]
fn backend_and_next_hop_addresses_may_be_written_in_any_form() {
    ok("vips: [{address: '2001:db8::1', backends: [{address: '2001:DB8:1:0:0:0:0:A'}]}]");
    ok("nextHop: {address: 'FE80::1'}");
    // Two spellings of one backend are still one backend.
    refused(
        "vips: [{address: '2001:db8::1', backends: [{address: '2001:db8::a'}, {address: '2001:DB8::A'}]}]",
        "spec.vips[0].backends[1].address",
        "duplicate backend 2001:db8::a",
    );
    assert_eq!(parse_ip("2001:DB8::A"), Ok("2001:db8::a".parse().unwrap()));
    assert!(parse_canonical_ip("2001:DB8::A").is_err());
    assert!(parse_canonical_ip("10.0.0.1").is_ok());
}

// ---- duplicates ----

#[test]
fn duplicate_vips_are_refused() {
    let text = "
vips:
  - {address: 10.0.0.1, port: 80}
  - {address: 10.0.0.1, port: 443}
  - {address: 10.0.0.1, port: 80, protocol: TCP}
";
    refused(
        text,
        "spec.vips[2]",
        "duplicate VIP 10.0.0.1:80/TCP, already defined by spec.vips[0]",
    );
    // Omitted port and protocol are the defaults (0 and TCP), so these collide too.
    refused(
        "vips: [{address: 10.0.0.1}, {address: 10.0.0.1, port: 0, protocol: TCP}]",
        "spec.vips[1]",
        "duplicate VIP 10.0.0.1:*/TCP",
    );
    refused(
        "vips: [{address: '2001:db8::1', port: 53, protocol: UDP}, {address: '2001:db8::1', port: 53, protocol: UDP}]",
        "spec.vips[1]",
        "[2001:db8::1]:53/UDP",
    );
}

#[test]
fn same_address_with_other_port_protocol_or_all_ports_is_allowed() {
    ok("
vips:
  - {address: 10.0.0.1, port: 0}
  - {address: 10.0.0.1, port: 80}
  - {address: 10.0.0.1, port: 80, protocol: UDP}
  - {address: 10.0.0.1, port: 0, protocol: UDP}
  - {address: 10.0.0.2, port: 80}
");
}

#[test]
fn duplicate_backends_within_a_vip_are_refused() {
    refused(
        "vips: [{address: 10.0.0.1, backends: [{address: 10.1.0.1}, {address: 10.1.0.2}, {address: 10.1.0.1, weight: 5}]}]",
        "spec.vips[0].backends[2].address",
        "duplicate backend 10.1.0.1, already spec.vips[0].backends[0]",
    );
    // The same backend behind two VIPs is normal.
    ok("
vips:
  - {address: 10.0.0.1, port: 80, backends: [{address: 10.1.0.1}]}
  - {address: 10.0.0.1, port: 443, backends: [{address: 10.1.0.1}]}
");
}

#[test]
fn vip_names_are_dns_labels_and_unique() {
    ok(
        "vips: [{name: web, address: 10.0.0.1, port: 80}, {name: web-tls, address: 10.0.0.1, port: 443}]",
    );
    refused(
        "vips: [{name: web, address: 10.0.0.1, port: 80}, {name: web, address: 10.0.0.1, port: 443}]",
        "spec.vips[1].name",
        r#""web" is already the name of spec.vips[0]"#,
    );
    refused(
        "vips: [{name: Web_1, address: 10.0.0.1}]",
        "spec.vips[0].name",
        "must be a DNS label",
    );
    refused(
        "vips: [{name: '-web', address: 10.0.0.1}]",
        "spec.vips[0].name",
        "must be a DNS label",
    );
    refused(
        "vips: [{name: '', address: 10.0.0.1}]",
        "spec.vips[0].name",
        "must be a DNS label",
    );
    let long = format!("vips: [{{name: {}, address: 10.0.0.1}}]", "a".repeat(64));
    refused(&long, "spec.vips[0].name", "must be a DNS label");
}

// ---- weights ----

#[test]
fn total_weight_must_be_positive_unless_the_vip_is_empty() {
    refused(
        "vips: [{address: 10.0.0.1, backends: [{address: 10.1.0.1, weight: 0}, {address: 10.1.0.2, weight: 0}]}]",
        "spec.vips[0].backends",
        "total backend weight is 0",
    );
    // An empty VIP is allowed (it drops), and so is a drained backend next to a live one.
    ok("vips: [{address: 10.0.0.1, backends: []}]");
    ok("vips: [{address: 10.0.0.1}]");
    ok(
        "vips: [{address: 10.0.0.1, backends: [{address: 10.1.0.1, weight: 0}, {address: 10.1.0.2}]}]",
    );
    // Large weights do not overflow the sum.
    ok(
        "vips: [{address: 10.0.0.1, backends: [{address: 10.1.0.1, weight: 4294967295}, {address: 10.1.0.2, weight: 4294967295}]}]",
    );
}

// ---- families ----

#[test]
fn ipv4_vip_may_use_ipv6_reals_but_not_a_mix() {
    ok(
        "vips: [{address: 10.0.0.1, backends: [{address: '2001:db8::a'}, {address: '2001:db8::b'}]}]",
    );
    refused(
        "vips: [{address: 10.0.0.1, backends: [{address: 10.1.0.1}, {address: '2001:db8::b'}]}]",
        "spec.vips[0].backends",
        "mixes 1 IPv4 and 1 IPv6 backends",
    );
}

#[test]
fn ipv6_vip_needs_ipv6_reals() {
    ok("vips: [{address: '2001:db8::1', backends: [{address: '2001:db8::a'}]}]");
    refused(
        "vips: [{address: '2001:db8::1', backends: [{address: '2001:db8::a'}, {address: 10.1.0.1}]}]",
        "spec.vips[0].backends[1].address",
        "10.1.0.1 is IPv4, but an IPv6 VIP needs IPv6 backends",
    );
}

// ---- Maglev table ----

#[test]
fn maglev_table_size_must_be_a_prime_in_range() {
    ok("hashing: {maglevTableSize: 7}");
    ok("hashing: {maglevTableSize: 251}");
    ok("hashing: {maglevTableSize: 1000003}");
    refused(
        "hashing: {maglevTableSize: 65536}",
        "spec.hashing.maglevTableSize",
        "65536 is not a prime",
    );
    refused(
        "hashing: {maglevTableSize: 1000001}",
        "spec.hashing.maglevTableSize",
        "is not a prime",
    );
    refused(
        "hashing: {maglevTableSize: 5}",
        "spec.hashing.maglevTableSize",
        "5 is out of range",
    );
    refused(
        "hashing: {maglevTableSize: 0}",
        "spec.hashing.maglevTableSize",
        "out of range",
    );
    refused(
        "hashing: {maglevTableSize: 1000033}",
        "spec.hashing.maglevTableSize",
        "must be between 7 and 1000003",
    );
}

#[test]
fn maglev_table_must_exceed_the_backend_count_of_every_vip() {
    let mut s = LoadBalancerSpec::default();
    s.hashing.maglev_table_size = 7;
    let six: Vec<String> = (1..=6).map(|i| format!("10.1.0.{i}")).collect();
    let refs: Vec<&str> = six.iter().map(String::as_str).collect();
    s.vips.push(vip("10.0.0.1", &refs));
    assert_eq!(s.validate(), Ok(()));
    s.vips[0].backends.push(Backend {
        address: "10.1.0.7".into(),
        weight: 1,
    });
    let e = s.validate().unwrap_err();
    assert_eq!(
        e.to_string(),
        "spec.hashing.maglevTableSize: 7 must exceed the number of backends of spec.vips[0] (7)"
    );
}

// ---- backendService ----

#[test]
fn backend_service_is_exclusive_with_backends_and_named_like_a_service() {
    ok("vips: [{address: 10.0.0.1, backendService: {name: web}}]");
    ok("vips: [{address: 10.0.0.1, backends: [], backendService: {name: web-2}}]");
    refused(
        "vips: [{address: 10.0.0.1, backends: [{address: 10.1.0.1}], backendService: {name: web}}]",
        "spec.vips[0].backendService",
        "exclusive",
    );
    for bad in ["2web", "Web", "web-", "web.prod", ""] {
        refused(
            &format!("vips: [{{address: 10.0.0.1, backendService: {{name: '{bad}'}}}}]"),
            "spec.vips[0].backendService.name",
            "is not a Service name",
        );
    }
    refused(
        &format!(
            "vips: [{{address: 10.0.0.1, backendService: {{name: {}}}}}]",
            "a".repeat(64)
        ),
        "spec.vips[0].backendService.name",
        "at most 63",
    );
}

#[test]
fn a_node_state_carries_resolved_backends_only() {
    let state = LoadBalancerNodeStateSpec {
        node_name: "node-a".into(),
        load_balancer: "web".into(),
        interface: None,
        lb: spec("vips: [{address: 10.0.0.1}, {address: 10.0.0.2, backendService: {name: web}}]"),
        load_balancer_created: None,
    };
    let e = state.validate().unwrap_err();
    assert_eq!(e.errors().len(), 1, "{e}");
    assert_eq!(e.errors()[0].path, "spec.lb.vips[1].backendService");
}

// ---- list sizes ----

#[test]
fn vip_and_backend_counts_are_bounded() {
    let mut s = LoadBalancerSpec::default();
    s.vips.extend((0..=MAX_VIPS_PER_LOADBALANCER).map(|i| Vip {
        port: i as u16 + 1,
        ..vip("10.0.0.1", &[])
    }));
    let e = s.validate().unwrap_err();
    assert!(
        e.mentions("spec.vips") && e.to_string().contains("257 VIPs, at most 256"),
        "{e}"
    );
    s.vips.truncate(MAX_VIPS_PER_LOADBALANCER);
    assert_eq!(s.validate(), Ok(()));

    let mut s = LoadBalancerSpec::default();
    let addrs: Vec<String> = (0..=MAX_BACKENDS_PER_VIP)
        .map(|i| std::net::Ipv4Addr::from(0x0a01_0000 + i as u32).to_string())
        .collect();
    let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    s.vips.push(vip("10.0.0.1", &refs));
    let e = s.validate().unwrap_err();
    assert!(
        e.to_string()
            .contains("spec.vips[0].backends: 1025 backends, at most 1024"),
        "{e}"
    );
    s.vips[0].backends.pop();
    assert_eq!(s.validate(), Ok(()));
}

// ---- flow marks, MTU ----

#[test]
fn mark_capacity_and_idle_timeout_ranges() {
    ok("flowMarks: {scope: PerReal, capacity: 1, idleTimeoutSeconds: 1}");
    ok("flowMarks: {scope: Disabled, capacity: 65535, idleTimeoutSeconds: 86400}");
    refused(
        "flowMarks: {capacity: 0}",
        "spec.flowMarks.capacity",
        "0 is out of range",
    );
    refused(
        "flowMarks: {capacity: 65536}",
        "spec.flowMarks.capacity",
        "between 1 and 65535",
    );
    refused(
        "flowMarks: {idleTimeoutSeconds: 0}",
        "spec.flowMarks.idleTimeoutSeconds",
        "out of range",
    );
    refused(
        "flowMarks: {idleTimeoutSeconds: 86401}",
        "spec.flowMarks.idleTimeoutSeconds",
        "between 1 and 86400",
    );
}

#[test]
fn udp_packets_before_mark_range() {
    ok("flowMarks: {udpPacketsBeforeMark: 1}");
    ok("flowMarks: {udpPacketsBeforeMark: 255}");
    refused(
        "flowMarks: {udpPacketsBeforeMark: 0}",
        "spec.flowMarks.udpPacketsBeforeMark",
        "0 is out of range",
    );
    refused(
        "flowMarks: {udpPacketsBeforeMark: 256}",
        "spec.flowMarks.udpPacketsBeforeMark",
        "between 1 and 255",
    );
}

#[test]
fn mtu_range() {
    ok("mtu: {size: 1280}");
    ok("mtu: {size: 9216, tooBig: Drop}");
    refused(
        "mtu: {size: 1279}",
        "spec.mtu.size",
        "1279 is out of range, must be between 1280 and 9216",
    );
    refused("mtu: {size: 9217}", "spec.mtu.size", "out of range");
}

// ---- next hop ----

#[test]
fn next_hop_mac_and_address_syntax() {
    ok("nextHop: {mac: 'aa:bb:cc:dd:ee:ff'}");
    ok("nextHop: {mac: 'AA:BB:CC:00:11:22', address: 10.0.0.254}");
    ok("nextHop: {address: 'fe80::1'}");
    ok("nextHop: {}");
    for bad in [
        "aa:bb:cc:dd:ee",
        "aa:bb:cc:dd:ee:ff:00",
        "aa-bb-cc-dd-ee-ff",
        "aabb.ccdd.eeff",
        "a:bb:cc:dd:ee:ff",
        "gg:bb:cc:dd:ee:ff",
        "+a:bb:cc:dd:ee:ff",
    ] {
        refused(
            &format!("nextHop: {{mac: '{bad}'}}"),
            "spec.nextHop.mac",
            "is not a MAC address",
        );
    }
    refused(
        "nextHop: {address: gateway}",
        "spec.nextHop.address",
        "is not an IP address",
    );
    assert_eq!(
        parse_mac("0a:1B:2c:3D:4e:5F"),
        Ok([0x0a, 0x1b, 0x2c, 0x3d, 0x4e, 0x5f])
    );
}

// ---- encap prefixes ----

#[test]
fn encap_prefixes_need_family_length_and_no_host_bits() {
    ok("encap: {sourcePrefixV4: 10.99.0.0/16, sourcePrefixV6: 'fd00:1::/96'}");
    refused(
        "encap: {sourcePrefixV4: 172.16.0.0/24}",
        "spec.encap.sourcePrefixV4",
        "must have prefix length 16, not 24",
    );
    refused(
        "encap: {sourcePrefixV4: 172.16.1.0/16}",
        "spec.encap.sourcePrefixV4",
        r#"has host bits set, write "172.16.0.0/16""#,
    );
    refused(
        "encap: {sourcePrefixV4: 172.16.0.0}",
        "spec.encap.sourcePrefixV4",
        "is not a CIDR prefix",
    );
    refused(
        "encap: {sourcePrefixV4: 172.16.0.0/33}",
        "spec.encap.sourcePrefixV4",
        "prefix length must be 0..=32",
    );
    refused(
        "encap: {sourcePrefixV4: 172.16.0.0/016}",
        "spec.encap.sourcePrefixV4",
        "prefix length",
    );
    refused(
        "encap: {sourcePrefixV4: 'fd00::/96'}",
        "spec.encap.sourcePrefixV4",
        "is not an IPv4 prefix",
    );
    refused(
        "encap: {sourcePrefixV6: 'fd00::/64'}",
        "spec.encap.sourcePrefixV6",
        "must have prefix length 96, not 64",
    );
    refused(
        "encap: {sourcePrefixV6: 'fd00::1/96'}",
        "spec.encap.sourcePrefixV6",
        r#"write "fd00::/96""#,
    );
    ok("encap: {sourcePrefixV6: 'fd00::1:0:0/96'}");
    refused(
        "encap: {sourcePrefixV6: 172.16.0.0/16}",
        "spec.encap.sourcePrefixV6",
        "is not an IPv6 prefix",
    );
    ok("encap: {sourcePrefixV6: 'FD00::/96'}");
}

// ---- interface ----

#[test]
fn interface_names_follow_the_kernel_rules() {
    ok("interface: eth0");
    ok("interface: enp65s0f0np0");
    ok("interface: vlan.100");
    for bad in ["", ".", "..", "eth/0", "eth:0", "eth 0", "abcdefghijklmnop"] {
        refused(
            &format!("interface: '{bad}'"),
            "spec.interface",
            "is not a network interface name",
        );
    }
}

// ---- reporting ----

#[test]
fn every_error_is_reported_with_its_path() {
    let text = "
vips:
  - {address: 10.0.0.1, backends: [{address: 10.1.0.1, weight: 0}]}
  - {address: bad, backends: [{address: 10.1.0.1}]}
hashing: {maglevTableSize: 100}
flowMarks: {capacity: 0}
mtu: {size: 64000}
nextHop: {mac: zz}
encap: {sourcePrefixV4: 1.2.3.4/8}
interface: '..'
";
    let e = spec(text).validate().unwrap_err();
    let paths: Vec<&str> = e.errors().iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "spec.hashing.maglevTableSize",
            "spec.vips[0].backends",
            "spec.vips[1].address",
            "spec.flowMarks.capacity",
            "spec.mtu.size",
            "spec.nextHop.mac",
            "spec.encap.sourcePrefixV4",
            "spec.interface",
        ],
        "{e}"
    );
    assert_eq!(e.to_string().lines().count(), e.len());
    assert!(e.mentions("spec.vips[0]") && e.mentions("spec.vips") && !e.mentions("spec.vip"));
}

#[test]
fn validate_at_prefixes_paths_for_embedded_specs() {
    let s = spec("vips: [{address: nope}]");
    let e = s.validate_at("spec.lb").unwrap_err();
    assert_eq!(e.errors()[0].path, "spec.lb.vips[0].address");
}

#[test]
fn node_state_spec_validation() {
    let good = LoadBalancerNodeStateSpec {
        node_name: "node-a".into(),
        load_balancer: "web".into(),
        interface: Some("eth0".into()),
        lb: spec(ONE_VIP),
        load_balancer_created: None,
    };
    assert_eq!(good.validate(), Ok(()));
    let bad = LoadBalancerNodeStateSpec {
        node_name: String::new(),
        load_balancer: String::new(),
        interface: Some("a/b".into()),
        lb: spec("mtu: {size: 1}"),
        load_balancer_created: None,
    };
    let e = bad.validate().unwrap_err();
    let paths: Vec<&str> = e.errors().iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "spec.nodeName",
            "spec.loadBalancer",
            "spec.interface",
            "spec.lb.mtu.size"
        ]
    );
}

#[test]
fn typed_accessors_parse_valid_specs() {
    let s = spec(
        "
vips: [{name: dns, address: '2001:db8::53', port: 53, protocol: UDP, backends: [{address: '2001:db8::a'}]}]
nextHop: {mac: '02:00:00:00:00:01', address: 10.0.0.254}
",
    );
    let v = &s.vips[0];
    assert_eq!(v.ip(), Some("2001:db8::53".parse().unwrap()));
    assert_eq!(v.backends[0].ip(), Some("2001:db8::a".parse().unwrap()));
    assert_eq!(v.label(), "dns");
    assert_eq!(v.endpoint(), "[2001:db8::53]:53/UDP");
    assert_eq!(v.protocol.ip_proto(), 17);
    let nh = s.next_hop.as_ref().unwrap();
    assert_eq!(nh.mac_bytes(), Some([2, 0, 0, 0, 0, 1]));
    assert_eq!(nh.ip(), Some("10.0.0.254".parse().unwrap()));
    let p4 = s.encap.v4_prefix().unwrap();
    assert_eq!((p4.addr.to_string(), p4.len), ("172.16.0.0".into(), 16));
    assert_eq!(s.encap.v6_prefix().unwrap().len, 96);
    assert_eq!(vip("10.0.0.1", &[]).label(), "10.0.0.1:80/TCP");
    assert_eq!(
        Vip {
            port: 0,
            ..vip("10.0.0.1", &[])
        }
        .endpoint(),
        "10.0.0.1:*/TCP"
    );
}

#[test]
fn serialization_round_trips_with_defaults_written_out() {
    let s = spec(ONE_VIP);
    let yaml = serde_yaml::to_string(&s).unwrap();
    assert!(
        yaml.contains("protocol: TCP") && yaml.contains("weight: 1"),
        "{yaml}"
    );
    assert!(
        !yaml.contains("nextHop") && !yaml.contains("interface"),
        "{yaml}"
    );
    assert_eq!(spec(&yaml), s);
}

#[test]
fn node_wide_settings_are_compared_field_by_field() {
    let a = spec(ONE_VIP);
    assert!(a.node_setting_differences(&spec("{}")).is_empty());
    // An empty next hop means "resolve the gateway", like no next hop.
    assert!(a.node_setting_differences(&spec("nextHop: {}")).is_empty());
    let b = spec(
        "
interface: eth1
nextHop: {address: 10.0.0.254}
mtu: {size: 9000}
flowMarks: {scope: PerReal}
icmpEcho: false
encap: {sourcePrefixV4: 172.17.0.0/16}
hashing: {maglevTableSize: 7}
",
    );
    assert_eq!(
        a.node_setting_differences(&b),
        [
            "interface",
            "nextHop",
            "encap",
            "mtu",
            "flowMarks",
            "icmpEcho"
        ]
    );
    assert_eq!(b.node_setting_differences(&a).len(), 6);
    // VIP keys compare parsed addresses.
    let v1 = spec("vips: [{address: '2001:db8::1', port: 80}]");
    let v2 =
        spec("vips: [{address: '2001:db8::1', port: 80, backends: [{address: '2001:db8::a'}]}]");
    assert_eq!(v1.vips[0].key(), v2.vips[0].key());
    assert!(!a.uses_backend_service());
    assert!(
        spec("vips: [{address: 10.0.0.1, backendService: {name: web}}]").uses_backend_service()
    );
}
