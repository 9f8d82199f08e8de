//! The new-flow event consumer: drains the datapath's ring buffer as events arrive and
//! turns them into marks through the engine ([`NodeHandle::handle_events`]), one batch per
//! wake-up and one lock per batch.

use std::time::Duration;

use tokio::io::unix::AsyncFd;

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
    // SAFETY: the reader owns the ring buffer's map fd, which stays open and the same for
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
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        while let Some(ev) = guard.get_inner_mut().next_event() {
            batch.push(ev);
            if batch.len() == BATCH {
                break;
            }
        }
        if batch.is_empty() {
            guard.clear_ready();
            continue;
        }
        for latency in node.handle_events(&mut batch) {
            on_mark(backend, latency);
        }
        // Under a flood the ring stays readable and this task would never give the
        // single-threaded runtime back: /metrics, aging and reloads must keep running.
        tokio::task::yield_now().await;
    }
}
