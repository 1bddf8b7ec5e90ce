//! chassis-network owns network isolation and egress (`network.chassis.dev`): the
//! NetworkProfile controller (profiles rendered into NetworkPolicies in every
//! matching namespace) and the EgressPolicy controller (ordered CIDR rules rendered
//! into one allow-only NetworkPolicy), with their pure renderers and the exact IP
//! set arithmetic egress rendering needs.

pub mod egress;
pub mod ipset;
pub mod profile;
pub mod selector;
pub mod write;

/// A stable hash for watch predicates (kube-runtime compares the `u64`s).
pub(crate) fn hash_of<T: std::hash::Hash>(value: &T) -> u64 {
    use std::hash::Hasher;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}
