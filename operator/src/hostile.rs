//! Hostile LoadBalancers: thousands of generated specs, most of them wrong in some way, go
//! through what the operator does with a spec (parse, validate, resolve, derive node states,
//! roll up). None may panic; each is either refused by parsing (the apiserver's schema would
//! refuse it), or reported as `InvalidSpec` with field paths, or turned into node states that
//! pass the node-state validation the agents run.

use std::collections::{BTreeMap, BTreeSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::controller::refused_status;
use crate::desired::{node_states, resolve_spec};
use crate::endpoints::ServiceEndpoints;
use crate::fixtures::{at, lb};
use crate::rollup::{Inputs, rollup};

fn pick<'a, T>(rng: &mut StdRng, items: &'a [T]) -> &'a T {
    &items[rng.random_range(0..items.len())]
}

fn address(rng: &mut StdRng) -> Value {
    let odd = [
        "",
        "nope",
        "10.0.0",
        "010.0.0.1",
        "::ffff:10.0.0.1",
        "2001:DB8::1",
        "fe80::1%eth0",
        "10.0.0.1/32",
        "999.1.1.1",
        "1.2.3.4.5",
        " 10.0.0.1",
    ];
    match rng.random_range(0..30) {
        0..=2 => json!(pick(rng, &odd)),
        3 => json!("x".repeat(rng.random_range(40..200))),
        4 => json!(rng.random::<u32>()),
        5..=14 => json!(format!("2001:db8::{:x}", rng.random_range(1..40u32))),
        _ => json!(format!(
            "10.{}.0.{}",
            rng.random_range(0..3),
            rng.random_range(0..300)
        )),
    }
}

fn number(rng: &mut StdRng) -> Value {
    match rng.random_range(0..40) {
        0 => json!(-1),
        1 => json!(rng.random::<u64>()),
        2 => json!("80"),
        3..=5 => json!(0),
        6..=20 => json!(rng.random_range(1..100)),
        _ => json!(rng.random_range(0..65_540)),
    }
}

fn spec(rng: &mut StdRng) -> Value {
    let mut vips = Vec::new();
    for _ in 0..rng.random_range(0..6) {
        let mut vip = json!({"address": address(rng)});
        if rng.random_bool(0.7) {
            vip["port"] = number(rng);
        }
        if rng.random_bool(0.5) {
            vip["protocol"] = json!(pick(
                rng,
                &["TCP", "UDP", "TCP", "UDP", "TCP", "UDP", "SCTP", "tcp"]
            ));
        }
        if rng.random_bool(0.3) {
            vip["name"] = json!(pick(rng, &["web", "Web_1", "", "a-", "dns", "web"]));
        }
        if rng.random_bool(0.7) {
            let backends: Vec<Value> = (0..rng.random_range(0..8))
                .map(|_| {
                    let mut b = json!({"address": address(rng)});
                    if rng.random_bool(0.3) {
                        b["weight"] = number(rng);
                    }
                    b
                })
                .collect();
            vip["backends"] = json!(backends);
        }
        if rng.random_bool(0.3) {
            vip["backendService"] = json!({"name": pick(rng, &["api", "web", "1api", "", "API"])});
        }
        if rng.random_bool(0.02) {
            vip["adress"] = json!("10.0.0.1");
        }
        vips.push(vip);
    }
    let mut spec = json!({"vips": vips});
    if rng.random_bool(0.4) {
        spec["hashing"] = json!({"maglevTableSize": pick(rng, &[json!(7), json!(11), json!(65537), json!(65536), json!(0), json!(1_000_003), json!(2_000_003), json!(4_294_967_291u64)])});
    }
    if rng.random_bool(0.4) {
        spec["flowMarks"] = json!({"scope": pick(rng, &["PerFlow", "PerReal", "Disabled", "PerFlow", "PerReal", "Disabled", "Off"]), "capacity": number(rng), "idleTimeoutSeconds": number(rng)});
    }
    if rng.random_bool(0.3) {
        spec["mtu"] = json!({"size": number(rng), "tooBig": pick(rng, &["Icmp", "Drop", "Icmp", "Drop", "Ignore"])});
    }
    if rng.random_bool(0.3) {
        spec["encap"] = json!({"sourcePrefixV4": pick(rng, &["172.16.0.0/16", "172.16.0.1/16", "10.0.0.0/8", "fc00::/96", "x"]), "sourcePrefixV6": pick(rng, &["fc00:6d6c:62::/96", "fc00::/64", "10.0.0.0/16"])});
    }
    if rng.random_bool(0.3) {
        spec["nextHop"] = json!({"mac": pick(rng, &["02:00:00:00:00:01", "zz:00:00:00:00:01", "02-00-00-00-00-01"]), "address": address(rng)});
    }
    if rng.random_bool(0.3) {
        spec["interface"] = json!(pick(
            rng,
            &["eth0", "", ".", "a/b", "averyveryverylongname", "eth 0"]
        ));
    }
    if rng.random_bool(0.3) {
        spec["nodeSelector"] = json!({"zone": pick(rng, &["a", "", "b"])});
    }
    if rng.random_bool(0.3) {
        spec["icmpEcho"] = json!(pick(
            rng,
            &[json!(true), json!(false), json!(true), json!("yes")]
        ));
    }
    spec
}

