//! Putting the datapath on an interface so it survives the agent: maps pinned under
//! bpffs, the XDP program attached through a pinned bpf_link. A restarted agent loads the
//! same pinned maps and swaps its freshly loaded program into the existing link in one
//! step (`bpf_link_update`), so traffic never stops and no state is lost.
//!
//! The running agent also keeps a descriptor of the link ([`KeptLink`]): the pin keeps the
//! datapath for the next agent, the descriptor keeps it while this one runs, even if the
//! pin goes (bpffs unmounted, files removed; [`repin`] puts them back).

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use aya::maps::MapData;
use aya::programs::{
    XdpMode,
    links::{FdLink, PinnedLink},
    xdp::XdpLink,
};

use crate::{
    datapath::{Datapath, Prog},
    xdp_link::{self, KeptLink},
};

/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Where one interface's datapath is pinned.
#[derive(Clone, Debug)]
pub struct PinLayout {
    pub dir: PathBuf,
}

impl PinLayout {
    pub fn new(bpffs: &Path, iface: &str) -> Self {
        Self {
            dir: bpffs.join("marklb").join(iface),
        }
    }
    pub fn maps(&self) -> PathBuf {
        self.dir.join("maps")
    }
    pub fn link(&self) -> PathBuf {
        self.dir.join("xdp_link")
    }
    /// The tcx link of the TC balancer (`--mark-delivery skb-mark`).
    pub fn tc_link(&self) -> PathBuf {
        self.dir.join("tc_link")
    }
    /// The tcx link of the emulated NIC's TC program, in front of the TC balancer.
    pub fn tc_nic_link(&self) -> PathBuf {
        self.dir.join("tc_nic_link")
    }
    /// Which LoadBalancer owns each VIP ([`crate::owner_record`]).
    pub fn owners(&self) -> PathBuf {
        self.dir.join("owners")
    }
    /// Every link a datapath may have pinned here.
    pub fn links(&self) -> [PathBuf; 3] {
        [self.link(), self.tc_link(), self.tc_nic_link()]
    }
    /// Whether a previous agent left a datapath here.
    pub fn exists(&self) -> bool {
        self.link().exists() || self.tc_link().exists()
    }
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

/// Makes sure `bpffs` is a bpf filesystem, mounting one there if it is not (many minimal
/// hosts do not mount /sys/fs/bpf).
pub fn ensure_bpffs(bpffs: &Path) -> Result<()> {
    if is_bpffs(bpffs) {
        return Ok(());
    }
    fs::create_dir_all(bpffs).with_context(|| format!("creating {}", bpffs.display()))?;
    let target = std::ffi::CString::new(bpffs.as_os_str().as_encoded_bytes())?;
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        bail!(
            "{} is not a bpf filesystem and mounting one failed: {} (mount bpffs there, or pass --bpffs)",
            bpffs.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// How the program ended up attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attached {
    /// `native` or `generic`.
    pub mode: String,
    /// Kernel id of the attached program.
    pub prog_id: u32,
    /// A previous agent's link was reused.
    pub adopted: bool,
}

/// The XDP mode preference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ModePref {
    /// Native (driver) mode, generic if the driver lacks XDP.
    Auto,
    Native,
    Generic,
}

/// Attaches `prog` (the balancer, or the emulated NIC in front of it) to `iface`, reusing
/// a pinned link when there is one. `current_mode` is the mode the pinned link is attached
/// in (netlink's name), if known: an adopted link in another mode than an explicit `pref`
/// is attached again in that mode ([`mode_change`]).
pub fn attach(
    dp: &mut Datapath,
    prog: Prog,
    iface: &str,
    pins: &PinLayout,
    pref: ModePref,
    current_mode: Option<&str>,
) -> Result<(Attached, KeptLink)> {
    let xdp = dp.program(prog)?;
    // A datapath left at TC by an agent with the other mark delivery makes way first.
    remove_links(&[pins.tc_nic_link(), pins.tc_link()])?;
    if pins.link().exists() {
        let pinned = PinnedLink::from_pin(pins.link())
            .with_context(|| format!("opening pinned link {}", pins.link().display()))?;
        let fd_link: FdLink = pinned.into();
        let link = XdpLink::try_from(fd_link).context("pinned link is not an XDP link")?;
        let id = xdp
            .attach_to_link(link)
            .context("replacing the program in the pinned link")?;
        // The pin keeps the link; dropping aya's handle must not detach it.
        let link = xdp.take_link(id)?;
        let fd_link = FdLink::try_from(link).context("XDP link without fd")?;
        let prog_id = prog_id_of(&fd_link)?;
        let link_id = fd_link.info().context("reading link info")?.id();
        let kept = KeptLink::open_pinned(&pins.link(), link_id).context("keeping the XDP link")?;
        drop(fd_link);
        // bpffs holds no plain files; the caller asks the kernel for the mode.
        let attached = Attached {
            mode: "unknown".into(),
            prog_id,
            adopted: true,
        };
        if let Some((from, to)) = current_mode.and_then(|c| mode_change(pref, c)) {
            return reattach(xdp, iface, pins, kept, from, to);
        }
        return Ok((attached, kept));
    }
    let modes: &[(XdpMode, &str)] = match pref {
        ModePref::Auto => &[NATIVE, GENERIC],
        ModePref::Native => &[NATIVE],
        ModePref::Generic => &[GENERIC],
    };
    let mut last_err = None;
    for &(mode, name) in modes {
        match attach_fresh(xdp, iface, pins, (mode, name)) {
            Ok(done) => return Ok(done),
            Err(e) => {
                tracing::info!(mode = name, error = %e, "XDP attach mode not available");
                last_err = Some(e);
            }
        }
    }
    Err(last_err.unwrap_or_else(|| anyhow::anyhow!("no XDP mode to try")))
        .with_context(|| format!("attaching XDP to {iface}"))
}

/// An XDP attach mode with its name (as netlink and the node state name it).
pub type NamedMode = (XdpMode, &'static str);

const NATIVE: NamedMode = (XdpMode::Driver, "native");
const GENERIC: NamedMode = (XdpMode::Skb, "generic");

/// The XDP mode an adopted attachment in mode `current` (as netlink names it) must move from
/// and to for `pref`, if it must: an explicit `native` or `generic` is honoured, `auto`
/// accepts whatever is attached (and modes marklb does not attach in are left alone).
pub fn mode_change(pref: ModePref, current: &str) -> Option<(NamedMode, NamedMode)> {
    let from = match current {
        "native" => NATIVE,
        "generic" => GENERIC,
        _ => return None,
    };
    let to = match pref {
        ModePref::Auto => return None,
        ModePref::Native => NATIVE,
        ModePref::Generic => GENERIC,
    };
    (from.1 != to.1).then_some((from, to))
}

/// Attaches `xdp` to `iface` in `mode` through a new bpf_link and pins it.
fn attach_fresh(
    xdp: &mut aya::programs::Xdp,
    iface: &str,
    pins: &PinLayout,
    (mode, name): (XdpMode, &str),
) -> Result<(Attached, KeptLink)> {
    let id = xdp
        .attach(iface, mode)
        .with_context(|| format!("attaching XDP to {iface} in {name} mode"))?;
    let link = xdp.take_link(id)?;
    let fd_link = FdLink::try_from(link)
        .context("the kernel attached XDP without a bpf_link; cannot pin it")?;
    let prog_id = prog_id_of(&fd_link)?;
    fs::create_dir_all(&pins.dir)?;
    let kept = KeptLink::pin_new(fd_link, &pins.link()).context("pinning the XDP link")?;
    let attached = Attached {
        mode: name.to_string(),
        prog_id,
        adopted: false,
    };
    Ok((attached, kept))
}

/// Moves an adopted datapath (its program already swapped into `kept`) from mode `from` to
/// mode `to`. A device holds native or generic XDP, never both, so this detaches and attaches
/// again, back to back: packets arriving in between pass to the kernel stack unbalanced (the
/// measured gap is logged). The maps stay pinned and in use, so the connection table and
/// the marks survive and established connections keep their real. Should `to` not attach
/// (a driver without native XDP), `from` is attached again at once and the error logged: the
/// node is never left without the program.
fn reattach(
    xdp: &mut aya::programs::Xdp,
    iface: &str,
    pins: &PinLayout,
    kept: KeptLink,
    from: NamedMode,
    to: NamedMode,
) -> Result<(Attached, KeptLink)> {
    let started = std::time::Instant::now();
    kept.detach()
        .context("detaching the adopted XDP link to change its mode")?;
    let detach_us = started.elapsed().as_micros() as u64;
    fs::remove_file(pins.link()).context("removing the adopted link's pin")?;
    match attach_fresh(xdp, iface, pins, to) {
        Ok((mut attached, kept)) => {
            let gap = started.elapsed();
            tracing::info!(
                iface,
                from = from.1,
                to = to.1,
                gap_us = gap.as_micros() as u64,
                detach_us,
                "re-attached the adopted datapath in the requested XDP mode (maps kept)"
            );
            attached.adopted = true;
            Ok((attached, kept))
        }
        Err(e) => {
            let (mut attached, kept) = attach_fresh(xdp, iface, pins, from).with_context(|| {
                format!(
                    "{iface}: XDP mode {} failed ({e:#}) and attaching {} again failed too: \
                     no program attached",
                    to.1, from.1
                )
            })?;
            let gap = started.elapsed();
            tracing::error!(
                iface,
                requested = to.1,
                serving = from.1,
                gap_us = gap.as_micros() as u64,
                detach_us,
                error = %format!("{e:#}"),
                "the requested XDP mode cannot be attached; the datapath serves in its previous \
                 mode again"
            );
            attached.adopted = true;
            Ok((attached, kept))
        }
    }
}

fn prog_id_of(link: &FdLink) -> Result<u32> {
    Ok(link.info().context("reading link info")?.program_id())
}

/// Detaches and unpins everything the agent left for `pins` (link and maps). The link is
/// detached for good even while a running agent still holds it.
pub fn remove_pins(pins: &PinLayout) -> Result<bool> {
    if !pins.dir.exists() {
        return Ok(false);
    }
    remove_links(&pins.links())?;
    fs::remove_dir_all(&pins.dir).with_context(|| format!("removing {}", pins.dir.display()))?;
    Ok(true)
}

/// Detaches the links pinned at `paths` (those present) and removes their pins.
pub fn remove_links(paths: &[PathBuf]) -> Result<()> {
    for path in paths.iter().filter(|p| p.exists()) {
        match xdp_link::detach_pinned(path) {
            // EINVAL: the link was detached already (defunct), nothing left to undo.
            Err(e) if e.raw_os_error() != Some(libc::EINVAL) => {
                return Err(e)
                    .with_context(|| format!("detaching the link pinned at {}", path.display()));
            }
            _ => {}
        }
        fs::remove_file(path)?;
    }
    Ok(())
}

/// The datapath's maps, each opened from its pin under `pins.maps()` with a descriptor of
/// its own, so they can be pinned again should their pins go. By pin, not by id: opening a
/// map by id needs CAP_SYS_ADMIN, which the agent's pod does not have.
pub fn pinned_maps(pins: &PinLayout) -> Result<Vec<(String, MapData)>> {
    let mut maps = Vec::new();
    for name in Datapath::PINNED_MAPS {
        let path = pins.maps().join(name);
        if !path.exists() {
            continue;
        }
        let data = MapData::from_pin(&path)
            .with_context(|| format!("opening pinned map {}", path.display()))?;
        maps.push((name.to_string(), data));
    }
    Ok(maps)
}

/// Whether every pin of the datapath is in place (a few `stat`s).
pub fn pinned(pins: &PinLayout, links: &[(PathBuf, KeptLink)], maps: &[(String, MapData)]) -> bool {
    links.iter().all(|(p, _)| p.exists()) && maps.iter().all(|(n, _)| pins.maps().join(n).exists())
}

/// Pins that went missing under a running agent, pinned again: the XDP link and `maps`.
/// Mounts a bpffs at `bpffs` first if it is not one any more. Returns what was pinned.
pub fn repin(
    links: &[(PathBuf, KeptLink)],
    maps: &[(String, MapData)],
    bpffs: &Path,
    pins: &PinLayout,
) -> Result<Vec<String>> {
    let mut pinned = Vec::new();
    ensure_bpffs(bpffs)?;
    fs::create_dir_all(pins.maps())
        .with_context(|| format!("creating {}", pins.maps().display()))?;
    for (name, data) in maps {
        let path = pins.maps().join(name);
        if !path.exists() {
            data.pin(&path)
                .with_context(|| format!("pinning map {name} at {}", path.display()))?;
            pinned.push(format!("map {name}"));
        }
    }
    for (path, link) in links {
        if !path.exists() {
            link.pin(path)
                .with_context(|| format!("pinning the link at {}", path.display()))?;
            pinned.push(format!("link {}", path.display()));
        }
    }
    Ok(pinned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_explicit_other_mode_re_attaches() {
        let names = |c: Option<(NamedMode, NamedMode)>| c.map(|(f, t)| (f.1, t.1));
        assert_eq!(
            names(mode_change(ModePref::Native, "generic")),
            Some(("generic", "native"))
        );
        assert_eq!(
            names(mode_change(ModePref::Generic, "native")),
            Some(("native", "generic"))
        );
        assert_eq!(names(mode_change(ModePref::Native, "native")), None);
        assert_eq!(names(mode_change(ModePref::Generic, "generic")), None);
        assert_eq!(names(mode_change(ModePref::Auto, "generic")), None);
        assert_eq!(names(mode_change(ModePref::Auto, "native")), None);
        assert_eq!(names(mode_change(ModePref::Native, "offload")), None);
    }
}
