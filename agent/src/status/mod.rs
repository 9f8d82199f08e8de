//! `marklb-agent status`: what a node serves, read from the datapath's pins under the bpffs
//! (VIPs with their owners and reals, ring sizes, marks, NIC rules, path counters, how the
//! program is attached). Reads only: nothing is loaded, created or written, and it works
//! whether an agent runs or not.

mod render;

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use marklb_common::{REAL_F_IPV6, VipKey, words_addr};
use serde::Serialize;

use crate::{
    attach::PinLayout, datapath::PinnedMaps, netlink::Netlink, owner_record::OwnerRecord,
    vip::VipId, xdp_link,
};

pub use render::render;

/// The command line of `marklb-agent status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The interface the datapath is attached to.
    #[arg(long)]
    pub interface: String,
    /// The bpffs mount the agent pinned under.
    #[arg(long, default_value = "/sys/fs/bpf")]
    pub bpffs: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What one node serves on one interface.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub interface: String,
    pub pin_dir: PathBuf,
    pub attach: AttachStatus,
    pub vips: Vec<VipStatus>,
    pub reals: Vec<RealStatus>,
    pub marks: MarkStatus,
    pub nic_rules: NicRuleStatus,
    /// Entries in the connection table.
    pub connections: usize,
    /// Slots of the shared Maglev ring storage, and how many the VIPs use.
    pub ring_storage: RingStorage,
    /// Packets per datapath path since the maps were created.
    pub counters: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct AttachStatus {
    /// `xdp`, `tcx` (the TC balancer, `--mark-delivery skb-mark`) or `none`.
    pub hook: String,
    /// XDP: `native` or `generic` as netlink reports it (`unknown` when the interface is
    /// not in this network namespace); tcx: `ingress`.
    pub mode: String,
    pub prog_id: u32,
    pub link_id: u32,
    /// The emulated NIC's program sits in front of the balancer (its id; XDP: the program
    /// on the link is the NIC, which tail-calls the balancer).
    pub nic_prog_id: Option<u32>,
}

#[derive(Clone, Debug, Serialize)]
pub struct VipStatus {
    /// `10.0.0.1:80/TCP`.
    pub vip: String,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: String,
    /// `namespace/name` of the LoadBalancer, if recorded.
    pub owner: Option<String>,
    /// Maglev table size (0: no reals, the VIP drops).
    pub ring_size: u32,
    /// Statistics slot.
    pub stats_id: u32,
    pub reals: Vec<VipReal>,
    pub marks: u32,
    pub packets: u64,
    pub bytes: u64,
}

