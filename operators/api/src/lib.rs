//! chassis-api owns every Chassis custom resource type, one module per API group
//! (`tenancy` is `tenancy.chassis.dev`, `network` is `network.chassis.dev`), plus the shared condition vocabulary.
//!
//! The Rust types are the source of truth: `crdgen` renders them into `crds/`, and
//! the field names follow `DESIGN.md`, which is a contract with users and tools.
//! This crate has no controller logic and makes no API calls.

// clippy reads the repeated `printcolumn(type_ = ...)` arguments of `#[kube]` as
// duplicated attributes; they are separate columns.
#![allow(clippy::duplicated_attributes)]

pub mod conditions;
pub mod network;
pub mod tenancy;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::core::crd::CustomResourceExt;

/// Every CRD Chassis installs, in install order.
pub fn all_crds() -> Vec<CustomResourceDefinition> {
    vec![
        tenancy::v1alpha1::ProjectTemplate::crd(),
        tenancy::v1alpha1::Project::crd(),
        network::v1alpha1::NetworkProfile::crd(),
        network::v1alpha1::EgressPolicy::crd(),
    ]
}

/// The category every Chassis kind belongs to, so `kubectl get chassis` lists them all.
pub const CATEGORY: &str = "chassis";

/// The value of `app.kubernetes.io/managed-by` on every object Chassis creates.
pub const MANAGED_BY: &str = "chassis";
