//! Readiness that tells the truth: the node is ready when the program attached to its
//! interface is the one it attached (same kernel id) and a desired state is applied. A
//! program detached or replaced behind the agent's back makes it not ready, with the reason.

use super::NodeView;
use crate::netlink::Netlink;

/// `Ok` when ready, else why not (one line).
pub async fn readiness(view: &NodeView, netlink: &Netlink) -> Result<(), String> {
    let Some(attached) = &view.attached else {
        return Err("datapath not attached".into());
    };
    if !view.applied {
        return Err("no valid configuration applied yet".into());
    }
    let iface = &view.interface;
    if attached.mode == "tcx" {
        return tcx_readiness(iface, attached.prog_id);
    }
    match netlink.xdp_attachment(iface).await {
        Ok(Some(x)) if x.prog_id == attached.prog_id => Ok(()),
        Ok(Some(x)) => Err(format!(
            "the XDP program on {iface} (id {}) is not ours (id {})",
            x.prog_id, attached.prog_id
        )),
        Ok(None) => Err(format!(
            "no XDP program on {iface}: the datapath (program id {}) was detached",
            attached.prog_id
        )),
        Err(e) => Err(format!("cannot read the XDP program of {iface}: {e:#}")),
    }
}

/// The TC balancer (`skb-mark` delivery) must be among the interface's tcx ingress programs.
fn tcx_readiness(iface: &str, prog_id: u32) -> Result<(), String> {
    use aya::programs::{SchedClassifier, TcAttachType};
    match SchedClassifier::query_tcx(iface, TcAttachType::Ingress) {
        Ok((_, progs)) if progs.iter().any(|p| p.id() == prog_id) => Ok(()),
        Ok(_) => Err(format!(
            "the TC balancer (program id {prog_id}) is not on {iface}'s tcx ingress: it was detached"
        )),
        Err(e) => Err(format!("cannot read the tcx programs of {iface}: {e}")),
    }
}
