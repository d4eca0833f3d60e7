//! Reservation commands from the NVMe/TCP initiator ([`Reservations`] for
//! [`NvmeTcpDevice`]): each one opens a short-lived I/O queue on the live association, sends
//! the command with its data in-capsule, waits for the answer and closes the queue. They are
//! rare control-plane commands (a volume's start and promotion), so they never share a
//! reactor's queue pair.

use super::control::COMMAND_TIMEOUT;
use super::NvmeTcpDevice;
use crate::reservations::Reservations;
use crate::spec::reservation::{
    AcquireCommand, RegisterCommand, ReleaseCommand, Report, ReportCommand,
};
use crate::spec::{CompletionQueueEntry, Status, SubmissionQueueEntry};
use crate::Result;

/// Entries of the queue a reservation command travels on.
const QUEUE_SIZE: u32 = 2;
/// Bytes of Report data asked for: the header and 63 extended registrant entries.
const REPORT_LEN: u32 = 4096;

impl NvmeTcpDevice {
    /// Runs one reservation command on a queue of its own.
    fn reservation_command(
        &self,
        step: &str,
        sqe: SubmissionQueueEntry,
        data_out: &[u8],
        data_in: usize,
    ) -> Result<(CompletionQueueEntry, Vec<u8>)> {
        let link = self.sup.live(step)?;
        let (mut conn, qid) = super::connect_io_queue(&link, QUEUE_SIZE)?;
        let r = conn.command(step, sqe, data_out, data_in, COMMAND_TIMEOUT);
        drop(conn);
        link.release_qid(qid);
        r
    }

    fn nsid(&self) -> u32 {
        self.sup.nsid()
    }
}

impl Reservations for NvmeTcpDevice {
    fn register(&self, cmd: &RegisterCommand) -> Result<Status> {
        let (sqe, data) = cmd.encode(0, self.nsid());
        let (c, _) = self.reservation_command("Reservation Register", sqe, &data, 0)?;
        Ok(c.status())
    }

    fn acquire(&self, cmd: &AcquireCommand) -> Result<Status> {
        let (sqe, data) = cmd.encode(0, self.nsid());
        let (c, _) = self.reservation_command("Reservation Acquire", sqe, &data, 0)?;
        Ok(c.status())
    }

    fn release(&self, cmd: &ReleaseCommand) -> Result<Status> {
        let (sqe, data) = cmd.encode(0, self.nsid());
        let (c, _) = self.reservation_command("Reservation Release", sqe, &data, 0)?;
        Ok(c.status())
    }

    fn report(&self) -> Result<std::result::Result<Report, Status>> {
        let step = "Reservation Report";
        let sqe = ReportCommand {
            len: REPORT_LEN,
            eds: true,
        }
        .encode(0, self.nsid());
        let (c, data) = self.reservation_command(step, sqe, &[], REPORT_LEN as usize)?;
        if !c.status().is_success() {
            return Ok(Err(c.status()));
        }
        let link = self.sup.live(step)?;
        Report::parse(&data, true)
            .map(Ok)
            .ok_or_else(|| link.peer.err(step, "the Report data does not parse"))
    }

    fn host_id(&self) -> [u8; 16] {
        super::host_id_for(&self.sup.hostnqn())
    }
}
