//! Pinned maps that no longer match the object are replaced before the object is loaded.
//!
//! Why: aya 0.14 adopts a pin found at a map's pin path as it is (`create_pinned_by_name`
//! opens it without comparing it with the object's definition). When a new agent version
//! changes a map (its type, key or value size, flags, or a fixed number of entries) and
//! restarts on the pins of the old one, the programs then either fail verification or run
//! against the old layout: a counter index beyond an old, smaller per-CPU array is never
//! counted, a value read with the new size is garbage. So before loading, every pin of the
//! object's maps is compared with the object's own definition; one that differs is unpinned
//! (the old map lives on only while an old program still holds it) and the loader creates
//! and pins a fresh map. Its contents are not carried over (the layouts differ): a fresh
//! connection table sends established flows through Maglev again, fresh counters start at
//! zero. The replacement is logged as a warning naming the map and what differed.
//!
//! Maps whose size the loader chooses at load time (`EbpfLoader::map_max_entries`) keep the
//! size of their pin, as before: their entry count is a setting of the running agent, not
//! part of the object's definition.

use std::{
    collections::HashMap,
    fmt,
    path::{Path, PathBuf},
};

use aya::maps::{MapData, MapError, MapType};
use aya_obj::generated::bpf_map_type;

/// A map's definition as far as adopting its pin is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapDef {
    /// `bpf_map_type`; [`UNKNOWN_TYPE`] for a pinned map of a type aya does not know.
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

/// `MapDef::map_type` of a pinned map whose type aya 0.14 cannot name (never an object's).
pub const UNKNOWN_TYPE: u32 = u32::MAX;

/// One way a pinned map differs from the object's definition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Difference {
    Type { pinned: u32, object: u32 },
    KeySize { pinned: u32, object: u32 },
    ValueSize { pinned: u32, object: u32 },
    Flags { pinned: u32, object: u32 },
    MaxEntries { pinned: u32, object: u32 },
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Difference::Type { pinned, object } => write!(
                f,
                "type {} (object: {})",
                type_name(pinned),
                type_name(object)
            ),
            Difference::KeySize { pinned, object } => {
                write!(f, "key size {pinned} B (object: {object} B)")
            }
            Difference::ValueSize { pinned, object } => {
                write!(f, "value size {pinned} B (object: {object} B)")
            }
            Difference::Flags { pinned, object } => {
                write!(f, "flags {pinned:#x} (object: {object:#x})")
            }
            Difference::MaxEntries { pinned, object } => {
                write!(f, "max entries {pinned} (object: {object})")
            }
        }
    }
}

fn type_name(map_type: u32) -> String {
    match bpf_map_type::try_from(map_type)
        .ok()
        .and_then(|t| MapType::try_from(t).ok())
    {
        Some(t) => format!("{t:?}"),
        None if map_type == UNKNOWN_TYPE => "unknown to aya".to_string(),
        None => format!("#{map_type}"),
    }
}

/// How the pinned map differs from the object's definition (empty: adopt it). The entry
/// count only counts for a map of fixed size (`sized_at_load` false).
pub fn differences(pinned: &MapDef, object: &MapDef, sized_at_load: bool) -> Vec<Difference> {
    let (p, o) = (pinned, object);
    let mut out = Vec::new();
    if p.map_type != o.map_type {
        out.push(Difference::Type {
            pinned: p.map_type,
            object: o.map_type,
        });
    }
    if p.key_size != o.key_size {
        out.push(Difference::KeySize {
            pinned: p.key_size,
            object: o.key_size,
        });
    }
    if p.value_size != o.value_size {
        out.push(Difference::ValueSize {
            pinned: p.value_size,
            object: o.value_size,
        });
    }
    if p.flags != o.flags {
        out.push(Difference::Flags {
            pinned: p.flags,
            object: o.flags,
        });
    }
    if !sized_at_load && pinned.max_entries != object.max_entries {
        out.push(Difference::MaxEntries {
            pinned: pinned.max_entries,
            object: object.max_entries,
        });
    }
    out
}

/// A pin that was removed because it did not match the object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplacedPin {
    pub name: &'static str,
    pub path: PathBuf,
    pub differences: Vec<Difference>,
}

