//! The datapath library: loads the embedded XDP object and gives typed access to every
//! map. This is the only code that touches aya maps; everything above it speaks in
//! VIPs, reals, rings and marks.

mod conn_table;
mod dispatcher;
mod event_rings;
mod handles;
mod loader;
mod mapping;
mod maps;
pub mod pin_compat;
mod pinned;
mod rings;
pub mod testrun;

pub use conn_table::ConnTable;
pub use dispatcher::DispatcherHold;
pub use event_rings::EventReader;
pub use handles::{NicFlowTable, StatsReader};
pub use loader::{Datapath, LoadOptions, Prog, TcProg, map_kind};
pub use maps::CounterSnapshot;
pub use pinned::PinnedMaps;
pub use rings::RingStore;

/// Errors of the datapath library.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the XDP object failed (are you root, with bpf() allowed?): {0}")]
    Load(#[from] aya::EbpfError),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("map {name} is a {kind}, not the array the datapath needs")]
    NotAnArray { name: &'static str, kind: String },
    #[error("program {0} is missing from the object")]
    MissingProgram(&'static str),
    #[error("mapping the ring storage failed: {0}")]
    Mmap(std::io::Error),
    #[error("{0}")]
    Capacity(String),
    #[error(transparent)]
    PinCompat(#[from] pin_compat::PinCompatError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = DatapathError> = std::result::Result<T, E>;

pub(crate) fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

pub(crate) fn prog_err(
    name: &'static str,
) -> impl FnOnce(aya::programs::ProgramError) -> DatapathError {
    move |source| DatapathError::Program { name, source }
}