/// One real's share of a VIP's ring.
#[derive(Clone, Debug, Serialize)]
pub struct VipReal {
    pub address: IpAddr,
    /// Ring slots pointing at it (its share of new flows).
    pub slots: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct RealStatus {
    pub address: IpAddr,
    pub id: u32,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct MarkStatus {
    /// Marks pointing at a real of the current generation.
    pub in_use: u32,
    /// Marks pointing at a real that left (the datapath ignores them).
    pub stale: u32,
    pub capacity: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct NicRuleStatus {
    /// Rules of the emulated NIC (its map). A Mellanox NIC's rules are tc flower filters
    /// on the interface (`tc filter show dev IFACE ingress`).
    pub emulated: usize,
    /// Packets the emulated NIC's rules marked.
    pub hits: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct RingStorage {
    pub capacity: u32,
    pub used: u32,
}

fn protocol(p: u8) -> String {
    match p {
        marklb_common::IPPROTO_TCP => "TCP".into(),
        marklb_common::IPPROTO_UDP => "UDP".into(),
        p => format!("proto{p}"),
    }
}

fn vip_id(key: &VipKey) -> VipId {
    let v6 = key.addr_be[1..].iter().any(|w| *w != 0);
    VipId {
        addr: words_addr(&key.addr_be, v6),
        port: u16::from_be(key.port_be),
        proto: key.proto,
    }
}

/// Which hook holds the datapath, read from the pinned links (and netlink for XDP's mode).
async fn attach_status(pins: &PinLayout, iface: &str) -> Result<AttachStatus> {
    let ids = |p: &Path| {
        xdp_link::pinned_link_ids(p).with_context(|| format!("reading the link {}", p.display()))
    };
    if pins.link().exists() {
        let (link_id, prog_id) = ids(&pins.link())?;
        let mode = match Netlink::connect()?.xdp_attachment(iface).await {
            Ok(Some(a)) => a.mode.to_string(),
            Ok(None) => "detached".into(),
            Err(_) => "unknown".into(),
        };
        return Ok(AttachStatus {
            hook: "xdp".into(),
            mode,
            prog_id,
            link_id,
            nic_prog_id: None,
        });
    }
    if pins.tc_link().exists() {
        let (link_id, prog_id) = ids(&pins.tc_link())?;
        let nic = pins.tc_nic_link();
        let nic_prog_id = if nic.exists() {
            Some(ids(&nic)?.1)
        } else {
            None
        };
        return Ok(AttachStatus {
            hook: "tcx".into(),
            mode: "ingress".into(),
            prog_id,
            link_id,
            nic_prog_id,
        });
    }
    Ok(AttachStatus {
        hook: "none".into(),
        mode: String::new(),
        prog_id: 0,
        link_id: 0,
        nic_prog_id: None,
    })
}

/// Reads what `iface`'s datapath serves from its pins under `bpffs`.
pub async fn read(bpffs: &Path, iface: &str) -> Result<Status> {
    let pins = PinLayout::new(bpffs, iface);
    if !pins.maps().exists() {
        bail!(
            "nothing of marklb's pinned for {iface} under {} (no {}); is --bpffs the agent's?",
            bpffs.display(),
            pins.maps().display()
        );
    }
    let maps = PinnedMaps::open(&pins.maps())
        .with_context(|| format!("opening the maps pinned in {}", pins.maps().display()))?;
    let owners = if pins.owners().exists() {
        OwnerRecord::open(&pins.owners())
            .and_then(|r| r.read())
            .with_context(|| format!("reading the owner record {}", pins.owners().display()))?
    } else {
        BTreeMap::new()
    };

    let reals = maps.reals()?;
    let addr_of = |id: u32| {
        reals
            .get(&id)
            .map(|d| words_addr(&d.addr_be, d.flags & REAL_F_IPV6 != 0))
    };
    let mut in_use = 0;
    let mut stale = 0;
    let mut marks_by_vip: BTreeMap<u32, u32> = BTreeMap::new();
    for (_, e) in maps.marks()? {
        if reals.get(&e.real_id).map(|d| d.generation) == Some(e.real_gen) {
            in_use += 1;
            *marks_by_vip.entry(e.vip_id).or_default() += 1;
        } else {
            stale += 1;
        }
    }

    let mut vips = Vec::new();
    let mut ring_used = 0;
    for (key, meta) in maps.vips()? {
        let id = vip_id(&key);
        let mut slots: BTreeMap<u32, u32> = BTreeMap::new();
        for real in maps.ring(meta.ring_off, meta.ring_size)? {
            *slots.entry(real).or_default() += 1;
        }
        ring_used += meta.ring_size;
        let mut vip_reals: Vec<VipReal> = slots
            .into_iter()
            .filter_map(|(real, slots)| {
                Some(VipReal {
                    address: addr_of(real)?,
                    slots,
                })
            })
            .collect();
        vip_reals.sort_by_key(|r| r.address);
        let stats = maps.vip_stats(meta.vip_id)?;
        vips.push(VipStatus {
            vip: id.to_string(),
            address: id.addr,
            port: id.port,
            protocol: protocol(id.proto),
            owner: owners.get(&key).cloned(),
            ring_size: meta.ring_size,
            stats_id: meta.vip_id,
            reals: vip_reals,
            marks: marks_by_vip.get(&meta.vip_id).copied().unwrap_or(0),
            packets: stats.packets,
            bytes: stats.bytes,
        });
    }
    vips.sort_by(|a, b| (a.address, a.port, &a.protocol).cmp(&(b.address, b.port, &b.protocol)));

    let mut real_rows = Vec::new();
    for (&id, def) in &reals {
        let stats = maps.real_stats(id)?;
        real_rows.push(RealStatus {
            address: words_addr(&def.addr_be, def.flags & REAL_F_IPV6 != 0),
            id,
            packets: stats.packets,
            bytes: stats.bytes,
        });
    }
    real_rows.sort_by_key(|r| r.address);

    let rules = maps.nic_flows()?;
    Ok(Status {
        interface: iface.to_string(),
        pin_dir: pins.dir.clone(),
        attach: attach_status(&pins, iface).await?,
        vips,
        reals: real_rows,
        marks: MarkStatus {
            in_use,
            stale,
            // Mark 0 means "no mark".
            capacity: maps.marks_capacity().saturating_sub(1),
        },
        nic_rules: NicRuleStatus {
            emulated: rules.len(),
            hits: rules.iter().map(|(_, r)| r.hits).sum(),
        },
        connections: maps.conn_count(),
        ring_storage: RingStorage {
            capacity: maps.ring_capacity()?,
            used: ring_used,
        },
        counters: maps
            .counters()?
            .0
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    })
}

/// `marklb-agent status`: prints the status as text or JSON.
pub async fn run(args: StatusArgs) -> Result<()> {
    let status = read(&args.bpffs, &args.interface).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", render(&status));
    }
    Ok(())
}