/// Why the pins could not be checked or replaced. Every pin is read before any is removed:
/// after any error but `Remove` nothing was removed.
#[derive(Debug, thiserror::Error)]
pub enum PinCompatError {
    #[error("the embedded eBPF object does not parse: {0}")]
    Object(#[from] aya_obj::ParseError),
    #[error("checking for a pinned map {name} at {}: {source}", path.display())]
    Stat {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `error` with its causes in the message (the syscall's error is aya's error's source).
    #[error(
        "pinned map {name} at {} cannot be read (not a BPF map, or not permitted?): {}",
        path.display(),
        with_causes(error)
    )]
    Read {
        name: &'static str,
        path: PathBuf,
        error: MapError,
    },
    #[error("counting the possible CPUs (the event rings' size): {0}")]
    Cpus(#[source] std::io::Error),
    #[error("removing the incompatible pin of map {name} at {}: {source}", path.display())]
    Remove {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        text = format!("{text}: {c}");
        cause = c.source();
    }
    text
}

/// The definition of every map in `object`, as the loader will create it.
fn object_defs(object: &[u8]) -> Result<HashMap<String, MapDef>, PinCompatError> {
    let parsed = aya_obj::Object::parse(object)?;
    Ok(parsed
        .maps
        .iter()
        .map(|(name, m)| {
            let def = MapDef {
                map_type: m.map_type(),
                key_size: m.key_size(),
                value_size: m.value_size(),
                max_entries: m.max_entries(),
                flags: m.map_flags(),
            };
            (name.clone(), as_created(def))
        })
        .collect())
}

/// `def` with the adjustments aya's loader makes before creating the map (ring buffers:
/// no value size, bytes rounded up to a power-of-two number of pages), so that a pin the
/// loader created itself compares equal. aya also adjusts CPU and device maps (value size)
/// and perf event arrays of 0 entries; the object has none (`datapath_pins` checks that a
/// load over the object's own pins replaces nothing).
fn as_created(mut def: MapDef) -> MapDef {
    if def.map_type == bpf_map_type::BPF_MAP_TYPE_RINGBUF as u32 {
        def.value_size = 0;
        if def.max_entries != 0 {
            let page = page_size();
            def.max_entries = def.max_entries.div_ceil(page).next_power_of_two() * page;
        }
    }
    def
}

fn page_size() -> u32 {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(page).unwrap_or(4096)
}

/// The pinned map's definition as the kernel reports it.
fn pinned_def(name: &'static str, path: &Path) -> Result<MapDef, PinCompatError> {
    let read = |error| PinCompatError::Read {
        name,
        path: path.to_path_buf(),
        error,
    };
    let info = MapData::from_pin(path)
        .and_then(|m| m.info())
        .map_err(read)?;
    Ok(MapDef {
        map_type: info.map_type().map_or(UNKNOWN_TYPE, |t| t as u32),
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        flags: info.map_flags(),
    })
}

/// Checks every pin under `dir` against the embedded object and unpins those that differ
/// (see the module comment); what [`super::Datapath::load`] does first with a pin directory.
/// The maps with an element a CPU (the event rings, the benchmark's frames) are sized at
/// load by the CPU count, and a pin of another count is replaced like a fixed-size map of
/// another size.
pub fn replace_incompatible(dir: &Path) -> Result<Vec<ReplacedPin>, PinCompatError> {
    use super::loader::{ALL_MAPS, OBJECT, SIZED_AT_LOAD, per_cpu_sizes};
    let per_cpu = per_cpu_sizes().map_err(PinCompatError::Cpus)?;
    replace_incompatible_pins(OBJECT, dir, ALL_MAPS, SIZED_AT_LOAD, &per_cpu)
}

/// Compares every existing pin `dir/<name>` of `names` with `object`'s definition of the
/// map and unpins those that differ (warning with what differed), so that loading `object`
/// creates them afresh. `sized_at_load`: the maps whose entry count the loader overrides;
/// `fixed_at_load`: maps the loader sizes whose pins must have that size all the same.
/// A pin of a map the object does not have is left alone. Every pin is read before any is
/// removed: a pin that cannot be read fails the whole check with nothing removed.
fn replace_incompatible_pins(
    object: &[u8],
    dir: &Path,
    names: &[&'static str],
    sized_at_load: &[&str],
    fixed_at_load: &[(&str, u32)],
) -> Result<Vec<ReplacedPin>, PinCompatError> {
    let mut stale = Vec::new();
    let mut defs = None;
    for &name in names {
        let path = dir.join(name);
        let exists = path.try_exists().map_err(|source| PinCompatError::Stat {
            name,
            path: path.clone(),
            source,
        })?;
        if !exists {
            continue;
        }
        // Parsed once, and only when there is a pin to compare.
        let defs = match &mut defs {
            Some(defs) => defs,
            None => defs.insert(object_defs(object)?),
        };
        let Some(&object_def) = defs.get(name) else {
            continue;
        };
        let object_def = match fixed_at_load.iter().find(|(m, _)| *m == name) {
            Some(&(_, max_entries)) => MapDef {
                max_entries,
                ..object_def
            },
            None => object_def,
        };
        let pinned = pinned_def(name, &path)?;
        let differences = differences(&pinned, &object_def, sized_at_load.contains(&name));
        if !differences.is_empty() {
            stale.push(ReplacedPin {
                name,
                path,
                differences,
            });
        }
    }
    for pin in &stale {
        let what = pin
            .differences
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        tracing::warn!(
            map = pin.name,
            pin = %pin.path.display(),
            differs = %what,
            "pinned map does not match this agent's definition: replacing it with a fresh, \
             empty map (its contents are not carried over)"
        );
        std::fs::remove_file(&pin.path).map_err(|source| PinCompatError::Remove {
            name: pin.name,
            path: pin.path.clone(),
            source,
        })?;
    }
    Ok(stale)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: u32 = bpf_map_type::BPF_MAP_TYPE_HASH as u32;
    const LRU_HASH: u32 = bpf_map_type::BPF_MAP_TYPE_LRU_HASH as u32;
    const ARRAY: u32 = bpf_map_type::BPF_MAP_TYPE_ARRAY as u32;
    const PERCPU_ARRAY: u32 = bpf_map_type::BPF_MAP_TYPE_PERCPU_ARRAY as u32;

    fn def(map_type: u32, key_size: u32, value_size: u32, max_entries: u32, flags: u32) -> MapDef {
        MapDef {
            map_type,
            key_size,
            value_size,
            max_entries,
            flags,
        }
    }

    #[test]
    fn an_identical_definition_is_adopted() {
        let d = def(PERCPU_ARRAY, 4, 8, 40, 0);
        assert!(differences(&d, &d, false).is_empty());
        assert!(differences(&d, &d, true).is_empty());
    }

    #[test]
    fn max_entries_counts_only_for_a_map_of_fixed_size() {
        // COUNTERS grown by one entry: the old, smaller pin must go.
        let pinned = def(PERCPU_ARRAY, 4, 8, 40, 0);
        let object = def(PERCPU_ARRAY, 4, 8, 41, 0);
        assert_eq!(
            differences(&pinned, &object, false),
            [Difference::MaxEntries {
                pinned: 40,
                object: 41
            }]
        );
        // A table sized by the agent's options keeps its pinned size.
        assert!(differences(&pinned, &object, true).is_empty());
    }

    #[test]
    fn every_differing_field_is_named() {
        // CONN_TABLE: LRU hash of 40 B keys and 16 B values, then an mmapable array of sets.
        let pinned = def(LRU_HASH, 40, 16, 1 << 18, 2);
        let object = def(ARRAY, 4, 256, 1 << 16, 1 << 10);
        let diffs = differences(&pinned, &object, true);
        assert_eq!(
            diffs,
            [
                Difference::Type {
                    pinned: LRU_HASH,
                    object: ARRAY
                },
                Difference::KeySize {
                    pinned: 40,
                    object: 4
                },
                Difference::ValueSize {
                    pinned: 16,
                    object: 256
                },
                Difference::Flags {
                    pinned: 2,
                    object: 0x400
                },
            ]
        );
        let text: Vec<String> = diffs.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "type LruHash (object: Array)",
                "key size 40 B (object: 4 B)",
                "value size 16 B (object: 256 B)",
                "flags 0x2 (object: 0x400)",
            ]
        );
    }

    #[test]
    fn a_type_unknown_to_aya_differs_and_says_so() {
        let pinned = def(UNKNOWN_TYPE, 4, 4, 1, 0);
        let object = def(HASH, 4, 4, 1, 0);
        let diffs = differences(&pinned, &object, false);
        assert_eq!(diffs.len(), 1);
        assert_eq!(diffs[0].to_string(), "type unknown to aya (object: Hash)");
    }

    #[test]
    fn a_ring_buffer_compares_as_the_loader_creates_it() {
        let ringbuf = bpf_map_type::BPF_MAP_TYPE_RINGBUF as u32;
        let page = page_size();
        // Three pages' worth of bytes become four pages; the value size is dropped.
        let created = as_created(def(ringbuf, 0, 8, 3 * page - 1, 0));
        assert_eq!(created, def(ringbuf, 0, 0, 4 * page, 0));
        let array = def(ARRAY, 4, 8, 3, 0);
        assert_eq!(as_created(array), array);
    }

    #[test]
    fn the_embedded_object_defines_every_pinned_map() {
        let defs = object_defs(super::super::loader::OBJECT).expect("the object parses");
        for name in super::super::Datapath::PINNED_MAPS {
            assert!(defs.contains_key(*name), "{name} missing from the object");
        }
    }
}
