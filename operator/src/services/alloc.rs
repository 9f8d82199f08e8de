//! Which addresses a Service gets, decided from the pools and their ledgers alone (no I/O, no
//! memory between calls): the same inputs give the same answer, so a restarted operator
//! re-derives every allocation and writes nothing.
//!
//! Rules, each checked by the property tests below:
//! - an address goes to one Service, or to several that all carry the same sharing key and
//!   whose ports do not clash (same protocol and port);
//! - a Service gets at most one address per family it wants, from one pool, inside that
//!   pool's blocks (never `.0`/`.255` when the pool avoids them), and every family its policy
//!   requires, or nothing;
//! - a requested address is honoured, or refused with a reason (in use by whom, in no pool
//!   the Service may use, avoided by its pool);
//! - a Service keeps what it holds while that stays valid (order of holding decides: an
//!   entry is checked only against the entries written before it, so of two Services whose
//!   ports start to clash the later holder moves);
//! - a released Service's entries leave the ledger, and its addresses are free again.
//!
//! Free addresses are taken lowest first, blocks in spec order, pools by name: allocation
//! is deterministic.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use marklb_crds::LoadBalancerIPPoolSpec;
use marklb_crds::pool::{AddressBlock, Family, PoolAllocation, addresses::is_buggy};

use super::reason;
use super::request::{PortKey, Request, ServiceId};

/// A pool as the allocator sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolView {
    pub name: String,
    pub spec: LoadBalancerIPPoolSpec,
    /// Its blocks when the pool is usable; why not otherwise (invalid spec, overlap).
    pub usable: Result<Vec<AddressBlock>, String>,
}

impl PoolView {
    /// A pool whose spec validates (overlaps with other pools are the caller's to report).
    pub fn new(name: &str, spec: LoadBalancerIPPoolSpec) -> PoolView {
        let usable = match spec.validate() {
            Ok(()) => Ok(spec.blocks().into_iter().flatten().collect()),
            Err(e) => Err(e.to_string()),
        };
        PoolView {
            name: name.to_string(),
            spec,
            usable,
        }
    }

    fn blocks(&self) -> &[AddressBlock] {
        self.usable.as_deref().unwrap_or_default()
    }

    /// Whether `ip` is one this pool may hand out (in a block, not an avoided `.0`/`.255`).
    pub fn offers(&self, ip: IpAddr) -> bool {
        self.blocks().iter().any(|b| b.contains(ip)) && !(self.spec.avoid_buggy_ips && is_buggy(ip))
    }

    fn contains(&self, ip: IpAddr) -> bool {
        self.blocks().iter().any(|b| b.contains(ip))
    }
}

/// One ledger entry: `address` of `pool` held by `service`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub pool: String,
    pub address: IpAddr,
    pub service: ServiceId,
    pub sharing_key: Option<String>,
    pub ports: BTreeSet<PortKey>,
}

/// Every pool's entries, each pool's in its ledger order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ledger {
    pub entries: Vec<Entry>,
}

impl Ledger {
    /// The ledger of `pools`' statuses (entries whose address does not parse are dropped:
    /// they hold nothing).
    pub fn from_pools<'a>(
        pools: impl IntoIterator<Item = (&'a str, &'a [PoolAllocation])>,
    ) -> Ledger {
        let mut entries = Vec::new();
        for (pool, allocations) in pools {
            for a in allocations {
                let Ok(address) = a.address.parse::<IpAddr>() else {
                    continue;
                };
                entries.push(Entry {
                    pool: pool.to_string(),
                    address,
                    service: ServiceId {
                        namespace: a.namespace.clone(),
                        name: a.service.clone(),
                        uid: a.uid.clone(),
                    },
                    sharing_key: a.sharing_key.clone(),
                    ports: a.ports.iter().filter_map(|p| PortKey::parse(p)).collect(),
                });
            }
        }
        Ledger { entries }
    }

    /// The entries of Service `uid`.
    pub fn held_by<'a>(&'a self, uid: &'a str) -> impl Iterator<Item = &'a Entry> + 'a {
        self.entries.iter().filter(move |e| e.service.uid == uid)
    }

    /// The holders of `ip` other than `uid`; with `before`, only entries before that index.
    fn others(&self, ip: IpAddr, uid: &str, before: Option<usize>) -> Vec<&Entry> {
        self.entries
            .iter()
            .enumerate()
            .filter(|(i, e)| {
                e.address == ip && e.service.uid != uid && before.is_none_or(|b| *i < b)
            })
            .map(|(_, e)| e)
            .collect()
    }

    /// Whether any Service holds `ip`.
    pub fn is_taken(&self, ip: IpAddr) -> bool {
        self.entries.iter().any(|e| e.address == ip)
    }

    /// Addresses held, distinct.
    pub fn addresses(&self) -> BTreeSet<IpAddr> {
        self.entries.iter().map(|e| e.address).collect()
    }
}

