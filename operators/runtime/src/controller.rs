//! The handle the manager gets from each area's controller constructor.

use futures::future::BoxFuture;

/// A controller that has been wired but not yet driven.
pub struct Running {
    /// Name used in `--controllers`, metrics and logs.
    pub name: &'static str,
    /// Resolves once every reflector store the controller reads has synced.
    pub synced: BoxFuture<'static, ()>,
    /// Drives the controller until shutdown.
    pub run: BoxFuture<'static, ()>,
}
