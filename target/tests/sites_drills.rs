//! Site drills (`docs/sites.md`): site A (`nvmirror serve`, a local file leg and an
//! `nvme-tcp://` leg to site B), site B (`nvmirror serve` exporting its file leg) and a host,
//! each in its own network namespace, a verifying writer on the host, and link faults between
//! A and B made with `ip link` and nftables.
//!
//! - (a) `drill_a_link_cut_under_load`: the A↔B link goes down under the load.
//! - (e) `drill_e_blackhole_then_heal`: A↔B packets are dropped silently (no reset) for
//!   `NVMIRROR_BLACKHOLE_SECS` (default 30), then the drop rule goes.
//! - (c) `drill_c_kill_a_mid_write_then_promote_b`: A is killed mid-write, B is promoted and
//!   holds every acknowledged write.
//! - (d) `drill_d_old_primary_fenced_then_rejoins`: the old A restarts fenced, then rejoins
//!   as B's mirror until both sites are identical.
//!
//! In both the host's writes continue, the remote leg is faulted at the I/O timeout, the
//! host's p99 while the link is bad stays within the I/O timeout, no acknowledged write is
//! lost, and after the heal the leg comes back with `leg_attach` and is resynced until the
//! legs are identical. They need root and network namespaces and print `SKIPPED: …` without
//! them; `NVMIRROR_REQUIRE_NETNS=1` (CI) turns the skip into a failure.

mod serve_rig;
mod sites;

use std::time::{Duration, Instant};

use serde_json::json;

use serve_rig::Server;
use sites::{scrub, status, wait_leg_state, HostWriter, Sites};

/// The volume's leg I/O timeout in the drills: long enough that a reactor starved of CPU
/// for a second on a loaded machine does not time out its local leg.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Size of each site's leg image; the host writes the first [`WRITE_SPAN`] of it.
const LEG_SIZE: &str = "64MiB";
const WRITE_SPAN: &str = "16MiB";
/// Load before the fault starts and after it ends.
const SETTLE: Duration = Duration::from_secs(2);
/// How long bringing the leg back (late answers reaped, attach accepted) may take: TCP
/// retransmits into a healed link on its backed-off timer.
const REJOIN_DEADLINE: Duration = Duration::from_secs(120);

/// The remote leg in site A's volume.
const REMOTE: usize = 1;

/// Site B, then site A mirroring onto it, both legs in sync.
fn two_sites(sites: &Sites) -> (Server, Server) {
    let b = sites.start_b(LEG_SIZE);
    let a = sites.start_a(
        &b,
        &sites.b_uri(None, ""),
        &format!("{}ms", IO_TIMEOUT.as_millis()),
    );
    let st = a.wait_in_sync();
    assert_eq!(st["legs"].as_array().map(Vec::len), Some(2), "{st}");
    (b, a)
}

/// What one fault drill measured (all of it printed by the drills' failure messages).
#[derive(Debug)]
#[allow(dead_code)]
struct Cut {
    /// From the fault to `volume_status` showing the remote leg faulted: at least, at most.
    faulted_min: Duration,
    faulted_max: Duration,
    /// Host write latency over the fault window: p99, max (ns) and writes.
    p99_ns: u64,
    max_ns: u64,
    writes_in_window: u64,
    /// Longest time without a completed host write during the fault (250 ms resolution).
    stall: Duration,
    rejoin: Rejoin,
}

