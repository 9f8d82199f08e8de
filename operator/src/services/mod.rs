//! Services of type `LoadBalancer` served by marklb: an address from a `LoadBalancerIPPool`,
//! an owned `LoadBalancer` whose reals are the cluster's nodes, and a decapsulator on every
//! node so that kube-proxy takes the traffic from there to a pod, whose reply goes straight
//! back to the client (direct server return).
//!
//! Layers point one way, as in the rest of the operator:
//! - pure: [`request`] (what a Service asks for), [`alloc`] (which addresses it gets, from the
//!   pools' ledgers), [`reals`] (which nodes take its traffic, weighted), [`desired`] (the
//!   owned LoadBalancer, the Service's status, the decapsulator DaemonSet), [`pools`] (a
//!   pool's own status);
//! - [`apply`] writes what they decided;
//! - [`controller`] wires the watches: one controller on Services, one on pools.
//!
//! Where the truth lives: the pools' `status.allocations` ledgers, written with the
//! `resourceVersion` read (optimistic concurrency), and the Services' ingress derived from
//! them. Nothing is kept in memory across reconciles, so a restarted operator re-reads the
//! same allocations and writes nothing, and two operators cannot hand one address to two
//! Services (the second ledger write is refused with 409 and retried on fresh data).

pub mod alloc;
pub mod apply;
pub mod controller;
pub mod desired;
pub mod pools;
pub mod reals;
pub mod request;

#[cfg(test)]
mod fixtures;

/// The `spec.loadBalancerClass` marklb serves by default.
pub const DEFAULT_CLASS: &str = "marklb.io/lb";
/// Annotation standing in for `spec.loadBalancerClass` on clusters that predate the field
/// (Kubernetes 1.20); the field wins when both are set.
pub const CLASS_ANNOTATION: &str = "marklb.io/load-balancer-class";
/// Annotation requesting addresses, comma-separated, at most one per IP family
/// (`192.0.2.10`, `192.0.2.10,2001:db8::10`). `spec.loadBalancerIP` works too (one address).
pub const ADDRESSES_ANNOTATION: &str = "marklb.io/load-balancer-ips";
/// Annotation naming the pool to draw from.
pub const POOL_ANNOTATION: &str = "marklb.io/address-pool";
/// Annotation opting in to share an address with other Services of the same key whose
/// ports differ (MetalLB's `allow-shared-ip`).
pub const SHARING_ANNOTATION: &str = "marklb.io/allow-shared-ip";
/// Finalizer on served Services: their LoadBalancer and addresses go before they do.
pub const SERVICE_FINALIZER: &str = "marklb.io/service-cleanup";
/// Label of a Service's LoadBalancer naming the Service.
pub const SERVICE_LABEL: &str = "marklb.io/service";

/// Condition types marklb writes into a Service's `status.conditions`.
pub mod condition {
    /// Whether the Service got its addresses (False: why not, e.g. `PoolExhausted`).
    pub const ADDRESS_ALLOCATED: &str = "marklb.io/AddressAllocated";
    /// Whether traffic to the addresses is served: the LoadBalancer is Ready and some node
    /// takes the traffic of every port.
    pub const READY: &str = "marklb.io/Ready";
}

/// Reasons of the Service conditions (and of the Events marklb publishes about Services).
pub mod reason {
    /// Addresses allocated (message: which, from which pool).
    pub const ALLOCATED: &str = "Allocated";
    /// The request cannot be read: bad annotation, family not served, SCTP... (message says).
    pub const INVALID_REQUEST: &str = "InvalidRequest";
    /// No pool the Service may draw from (none admits it, or none auto-assigns).
    pub const NO_POOL: &str = "NoPool";
    /// The named pool does not exist.
    pub const POOL_NOT_FOUND: &str = "PoolNotFound";
    /// The named pool (or the one holding the requested address) does not admit the Service.
    pub const POOL_NOT_ALLOWED: &str = "PoolNotAllowed";
    /// The named pool is invalid (its `Valid` condition says why).
    pub const POOL_INVALID: &str = "PoolInvalid";
    /// The requested address is in no pool the Service may use.
    pub const ADDRESS_NOT_IN_POOL: &str = "AddressNotInPool";
    /// The requested address belongs to another Service (message names it) and cannot be
    /// shared with it.
    pub const ADDRESS_IN_USE: &str = "AddressInUse";
    /// Every address of the Service's pools is taken.
    pub const POOL_EXHAUSTED: &str = "PoolExhausted";
    /// The LoadBalancer serves the Service on every balancer node.
    pub const SERVING: &str = "Serving";
    /// No node can take the Service's traffic (message: why, per port family).
    pub const NO_READY_NODES: &str = "NoReadyNodes";
    /// The Service's LoadBalancer is not Ready (message: its reason and message).
    pub const LOADBALANCER_NOT_READY: &str = "LoadBalancerNotReady";
    /// The Service's LoadBalancer name is held by a LoadBalancer the Service does not own.
    pub const NAME_TAKEN: &str = "LoadBalancerNameTaken";
    /// Released: the Service is no longer served by marklb (class or type changed).
    pub const RELEASED: &str = "Released";
}
