//! Label keys, finalizers and field managers shared by the operator and the agent.
//!
//! Both sides must spell these identically (the agent's watch selects on the operator's node
//! label; server-side apply attributes fields by manager name), hence one definition here.

/// On a LoadBalancerNodeState: the node whose agent programs it. The agent watches only
/// `marklb.io/node=<its node>` (see [`node_selector`]).
pub const NODE_LABEL: &str = "marklb.io/node";
/// On a LoadBalancerNodeState: the LoadBalancer it was derived from.
pub const LOADBALANCER_LABEL: &str = "marklb.io/loadbalancer";
/// On every object the operator creates (`app.kubernetes.io/managed-by` convention).
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";

/// On a LoadBalancer, added by the operator. On deletion the operator empties the VIPs of
/// every node state of it, waits (bounded) until each agent reports that generation with no
/// VIPs, deletes the node states and only then removes this finalizer, so deleting an LB never
/// strands programmed datapaths. Agents hold no finalizer (their RBAC stays read-only on node
/// states, plus their status): a node whose agent is gone is released after the wait.
pub const OPERATOR_FINALIZER: &str = "marklb.io/loadbalancer-cleanup";

/// Server-side apply field manager of the operator's objects and specs (node states, the
/// LoadBalancers of Services, DaemonSets).
pub const OPERATOR_FIELD_MANAGER: &str = "marklb-operator";
/// Server-side apply field manager of the operator's status writes (LoadBalancer, Service).
/// Kubernetes before 1.22 keeps one managed-fields entry per manager and operation for an object
/// and its status subresource alike: a status apply under the spec's manager replaced the record
/// of the spec fields that manager owned, and its next spec apply could not remove what it no
/// longer listed (a node that lost its last endpoint stayed in `vips[].backends`).
pub const OPERATOR_STATUS_FIELD_MANAGER: &str = "marklb-operator-status";
/// Server-side apply field manager of the agents (node state status only).
pub const AGENT_FIELD_MANAGER: &str = "marklb-agent";

/// Longest label value Kubernetes accepts.
pub const MAX_LABEL_VALUE_LEN: usize = 63;

/// The value of [`NODE_LABEL`] for a node.
///
/// Node names may be up to 253 characters but label values only 63, so a longer name is cut
/// and suffixed with a hash of the full name: still unique, and computed identically by the
/// operator (when it labels) and the agent (when it selects). Names that fit are used as is.
pub fn node_label_value(node_name: &str) -> String {
    label_value(node_name)
}

/// The value of [`LOADBALANCER_LABEL`] for a LoadBalancer name (same shortening as
/// [`node_label_value`]).
pub fn loadbalancer_label_value(lb_name: &str) -> String {
    label_value(lb_name)
}

/// Longest object name Kubernetes accepts (a DNS subdomain).
pub const MAX_OBJECT_NAME_LEN: usize = 253;

/// The name of the node state of LoadBalancer `lb_name` on node `node_name`: `<lb>-<node>`,
/// or, when that exceeds [`MAX_OBJECT_NAME_LEN`], cut and suffixed with a hash of both names
/// (stable, so re-applies find the same object). Both inputs are DNS subdomains, so the
/// result is one too.
///
/// `<lb>-<node>` is ambiguous in rare cases (`a-b` on node `c` and `a` on node `b-c`); the
/// operator checks the [`LOADBALANCER_LABEL`] of an existing object before it writes to it.
pub fn node_state_name(lb_name: &str, node_name: &str) -> String {
    let full = format!("{lb_name}-{node_name}");
    if full.len() <= MAX_OBJECT_NAME_LEN {
        return full;
    }
    let hash = format!(
        "{:016x}",
        fnv1a64(format!("{lb_name}/{node_name}").as_bytes())
    );
    let keep = MAX_OBJECT_NAME_LEN - hash.len() - 1;
    let prefix = full[..keep].trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
    format!("{prefix}-{hash}")
}

