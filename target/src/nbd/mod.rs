//! NBD front end: serves any [`BlockDevice`](nvmirror_nvme::BlockDevice) — a mirror volume or
//! a single leg — over the Network Block Device protocol, so unmodified tools (`qemu-img`,
//! `qemu-io`, `nbdinfo`, `fio --ioengine=nbd`, the kernel's `nbd-client`) can use it.
//!
//! Fixed-newstyle handshake with `NBD_OPT_GO`/`INFO`/`LIST`/`EXPORT_NAME`/`ABORT`; simple
//! replies only; `READ`, `WRITE`, `FLUSH`, `TRIM`, `WRITE_ZEROES`, `DISC`. Threading follows
//! the rest of nvmirror: an accept thread hands each connection to one reactor, where a
//! poller owns the socket, a queue pair on the device and a DMA buffer pool, so the request
//! path takes no lock and allocates nothing. See `docs/nbd.md`.
//!
//! ```no_run
//! use nvmirror_poller::{ReactorConfig, ReactorPool};
//! use nvmirror_target::nbd::{NbdConfig, NbdServer};
//!
//! let pool = ReactorPool::start(ReactorConfig::unpinned(1)).unwrap();
//! let cfg = NbdConfig {
//!     exports: vec![("vol0".into(), nvmirror_nvme::open_leg("mem://1GiB").unwrap())],
//!     ..NbdConfig::default()
//! };
//! let server = NbdServer::start(cfg, &pool.handle()).unwrap();
//! // qemu-img info nbd://127.0.0.1:10809/vol0
//! server.shutdown();
//! pool.shutdown();
//! ```

mod buffer;
mod connection;
mod error;
mod export;
mod negotiation;
pub mod proto;
mod server;
mod transmission;

pub use error::{Error, Result};

/// Pieces of the server the fuzz entry points in [`crate::fuzzing`] put together by hand.
pub(crate) mod fuzzing {
    use std::net::{SocketAddr, TcpStream};
    use std::sync::Arc;

    use nvmirror_nvme::BlockDevice;

    pub(crate) use super::connection::Connection;
    use super::export::{Export, ExportTable};
    use super::server::{LiveConnection, ServerState};

    /// A connection as the accept loop sets it up, serving `exports`.
    pub(crate) fn connection(
        sock: TcpStream,
        peer: SocketAddr,
        exports: Vec<(String, Arc<dyn BlockDevice>)>,
    ) -> Connection {
        sock.set_nonblocking(true).expect("non-blocking socket");
        let exports = ExportTable::new(
            exports
                .into_iter()
                .map(|(name, device)| Export::new(name, device, u64::MAX))
                .collect(),
        );
        let state = Arc::new(ServerState::default());
        let live = LiveConnection::new(&state);
        Connection::new(sock, peer, exports, state, live)
    }
}
pub use server::{NbdConfig, NbdLimits, NbdServer, DEFAULT_PORT};
