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
        spec_may_be_left_out(tenancy::v1alpha1::Project::crd()),
        network::v1alpha1::NetworkProfile::crd(),
        network::v1alpha1::EgressPolicy::crd(),
    ]
}

/// A Project of only a name is complete (every spec field has a default), but kube's
/// derive makes `spec` required: the API server would then refuse it wherever the
/// mutating webhook, which adds `spec`, does not run (`webhook.objectSelector`, an
/// operator run without webhooks). With `default: {}` it defaults `spec` and then the
/// fields inside it, and every stored Project has one.
fn spec_may_be_left_out(mut crd: CustomResourceDefinition) -> CustomResourceDefinition {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSON;
    for version in &mut crd.spec.versions {
        let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        else {
            continue;
        };
        if let Some(required) = schema.required.as_mut() {
            required.retain(|r| r != "spec");
            if required.is_empty() {
                schema.required = None;
            }
        }
        if let Some(spec) = schema.properties.as_mut().and_then(|p| p.get_mut("spec")) {
            spec.default = Some(JSON(serde_json::json!({})));
        }
    }
    crd
}

/// The category every Chassis kind belongs to, so `kubectl get chassis` lists them all.
pub const CATEGORY: &str = "chassis";

/// The value of `app.kubernetes.io/managed-by` on every object Chassis creates.
pub const MANAGED_BY: &str = "chassis";

#[cfg(test)]
mod tests {
    use super::*;

    /// The path of every property below `schema` that has no description.
    fn undescribed(schema: &serde_json::Value, path: &str, out: &mut Vec<String>) {
        if let Some(properties) = schema.get("properties").and_then(|p| p.as_object()) {
            for (name, property) in properties {
                let here = format!("{path}.{name}");
                if property.get("description").is_none() {
                    out.push(here.clone());
                }
                undescribed(property, &here, out);
            }
        }
        if let Some(items) = schema.get("items") {
            undescribed(items, &format!("{path}[]"), out);
        }
        if let Some(values) = schema.get("additionalProperties").filter(|v| v.is_object()) {
            undescribed(values, &format!("{path}{{}}"), out);
        }
    }

    #[test]
    fn a_project_of_only_a_name_gets_a_defaulted_spec() -> Result<(), serde_json::Error> {
        let crd = all_crds()
            .into_iter()
            .find(|c| c.spec.names.kind == "Project")
            .map(serde_json::to_value)
            .transpose()?
            .unwrap_or_default();
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        assert_eq!(schema["properties"]["spec"]["default"], serde_json::json!({}));
        assert!(
            !schema["required"]
                .as_array()
                .is_some_and(|r| r.iter().any(|f| f == "spec")),
            "{schema}"
        );
        // What the API server then defaults inside it.
        assert_eq!(
            schema["properties"]["spec"]["properties"]["template"]["default"],
            "default"
        );
        Ok(())
    }

    #[test]
    fn every_kind_is_listed_like_the_others_and_every_field_is_described() -> Result<(), serde_json::Error> {
        for crd in all_crds() {
            let kind = &crd.spec.names.kind;
            // Every kind is in the `chassis` category, with a short name and the columns
            // `kubectl get` shows for all of them.
            assert!(
                crd.spec.names.categories.iter().flatten().any(|c| c == CATEGORY),
                "{kind}: not in the {CATEGORY} category"
            );
            assert!(
                crd.spec.names.short_names.as_ref().is_some_and(|s| !s.is_empty()),
                "{kind}: no short name"
            );
            for version in &crd.spec.versions {
                assert!(
                    version
                        .subresources
                        .as_ref()
                        .and_then(|s| s.status.as_ref())
                        .is_some(),
                    "{kind}: no status subresource"
                );
                let columns: Vec<&str> = version
                    .additional_printer_columns
                    .iter()
                    .flatten()
                    .map(|c| c.name.as_str())
                    .collect();
                assert!(
                    columns.contains(&"Ready") && columns.contains(&"Age"),
                    "{kind}: columns {columns:?}"
                );
                let schema = serde_json::to_value(
                    version
                        .schema
                        .as_ref()
                        .and_then(|s| s.open_api_v3_schema.as_ref()),
                )?;
                let mut missing = Vec::new();
                for part in ["spec", "status"] {
                    if let Some(part_schema) = schema.pointer(&format!("/properties/{part}")) {
                        undescribed(part_schema, part, &mut missing);
                    }
                }
                assert!(
                    missing.is_empty(),
                    "{kind} {}: no description on {missing:?}",
                    version.name
                );
            }
        }
        Ok(())
    }
}
