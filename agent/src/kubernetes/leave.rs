//! What a stopping agent in Kubernetes mode leaves on its node.
//!
//! SIGTERM normally leaves the datapath serving, pinned, for the next agent (a rolling
//! upgrade or a restarted pod must not drop a flow). But `helm uninstall` / `kubectl delete`
//! also stop the agent for good: if the datapath stayed, every node would keep an XDP program
//! and pinned maps nobody owns. The LoadBalancers go first (the operator empties and deletes
//! their node states), so an agent that has seen a complete list with no node state of its
//! node, and whose datapath serves no VIP, has nothing to hand over: it removes the datapath.
//! A next agent, if any, attaches a fresh one and loses nothing, since nothing was served.

/// What the agent knows when it stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leaving {
    /// `--remove-on-exit`.
    pub remove_on_exit: bool,
    /// A complete list of this node's states has been seen (else the agent does not know
    /// what the node should serve, and the pinned datapath may serve a previous agent's VIPs).
    pub synced: bool,
    /// Node states of this node in the agent's copy.
    pub node_states: usize,
    /// VIPs the datapath holds (programmed or adopted from the pins).
    pub vips: usize,
}

/// Whether to remove the datapath, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnExit {
    Keep,
    Remove(&'static str),
}

pub fn on_exit(l: Leaving) -> OnExit {
    if l.remove_on_exit {
        OnExit::Remove("--remove-on-exit")
    } else if l.synced && l.node_states == 0 && l.vips == 0 {
        OnExit::Remove("no node state of this node is left and the datapath serves no VIP")
    } else {
        OnExit::Keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVING: Leaving = Leaving {
        remove_on_exit: false,
        synced: true,
        node_states: 2,
        vips: 3,
    };

    #[test]
    fn a_node_that_serves_keeps_its_datapath_for_the_next_agent() {
        assert_eq!(on_exit(SERVING), OnExit::Keep);
    }

    #[test]
    fn with_every_load_balancer_gone_the_datapath_goes() {
        let gone = Leaving {
            node_states: 0,
            vips: 0,
            ..SERVING
        };
        assert!(matches!(on_exit(gone), OnExit::Remove(r) if r.contains("no node state")));
    }

    #[test]
    fn without_a_complete_list_the_pinned_datapath_stays() {
        // Started while the API server was away: the copy is empty, the pins may serve.
        let unknown = Leaving {
            synced: false,
            node_states: 0,
            vips: 0,
            ..SERVING
        };
        assert_eq!(on_exit(unknown), OnExit::Keep);
        let adopted = Leaving {
            synced: false,
            node_states: 0,
            ..SERVING
        };
        assert_eq!(on_exit(adopted), OnExit::Keep);
    }

    #[test]
    fn vips_still_programmed_keep_the_datapath() {
        // No states, but emptying the datapath failed: what it serves is not handed away.
        let stuck = Leaving {
            node_states: 0,
            ..SERVING
        };
        assert_eq!(on_exit(stuck), OnExit::Keep);
        // States listed with no VIPs yet (the operator is still writing them): keep.
        let pending = Leaving { vips: 0, ..SERVING };
        assert_eq!(on_exit(pending), OnExit::Keep);
    }

    #[test]
    fn remove_on_exit_always_removes() {
        let flag = Leaving {
            remove_on_exit: true,
            ..SERVING
        };
        assert_eq!(on_exit(flag), OnExit::Remove("--remove-on-exit"));
    }
}