/// The label selector an agent uses to watch only its node's states.
pub fn node_selector(node_name: &str) -> String {
    format!("{NODE_LABEL}={}", node_label_value(node_name))
}

fn label_value(name: &str) -> String {
    if name.len() <= MAX_LABEL_VALUE_LEN {
        return name.to_string();
    }
    let hash = format!("{:016x}", fnv1a64(name.as_bytes()));
    // Object names are ASCII (DNS subdomains), so byte slicing is on char boundaries; the
    // prefix must end alphanumeric for the value to stay a valid label value.
    let keep = MAX_LABEL_VALUE_LEN - hash.len() - 1;
    let prefix = name[..keep].trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
    format!("{prefix}-{hash}")
}

/// FNV-1a, 64-bit: a tiny stable hash (labels must not change between releases, so no
/// `DefaultHasher`, whose output is unspecified).
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_label_value(v: &str) -> bool {
        let b = v.as_bytes();
        b.len() <= MAX_LABEL_VALUE_LEN
            && (b.is_empty()
                || (b[0].is_ascii_alphanumeric()
                    && b[b.len() - 1].is_ascii_alphanumeric()
                    && b.iter()
                        .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(c))))
    }

    #[test]
    fn short_names_are_kept() {
        assert_eq!(node_label_value("node-a.example.com"), "node-a.example.com");
        assert_eq!(node_selector("worker-1"), "marklb.io/node=worker-1");
        let exactly = "a".repeat(63);
        assert_eq!(node_label_value(&exactly), exactly);
    }

    #[test]
    fn long_names_are_shortened_uniquely_and_stably() {
        let a = format!("{}.a", "x".repeat(100));
        let b = format!("{}.b", "x".repeat(100));
        let (va, vb) = (node_label_value(&a), node_label_value(&b));
        assert_ne!(va, vb);
        assert!(is_label_value(&va), "{va}");
        assert!(is_label_value(&vb), "{vb}");
        assert_eq!(va, node_label_value(&a));
        // The prefix is trimmed back to an alphanumeric character.
        let dotted = format!("{}.{}", "y".repeat(45), "z".repeat(40));
        let v = node_label_value(&dotted);
        assert!(is_label_value(&v), "{v}");
        assert!(v.starts_with(&"y".repeat(45)));
        // Pinned: a change of the hash would orphan labelled objects on upgrade.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn node_state_names_fit_and_stay_distinct() {
        assert_eq!(node_state_name("web", "node-a"), "web-node-a");
        let lb = format!("{}.lb", "l".repeat(150));
        let (a, b) = (
            format!("{}.a", "n".repeat(150)),
            format!("{}.b", "n".repeat(150)),
        );
        let (na, nb) = (node_state_name(&lb, &a), node_state_name(&lb, &b));
        assert_ne!(na, nb);
        for n in [&na, &nb] {
            assert!(n.len() <= MAX_OBJECT_NAME_LEN, "{n}");
            assert!(n.starts_with(&lb), "{n}");
            assert!(n.bytes().last().unwrap().is_ascii_alphanumeric(), "{n}");
        }
        assert_eq!(na, node_state_name(&lb, &a));
        // Exactly at the limit: kept as is.
        let exact_node = "n".repeat(MAX_OBJECT_NAME_LEN - 4);
        assert_eq!(
            node_state_name("web", &exact_node),
            format!("web-{exact_node}")
        );
    }

    #[test]
    fn names_are_distinct() {
        assert_ne!(NODE_LABEL, LOADBALANCER_LABEL);
        assert_ne!(OPERATOR_FIELD_MANAGER, AGENT_FIELD_MANAGER);
        assert_ne!(OPERATOR_FIELD_MANAGER, OPERATOR_STATUS_FIELD_MANAGER);
        assert_eq!(loadbalancer_label_value("web"), "web");
    }
}
