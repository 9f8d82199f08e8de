//! Flow marks: the mark manager (allocation, aging, invalidation) and the hardware backends
//! that program "packets of this flow carry this mark" rules into a NIC.
//!
//! One idea, one name: a **hardware backend** ([`HwBackend`]) is whatever makes packets of a
//! known flow arrive with a mark. [`HwBackendKind`] is the choice on the command line
//! (`--hw-backend`), [`select`] turns it into a backend, [`NoHwBackend`] is the choice of none.
//! A backend owns what it needs (the emulated NIC its own handle on the rule map, a real NIC
//! its device): the mark manager never hands it the datapath.

mod backend;
mod emulated;
mod manager;
pub mod mellanox;
pub mod nic_probe;

pub use backend::{
    Entry, HwBackend, HwBackendError, HwBackendKind, MarkDelivery, NoHwBackend, SelectedBackend,
    select,
};
pub use emulated::EmulatedNic;
pub use manager::{MarkManager, MarkStats};