#[test]
fn thousands_of_generated_specs_never_panic_and_are_refused_or_reported() {
    let mut rng = StdRng::seed_from_u64(0x6d6c62);
    let endpoints = BTreeMap::from([(
        "api".to_string(),
        ServiceEndpoints {
            v4: ["10.2.0.1".parse().unwrap(), "10.2.0.2".parse().unwrap()].into(),
            v6: ["2001:db8::a".parse().unwrap()].into(),
            slices: 1,
            skipped: 0,
        },
    )]);
    let nodes: BTreeSet<String> = ["n1", "n2", "n3"].iter().map(|n| n.to_string()).collect();
    let (mut unparsable, mut invalid, mut programmed) = (0, 0, 0);
    for i in 0..5_000 {
        let value = spec(&mut rng);
        let Ok(parsed) = serde_json::from_value::<marklb_crds::LoadBalancerSpec>(value.clone())
        else {
            unparsable += 1;
            continue;
        };
        let mut obj = lb("prod", &format!("lb-{i}"), 1, "{}");
        obj.spec = parsed;
        match obj.spec.validate() {
            Err(errors) => {
                invalid += 1;
                let status = refused_status(
                    &obj,
                    marklb_crds::conditions::reason::INVALID_SPEC,
                    &errors.to_string(),
                );
                let ready =
                    marklb_crds::conditions::find_condition(&status.conditions, "Ready").unwrap();
                assert_eq!(
                    (ready.status.as_str(), ready.reason.as_str()),
                    ("False", "InvalidSpec")
                );
                assert!(
                    ready.message.lines().all(|l| l.starts_with("spec.")),
                    "{value}: {}",
                    ready.message
                );
            }
            Ok(()) => match resolve_spec(&obj.spec, &endpoints) {
                Err(e) => {
                    invalid += 1;
                    assert!(!e.to_string().is_empty());
                }
                Ok(resolved) => {
                    programmed += 1;
                    let states = node_states(&obj, &nodes, &resolved);
                    for s in &states {
                        assert_eq!(s.spec.validate(), Ok(()), "{value}");
                    }
                    let desired = states
                        .into_iter()
                        .map(|s| (s.spec.node_name.clone(), s))
                        .collect();
                    let existing = BTreeMap::new();
                    let status = rollup(
                        None,
                        &Inputs {
                            generation: Some(1),
                            scope: resolved.flow_marks.scope,
                            desired: &desired,
                            existing: &existing,
                            agents: None,
                            lost: &[],
                            apply_error: None,
                            selector: "x",
                        },
                        at(1),
                    );
                    assert_eq!(status.nodes.as_deref(), Some("0/3"));
                }
            },
        }
    }
    eprintln!(
        "hostile specs: {unparsable} refused by parsing, {invalid} reported invalid, {programmed} programmed"
    );
    // The generator must exercise every path, or this test proves little.
    assert!(
        unparsable > 300 && invalid > 300 && programmed > 150,
        "{unparsable} / {invalid} / {programmed}"
    );
}
