// SPDX-License-Identifier: GPL-2.0 OR MIT
//! Traffic counters kept per CPU and summed by user space at read time.

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficStats {
    pub packets: u64,
    /// Bytes of the packets as received (Ethernet frame, before encapsulation).
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<TrafficStats>() == 16);
