//! Starts a target with chosen namespaces and drives queue pairs one command at a time.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvmirror_nvme::backend::{NvmeTcpDevice, NvmeTcpOptions};
use nvmirror_nvme::dma::IoBuf;
use nvmirror_nvme::{BlockDevice, Completion, IoCommand, IoOp, LegUri, QueuePair, Status};
use nvmirror_poller::{IdlePolicy, ReactorConfig, ReactorPool};
use nvmirror_target::{NvmeTcpTarget, SubsystemConfig, TargetConfig};

pub const SUBNQN: &str = "nqn.2024-01.io.nvmirror:initiator-test";

/// How long one command may take before a test gives up on it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A target and its reactors; dropping it stops both.
pub struct Target {
    target: Option<NvmeTcpTarget>,
    pool: Option<ReactorPool>,
    pub addr: SocketAddr,
    pub namespaces: Vec<Arc<dyn BlockDevice>>,
}

impl Target {
    /// `nvme-tcp://` URI of this target's subsystem with `query` appended.
    pub fn uri(&self, query: &str) -> String {
        let q = if query.is_empty() {
            String::new()
        } else {
            format!("?{query}")
        };
        format!("nvme-tcp://{}/{SUBNQN}{q}", self.addr)
    }

    /// Connects through the URI parser, as a leg would.
    pub fn connect(&self, query: &str) -> nvmirror_nvme::Result<NvmeTcpDevice> {
        match LegUri::parse(&self.uri(query))? {
            LegUri::NvmeTcp { addr, opts } => NvmeTcpDevice::connect(&addr, &opts),
            other => panic!("not an nvme-tcp URI: {other:?}"),
        }
    }

    /// Connects with explicit options.
    pub fn connect_with(&self, opts: &NvmeTcpOptions) -> nvmirror_nvme::Result<NvmeTcpDevice> {
        NvmeTcpDevice::connect(&self.addr.to_string(), opts)
    }

    pub fn controllers(&self) -> usize {
        self.target.as_ref().map_or(0, |t| t.controller_count())
    }

    /// Stops the target: it closes every connection at its next poll.
    pub fn stop(&mut self) {
        if let Some(t) = self.target.take() {
            t.shutdown();
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        drop(self.target.take());
        if let Some(p) = self.pool.take() {
            p.shutdown();
        }
    }
}

/// A 16 MiB namespace of 512-byte blocks (NSID 1) and a 4 MiB one of 4096-byte blocks
/// (NSID 2): the raw-PDU tests' namespaces.
pub use crate::common::mem_namespaces;

/// Starts a target on a free loopback port serving `namespaces`; `tweak` adjusts the
/// configuration.
pub fn start_with(
    namespaces: Vec<Arc<dyn BlockDevice>>,
    tweak: impl FnOnce(&mut TargetConfig),
) -> Target {
    let mut cfg = TargetConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        subsystems: vec![SubsystemConfig::new(SUBNQN, namespaces.clone())],
        ..TargetConfig::default()
    };
    tweak(&mut cfg);
    let pool = ReactorPool::start(ReactorConfig::unpinned(2).with_idle(
        IdlePolicy::SpinThenSleep {
            spin: Duration::from_micros(50),
            sleep: Duration::from_millis(1),
        },
    ))
    .unwrap();
    let target = NvmeTcpTarget::start(cfg, &pool.handle()).unwrap();
    Target {
        addr: target.local_addr(),
        target: Some(target),
        pool: Some(pool),
        namespaces,
    }
}

/// [`start_with`] the [`mem_namespaces`].
pub fn start(tweak: impl FnOnce(&mut TargetConfig)) -> Target {
    start_with(mem_namespaces(), tweak)
}

/// Polls until `n` completions arrived (yielding the CPU on empty polls, so the target's
/// reactors run on a small machine); panics after [`IO_TIMEOUT`].
pub fn reap(qp: &mut dyn QueuePair, n: usize) -> Vec<Completion> {
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut got = Vec::with_capacity(n);
    let mut cpl = [Completion::default(); 16];
    while got.len() < n {
        let k = qp.poll(&mut cpl);
        got.extend_from_slice(&cpl[..k]);
        if k == 0 {
            assert!(
                Instant::now() < deadline,
                "{} of {n} completions after {IO_TIMEOUT:?}",
                got.len()
            );
            std::thread::yield_now();
        }
    }
    got
}

/// Runs one command to completion.
pub fn run(qp: &mut dyn QueuePair, cmd: IoCommand) -> Status {
    // SAFETY: the command's buffer (if any) belongs to the caller, who keeps it until this
    // returns, after the completion was reaped.
    unsafe { qp.submit(cmd) }.expect("queue has room");
    let c = reap(qp, 1);
    assert_eq!(c[0].tag, cmd.tag);
    c[0].status
}

pub fn write(qp: &mut dyn QueuePair, slba: u64, data: &mut [u8], lba: usize) -> Status {
    let nlb = (data.len() / lba) as u32;
    run(
        qp,
        IoCommand::with_buf(IoOp::Write, slba, nlb, IoBuf::from_slice(data), 11),
    )
}

pub fn read(qp: &mut dyn QueuePair, slba: u64, len: usize, lba: usize) -> (Status, Vec<u8>) {
    let mut data = vec![0xeeu8; len];
    let nlb = (len / lba) as u32;
    let st = run(
        qp,
        IoCommand::with_buf(IoOp::Read, slba, nlb, IoBuf::from_slice(&mut data), 12),
    );
    (st, data)
}

/// A deterministic test pattern.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

/// Reads `len` bytes at byte offset `off` of a namespace directly (not over the network).
pub fn backing(dev: &dyn BlockDevice, off: usize, len: usize) -> Vec<u8> {
    nvmirror_nvme::read_all(dev).unwrap()[off..off + len].to_vec()
}
