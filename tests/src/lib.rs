//! Helpers shared by the integration tests.
pub mod agent_proc;
pub mod capture;
pub mod cluster;
pub mod datapath_fixture;
pub mod install;
pub mod kube_harness;
pub mod lb_side;
pub mod netns;
pub mod ns_forward;
pub mod operator_harness;
pub mod operator_install;
pub mod pins;
pub mod prometheus;
pub mod supervise;
