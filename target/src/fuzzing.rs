//! Entry points for the fuzz targets in `fuzz/` (see `docs/fuzzing.md`): each feeds arbitrary
//! bytes to a front end's real connection state machine, as a host would send them, and must
//! never panic. Not part of the API.
//!
//! A connection owns a `TcpStream`, so every run uses a loopback socket pair: the client end
//! writes the input and swallows the replies, the server end is the connection under test,
//! stepped by hand instead of by a reactor. The client end closes with a reset (linger 0), so
//! a long run leaves no sockets in TIME_WAIT.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use nvmirror_mirror::{Volume, VolumeConfig};
use nvmirror_nvme::backend::FaultyDevice;

use nvmirror_nvme::backend::{LatencyModel, MemDevice};
use nvmirror_nvme::spec::fabrics::{
    connect_sqe, property, property_set_sqe, sgl_in_capsule, ConnectData, CNTLID_DYNAMIC,
};
use nvmirror_nvme::spec::tcp::{self, digest_bits, Digests};
use nvmirror_nvme::spec::wire::put_nul_padded;
use nvmirror_nvme::BlockDevice;
use nvmirror_poller::{IdlePolicy, PollStatus, ReactorConfig, ReactorPool};
use serde_json::Value;

use crate::control::{self, LegEntry, Registry, VolumeEntry};
use crate::nbd;
use crate::nvme_tcp::{self, SubsystemConfig, TargetConfig};

/// Steps a connection may take per input; a run that is still busy after this many stops.
const MAX_STEPS: usize = 512;
/// Idle steps, once the input is all written, after which a connection is taken as stuck.
const IDLE_STEPS: usize = 3;
/// The subsystem the NVMe/TCP prefixes connect to.
const SUBNQN: &str = "nqn.2024-01.io.nvmirror:fuzz";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:fuzz-host";

