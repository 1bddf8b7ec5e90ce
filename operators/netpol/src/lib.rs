//! chassis-netpol owns the NetworkPolicy evaluator: given NetworkPolicies and a
//! model of namespaces, pods, labels, IPs and ports, it decides whether traffic from
//! one pod to another on a port is allowed, exactly as the Kubernetes NetworkPolicy
//! specification says. It has no Kubernetes client; `chassis-netpol` (the CLI) calls
//! it, and the network controllers' tests use it to check what they render.

pub mod eval;
pub mod model;
pub mod policy;
pub mod probe;

#[cfg(test)]
mod tests;
