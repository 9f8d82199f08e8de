// SPDX-License-Identifier: GPL-2.0 OR MIT
//! The packet under the datapath, whichever hook runs it: XDP (`XdpContext`, the mark in
//! metadata) or TC ingress (`TcContext`, the mark in `skb->mark`). Every path is written
//! once against [`Packet`]; each method is `#[inline(always)]` and monomorphised, so the
//! XDP program compiles to what it was before the trait existed.

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L3_IPV6,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    helpers::{
        bpf_csum_diff, bpf_csum_update, bpf_skb_change_tail, bpf_xdp_adjust_head,
        bpf_xdp_adjust_meta, bpf_xdp_adjust_tail,
    },
    programs::{TcContext, XdpContext},
};

/// What becomes of a packet; each hook turns it into its own return code.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// On to the stack (TC: the next tcx program, then the stack), untouched.
    Pass,
    Drop,
    /// Out of the interface it came in on (XDP_TX; TC: redirect to the same device's egress).
    Tx,
}

/// mlx5 delivers the tc flower flow tag in the low 16 bits of `skb->mark`
/// (`MLX5E_TC_FLOW_ID_MASK`); anything above is somebody else's.
pub const SKB_MARK_MASK: u32 = 0xffff;

pub trait Packet {
    /// Start and end of the directly readable bytes (the Ethernet header first).
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// Bytes of the whole frame (an skb may hold more than its linear part).
    fn len(&self) -> usize;
    /// The NIC's flow mark, 0 when the packet carries none.
    fn mark(&self) -> u32;
    /// Whether the frame stands for several wire packets (a GRO'd skb): the kernel shrinks
    /// its segments by what encapsulation adds, so the MTU check does not apply to its sum.
    fn is_gso(&self) -> bool;
    /// Opens `n` bytes for an outer header; returns where the original Ethernet header
    /// starts now (XDP grows in front of it; TC inserts behind it). Packet pointers taken
    /// before are invalid afterwards.
    fn open_outer(&self, n: usize, outer_v6: bool) -> Option<usize>;
    /// Called after the outer IPv6 header at `hdr` was written: an skb whose checksum the
    /// driver computed over the whole packet (CHECKSUM_COMPLETE) must account for it.
    fn outer_written(&self, hdr: *const u8, len: u32);
    /// Makes room for `grow` bytes of new headers in front of the IP header and trims the
    /// frame to `total` bytes (ICMP errors quoting the packet).
    fn reshape(&self, grow: usize, total: usize) -> bool;
}

impl Packet for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }
    #[inline(always)]
    fn len(&self) -> usize {
        XdpContext::data_end(self) - XdpContext::data(self)
    }
    /// The first 4 bytes of XDP metadata (4-byte aligned: adjust_meta moves in 4s).
    #[inline(always)]
    fn mark(&self) -> u32 {
        let meta = self.metadata();
        if meta + 4 > XdpContext::data(self) {
            return 0;
        }
        unsafe { *(meta as *const u32) }
    }
    #[inline(always)]
    fn is_gso(&self) -> bool {
        false
    }
    /// Lets the metadata go first (the mark in it has been read): a growth moves the
    /// metadata along with the frame's start, a memmove that cost 16-21 ns a packet here,
    /// while dropping it only moves a pointer.
    #[inline(always)]
    fn open_outer(&self, n: usize, _outer_v6: bool) -> Option<usize> {
        let meta = XdpContext::data(self) - self.metadata();
        if meta != 0 && unsafe { bpf_xdp_adjust_meta(self.ctx, meta as i32) } != 0 {
            return None;
        }
        if unsafe { bpf_xdp_adjust_head(self.ctx, -(n as i32)) } != 0 {
            return None;
        }
        Some(n)
    }
    #[inline(always)]
    fn outer_written(&self, _hdr: *const u8, _len: u32) {}
    #[inline(always)]
    fn reshape(&self, grow: usize, total: usize) -> bool {
        if unsafe { bpf_xdp_adjust_head(self.ctx, -(grow as i32)) } != 0 {
            return false;
        }
        let len = Packet::len(self);
        if len < total {
            return false;
        }
        unsafe { bpf_xdp_adjust_tail(self.ctx, total as i32 - len as i32) == 0 }
    }
}

impl Packet for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }
    #[inline(always)]
    fn len(&self) -> usize {
        TcContext::len(self) as usize
    }
    #[inline(always)]
    fn mark(&self) -> u32 {
        unsafe { (*self.skb.skb).mark & SKB_MARK_MASK }
    }
    #[inline(always)]
    fn is_gso(&self) -> bool {
        unsafe { (*self.skb.skb).gso_segs > 1 }
    }
    /// Room behind the MAC header, marked as IP-in-IP so a GSO skb is segmented (and its
    /// MSS shrunk) correctly; for IPv4 inside IPv6 the kernel sets `skb->protocol` to the
    /// outer family.
    #[inline(always)]
    fn open_outer(&self, n: usize, outer_v6: bool) -> Option<usize> {
        let flags = if outer_v6 {
            BPF_F_ADJ_ROOM_ENCAP_L3_IPV6
        } else {
            BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
        };
        self.adjust_room(n as i32, BPF_ADJ_ROOM_MAC, flags as u64)
            .ok()?;
        Some(0)
    }
    /// A valid IPv4 header sums to zero, so only an IPv6 outer header changes the sum.
    /// `bpf_csum_update` does nothing unless the skb is CHECKSUM_COMPLETE.
    #[inline(always)]
    fn outer_written(&self, hdr: *const u8, len: u32) {
        unsafe {
            let sum = bpf_csum_diff(core::ptr::null_mut(), 0, hdr as *mut u32, len, 0);
            if sum >= 0 {
                bpf_csum_update(self.skb.skb, sum as u32);
            }
        }
    }
    #[inline(always)]
    fn reshape(&self, grow: usize, total: usize) -> bool {
        if self.adjust_room(grow as i32, BPF_ADJ_ROOM_MAC, 0).is_err() {
            return false;
        }
        if unsafe { bpf_skb_change_tail(self.skb.skb, total as u32, 0) } != 0 {
            return false;
        }
        self.pull_data(total as u32).is_ok()
    }
}

/// Bytes the datapath may read directly: every header it parses, up to the ports quoted
/// in an ICMP error about an IPv6 flow (Ethernet + IPv6 + ICMPv6 + IPv6 + ports).
const TC_HEADERS: u32 = 128;

/// Makes the headers of an skb directly readable (a driver may leave them in fragments).
/// False: the skb could not be pulled (the caller lets it pass untouched).
#[inline(always)]
pub fn linear_headers(ctx: &TcContext) -> bool {
    let len = TcContext::len(ctx);
    let want = if len < TC_HEADERS { len } else { TC_HEADERS };
    (TcContext::data_end(ctx) - TcContext::data(ctx)) as u32 >= want || ctx.pull_data(want).is_ok()
}

/// A packet going on to the stack leaves its flow tag here: the low 16 bits of `skb->mark`
/// are ours (the NIC set them for a rule the agent installed), and the stack gives mark bits
/// meanings of its own (kube-proxy: 0x4000 masquerade, 0x8000 drop).
#[inline(always)]
pub fn clear_flow_tag(ctx: &TcContext) {
    let mark = unsafe { (*ctx.skb.skb).mark };
    if mark & SKB_MARK_MASK != 0 {
        ctx.set_mark(mark & !SKB_MARK_MASK);
    }
}
