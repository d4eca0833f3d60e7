//! Starting, addressing and stopping the set of reactors.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::{self, JoinHandle, Thread};

use crate::reactor::{IdlePolicy, Message, Reactor, ReactorContext, ReactorStats};
use crate::ring::Ring;
use crate::{Error, Result};

/// How to start the reactors.
#[derive(Clone, Debug)]
pub struct ReactorConfig {
    /// One reactor per entry; the value is the CPU it is pinned to (`None`: not pinned).
    pub cores: Vec<Option<usize>>,
    /// What an idle reactor does.
    pub idle: IdlePolicy,
    /// Room in each reactor's message ring.
    pub ring_capacity: usize,
}

impl ReactorConfig {
    /// Reactors pinned to the given CPUs.
    pub fn pinned(cpus: &[usize]) -> Self {
        Self {
            cores: cpus.iter().map(|&c| Some(c)).collect(),
            ..Self::unpinned(0)
        }
    }

    /// `n` reactors the OS may schedule anywhere (tests, shared machines).
    pub fn unpinned(n: usize) -> Self {
        Self {
            cores: vec![None; n],
            idle: IdlePolicy::Spin,
            ring_capacity: 4096,
        }
    }

    /// Sets the idle policy.
    pub fn with_idle(mut self, idle: IdlePolicy) -> Self {
        self.idle = idle;
        self
    }
}

/// Per-reactor state every thread can reach.
#[derive(Debug)]
pub(crate) struct ReactorSlot {
    pub(crate) ring: Ring<Message>,
    pub(crate) stats: ReactorStats,
    pub(crate) sleeping: AtomicBool,
    pub(crate) thread: std::sync::OnceLock<Thread>,
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) reactors: Vec<ReactorSlot>,
    pub(crate) stop: AtomicBool,
}

/// A cheap, cloneable way to reach the reactors from any thread.
#[derive(Clone, Debug)]
pub struct ReactorHandle {
    shared: Arc<Shared>,
}

impl ReactorHandle {
    /// Number of reactors.
    pub fn count(&self) -> usize {
        self.shared.reactors.len()
    }

    fn slot(&self, index: usize) -> Result<&ReactorSlot> {
        self.shared.reactors.get(index).ok_or(Error::NoSuchReactor {
            index,
            count: self.count(),
        })
    }

    /// Runs `f` on reactor `index` at its next iteration. Never blocks.
    pub fn send_msg(
        &self,
        index: usize,
        f: impl FnOnce(&mut ReactorContext) + Send + 'static,
    ) -> Result<()> {
        if self.shared.stop.load(Ordering::Acquire) {
            return Err(Error::ShutDown);
        }
        let slot = self.slot(index)?;
        slot.ring
            .push(Box::new(f))
            .map_err(|_| Error::RingFull(index))?;
        if slot.sleeping.load(Ordering::SeqCst) {
            if let Some(t) = slot.thread.get() {
                t.unpark();
            }
        }
        Ok(())
    }

    /// Runs `f` on reactor `index` and waits for its result (control plane, not the I/O path).
    pub fn call<R: Send + 'static>(
        &self,
        index: usize,
        f: impl FnOnce(&mut ReactorContext) -> R + Send + 'static,
    ) -> Result<R> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send_msg(index, move |ctx| {
            let _ = tx.send(f(ctx));
        })?;
        rx.recv().map_err(|_| Error::ShutDown)
    }

    /// Counters of reactor `index`.
    pub fn stats(&self, index: usize) -> Result<&ReactorStats> {
        Ok(&self.slot(index)?.stats)
    }
}

/// The running reactors; dropping it shuts them down.
#[derive(Debug)]
pub struct ReactorPool {
    handle: ReactorHandle,
    threads: Vec<JoinHandle<()>>,
}

impl ReactorPool {
    /// Starts one thread per configured core, pinned where a CPU is given.
    pub fn start(cfg: ReactorConfig) -> Result<Self> {
        if cfg.cores.is_empty() {
            return Err(Error::Config("at least one reactor is needed".into()));
        }
        let available: Vec<usize> = core_affinity::get_core_ids()
            .unwrap_or_default()
            .into_iter()
            .map(|c| c.id)
            .collect();
        for cpu in cfg.cores.iter().flatten() {
            if !available.contains(cpu) {
                return Err(Error::Config(format!(
                    "core {cpu} is not available (available: {available:?})"
                )));
            }
        }
        let shared = Arc::new(Shared {
            reactors: cfg
                .cores
                .iter()
                .map(|_| ReactorSlot {
                    ring: Ring::new(cfg.ring_capacity),
                    stats: ReactorStats::default(),
                    sleeping: AtomicBool::new(false),
                    thread: std::sync::OnceLock::new(),
                })
                .collect(),
            stop: AtomicBool::new(false),
        });
        let handle = ReactorHandle {
            shared: Arc::clone(&shared),
        };
        let mut pool = Self {
            handle: handle.clone(),
            threads: Vec::new(),
        };
        for (index, cpu) in cfg.cores.iter().copied().enumerate() {
            let reactor = Reactor::new(index, handle.clone(), Arc::clone(&shared), cfg.idle);
            let t = thread::Builder::new()
                .name(format!("nvmirror-r{index}"))
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        core_affinity::set_for_current(core_affinity::CoreId { id: cpu });
                    }
                    reactor.run();
                })
                .map_err(|e| Error::Spawn {
                    index,
                    reason: e.to_string(),
                })?;
            let _ = shared.reactors[index].thread.set(t.thread().clone());
            pool.threads.push(t);
        }
        Ok(pool)
    }

    /// A handle for messaging the reactors.
    pub fn handle(&self) -> ReactorHandle {
        self.handle.clone()
    }

    /// Stops every reactor after its current iteration (pollers get `stop`) and joins them.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.handle.shared.stop.store(true, Ordering::SeqCst);
        for slot in &self.handle.shared.reactors {
            if let Some(t) = slot.thread.get() {
                t.unpark();
            }
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for ReactorPool {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}
