//! chassis-tenancy owns self-service projects (`tenancy.chassis.dev`): the Project
//! and ProjectTemplate controllers and their pure builders.
//!
//! ```text
//!  [ ProjectTemplate ] ──┐
//!                        ├─▶ reconcile(Project) ─▶ [ Namespace ] (owned by the Project)
//!  [ Project ] ──────────┘          │
//!  [ Namespace ] (by name) ─────────┘ (drift and conflicts wake the project up)
//! ```
//!
//! The ProjectTemplate controller checks that the template's member roles name
//! existing ClusterRoles the operator may bind ([`bind`]) and reports `Ready` on the
//! template.
//!
//! It reads the cluster only through reflector stores and writes through
//! chassis-runtime's server-side apply; builders in [`project::build`] never touch a
//! client.

pub mod admission;
pub mod bind;
pub mod project;
pub mod template;
