//! The text form of `marklb-agent status`.

use std::fmt::Write;

use super::Status;

/// Human-readable status: the attachment, each VIP with its owner and reals, then marks,
/// NIC rules, connections and the non-zero path counters.
pub fn render(s: &Status) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "interface {} (pins {})",
        s.interface,
        s.pin_dir.display()
    );
    let a = &s.attach;
    match a.hook.as_str() {
        "none" => {
            let _ = writeln!(o, "attached:   nothing pinned (no link)");
        }
        hook => {
            let _ = write!(
                o,
                "attached:   {hook} {}, program {} (link {})",
                a.mode, a.prog_id, a.link_id
            );
            if let Some(nic) = a.nic_prog_id {
                let _ = write!(o, ", emulated NIC program {nic} in front");
            }
            o.push('\n');
        }
    }
    let _ = writeln!(
        o,
        "marks:      {} in use, {} stale, of {}",
        s.marks.in_use, s.marks.stale, s.marks.capacity
    );
    let _ = writeln!(
        o,
        "NIC rules:  {} (emulated NIC), {} packets marked",
        s.nic_rules.emulated, s.nic_rules.hits
    );
    let _ = writeln!(o, "flows:      {} in the connection table", s.connections);
    let _ = writeln!(
        o,
        "rings:      {} of {} slots",
        s.ring_storage.used, s.ring_storage.capacity
    );
    let _ = writeln!(o, "\nVIPs ({}):", s.vips.len());
    for v in &s.vips {
        let owner = v.owner.as_deref().unwrap_or("(owner not recorded)");
        let _ = writeln!(
            o,
            "  {}  owner {owner}  ring {}  marks {}  packets {}  bytes {}",
            v.vip, v.ring_size, v.marks, v.packets, v.bytes
        );
        for r in &v.reals {
            let share = 100.0 * f64::from(r.slots) / f64::from(v.ring_size.max(1));
            let _ = writeln!(o, "    real {}  {} slots ({share:.1}%)", r.address, r.slots);
        }
    }
    let _ = writeln!(o, "\nreals ({}):", s.reals.len());
    for r in &s.reals {
        let _ = writeln!(
            o,
            "  {}  id {}  packets {}  bytes {}",
            r.address, r.id, r.packets, r.bytes
        );
    }
    let _ = writeln!(o, "\npath counters (non-zero):");
    for (name, v) in s.counters.iter().filter(|(_, v)| **v > 0) {
        let _ = writeln!(o, "  {name:<24} {v}");
    }
    o
}
