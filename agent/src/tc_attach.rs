//! The datapath at TC ingress (`--mark-delivery skb-mark`): the TC balancer on a tcx link,
//! and with the emulated NIC its TC program on a second tcx link in front of it (the NIC sets
//! `skb->mark`, then hands the packet to the next program: the balancer). Both links are
//! pinned like the XDP link, so a restarted agent swaps its programs into them
//! (`bpf_link_update`) and traffic never stops.

use std::{fs, path::PathBuf};

use anyhow::{Context, Result};
use aya::programs::{
    LinkOrder, SchedClassifier, TcAttachType,
    links::{FdLink, PinnedLink},
    tc::{SchedClassifierLink, TcAttachOptions},
};

use crate::{
    attach::{self, Attached, PinLayout},
    datapath::{Datapath, TcProg},
    xdp_link::KeptLink,
};

/// Where a TC program goes among the interface's tcx programs.
#[derive(Clone, Copy)]
enum Place {
    /// Behind everything there (the balancer: a NIC stand-in or a filter may come first).
    Last,
    /// Before everything (the emulated NIC: the mark must be set before anyone looks).
    First,
}

/// Attaches the TC balancer (and, with `nic`, the emulated NIC in front of it) to `iface`'s
/// ingress, reusing pinned links when there are; an XDP datapath a previous agent left on
/// the interface is removed first. Returns the links with where they are pinned.
pub fn attach_tc(
    dp: &mut Datapath,
    nic: bool,
    iface: &str,
    pins: &PinLayout,
) -> Result<(Attached, Vec<(PathBuf, KeptLink)>)> {
    attach::remove_links(&[pins.link()])?;
    if !nic {
        attach::remove_links(&[pins.tc_nic_link()])?;
    }
    fs::create_dir_all(&pins.dir)?;
    let mut links = Vec::new();
    let (balancer, adopted) =
        attach_one(dp, TcProg::Balancer, iface, &pins.tc_link(), Place::Last)?;
    let prog_id = balancer.1;
    links.push((pins.tc_link(), balancer.0));
    if nic {
        let (l, _) = attach_one(
            dp,
            TcProg::EmulatedNic,
            iface,
            &pins.tc_nic_link(),
            Place::First,
        )?;
        links.push((pins.tc_nic_link(), l.0));
    }
    let attached = Attached {
        mode: "tcx".into(),
        prog_id,
        adopted,
    };
    Ok((attached, links))
}

/// One program on its own pinned tcx link: the pinned link gets the new program, or a new
/// link is created and pinned. Returns the kept link, the program id, and whether the link
/// was adopted.
fn attach_one(
    dp: &mut Datapath,
    prog: TcProg,
    iface: &str,
    pin: &PathBuf,
    place: Place,
) -> Result<((KeptLink, u32), bool)> {
    let tc: &mut SchedClassifier = dp.tc_program(prog)?;
    let (id, adopted) = if pin.exists() {
        let pinned = PinnedLink::from_pin(pin)
            .with_context(|| format!("opening pinned link {}", pin.display()))?;
        let fd_link: FdLink = pinned.into();
        let link = SchedClassifierLink::try_from(fd_link)
            .with_context(|| format!("{} is not a tcx link", pin.display()))?;
        let id = tc
            .attach_to_link(link)
            .with_context(|| format!("replacing the program in {}", pin.display()))?;
        (id, true)
    } else {
        let order = match place {
            Place::Last => LinkOrder::last(),
            Place::First => LinkOrder::first(),
        };
        let id = tc
            .attach_with_options(
                iface,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(order),
            )
            .with_context(|| {
                format!(
                    "attaching {} to {iface} ingress (tcx, kernel 6.6+)",
                    prog.name()
                )
            })?;
        (id, false)
    };
    // The pin (and the kept descriptor) keep the link; aya's handle must not detach it.
    let link = tc.take_link(id)?;
    let fd_link = FdLink::try_from(link).context("tcx link without fd")?;
    let prog_id = fd_link.info().context("reading link info")?.program_id();
    let kept = if adopted {
        let link_id = fd_link.info().context("reading link info")?.id();
        KeptLink::open_pinned(pin, link_id).context("keeping the tcx link")?
    } else {
        KeptLink::pin_new(fd_link, pin)
            .with_context(|| format!("pinning the tcx link at {}", pin.display()))?
    };
    Ok(((kept, prog_id), adopted))
}