/// Runs the verifying writer against A, applies `fault` after [`SETTLE`], keeps it for
/// `hold`, `heal`s it, and checks what every fault drill must show: the remote leg faulted at
/// the I/O timeout, the host writing all along with p99 ≤ the I/O timeout, every acknowledged
/// write read back. Then the leg rejoins (`leg_attach`, retried while its abandoned commands
/// are still unanswered) and resyncs, and a scrub finds the legs identical.
fn fault_drill(
    sites: &Sites,
    name: &str,
    hold: Duration,
    fault: impl FnOnce(),
    heal: impl FnOnce(),
) -> Cut {
    let (b, a) = two_sites(sites);
    eprintln!(
        "{name}: logs {} and {}",
        sites.log(sites::Site::A).display(),
        sites.log(sites::Site::B).display()
    );
    let runtime = SETTLE + hold + SETTLE;
    let mut writer = HostWriter::start(sites, name, WRITE_SPAN, 32, runtime);
    writer.wait_connected(sites);
    std::thread::sleep(SETTLE);
    // The fault takes effect while its command runs (which can take a second to start on a
    // loaded machine): somewhere in [cut_at, applied_at].
    let cut_at = writer.started.elapsed();
    fault();
    let applied_at = writer.started.elapsed();
    wait_leg_state(&a, REMOTE, "faulted", hold.max(IO_TIMEOUT * 10));
    let seen_at = writer.started.elapsed();
    // Between these two lies the time from the fault to the leg faulted.
    let (faulted_min, faulted_max) = (seen_at - applied_at, seen_at - cut_at);
    // The control plane answers throughout the fault: no hung RPC thread.
    while writer.started.elapsed() < cut_at + hold {
        let t = Instant::now();
        let st = status(&a);
        assert_eq!(st["legs"][0]["state"], "in_sync", "{st}");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "volume_status took {:?} during the fault",
            t.elapsed()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let heal_at = writer.started.elapsed();
    heal();
    let report = writer.finish(runtime + Duration::from_secs(120));
    let (acked, failed) = report.writes();
    let (verified, bad) = report.verified();
    assert!(
        report.success && failed == 0,
        "host writes failed during the fault ({failed} failed): {}\n{}",
        report.job,
        report.stderr
    );
    assert_eq!(bad, 0, "acknowledged writes lost: {}", report.job);
    assert!(verified > 0 && acked > 0, "the writer ran: {}", report.job);

    // The interval log is timed from the writer's measured window, which starts a little after
    // it connected: take the window from a little before the fault, so that the writes the
    // fault held up are in it.
    let from = cut_at.saturating_sub(Duration::from_millis(500));
    let (p99_ns, max_ns, writes_in_window) = report.window(from, heal_at);
    // Host writes continued: the writes in flight at the fault wait for the I/O timeout, so no
    // write may complete for up to io_timeout; after that every interval of the fault has
    // acknowledged writes. The longest run of empty intervals is that stall.
    let mut stall = Duration::ZERO;
    let mut run = Duration::ZERO;
    for (start, h) in &report.intervals {
        if *start + report.interval <= cut_at || *start >= heal_at {
            continue;
        }
        if h.is_empty() {
            run += report.interval;
            stall = stall.max(run);
        } else {
            run = Duration::ZERO;
        }
    }
    let timeline: Vec<String> = report
        .intervals
        .iter()
        .map(|(s, h)| {
            format!(
                "{:.2}s:{}/{}ms",
                s.as_secs_f64(),
                h.len(),
                h.max() / 1_000_000
            )
        })
        .collect();
    eprintln!(
        "{name}: fault from {cut_at:?} to {heal_at:?}; writes/max latency per interval: {}",
        timeline.join(" ")
    );
    // Three intervals of slack: on a shared machine a 250 ms interval without a completion
    // happens now and then without any fault.
    assert!(
        stall <= IO_TIMEOUT + report.interval * 3,
        "no host write completed for {stall:?} during the fault (io_timeout {IO_TIMEOUT:?})"
    );
    assert!(
        p99_ns <= IO_TIMEOUT.as_nanos() as u64,
        "host write p99 during the fault {} µs > io_timeout {IO_TIMEOUT:?}",
        p99_ns / 1000
    );
    // Faulted at the timeout: the oldest command in flight at the fault times out after
    // io_timeout; the scan runs every 100 µs and status is polled every 50 ms.
    assert!(
        faulted_min <= IO_TIMEOUT + Duration::from_secs(1),
        "remote leg faulted {faulted_min:?} to {faulted_max:?} after the fault, io_timeout \
         {IO_TIMEOUT:?}"
    );

    let st = status(&a);
    eprintln!(
        "{name}: remote leg faulted {faulted_min:?} to {faulted_max:?} after the fault; host writes during the fault: \
         {writes_in_window}, p99 {} µs, max {} µs, longest stall {stall:?}; acked {acked}, \
         verified blocks {verified}, lost 0; remote leg {} with missed regions {}",
        p99_ns / 1000,
        max_ns / 1000,
        st["legs"][REMOTE]["state"],
        st["legs"][REMOTE]["missed_regions"]
    );
    // The missed regions are counted until the leg is back; a link that healed on its own
    // may already have been resynced (auto_resync), which then copied them.
    let missed = st["legs"][REMOTE]["missed_regions"].as_u64().unwrap_or(0);
    let copied = if st["resync"]["leg"] == REMOTE {
        st["resync"]["regions_copied"].as_u64().unwrap_or(0)
    } else {
        0
    };
    assert!(
        missed > 0 || copied > 0,
        "the fault left no missed regions: {st}"
    );
    let how = rejoin(&a, REMOTE);
    let st = a.wait_in_sync();
    let (checked, mismatched) = scrub(&a);
    assert!(checked > 0, "scrub checked nothing: {st}");
    assert_eq!(mismatched, 0, "legs differ after the resync: {st}");
    eprintln!(
        "{name}: remote leg back ({how:?}), resynced {} bytes; scrub of {checked} regions: \
         identical",
        st["resync"]["bytes_copied"]
    );
    a.stop();
    b.stop();
    Cut {
        faulted_min,
        faulted_max,
        p99_ns,
        max_ns,
        writes_in_window,
        stall,
        rejoin: how,
    }
}

/// How the remote leg came back.
#[derive(Debug, PartialEq, Eq)]
enum Rejoin {
    /// `leg_attach` of the same leg: a resync of its missed regions.
    Attached,
    /// The leg's device reconnected by itself and `auto_resync` resynced its missed regions
    /// before the drill asked (docs/operations.md, "Auto-resync").
    Reconnected,
    /// Site B had dropped A's controller (no keep-alive for its KATO), so the leg's device
    /// could not open a queue again: `leg_remove`, then `leg_add` of the same URI (a new
    /// connection and a full copy).
    Readded,
}

/// Brings leg `leg` back. `leg_attach` refuses while commands abandoned at the timeout are
/// still unanswered (they are answered once TCP gets through again): retried. When site B no
/// longer knows the controller the attach cannot open a queue pair: the leg is removed and its
/// URI added again.
fn rejoin(a: &Server, leg: usize) -> Rejoin {
    let deadline = Instant::now() + REJOIN_DEADLINE;
    loop {
        let text = match a.call("leg_attach", json!({"volume": "vol0", "leg": leg})) {
            Ok(_) => return Rejoin::Attached,
            Err(e) => e,
        };
        let state = status(a)["legs"][leg]["state"].clone();
        if state == "in_sync" || state == "resyncing" {
            return Rejoin::Reconnected;
        }
        if text.contains("cannot open a queue pair") {
            let uri = status(a)["legs"][leg]["uri"].as_str().unwrap().to_string();
            a.call("leg_remove", json!({"volume": "vol0", "leg": leg}))
                .unwrap();
            a.call("leg_add", json!({"volume": "vol0", "uri": uri}))
                .unwrap();
            return Rejoin::Readded;
        }
        assert!(
            Instant::now() < deadline,
            "leg {leg} not accepted back within {REJOIN_DEADLINE:?}: {text}\n{}",
            status(a)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Drill (a): `ip link set down` on A's interface to B under the load, 4 s, then up.
#[test]
fn drill_a_link_cut_under_load() {
    let Some(sites) = Sites::up() else { return };
    let cut = fault_drill(
        &sites,
        "drill-a",
        Duration::from_secs(4),
        || sites.link_down(),
        || sites.link_up(),
    );
    assert!(cut.writes_in_window > 0 && cut.max_ns > 0, "{cut:?}");
    // Shorter than the keep-alive timeout less its interval (10 s - 5 s: site B drops the
    // controller 10 s after the last keep-alive it received): the same controller answers
    // again, and the leg catches up from its missed regions.
    assert_eq!(cut.rejoin, Rejoin::Attached, "{cut:?}");
}

/// Drill (e): nftables drops every A↔B packet (no reset) for `NVMIRROR_BLACKHOLE_SECS`
/// (default 30), then the table is deleted.
#[test]
fn drill_e_blackhole_then_heal() {
    let Some(sites) = Sites::up() else { return };
    if !sites.have_nft() {
        sites::skip::<()>("drill (e) needs nftables (apt-get install nftables)");
        return;
    }
    let secs: u64 = std::env::var("NVMIRROR_BLACKHOLE_SECS")
        .ok()
        .map(|s| s.parse().expect("NVMIRROR_BLACKHOLE_SECS: whole seconds"))
        .unwrap_or(30);
    let cut = fault_drill(
        &sites,
        "drill-e",
        Duration::from_secs(secs),
        || sites.blackhole(),
        || sites.heal(),
    );
    assert!(cut.writes_in_window > 0 && cut.max_ns > 0, "{cut:?}");
}

/// What drill (c) leaves for drill (d): the promoted B and the first writer's ledger.
struct Promoted {
    b: Server,
    acked: Vec<sites::ledger::Acked>,
    data_offset: u64,
    bytes: u64,
}

/// Drill (c)'s steps: A mirrors onto a promotable B; the verifying writer runs against A and
/// A is killed (SIGKILL) mid-write; `volume_promote` at B; every write the writer saw
/// acknowledged is in B's copy.
fn kill_a_and_promote_b(sites: &Sites, name: &str) -> Promoted {
    let timeout = format!("{}ms", IO_TIMEOUT.as_millis());
    let b = sites.start_b_promotable(LEG_SIZE, &timeout);
    let raw = b.call("volume_status", json!({"name": "siteb"})).unwrap();
    let bytes = raw["capacity_bytes"].as_u64().unwrap();
    let a = sites.start_a_sized(bytes, &sites.b_uri(None, ""), &timeout);
    let st = a.wait_in_sync();
    assert_eq!(st["legs"][REMOTE]["fencing"]["state"], "held", "{st}");
    let data_offset = st["bitmap"]["data_offset"].as_u64().unwrap();
    eprintln!(
        "{name}: logs {} and {}",
        sites.log(sites::Site::A).display(),
        sites.log(sites::Site::B).display()
    );
    let ledger = sites.path(name).join("ledger");
    let extra = ["--verify-ledger".to_string(), ledger.display().to_string()];
    let runtime = SETTLE * 3;
    let mut writer =
        HostWriter::start_to(sites, name, &sites.a_uri(), WRITE_SPAN, 32, runtime, &extra);
    writer.wait_connected(sites);
    std::thread::sleep(SETTLE);
    let killed_at = writer.started.elapsed();
    a.kill9();
    let report = writer.finish(runtime + Duration::from_secs(120));
    let (acked_ios, failed) = report.writes();
    eprintln!(
        "{name}: A killed at {killed_at:?}; the writer saw {acked_ios} writes acknowledged, {failed} failed"
    );
    assert!(acked_ios > 0, "the writer ran: {}", report.job);

    let t = Instant::now();
    let out = b
        .call("volume_promote", json!({"name": "vol0"}))
        .unwrap_or_else(|e| panic!("volume_promote: {e}"));
    let st = &out["status"];
    eprintln!("{name}: volume_promote took {:?}", t.elapsed());
    assert_eq!(st["epoch"], 1, "{out}");
    assert!(st["fenced"].is_null(), "{out}");
    assert_eq!(st["legs"][1]["state"], "in_sync", "{out}");
    assert_eq!(st["bitmap"]["data_offset"], data_offset, "{out}");

    let acked = sites::ledger::read(&ledger);
    assert!(!acked.is_empty(), "the ledger is empty");
    let (_, b_img) = sites::promotion::images(sites);
    let checked = sites::ledger::check_image(&b_img, data_offset, &acked)
        .unwrap_or_else(|e| panic!("an acknowledged write is missing at B: {e}"));
    eprintln!("{name}: all {checked} acknowledged blocks are at B");
    Promoted {
        b,
        acked,
        data_offset,
        bytes,
    }
}

/// Drill (c): SIGKILL of site A mid-write, `volume_promote` at B: every acknowledged write is
/// at B, and B serves the volume to the host.
#[test]
fn drill_c_kill_a_mid_write_then_promote_b() {
    let Some(sites) = Sites::up() else { return };
    let p = kill_a_and_promote_b(&sites, "drill-c");
    // The host writes and reads back through the promoted B.
    let mut w = HostWriter::start_to(
        &sites,
        "drill-c-b",
        &sites.b_volume_uri(),
        WRITE_SPAN,
        8,
        Duration::from_secs(1),
        &["--offset".into(), WRITE_SPAN.into()],
    );
    w.wait_connected_at(&sites, sites::Site::B, sites::HOST_B_ADDR);
    let r = w.finish(Duration::from_secs(120));
    let (acked, failed) = r.writes();
    assert!(
        r.success && failed == 0 && acked > 0,
        "{}\n{}",
        r.job,
        r.stderr
    );
    assert_eq!(r.verified().1, 0, "{}", r.job);
    p.b.stop();
}

/// Drill (d): after (c), the old A restarts as it was: it is fenced and every write it is
/// sent fails with Reservation Conflict. It then rejoins as B's mirror; B resyncs it by the
/// union of both bitmaps and the two sites are byte-identical.
#[test]
fn drill_d_old_primary_fenced_then_rejoins() {
    let Some(sites) = Sites::up() else { return };
    let p = kill_a_and_promote_b(&sites, "drill-d");
    let timeout = format!("{}ms", IO_TIMEOUT.as_millis());
    // B takes writes of its own since the promotion: the second half of the span.
    let b_ledger = sites.path("drill-d-b").join("ledger");
    std::fs::create_dir_all(b_ledger.parent().unwrap()).unwrap();
    let mut w = HostWriter::start_to(
        &sites,
        "drill-d-b",
        &sites.b_volume_uri(),
        WRITE_SPAN,
        8,
        Duration::from_secs(2),
        &[
            "--offset".into(),
            WRITE_SPAN.into(),
            "--verify-ledger".into(),
            b_ledger.display().to_string(),
        ],
    );
    w.wait_connected_at(&sites, sites::Site::B, sites::HOST_B_ADDR);
    let r = w.finish(Duration::from_secs(120));
    assert!(r.success && r.writes().0 > 0, "{}\n{}", r.job, r.stderr);
    let b_acked = sites::ledger::read(&b_ledger);

    // The old primary restarts with its old configuration: fenced.
    let a = sites.start_a_sized(p.bytes, &sites.b_uri(None, ""), &timeout);
    let st = status(&a);
    let why = st["fenced"]
        .as_str()
        .unwrap_or_else(|| panic!("A not fenced: {st}"));
    eprintln!("drill-d: the restarted A is fenced: {why}");
    let w = HostWriter::start_to(
        &sites,
        "drill-d-a",
        &sites.a_uri(),
        WRITE_SPAN,
        4,
        Duration::from_millis(500),
        &[],
    );
    let r = w.finish(Duration::from_secs(120));
    let (acked, failed) = r.writes();
    assert!(
        !r.success && failed > 0,
        "the fenced A acknowledged writes ({acked}): {}",
        r.job
    );
    let text = format!("{}{}", r.job, r.stderr);
    assert!(
        text.contains("Reservation Conflict") || text.contains("0x83"),
        "the fenced A's writes failed otherwise: {text}"
    );
    let log = std::fs::read_to_string(sites.log(sites::Site::A)).unwrap();
    assert!(log.contains("fenced"), "A's log does not say it is fenced");
    // Nothing of that reached B.
    let (a_img, b_img) = sites::promotion::images(&sites);
    sites::ledger::check_image(&b_img, p.data_offset, &p.acked).unwrap();
    a.kill9();

    // A rejoins as B's mirror; B resyncs it.
    let mirror = sites.start_a_mirror();
    let t = Instant::now();
    let st = p.b.wait_in_sync();
    assert_eq!(st["legs"][0]["state"], "in_sync", "{st}");
    eprintln!(
        "drill-d: A rejoined and was resynced in {:?}: {} regions, {} bytes",
        t.elapsed(),
        st["resync"]["regions_copied"],
        st["resync"]["bytes_copied"]
    );
    let (checked, mismatched) = scrub(&p.b);
    assert!(
        checked > 0 && mismatched == 0,
        "scrub: {checked} checked, {mismatched} differ"
    );
    let off = p.data_offset as usize;
    let (ia, ib) = (
        std::fs::read(&a_img).unwrap(),
        std::fs::read(&b_img).unwrap(),
    );
    let diff = ia[off..].iter().zip(&ib[off..]).position(|(x, y)| x != y);
    assert_eq!(
        diff, None,
        "the sites differ at byte {diff:?} of the data area"
    );
    for acked in [&p.acked, &b_acked] {
        sites::ledger::check_image(&a_img, p.data_offset, acked).unwrap();
    }
    eprintln!(
        "drill-d: both sites byte-identical; {} + {} acknowledged blocks on both",
        p.acked.len(),
        b_acked.len()
    );
    // The primary first: it marks the volume clean on both legs.
    p.b.stop();
    mirror.stop();
}
