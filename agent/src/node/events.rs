//! The new-flow event consumer: drains the datapath's per-CPU event rings and turns the
//! events into marks through the engine ([`NodeHandle::handle_events`]), one batch per
//! wake-up and one lock per batch. The datapath rings the doorbell (which wakes this task)
//! at most once per `EVENT_WAKE_GAP_NS` per CPU (waking costs a self-IPI), so it also
//! drains the rings every `EVENT_POLL_NS`: no event waits longer than that.

use std::time::Duration;

use marklb_common::EVENT_POLL_NS;
use tokio::{io::unix::AsyncFd, time::MissedTickBehavior};

use super::NodeHandle;
use crate::datapath::EventReader;

/// Largest batch handled under one lock hold.
const BATCH: usize = 1024;

/// Runs until the task is dropped; `on_mark` gets the hardware backend's name and the
/// event-to-mark latency of every mark installed.
pub async fn consume_events(
    reader: EventReader,
    node: NodeHandle,
    on_mark: impl Fn(&'static str, Duration) + Send,
) {
    // SAFETY: the reader owns the doorbell ring's map fd, which stays open and the same for
    // as long as the AsyncFd owns the reader.
    let mut fd = match unsafe { AsyncFd::register(reader) } {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!(error = %e, "cannot poll the event ring; no marks will be installed");
            return;
        }
    };
    let backend = node.published().view().hw_backend;
    let mut batch = Vec::with_capacity(BATCH);
    let mut reported_skips = 0;
    let mut tick = tokio::time::interval(Duration::from_nanos(EVENT_POLL_NS));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            ready = fd.readable_mut() => {
                let Ok(mut guard) = ready else {
                    return;
                };
                fill(guard.get_inner_mut(), &mut batch);
                if batch.is_empty() {
                    guard.clear_ready();
                    continue;
                }
            }
            // Events submitted without a wake-up.
            _ = tick.tick() => {
                fill(fd.get_mut(), &mut batch);
                if batch.is_empty() {
                    continue;
                }
            }
        }
        let skipped = fd.get_ref().skipped();
        if skipped > reported_skips {
            tracing::warn!(
                skipped,
                "event slots whose check did not match were skipped (torn or unfinished writes)"
            );
            reported_skips = skipped;
        }
        for latency in node.handle_events(&mut batch) {
            on_mark(backend, latency);
        }
        // Under a flood the ring stays readable and this task would never give the
        // single-threaded runtime back: /metrics, aging and reloads must keep running.
        tokio::task::yield_now().await;
    }
}

/// Moves up to [`BATCH`] waiting events into `batch`.
fn fill(reader: &mut EventReader, batch: &mut Vec<marklb_common::NewFlowEvent>) {
    while batch.len() < BATCH {
        let Some(ev) = reader.next_event() else {
            return;
        };
        batch.push(ev);
    }
}
