//! Whether the operator may bind a ClusterRole, asked the only exact way: a dry-run
//! create of a RoleBinding to it.
//!
//! RBAC's escalation check lets a client bind a role when it holds the `bind` verb on
//! it *or* already holds every permission the role grants. A SelfSubjectAccessReview
//! for `bind` sees only the first way, so it would call a small custom role
//! unbindable that the API server accepts. A dry run passes the whole check (and
//! admission) and stores nothing.

use k8s_openapi::api::rbac::v1::{RoleBinding, RoleRef};
use kube::api::{Api, PostParams};
use kube::{Client, core::ObjectMeta};

/// Prefix of the dry-run bindings' generated names (never stored).
const CHECK_PREFIX: &str = "chassis-bind-check-";

/// Asks the API server whether the operator may bind ClusterRole `role` in
/// `namespace`. `Ok(None)`: it may. `Ok(Some(why))`: the API server refused (403,
/// or 404 when the role does not exist and only holding its permissions would do),
/// with its sentence. `Err`: the question itself failed (unreachable, or something
/// else refused the dry run); the caller retries.
pub async fn refusal(client: &Client, namespace: &str, role: &str) -> Result<Option<String>, kube::Error> {
    let probe = RoleBinding {
        metadata: ObjectMeta {
            generate_name: Some(CHECK_PREFIX.into()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: role.into(),
        },
        subjects: None,
    };
    let params = PostParams {
        dry_run: true,
        ..Default::default()
    };
    match Api::<RoleBinding>::namespaced(client.clone(), namespace)
        .create(&params, &probe)
        .await
    {
        Ok(_) => Ok(None),
        Err(kube::Error::Api(status)) if status.code == 403 || status.code == 404 => Ok(Some(status.message)),
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response};
    use kube::client::Body;

    /// Answers one request with `code` and records what was asked.
    async fn ask(code: u16) -> (Result<Option<String>, kube::Error>, String) {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server = tokio::spawn(async move {
            let Some((request, send)) = handle.next_request().await else {
                return String::new();
            };
            let seen = format!("{} {}", request.method(), request.uri());
            let body = request.into_body().collect_bytes().await.unwrap_or_default();
            let sent: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let role = sent["roleRef"]["name"].clone();
            let answer = if code == 201 {
                sent
            } else {
                serde_json::json!({
                    "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
                    "reason": "Forbidden",
                    "message": "rolebindings.rbac.authorization.k8s.io \"x\" is forbidden: user \"op\" is attempting to grant RBAC permissions not currently held",
                })
            };
            let answer = serde_json::to_vec(&answer).unwrap_or_default();
            if let Ok(response) = Response::builder().status(code).body(Body::from(answer)) {
                send.send_response(response);
            }
            format!("{seen} {role}")
        });
        let client = Client::new(service, "default");
        let answer = refusal(&client, "team-a", "cluster-admin").await;
        drop(client);
        (answer, server.await.unwrap_or_default())
    }

    #[tokio::test]
    async fn the_check_is_a_dry_run_binding_and_reports_the_api_servers_refusal() {
        let (answer, seen) = ask(201).await;
        assert!(matches!(answer, Ok(None)), "{answer:?}");
        assert_eq!(
            seen,
            "POST /apis/rbac.authorization.k8s.io/v1/namespaces/team-a/rolebindings?&dryRun=All \"cluster-admin\""
        );

        let (answer, _) = ask(403).await;
        let why = answer.ok().flatten().unwrap_or_default();
        assert!(why.contains("not currently held"), "{why}");

        // Anything else is a failed question, not an answer.
        let (answer, _) = ask(500).await;
        assert!(answer.is_err(), "{answer:?}");
    }
}
