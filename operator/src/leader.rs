//! Leader election on a `coordination.k8s.io/v1` Lease (`kube-lease-manager`), so that two
//! replicas are safe: only the holder runs the controller; the other waits, ready, and takes
//! over when the holder stops renewing (it died) or releases (it stopped).
//!
//! A leader that loses the Lease stops its controller at once and returns an error: the
//! process exits and restarts as a standby rather than acting on a stale belief.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::{Result, anyhow};
use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use tracing::info;

use crate::http::Shared;
use crate::settings::Settings;

/// How the Lease is held.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    /// Name of the Lease (in the operator's namespace).
    pub name: String,
    /// Identity of this replica (the pod name).
    pub identity: String,
    /// Seconds a holder stays leader without renewing.
    pub duration_seconds: u64,
    /// Seconds before expiry at which the holder renews.
    pub grace_seconds: u64,
}

/// Waits for the Lease, then runs the controller while holding it.
pub async fn run_when_leader(
    client: Client,
    settings: Settings,
    lease: LeaseSettings,
    shared: Arc<Shared>,
) -> Result<()> {
    let manager = LeaseManagerBuilder::new(client.clone(), &lease.name)
        .with_namespace(&settings.namespace)
        .with_identity(&lease.identity)
        .with_duration(lease.duration_seconds)
        .with_grace(lease.grace_seconds)
        .build()
        .await?;
    let (mut leading, _task) = manager.watch().await;
    shared.standby.store(true, Ordering::SeqCst);
    info!(lease = %lease.name, identity = %lease.identity, "waiting for the leader Lease");
    leading
        .wait_for(|l| *l)
        .await
        .map_err(|_| anyhow!("the Lease manager stopped"))?;
    shared.standby.store(false, Ordering::SeqCst);
    shared.metrics.leader.set(1);
    info!(lease = %lease.name, identity = %lease.identity, "leading");
    let mut lost = leading.clone();
    let stop = async move {
        let _ = lost.wait_for(|l| !*l).await;
    };
    crate::controller::run(
        client,
        settings,
        shared.clone(),
        lease.identity.clone(),
        stop,
    )
    .await;
    shared.metrics.leader.set(0);
    // Keep `leading` alive until here: dropping it releases the Lease.
    if *leading.borrow() {
        return Ok(());
    }
    Err(anyhow!("lost the leader Lease {}", lease.name))
}