/// A client socket and the server end accepted from it.
fn socket_pair() -> (TcpStream, TcpStream, SocketAddr) {
    static LISTENER: OnceLock<TcpListener> = OnceLock::new();
    let listener =
        LISTENER.get_or_init(|| TcpListener::bind("127.0.0.1:0").expect("bind a loopback port"));
    let client =
        TcpStream::connect(listener.local_addr().expect("listener address")).expect("connect");
    let (server, peer) = listener.accept().expect("accept");
    client.set_nonblocking(true).expect("non-blocking client");
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `client` owns a valid socket descriptor; the option value is a `linger` of the
    // size passed.
    let rc = unsafe {
        libc::setsockopt(
            client.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER on the client socket");
    (client, server, peer)
}

/// The client end of a run: writes its input as the server reads, drops the replies.
struct Client {
    sock: TcpStream,
    input: Vec<u8>,
    sent: usize,
    sink: Vec<u8>,
}

impl Client {
    fn new(sock: TcpStream, input: Vec<u8>) -> Self {
        Self {
            sock,
            input,
            sent: 0,
            sink: vec![0; 64 * 1024],
        }
    }

    /// Writes what the socket takes and reads what arrived. False once the input is all out.
    fn exchange(&mut self) -> bool {
        if self.sent < self.input.len() {
            match self.sock.write(&self.input[self.sent..]) {
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => self.sent = self.input.len(),
            }
        }
        while matches!(self.sock.read(&mut self.sink), Ok(n) if n > 0) {}
        self.sent < self.input.len()
    }
}

/// Steps `step` against `client` until the connection is done, stuck or out of steps.
fn drive(client: &mut Client, mut step: impl FnMut() -> PollStatus) {
    let mut idle = 0;
    for _ in 0..MAX_STEPS {
        let writing = client.exchange();
        let status = step();
        client.exchange();
        match status {
            PollStatus::Done => return,
            PollStatus::Busy => idle = 0,
            PollStatus::Idle if !writing => {
                idle += 1;
                if idle >= IDLE_STEPS {
                    return;
                }
            }
            PollStatus::Idle => {}
        }
    }
}

fn mem_namespace(bytes: u64, lba_size: u32) -> Arc<dyn BlockDevice> {
    Arc::new(MemDevice::new(bytes, lba_size, LatencyModel::None).expect("a small RAM namespace"))
}

// ---- NVMe/TCP ---------------------------------------------------------------------------

/// A command capsule carrying `data` in-capsule.
fn capsule(sqe: nvmirror_nvme::spec::SubmissionQueueEntry, data: &[u8], dg: Digests) -> Vec<u8> {
    let mut sqe = sqe;
    if !data.is_empty() {
        sgl_in_capsule(&mut sqe, data.len() as u32);
    }
    let mut out = vec![0u8; tcp::capsule_cmd_len(data.len(), dg)];
    let n = tcp::write_capsule_cmd(&mut out, &sqe, data, dg);
    out.truncate(n);
    out
}

/// ICReq and Connect for queue `qid` of controller `cntlid`, as a host sends them.
fn connect_prefix(qid: u16, cntlid: u16, dg: Digests) -> Vec<u8> {
    let digest = if dg.hdgst {
        digest_bits::HDGST_ENABLE
    } else {
        0
    } | if dg.ddgst {
        digest_bits::DDGST_ENABLE
    } else {
        0
    };
    let mut out = tcp::icreq_bytes(0, digest, 0).to_vec();
    let mut d = ConnectData::zeroed();
    d.cntlid = cntlid;
    put_nul_padded(&mut d.subnqn, SUBNQN);
    put_nul_padded(&mut d.hostnqn, HOSTNQN);
    let mut data = vec![0u8; 1024];
    d.write_to(&mut data);
    out.extend(capsule(connect_sqe(0, qid, 31, 0), &data, dg));
    out
}

/// Feeds `data` to one NVMe/TCP target connection. The first byte picks the start: bits 0-1
/// the queue (0: a fresh connection, the input starts with the ICReq; 1: the admin queue,
/// ICReq and Connect already sent; 2: an I/O queue of an enabled controller, likewise), bit 2
/// header digests and bit 3 data digests for the prefix.
pub fn nvme_tcp_connection(data: &[u8]) {
    let Some((&sel, input)) = data.split_first() else {
        return;
    };
    let dg = Digests {
        hdgst: sel & 4 != 0,
        ddgst: sel & 8 != 0,
    };
    let cfg = TargetConfig {
        listen: "127.0.0.1:0".parse().expect("address"),
        subsystems: vec![SubsystemConfig::new(
            SUBNQN,
            vec![mem_namespace(1 << 20, 512), mem_namespace(1 << 20, 4096)],
        )],
        max_queue_size: 32,
        ..TargetConfig::default()
    };
    let shared = nvme_tcp::fuzzing::shared(cfg);
    let mut admin = None;
    let prefix = match sel & 3 {
        0 => Vec::new(),
        1 => connect_prefix(0, CNTLID_DYNAMIC, dg),
        _ => {
            // An admin queue that connects and enables its controller, kept open while the
            // I/O queue runs.
            let mut bring_up = connect_prefix(0, CNTLID_DYNAMIC, Digests::default());
            bring_up.extend(capsule(
                property_set_sqe(1, property::CC, 4, 0x46_0001),
                &[],
                Digests::default(),
            ));
            let (client, server, peer) = socket_pair();
            let mut conn = nvme_tcp::fuzzing::connection(server, peer, &shared);
            let mut client = Client::new(client, bring_up);
            drive(&mut client, || conn.step(Instant::now()));
            admin = Some((client, conn));
            connect_prefix(1, 1, dg)
        }
    };
    let mut stream = prefix;
    stream.extend_from_slice(input);
    let (client, server, peer) = socket_pair();
    let mut conn = nvme_tcp::fuzzing::connection(server, peer, &shared);
    let mut client = Client::new(client, stream);
    drive(&mut client, || conn.step(Instant::now()));
    drop(client);
    conn.finish();
    if let Some((client, mut conn)) = admin {
        drop(client);
        conn.finish();
    }
}

// ---- NBD ----------------------------------------------------------------------------------

/// Feeds `data` to one NBD server connection after its greeting. First byte: 0, the input
/// starts with the client flags; otherwise the client flags and `NBD_OPT_GO` for the export
/// are already sent and the input is the transmission phase.
pub fn nbd_session(data: &[u8]) {
    let Some((&sel, input)) = data.split_first() else {
        return;
    };
    let mut stream = Vec::new();
    if sel & 1 != 0 {
        // NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES, then NBD_OPT_GO "vol0", no infos.
        stream.extend_from_slice(&3u32.to_be_bytes());
        stream.extend_from_slice(b"IHAVEOPT");
        stream.extend_from_slice(&7u32.to_be_bytes());
        stream.extend_from_slice(&10u32.to_be_bytes());
        stream.extend_from_slice(&4u32.to_be_bytes());
        stream.extend_from_slice(b"vol0");
        stream.extend_from_slice(&0u16.to_be_bytes());
    }
    stream.extend_from_slice(input);
    let (client, server, peer) = socket_pair();
    let mut conn = nbd::fuzzing::connection(
        server,
        peer,
        vec![("vol0".into(), mem_namespace(1 << 20, 512))],
    );
    let mut client = Client::new(client, stream);
    drive(&mut client, || conn.step());
    drop(client);
    conn.finish();
}

// ---- JSON-RPC -----------------------------------------------------------------------------

/// Leg URIs a request may name: anything else would open files or dial out.
const RPC_URIS: [&str; 2] = ["mem://1MiB", "null://1MiB"];

/// Whether a request would reach outside the process or block a reactor for good: a leg URI
/// other than [`RPC_URIS`], or a `hang` fault (a job on a hung leg never ends, so runs would
/// pile up on the shared reactor).
fn reaches_outside(v: &Value) -> bool {
    match v {
        Value::String(s) => s == "hang" || (s.contains("://") && !RPC_URIS.contains(&s.as_str())),
        Value::Array(a) => a.iter().any(reaches_outside),
        Value::Object(o) => o
            .iter()
            .any(|(k, v)| reaches_outside(&Value::String(k.clone())) || reaches_outside(v)),
        _ => false,
    }
}

/// A control plane over one fresh two-leg RAM volume `vol0`, as `serve` builds it.
fn rpc_registry() -> Arc<Registry> {
    static POOL: OnceLock<ReactorPool> = OnceLock::new();
    let pool = POOL.get_or_init(|| {
        let idle = IdlePolicy::SpinThenSleep {
            spin: Duration::from_micros(50),
            sleep: Duration::from_millis(1),
        };
        ReactorPool::start(ReactorConfig::unpinned(1).with_idle(idle)).expect("one reactor")
    });
    let mut legs = Vec::new();
    let mut devs: Vec<Arc<dyn BlockDevice>> = Vec::new();
    for _ in 0..2 {
        let faulty = FaultyDevice::wrap(mem_namespace(1 << 20, 512));
        legs.push(LegEntry {
            uri: RPC_URIS[0].into(),
            injector: Arc::clone(faulty.injector()),
        });
        devs.push(Arc::new(faulty));
    }
    let volume = Volume::new("vol0", devs, VolumeConfig::default()).expect("a RAM volume");
    Arc::new(Registry {
        volumes: vec![VolumeEntry {
            volume: Arc::new(volume),
            legs: Mutex::new(legs),
            members: None,
        }],
        reactors: pool.handle(),
        data_dir: std::path::PathBuf::new(),
        leg_dirs: Vec::new(),
        nvme_tcp: Weak::new(),
    })
}

/// Feeds `data` to the JSON-RPC methods `serve` offers, as its socket does: a stream of
/// JSON values, each handled in turn, until one does not parse. Requests that would open
/// other devices or hang a leg are skipped (see [`reaches_outside`]).
pub fn rpc_request(data: &[u8]) {
    let methods = control::methods(rpc_registry());
    for req in serde_json::Deserializer::from_slice(data).into_iter::<Value>() {
        let Ok(req) = req else {
            return;
        };
        if reaches_outside(&req) {
            continue;
        }
        if let Some(resp) = methods.handle(&req) {
            assert!(resp.get("result").is_some() != resp.get("error").is_some());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every start of both front ends runs on a few plain inputs.
    #[test]
    fn entry_points_run() {
        for sel in 0..16u8 {
            nvme_tcp_connection(&[sel]);
            nvme_tcp_connection(&[sel, 0, 0, 0, 0, 0, 0, 0, 0]);
            nbd_session(&[sel]);
            nbd_session(&[sel, 0x25, 0x60, 0x95, 0x13, 0, 0]);
        }
        rpc_request(br#"{"jsonrpc":"2.0","id":1,"method":"volume_list"} [] {"#);
        rpc_request(br#"{"jsonrpc":"2.0","id":2,"method":"leg_add","params":{"volume":"vol0","uri":"file:///x"}}"#);
    }
}
