//! Status writes: server-side apply of a node state's status with the agent's field
//! manager, one task per write, the result handed back to the loop (which never waits on the
//! API server: the datapath's upkeep and the watch go on while a write hangs or fails).

use std::time::Duration;

use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use marklb_crds::{
    API_VERSION, LoadBalancerNodeState, LoadBalancerNodeStateStatus, labels::AGENT_FIELD_MANAGER,
};
use tokio::sync::mpsc;

use super::states::StateKey;

/// Longest a write may take before it counts as failed (and is retried).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// How a write ended.
#[derive(Debug)]
pub enum WriteResult {
    /// The object as the API server holds it after the write.
    Written(Box<LoadBalancerNodeState>),
    /// The state is gone (deleted since).
    Gone,
    Failed(String),
}

/// Starts writing `status` to `key`; the result arrives on `done`.
pub fn spawn_write(
    client: Client,
    key: StateKey,
    status: LoadBalancerNodeStateStatus,
    done: mpsc::UnboundedSender<(StateKey, WriteResult)>,
) {
    tokio::spawn(async move {
        let api: Api<LoadBalancerNodeState> = Api::namespaced(client, &key.namespace);
        let body = serde_json::json!({
            "apiVersion": API_VERSION,
            "kind": "LoadBalancerNodeState",
            "status": status,
        });
        // Forced: the status is this agent's alone (the operator writes only the spec), so a
        // field another manager once set is taken over rather than refused.
        let params = PatchParams::apply(AGENT_FIELD_MANAGER).force();
        let result = match tokio::time::timeout(
            WRITE_TIMEOUT,
            api.patch_status(&key.name, &params, &Patch::Apply(&body)),
        )
        .await
        {
            Ok(Ok(obj)) => WriteResult::Written(Box::new(obj)),
            Ok(Err(kube::Error::Api(e))) if e.code == 404 => WriteResult::Gone,
            Ok(Err(e)) => WriteResult::Failed(e.to_string()),
            Err(_) => WriteResult::Failed(format!("no answer within {WRITE_TIMEOUT:?}")),
        };
        let _ = done.send((key, result));
    });
}
