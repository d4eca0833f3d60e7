//! Authentication Send (FCTYPE 05h) and Receive (06h) on a connected queue.

use nvmirror_nvme::spec::auth::AuthCommand;
use nvmirror_nvme::spec::Status;

use super::super::connection::Connection;

/// Longest message an Authentication Send may carry here (TL); DH-HMAC-CHAP with the NULL
/// group needs under 200 bytes.
pub(crate) const MAX_SEND_LEN: u32 = 4096;

/// Checks SECP/SPSP and that the queue authenticates at all.
fn check(conn: &Connection, cmd: &AuthCommand) -> Result<(), Status> {
    if !cmd.is_dhchap() || cmd.len == 0 {
        return Err(Status::INVALID_FIELD.with_dnr());
    }
    if conn.auth.is_none() {
        // The host was not asked to authenticate (no secret for it).
        return Err(Status::COMMAND_SEQUENCE_ERROR.with_dnr());
    }
    Ok(())
}

/// Authentication Send in slot `i`, its TL bytes received.
pub(crate) fn auth_send(conn: &mut Connection, i: u16) -> Result<u64, (Status, u32)> {
    let slot = &conn.slots.slots[usize::from(i)];
    let cmd = AuthCommand::from_sqe(&slot.sqe);
    check(conn, &cmd).map_err(|s| (s, 0))?;
    if cmd.len > MAX_SEND_LEN || slot.received < cmd.len {
        return Err((Status::DATA_SGL_LENGTH_INVALID.with_dnr(), 0));
    }
    let bytes = &slot.buf.as_slice()[..cmd.len as usize];
    conn.auth.as_mut().expect("checked").on_send(bytes);
    Ok(0)
}

/// Authentication Receive in slot `i`: the next message, zero-padded to AL.
pub(crate) fn auth_receive(conn: &mut Connection, i: u16) -> Result<u64, (Status, u32)> {
    let cmd = AuthCommand::from_sqe(&conn.slots.slots[usize::from(i)].sqe);
    check(conn, &cmd).map_err(|s| (s, 0))?;
    let msg = conn.auth.as_mut().expect("checked").on_receive().to_bytes();
    let slot = &mut conn.slots.slots[usize::from(i)];
    let al = (cmd.len as usize).min(slot.xfer_len as usize);
    if al < msg.len() || al > slot.buf.len() {
        return Err((Status::DATA_SGL_LENGTH_INVALID.with_dnr(), 0));
    }
    let out = &mut slot.buf.as_mut_slice()[..al];
    out[..msg.len()].copy_from_slice(&msg);
    out[msg.len()..].fill(0);
    slot.c2h_len = al as u32;
    Ok(0)
}
