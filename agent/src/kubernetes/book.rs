//! When to write a node state's status (pure: the caller passes the time).
//!
//! - Nothing is written when the wanted status equals the newest one known to be in the API:
//!   the one this agent wrote last (the server's answer to the write), else what the watch
//!   shows. The agent's own writes come back through the watch; once the watch shows what
//!   was written, the watch is the reference again (so a status changed by someone else is
//!   noticed and put right).
//! - At most one write per state per [`StatusBook::min_interval`]; a change of `marksInUse`
//!   alone (it moves with every new flow under traffic) waits [`StatusBook::counts_interval`].
//!   A change wanted meanwhile is written when the interval ends, with whatever is wanted
//!   then: changes coalesce.
//! - One write per state in flight; a failed write (API server away) is retried with a
//!   doubling delay, up to [`MAX_RETRY`].

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use marklb_crds::LoadBalancerNodeStateStatus;

use super::states::StateKey;

/// Longest delay between retries of a failed write.
pub const MAX_RETRY: Duration = Duration::from_secs(8);

/// What to do about one state now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Write the wanted status now.
    Write,
    /// A write is due, but not before this instant.
    WaitUntil(Instant),
    /// Nothing to write (unchanged, or a write is in flight).
    Nothing,
}

#[derive(Clone, Debug, Default)]
struct Entry {
    /// The object written to (a state deleted and created again under its name is another).
    uid: Option<String>,
    /// The status the API returned for this agent's last write, until the watch shows it.
    written: Option<LoadBalancerNodeStateStatus>,
    last_write: Option<Instant>,
    in_flight: bool,
    failures: u32,
    retry_at: Option<Instant>,
}

/// Per state: what was written, when, and whether a write is in flight.
#[derive(Debug)]
pub struct StatusBook {
    entries: HashMap<StateKey, Entry>,
    pub min_interval: Duration,
    pub counts_interval: Duration,
}

impl Default for StatusBook {
    fn default() -> Self {
        Self {
            entries: HashMap::new(),
            min_interval: Duration::from_secs(1),
            counts_interval: Duration::from_secs(10),
        }
    }
}

/// Two statuses are the same when they differ at most in the order of their conditions
/// (a list keyed by type).
pub fn same(a: &LoadBalancerNodeStateStatus, b: &LoadBalancerNodeStateStatus) -> bool {
    if a.conditions.len() != b.conditions.len() {
        return false;
    }
    let sorted = |s: &LoadBalancerNodeStateStatus| {
        let mut s = s.clone();
        s.conditions.sort_by(|x, y| x.type_.cmp(&y.type_));
        s
    };
    sorted(a) == sorted(b)
}

/// Whether `a` and `b` differ only in `marksInUse`.
fn only_counts_differ(a: &LoadBalancerNodeStateStatus, b: &LoadBalancerNodeStateStatus) -> bool {
    let mut b = b.clone();
    b.marks_in_use = a.marks_in_use;
    same(a, &b)
}

