//! What the agent's tasks share: the datapath and the models kept in step with it.

use std::{collections::BTreeMap, sync::Arc};

use crate::{
    attach::Attached,
    balancer::{Balancer, VipId},
    datapath::Datapath,
    desired::Desired,
    marks::MarkManager,
};

pub struct Shared {
    pub dp: Datapath,
    pub lb: Balancer,
    pub marks: MarkManager,
    pub interface: String,
    /// Metric labels of the programmed VIPs.
    pub vip_labels: BTreeMap<VipId, String>,
    pub attached: Option<Attached>,
    /// The last configuration applied.
    pub applied: Option<Desired>,
    pub next_hop_mac: Option<[u8; 6]>,
    /// Why the agent is not ready, if it is not.
    pub not_ready: Option<String>,
}

pub type SharedRef = Arc<std::sync::Mutex<Shared>>;

impl Shared {
    pub fn ready(&self) -> Result<(), String> {
        match (&self.not_ready, &self.attached, &self.applied) {
            (Some(why), _, _) => Err(why.clone()),
            (None, None, _) => Err("datapath not attached".into()),
            (None, Some(_), None) => Err("no valid configuration applied yet".into()),
            (None, Some(_), Some(_)) => Ok(()),
        }
    }
}