/// Whether a Service with `key` and `ports` may hold an address also held by `others`.
fn may_share(
    key: Option<&str>,
    ports: &BTreeSet<PortKey>,
    others: &[&Entry],
) -> Result<(), String> {
    let Some(first) = others.first() else {
        return Ok(());
    };
    let holder = first.service.key();
    let Some(key) = key else {
        return Err(format!("held by {holder}"));
    };
    for o in others {
        if o.sharing_key.as_deref() != Some(key) {
            return Err(format!(
                "held by {} with {}",
                o.service.key(),
                match &o.sharing_key {
                    Some(k) => format!("sharing key {k:?}, not {key:?}"),
                    None => "no sharing key".to_string(),
                }
            ));
        }
        if let Some(clash) = o.ports.intersection(ports).next() {
            return Err(format!(
                "shared with {} (key {key:?}), whose port {} clashes",
                o.service.key(),
                clash.label()
            ));
        }
    }
    Ok(())
}

/// The addresses a Service gets, from one pool, in the order of its families.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocation {
    pub pool: String,
    pub addresses: Vec<IpAddr>,
}

/// Why a Service gets nothing: a reason of [`super::reason`] and a message a user can act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    pub message: String,
}

fn refuse(reason: &'static str, message: String) -> Refusal {
    Refusal { reason, message }
}

/// The pools `req` may draw from, in the order they are tried.
fn candidate_pools<'a>(
    req: &Request,
    pools: &'a [PoolView],
    namespace_labels: &BTreeMap<String, String>,
) -> Result<Vec<&'a PoolView>, Refusal> {
    let admits = |p: &PoolView| {
        p.spec
            .admits(&req.id.namespace, namespace_labels, &req.labels)
    };
    let mut sorted: Vec<&PoolView> = pools.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(name) = &req.pool {
        let Some(pool) = sorted.iter().find(|p| &p.name == name) else {
            return Err(refuse(
                reason::POOL_NOT_FOUND,
                format!("pool {name} does not exist"),
            ));
        };
        if let Err(why) = &pool.usable {
            return Err(refuse(
                reason::POOL_INVALID,
                format!("pool {name} is not valid: {why}"),
            ));
        }
        if !admits(pool) {
            return Err(refuse(
                reason::POOL_NOT_ALLOWED,
                format!(
                    "pool {name} does not admit Services of namespace {} with these labels (spec.serviceAllocation)",
                    req.id.namespace
                ),
            ));
        }
        for ip in &req.requested {
            if !pool.contains(*ip) {
                return Err(refuse(
                    reason::ADDRESS_NOT_IN_POOL,
                    format!("{ip} is not in pool {name}"),
                ));
            }
        }
        return Ok(vec![*pool]);
    }
    if !req.requested.is_empty() {
        let holding: Vec<&PoolView> = sorted
            .iter()
            .copied()
            .filter(|p| p.usable.is_ok() && req.requested.iter().all(|ip| p.contains(*ip)))
            .collect();
        let admitted: Vec<&PoolView> = holding.iter().copied().filter(|p| admits(p)).collect();
        if admitted.is_empty() {
            let list = req
                .requested
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(match holding.first() {
                Some(p) => refuse(
                    reason::POOL_NOT_ALLOWED,
                    format!(
                        "{list}: pool {} does not admit Services of namespace {} with these labels (spec.serviceAllocation)",
                        p.name, req.id.namespace
                    ),
                ),
                None => refuse(
                    reason::ADDRESS_NOT_IN_POOL,
                    format!("{list}: in no valid pool"),
                ),
            });
        }
        return Ok(admitted);
    }
    let auto: Vec<&PoolView> = sorted
        .iter()
        .copied()
        .filter(|p| p.usable.is_ok() && p.spec.auto_assign && admits(p))
        .collect();
    if auto.is_empty() {
        return Err(refuse(
            reason::NO_POOL,
            format!(
                "no valid pool with autoAssign admits Services of namespace {} with these labels; name one (annotation {}) or request an address",
                req.id.namespace,
                super::POOL_ANNOTATION
            ),
        ));
    }
    Ok(auto)
}