impl StatusBook {
    /// The newest status of `key` known to be in the API, given what the watch shows.
    pub fn baseline<'a>(
        &'a self,
        key: &StateKey,
        observed: Option<&'a LoadBalancerNodeStateStatus>,
    ) -> Option<&'a LoadBalancerNodeStateStatus> {
        self.entries
            .get(key)
            .and_then(|e| e.written.as_ref())
            .or(observed)
    }

    /// What to do about `key`, wanting `wanted`, with `observed` in the watch.
    pub fn decide(
        &self,
        key: &StateKey,
        wanted: &LoadBalancerNodeStateStatus,
        observed: Option<&LoadBalancerNodeStateStatus>,
        now: Instant,
    ) -> Decision {
        let entry = self.entries.get(key);
        if entry.is_some_and(|e| e.in_flight) {
            return Decision::Nothing;
        }
        let base = self.baseline(key, observed);
        if base.is_some_and(|b| same(b, wanted)) {
            return Decision::Nothing;
        }
        let Some(entry) = entry else {
            return Decision::Write;
        };
        if let Some(at) = entry.retry_at
            && at > now
        {
            return Decision::WaitUntil(at);
        }
        let interval = match base {
            Some(b) if only_counts_differ(b, wanted) => self.counts_interval,
            _ => self.min_interval,
        };
        match entry.last_write {
            Some(t) if t + interval > now => Decision::WaitUntil(t + interval),
            _ => Decision::Write,
        }
    }

    /// A write of `key` starts.
    pub fn started(&mut self, key: &StateKey, now: Instant) {
        let e = self.entries.entry(key.clone()).or_default();
        e.in_flight = true;
        e.last_write = Some(now);
    }

    /// The write of `key` succeeded; the API now holds `returned` for object `uid`.
    pub fn succeeded(
        &mut self,
        key: &StateKey,
        uid: Option<&str>,
        returned: LoadBalancerNodeStateStatus,
    ) {
        let e = self.entries.entry(key.clone()).or_default();
        e.uid = uid.map(str::to_string);
        e.in_flight = false;
        e.failures = 0;
        e.retry_at = None;
        e.written = Some(returned);
    }

    /// The write of `key` failed; returns the delay before the next attempt and how many
    /// attempts in a row failed.
    pub fn failed(&mut self, key: &StateKey, now: Instant) -> (Duration, u32) {
        let e = self.entries.entry(key.clone()).or_default();
        e.in_flight = false;
        e.failures = e.failures.saturating_add(1);
        let delay = self
            .min_interval
            .saturating_mul(1 << e.failures.min(5).saturating_sub(1))
            .min(MAX_RETRY);
        e.retry_at = Some(now + delay);
        (delay, e.failures)
    }

    /// The watch shows `observed` for object `uid` at `key`: once it shows what was written,
    /// the watch is the reference again; another object under the same name starts afresh.
    pub fn observed(
        &mut self,
        key: &StateKey,
        uid: Option<&str>,
        observed: Option<&LoadBalancerNodeStateStatus>,
    ) {
        let Some(e) = self.entries.get_mut(key) else {
            return;
        };
        if e.uid.is_some() && e.uid.as_deref() != uid {
            self.entries.remove(key);
            return;
        }
        if let (Some(w), Some(o)) = (&e.written, observed)
            && same(w, o)
        {
            e.written = None;
        }
    }

    /// Forgets states that are gone (a state re-created under the same name starts afresh).
    pub fn retain(&mut self, keep: impl Fn(&StateKey) -> bool) {
        self.entries.retain(|k, _| keep(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: &str) -> StateKey {
        StateKey {
            namespace: "shop".into(),
            name: n.into(),
        }
    }

    fn status(vips: u32, marks: u32) -> LoadBalancerNodeStateStatus {
        LoadBalancerNodeStateStatus {
            observed_generation: Some(1),
            vips,
            marks_in_use: marks,
            ..Default::default()
        }
    }

    #[test]
    fn unchanged_writes_nothing_and_a_change_writes_once() {
        let mut book = StatusBook::default();
        let t0 = Instant::now();
        let k = key("a");
        // Nothing known: write.
        assert_eq!(book.decide(&k, &status(1, 0), None, t0), Decision::Write);
        book.started(&k, t0);
        assert_eq!(book.decide(&k, &status(1, 0), None, t0), Decision::Nothing);
        book.succeeded(&k, Some("u1"), status(1, 0));
        // The watch has not shown the write yet: the written status is the reference.
        assert_eq!(book.decide(&k, &status(1, 0), None, t0), Decision::Nothing);
        book.observed(&k, Some("u1"), Some(&status(1, 0)));
        let later = t0 + Duration::from_secs(60);
        assert_eq!(
            book.decide(&k, &status(1, 0), Some(&status(1, 0)), later),
            Decision::Nothing
        );
        // Equal to what the API already holds (e.g. after a restart): nothing.
        let fresh = StatusBook::default();
        assert_eq!(
            fresh.decide(&k, &status(1, 0), Some(&status(1, 0)), t0),
            Decision::Nothing
        );
    }

    #[test]
    fn churn_is_coalesced_to_one_write_per_interval() {
        let mut book = StatusBook::default();
        let t0 = Instant::now();
        let k = key("a");
        let mut writes = 0;
        let mut next_write = None;
        // 100 spec changes over 5 s (one every 50 ms), each wanting a new status.
        for i in 0..100u32 {
            let now = t0 + Duration::from_millis(50 * u64::from(i));
            let wanted = status(i + 1, 0);
            match book.decide(&k, &wanted, None, now) {
                Decision::Write => {
                    writes += 1;
                    book.started(&k, now);
                    book.succeeded(&k, Some("u1"), wanted);
                    next_write = None;
                }
                Decision::WaitUntil(at) => {
                    assert!(at <= now + Duration::from_secs(1));
                    next_write = Some(at);
                }
                Decision::Nothing => {}
            }
        }
        assert!(next_write.is_some(), "the last change is still due");
        assert!((5..=6).contains(&writes), "{writes} writes in 5 s");
    }

    #[test]
    fn a_change_of_marks_alone_waits_longer() {
        let mut book = StatusBook::default();
        let t0 = Instant::now();
        let k = key("a");
        book.started(&k, t0);
        book.succeeded(&k, Some("u1"), status(1, 5));
        let t2 = t0 + Duration::from_secs(2);
        assert_eq!(
            book.decide(&k, &status(1, 9), None, t2),
            Decision::WaitUntil(t0 + Duration::from_secs(10))
        );
        assert_eq!(book.decide(&k, &status(2, 9), None, t2), Decision::Write);
    }

    #[test]
    fn failures_back_off_and_success_resets() {
        let mut book = StatusBook::default();
        let t0 = Instant::now();
        let k = key("a");
        let mut delays = Vec::new();
        let mut now = t0;
        for _ in 0..6 {
            book.started(&k, now);
            let (d, _) = book.failed(&k, now);
            delays.push(d.as_secs());
            assert_eq!(
                book.decide(&k, &status(1, 0), None, now),
                Decision::WaitUntil(now + d)
            );
            now += d;
        }
        assert_eq!(delays, [1, 2, 4, 8, 8, 8]);
        assert_eq!(book.decide(&k, &status(1, 0), None, now), Decision::Write);
        book.started(&k, now);
        book.succeeded(&k, Some("u1"), status(1, 0));
        book.started(&k, now);
        assert_eq!(book.failed(&k, now), (Duration::from_secs(1), 1));
    }

    #[test]
    fn someone_elses_change_is_put_right() {
        let mut book = StatusBook::default();
        let t0 = Instant::now();
        let k = key("a");
        book.started(&k, t0);
        book.succeeded(&k, Some("u1"), status(1, 0));
        book.observed(&k, Some("u1"), Some(&status(1, 0)));
        // Somebody wiped the status.
        let wiped = LoadBalancerNodeStateStatus::default();
        let later = t0 + Duration::from_secs(5);
        assert_eq!(
            book.decide(&k, &status(1, 0), Some(&wiped), later),
            Decision::Write
        );
    }

    #[test]
    fn a_state_created_again_under_its_name_gets_its_status() {
        let mut book = StatusBook::default();
        let t0 = Instant::now();
        let k = key("a");
        book.started(&k, t0);
        book.succeeded(&k, Some("u1"), status(1, 0));
        // Deleted and created again with the same spec: the watch shows the new object
        // without a status; what was written to the old one must not count.
        book.observed(&k, Some("u2"), None);
        assert_eq!(book.decide(&k, &status(1, 0), None, t0), Decision::Write);
    }

    #[test]
    fn condition_order_does_not_matter() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
        let c = |t: &str| Condition {
            type_: t.into(),
            status: "True".into(),
            reason: "R".into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: crate::kubernetes::status::now_seconds(),
        };
        let mut a = status(1, 0);
        a.conditions = vec![c("Ready"), c("Conflict")];
        let mut b = status(1, 0);
        b.conditions = vec![c("Conflict"), c("Ready")];
        assert!(same(&a, &b));
        b.conditions.pop();
        assert!(!same(&a, &b));
    }
}
