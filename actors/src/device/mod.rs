//! Per-device processing: the directory the front end submits events to, each device's
//! queue (its slot), the device actor that owns the window, and the supervisor.
//!
//! Events do not travel in ractor mailboxes. Each device has a [`slot`](Slot): a small
//! mutex-guarded queue shared by the front end (which pushes) and the device actor (which
//! pops). The mailbox carries only a `Wake` when the queue turns non-empty. This is what
//! lets the service promise that no accepted event is lost: a mailbox dies with its
//! actor, a slot survives it, and the restarted actor continues where the failed one
//! stopped. It also batches naturally: a busy device costs one wake-up per burst.

mod actor;
mod directory;
mod slot;
mod supervisor;
#[cfg(test)]
mod tests;

pub use actor::{BoxFuture, DeviceActor, DeviceArgs, DeviceContext, DeviceMsg};
pub(crate) use directory::SlotMap;
pub use directory::{Admission, Directory, SubmitError};
pub use slot::{Queued, Slot};
pub use supervisor::{DeviceSupervisor, SupervisorArgs, SupervisorMsg};