/// The allocation of `req`: what it holds, where still valid, completed from `pools`;
/// or why it gets nothing.
pub fn allocate(
    req: &Request,
    pools: &[PoolView],
    ledger: &Ledger,
    namespace_labels: &BTreeMap<String, String>,
) -> Result<Allocation, Refusal> {
    // A pool that became invalid (a bad edit) hands out nothing new, but its Services keep
    // what they hold: the last good state keeps serving while the pool reports why.
    for pool in pools.iter().filter(|p| p.usable.is_err()) {
        let held: Vec<IpAddr> = req
            .wanted()
            .iter()
            .filter_map(|f| {
                ledger
                    .held_by(&req.id.uid)
                    .find(|e| e.pool == pool.name && Family::of(e.address) == *f)
                    .map(|e| e.address)
            })
            .collect();
        if !held.is_empty() {
            return Ok(Allocation {
                pool: pool.name.clone(),
                addresses: held,
            });
        }
    }
    let candidates = candidate_pools(req, pools, namespace_labels)?;
    let key = req.sharing_key.as_deref();
    let required = req.required();
    let mut last_failure: Option<Refusal> = None;
    for pool in candidates {
        let mut addresses = Vec::new();
        let mut failure = None;
        for &family in req.wanted() {
            let pick = if let Some(ip) = req.requested_of(family) {
                if !pool.offers(ip) {
                    return Err(refuse(
                        reason::ADDRESS_NOT_IN_POOL,
                        format!(
                            "{ip}: pool {} avoids addresses ending in .0 and .255 (avoidBuggyIPs)",
                            pool.name
                        ),
                    ));
                }
                let held_at = ledger
                    .entries
                    .iter()
                    .position(|e| e.address == ip && e.service.uid == req.id.uid);
                if let Err(why) =
                    may_share(key, &req.ports, &ledger.others(ip, &req.id.uid, held_at))
                {
                    return Err(refuse(reason::ADDRESS_IN_USE, format!("{ip} is {why}")));
                }
                Some(ip)
            } else {
                keep_held(req, pool, family, ledger)
                    .or_else(|| pick_free(req, pool, family, ledger))
            };
            match pick {
                Some(ip) => addresses.push(ip),
                None if required.contains(&family) => {
                    failure = Some(refuse(
                        reason::POOL_EXHAUSTED,
                        format!("pool {} has no free {family} address", pool.name),
                    ));
                    break;
                }
                None => {}
            }
        }
        match failure {
            None if !addresses.is_empty() => {
                return Ok(Allocation {
                    pool: pool.name.clone(),
                    addresses,
                });
            }
            None => {
                last_failure = Some(refuse(
                    reason::POOL_EXHAUSTED,
                    format!(
                        "pool {} has no free {} address",
                        pool.name,
                        req.wanted()
                            .iter()
                            .map(|f| f.as_str())
                            .collect::<Vec<_>>()
                            .join(" or ")
                    ),
                ))
            }
            Some(f) => last_failure = Some(f),
        }
    }
    Err(last_failure.expect("at least one candidate pool was tried"))
}

/// The address of `family` the Service holds in `pool`, if it may keep it.
fn keep_held(req: &Request, pool: &PoolView, family: Family, ledger: &Ledger) -> Option<IpAddr> {
    let key = req.sharing_key.as_deref();
    ledger.entries.iter().enumerate().find_map(|(i, e)| {
        let ok = e.service.uid == req.id.uid
            && e.pool == pool.name
            && Family::of(e.address) == family
            && pool.offers(e.address)
            && may_share(
                key,
                &req.ports,
                &ledger.others(e.address, &req.id.uid, Some(i)),
            )
            .is_ok();
        ok.then_some(e.address)
    })
}

/// A new address of `family` in `pool`: one already shared under the Service's key where its
/// ports fit, else the lowest free one.
fn pick_free(req: &Request, pool: &PoolView, family: Family, ledger: &Ledger) -> Option<IpAddr> {
    if let Some(key) = req.sharing_key.as_deref() {
        let shared = ledger
            .addresses()
            .into_iter()
            .filter(|ip| Family::of(*ip) == family && pool.offers(*ip))
            .find(|ip| {
                may_share(
                    Some(key),
                    &req.ports,
                    &ledger.others(*ip, &req.id.uid, None),
                )
                .is_ok()
            });
        if shared.is_some() {
            return shared;
        }
    }
    pool.blocks()
        .iter()
        .filter(|b| b.family() == family)
        .find_map(|b| b.first_free(pool.spec.avoid_buggy_ips, |ip| ledger.is_taken(ip)))
}

/// `pool`'s ledger once `req`'s entries in it follow `allocation` (`None`: released):
/// entries of other Services unchanged and in order; the Service's kept addresses stay in
/// place (their rank) with its current key and ports; new ones go at the end.
pub fn record(
    current: &[PoolAllocation],
    pool: &str,
    req_id: &ServiceId,
    req: Option<(&Request, &Allocation)>,
) -> Vec<PoolAllocation> {
    let keep: Vec<IpAddr> = match req {
        Some((_, a)) if a.pool == pool => a.addresses.clone(),
        _ => Vec::new(),
    };
    let entry = |address: IpAddr, r: &Request| PoolAllocation {
        address: address.to_string(),
        namespace: req_id.namespace.clone(),
        service: req_id.name.clone(),
        uid: req_id.uid.clone(),
        sharing_key: r.sharing_key.clone(),
        ports: r.port_labels(),
    };
    let mut out = Vec::new();
    let mut placed = BTreeSet::new();
    for a in current {
        if a.uid != req_id.uid {
            out.push(a.clone());
            continue;
        }
        let Ok(ip) = a.address.parse::<IpAddr>() else {
            continue;
        };
        if let Some((r, _)) = req
            && keep.contains(&ip)
            && placed.insert(ip)
        {
            out.push(entry(ip, r));
        }
    }
    if let Some((r, _)) = req {
        for ip in keep {
            if placed.insert(ip) {
                out.push(entry(ip, r));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests;
