//! marklb Kubernetes API types.
