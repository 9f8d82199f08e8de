//! marklb Kubernetes API types (`marklb.io/v1alpha1`): `LoadBalancer`,
//! `LoadBalancerNodeState` and `LoadBalancerIPPool`, their validation in Rust, the shared condition, label and finalizer
//! names, and the CRDs generated from them (`crds/yaml/`, written by the `crdgen` binary).
//!
//! - [`loadbalancer`]: the user-facing spec, also the agent's standalone config file.
//! - [`node_state`]: the per-node object (spec by the operator, status by the agent).
//! - [`pool`]: `LoadBalancerIPPool`, the addresses Services of type LoadBalancer draw from.
//! - [`limits`]: bounds and defaults of the API (and [`is_prime`] for Maglev table sizes).
//! - [`parse`]: the address, prefix and MAC parsers the types and the validation share.
//! - [`validate`]: [`LoadBalancerSpec::validate`], every rule of the schema and CEL in Rust.
//! - [`manifest`]: [`from_yaml_manifest`] / [`from_yaml_manifests`], strict readers of
//!   LoadBalancer manifest files.
//! - [`conditions`], [`labels`]: names both controllers must spell alike.
//! - [`crd`]: the CRDs, current (with CEL rules) and legacy (for Kubernetes 1.20).

pub mod conditions;
pub mod crd;
pub mod labels;
pub mod limits;
pub mod loadbalancer;
pub mod manifest;
pub mod node_state;
pub mod parse;
pub mod pool;
pub mod validate;

#[cfg(test)]
mod examples;
#[cfg(test)]
mod schema_check;

pub use limits::is_prime;
pub use loadbalancer::{
    Backend, Encap, FlowMarks, Hashing, LoadBalancer, LoadBalancerSpec, LoadBalancerStatus,
    MarkScope, Mtu, NextHop, Protocol, TooBig, Vip,
};
pub use manifest::{ManifestError, from_yaml_manifest, from_yaml_manifests};
pub use node_state::{
    LoadBalancerNodeState, LoadBalancerNodeStateSpec, LoadBalancerNodeStateStatus,
};
pub use parse::IpPrefix;
pub use pool::{LoadBalancerIPPool, LoadBalancerIPPoolSpec, LoadBalancerIPPoolStatus};
pub use validate::{FieldError, ValidationErrors};

/// API group of every marklb resource.
pub const GROUP: &str = "marklb.io";
/// API version of every marklb resource.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` of every marklb resource.
pub const API_VERSION: &str = "marklb.io/v1alpha1";
