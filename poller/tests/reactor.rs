#![cfg(not(loom))]

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvmirror_poller::{
    Error, IdlePolicy, PollStatus, Poller, ReactorConfig, ReactorContext, ReactorPool, TimerAction,
};

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn messages_run_on_the_addressed_reactor_in_order() {
    let pool = ReactorPool::start(ReactorConfig::unpinned(3)).unwrap();
    let h = pool.handle();
    for i in 0..3 {
        let name = h
            .call(i, |_| std::thread::current().name().unwrap().to_string())
            .unwrap();
        assert_eq!(name, format!("nvmirror-r{i}"));
        assert_eq!(h.call(i, |ctx| ctx.index()).unwrap(), i);
    }
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    for n in 0..100 {
        let seen = Arc::clone(&seen);
        h.send_msg(1, move |_| seen.lock().unwrap().push(n))
            .unwrap();
    }
    h.call(1, |_| ()).unwrap();
    assert_eq!(*seen.lock().unwrap(), (0..100).collect::<Vec<_>>());
    assert_eq!(
        h.send_msg(7, |_| ()),
        Err(Error::NoSuchReactor { index: 7, count: 3 })
    );
    pool.shutdown();
}

#[test]
fn a_message_can_hop_between_reactors() {
    let pool = ReactorPool::start(ReactorConfig::unpinned(2)).unwrap();
    let h = pool.handle();
    let done = Arc::new(AtomicUsize::new(usize::MAX));
    let d = Arc::clone(&done);
    h.send_msg(0, move |ctx| {
        ctx.handle()
            .send_msg(1, move |ctx| d.store(ctx.index(), Ordering::SeqCst))
            .unwrap();
    })
    .unwrap();
    wait_for("the hop", || done.load(Ordering::SeqCst) == 1);
}

struct Counter {
    left: u32,
    polls: Arc<AtomicU64>,
    stopped: Arc<AtomicBool>,
}

impl Poller for Counter {
    fn poll(&mut self, _ctx: &mut ReactorContext) -> PollStatus {
        self.polls.fetch_add(1, Ordering::Relaxed);
        if self.left == 0 {
            return PollStatus::Done;
        }
        self.left -= 1;
        PollStatus::Busy
    }

    fn stop(&mut self, _ctx: &mut ReactorContext) {
        self.stopped.store(true, Ordering::SeqCst);
    }
}

#[test]
fn pollers_run_until_done_and_are_stopped() {
    let pool = ReactorPool::start(ReactorConfig::unpinned(1)).unwrap();
    let h = pool.handle();
    let polls = Arc::new(AtomicU64::new(0));
    let stopped = Arc::new(AtomicBool::new(false));
    let (p, s) = (Arc::clone(&polls), Arc::clone(&stopped));
    h.send_msg(0, move |ctx| {
        ctx.register_poller(Box::new(Counter {
            left: 1000,
            polls: p,
            stopped: s,
        }))
    })
    .unwrap();
    wait_for("the poller to finish", || stopped.load(Ordering::SeqCst));
    assert_eq!(polls.load(Ordering::Relaxed), 1001);
    assert_eq!(h.stats(0).unwrap().pollers.load(Ordering::Relaxed), 0);
}

#[test]
fn shutdown_stops_running_pollers() {
    let pool = ReactorPool::start(ReactorConfig::unpinned(1)).unwrap();
    let h = pool.handle();
    let stopped = Arc::new(AtomicBool::new(false));
    let s = Arc::clone(&stopped);
    h.call(0, move |ctx| {
        let polls = Arc::new(AtomicU64::new(0));
        ctx.register_poller(Box::new(Counter {
            left: u32::MAX,
            polls,
            stopped: s,
        }))
    })
    .unwrap();
    pool.shutdown();
    assert!(stopped.load(Ordering::SeqCst));
    assert_eq!(h.send_msg(0, |_| ()), Err(Error::ShutDown));
}

#[test]
fn timers_repeat_until_stopped() {
    let pool = ReactorPool::start(ReactorConfig::unpinned(1)).unwrap();
    let h = pool.handle();
    let runs = Arc::new(AtomicU64::new(0));
    let r = Arc::clone(&runs);
    let start = Instant::now();
    h.send_msg(0, move |ctx| {
        ctx.add_timer(
            Duration::from_millis(5),
            Box::new(move |_| {
                let n = r.fetch_add(1, Ordering::SeqCst) + 1;
                if n == 4 {
                    TimerAction::Stop
                } else {
                    TimerAction::Repeat
                }
            }),
        )
    })
    .unwrap();
    wait_for("four timer runs", || runs.load(Ordering::SeqCst) == 4);
    assert!(start.elapsed() >= Duration::from_millis(20));
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(runs.load(Ordering::SeqCst), 4, "a stopped timer ran again");
}

#[test]
fn busy_and_idle_time_are_accounted() {
    let pool = ReactorPool::start(ReactorConfig::unpinned(2)).unwrap();
    let h = pool.handle();
    let polls = Arc::new(AtomicU64::new(0));
    let stopped = Arc::new(AtomicBool::new(false));
    h.send_msg(0, move |ctx| {
        ctx.register_poller(Box::new(Counter {
            left: u32::MAX,
            polls,
            stopped,
        }))
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let busy = h.stats(0).unwrap().busy_ratio();
    let idle = h.stats(1).unwrap().busy_ratio();
    // Loose bounds: on a shared 2-core machine other tests' reactors take CPU time, and a
    // descheduled iteration is still counted to the kind it was; the two reactors must only
    // be told apart clearly.
    assert!(
        busy > 0.7,
        "reactor with an always-busy poller: busy ratio {busy}"
    );
    assert!(idle < 0.3, "reactor with nothing to do: busy ratio {idle}");
}

#[test]
fn spin_then_sleep_naps_when_idle_and_wakes_for_messages() {
    let idle = IdlePolicy::SpinThenSleep {
        spin: Duration::from_millis(1),
        sleep: Duration::from_secs(5),
    };
    let pool = ReactorPool::start(ReactorConfig::unpinned(1).with_idle(idle)).unwrap();
    let h = pool.handle();
    std::thread::sleep(Duration::from_millis(50));
    let before = h.stats(0).unwrap().iterations.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(100));
    let after = h.stats(0).unwrap().iterations.load(Ordering::Relaxed);
    assert!(
        after - before < 10,
        "a sleeping reactor iterated {} times",
        after - before
    );
    let start = Instant::now();
    h.call(0, |_| ()).unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "the message did not wake the reactor"
    );
}

#[test]
fn pinning_to_a_missing_core_is_refused() {
    let err = ReactorPool::start(ReactorConfig::pinned(&[100_000])).unwrap_err();
    assert!(err.to_string().contains("core 100000"), "{err}");
    assert!(ReactorPool::start(ReactorConfig::unpinned(0)).is_err());
}
