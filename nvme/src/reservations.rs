//! Reservations as an initiator sees them (NVMe Base 2.0 §8.19): the commands a volume sends
//! to fence a remote leg. A back end that can send them (the NVMe/TCP initiator) hands out a
//! [`Reservations`] from [`BlockDevice::reservations`](crate::BlockDevice::reservations);
//! the others return `None`, and a volume reports such a leg as unfenced.
//!
//! Each call is a blocking control-plane round trip, never made from a reactor. `Ok` carries
//! the command's NVMe status (Reservation Conflict is an answer, not an error); `Err` is a
//! transport failure (no controller, no answer).

use crate::spec::reservation::{AcquireCommand, RegisterCommand, ReleaseCommand, Report};
use crate::spec::Status;
use crate::Result;

/// Reservation Register, Acquire, Release and Report on one namespace.
pub trait Reservations: Send + Sync {
    /// Reservation Register (opcode 0x0D).
    fn register(&self, cmd: &RegisterCommand) -> Result<Status>;
    /// Reservation Acquire (opcode 0x11).
    fn acquire(&self, cmd: &AcquireCommand) -> Result<Status>;
    /// Reservation Release (opcode 0x15).
    fn release(&self, cmd: &ReleaseCommand) -> Result<Status>;
    /// Reservation Report (opcode 0x0E) with the extended data structure; `Err(status)` when
    /// the controller refused it.
    fn report(&self) -> Result<std::result::Result<Report, Status>>;
    /// The 128-bit host identifier these commands are sent with (a Report lists it).
    fn host_id(&self) -> [u8; 16];
}
