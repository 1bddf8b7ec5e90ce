//! Leader election on a `coordination.k8s.io` Lease with kube-lease-manager.
//! Only the holder runs controllers; losing the lease ends the process, so that a
//! restarted replica starts from clean caches (as controller-runtime does).

use kube::Client;
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Lease timing: a crashed leader is replaced within `duration` plus one poll.
pub const LEASE_DURATION_SECONDS: u64 = 10;
pub const LEASE_GRACE_SECONDS: u64 = 3;

/// A running election. Drop `leading` (via [`Election::release`]) to give the lease up.
pub struct Election {
    pub leading: watch::Receiver<bool>,
    task: JoinHandle<Result<LeaseManager, LeaseManagerError>>,
}

impl Election {
    /// Joins the election for Lease `namespace/name` as `identity`.
    pub async fn start(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
    ) -> Result<Self, LeaseManagerError> {
        let manager = LeaseManagerBuilder::new(client, name)
            .with_namespace(namespace)
            .with_identity(identity)
            .with_duration(LEASE_DURATION_SECONDS)
            .with_grace(LEASE_GRACE_SECONDS)
            .with_field_manager(format!("chassis-leader-{identity}"))
            .build()
            .await?;
        let (leading, task) = manager.watch().await;
        Ok(Self { leading, task })
    }

    /// Waits until this instance holds the lease.
    pub async fn acquired(&mut self) -> bool {
        self.leading.wait_for(|leading| *leading).await.is_ok()
    }

    /// Resolves when the lease, once held, is lost.
    pub async fn lost(&mut self) {
        let _ = self.leading.wait_for(|leading| !*leading).await;
    }

    /// Releases the lease so a standby takes over at once, not after it expires.
    pub async fn release(self) {
        drop(self.leading);
        match self.task.await {
            Ok(Ok(_)) => tracing::info!("released the leader lease"),
            Ok(Err(err)) => tracing::warn!(error = %err, "could not release the leader lease"),
            Err(err) => tracing::warn!(error = %err, "leader election task failed"),
        }
    }
}
