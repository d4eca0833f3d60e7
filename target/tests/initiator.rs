//! nvmirror's NVMe/TCP initiator (`nvme-tcp://`, `NvmeTcpDevice`) against the target running
//! in this process on a free loopback port with `mem://` namespaces.

#[path = "initiator/abort.rs"]
mod abort;
#[path = "initiator/close.rs"]
mod close;
mod common;
#[path = "initiator/fake.rs"]
mod fake;
#[path = "initiator/faults.rs"]
mod faults;
#[path = "initiator/harness.rs"]
mod harness;
#[path = "initiator/io.rs"]
mod io;
#[path = "initiator/model.rs"]
mod model;
#[path = "initiator/violations.rs"]
mod violations;
#[path = "initiator/volume_close.rs"]
mod volume_close;
