//! How long the node-state watch waits after an error (pure).
//!
//! An expired `resourceVersion` (410 Gone: the API server restarted or compacted while the
//! agent was away) is retried at once: the watcher re-lists, which is exactly the catch-up
//! needed. Anything else (connection refused, 403 while a restarted server's authorizer warms
//! up, 5xx) waits 250 ms doubling to 2 s, a quarter of it jittered so a thousand agents do not
//! come back in step; kube's default goes to 30 s, which would keep an agent that long behind an
//! API server that came back. Any event received resets the delay.

use std::time::Duration;

use kube::runtime::watcher;

const FIRST: Duration = Duration::from_millis(250);
const MAX: Duration = Duration::from_secs(2);

/// The watch's retry delays.
#[derive(Debug)]
pub struct WatchRetry {
    next: Duration,
}

impl Default for WatchRetry {
    fn default() -> Self {
        Self { next: FIRST }
    }
}

/// Whether `e` says the agent's resourceVersion is too old (a re-list is the cure).
pub fn expired(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::WatchError(s) => s.code == 410,
        watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s))
        | watcher::Error::InitialListFailed(kube::Error::Api(s)) => s.code == 410,
        _ => false,
    }
}

impl WatchRetry {
    /// The delay before polling the watch again after `e`; `jitter` in [0, 1).
    pub fn after(&mut self, e: &watcher::Error, jitter: f64) -> Duration {
        if expired(e) {
            return Duration::ZERO;
        }
        let base = self.next;
        self.next = (self.next * 2).min(MAX);
        base.mul_f64(0.75 + 0.25 * jitter.clamp(0.0, 1.0))
    }

    /// An event arrived: the next error starts from the shortest delay again.
    pub fn reset(&mut self) {
        self.next = FIRST;
    }
}

/// A number in [0, 1) that differs between agents and calls (no RNG dependency needed).
pub fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    f64::from(nanos % 1_000_000) / 1_000_000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::Status;

    fn refused() -> watcher::Error {
        watcher::Error::NoResourceVersion
    }

    fn gone() -> watcher::Error {
        watcher::Error::WatchError(Box::new(
            Status::failure("too old resource version", "Expired").with_code(410),
        ))
    }

    #[test]
    fn errors_back_off_to_two_seconds_and_an_event_resets() {
        let mut r = WatchRetry::default();
        let delays: Vec<u128> = (0..6)
            .map(|_| r.after(&refused(), 1.0).as_millis())
            .collect();
        assert_eq!(delays, [250, 500, 1000, 2000, 2000, 2000]);
        r.reset();
        assert_eq!(r.after(&refused(), 0.0), Duration::from_micros(187_500));
    }

    #[test]
    fn an_expired_version_relists_at_once() {
        let mut r = WatchRetry::default();
        r.after(&refused(), 0.5);
        assert_eq!(r.after(&gone(), 0.5), Duration::ZERO);
        assert!(expired(&gone()));
        assert!(!expired(&refused()));
        let j = jitter();
        assert!((0.0..1.0).contains(&j));
    }
}
