//! `nvmirror-netdelay`: a TCP proxy that adds a fixed one-way delay per direction, for site
//! drills and benchmarks on a kernel without netem (`docs/sites.md`).
//!
//! Every connection accepted on `--listen` is joined to a new connection to `--connect`. Each
//! direction is a reader thread and a writer thread: the reader stamps every chunk it reads
//! with the time it arrived, the writer sends it on when `arrival + delay` is reached (sleeping
//! until shortly before, then spinning, so the delay is held to a few microseconds). With no
//! delay and no stall a direction is one thread copying straight through. Bytes are never
//! reordered or lost: the delay shifts the stream in time, as a longer cable would.
//!
//! `--stall AT+FOR` holds every byte from AT after the start for FOR (data arriving meanwhile
//! is queued and sent when the stall ends), the way a link that drops packets for a while and
//! then recovers looks to TCP's peers once retransmission gets through. `--reset-at AT` closes
//! every connection at AT (both peers see the connection end). Both may be repeated.
//!
//! It prints `nvmirror-netdelay: listening on ADDR` once it accepts connections.
//!
//! `--measure N` times N round trips of 4 KiB to an echo server on loopback, directly and
//! through the proxy (with the delays given), and prints what the proxy adds beyond them.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "nvmirror-netdelay",
    about = "TCP proxy with a fixed one-way delay per direction"
)]
struct Args {
    /// Address to accept connections on (`ADDR:PORT`).
    #[arg(long, required_unless_present = "measure")]
    listen: Option<String>,
    /// Address every accepted connection is forwarded to.
    #[arg(long, required_unless_present = "measure")]
    connect: Option<String>,
    /// Instead of serving: time N round trips of 4 KiB to an echo server on loopback, direct
    /// and through the proxy with the given delays, and print what the proxy adds beyond them.
    #[arg(long, value_name = "N", conflicts_with_all = ["listen", "connect"])]
    measure: Option<usize>,
    /// One-way delay in both directions (`1ms`, `250us`).
    #[arg(long, default_value = "0", value_parser = parse_duration)]
    delay: Duration,
    /// One-way delay client → server; overrides `--delay` for that direction.
    #[arg(long, value_parser = parse_duration)]
    delay_up: Option<Duration>,
    /// One-way delay server → client; overrides `--delay` for that direction.
    #[arg(long, value_parser = parse_duration)]
    delay_down: Option<Duration>,
    /// Hold all traffic from AT (after start) for FOR: `AT+FOR`, e.g. `5s+2s`. Repeatable.
    #[arg(long, value_parser = parse_stall)]
    stall: Vec<(Duration, Duration)>,
    /// How long before a chunk is due the writer stops sleeping and spins: a sleep can
    /// overshoot by this much on a busy machine (more spin, more CPU, less lateness).
    #[arg(long, default_value = "200us", value_parser = parse_duration)]
    spin: Duration,
    /// Close every connection at this time after start. Repeatable.
    #[arg(long, value_parser = parse_duration)]
    reset_at: Vec<Duration>,
}

/// `1ms`, `250us`, `2s`, `100ns`; a bare number is seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num
        .parse()
        .map_err(|_| format!("`{s}`: expected a duration such as 1ms or 250us"))?;
    let scale = match unit {
        "" | "s" => 1e9,
        "ms" => 1e6,
        "us" => 1e3,
        "ns" => 1.0,
        _ => return Err(format!("`{s}`: unit must be s, ms, us or ns")),
    };
    if !v.is_finite() || v < 0.0 || v * scale > 3.6e12 {
        return Err(format!("`{s}`: between 0 and 1 hour"));
    }
    Ok(Duration::from_nanos((v * scale) as u64))
}

fn parse_stall(s: &str) -> Result<(Duration, Duration), String> {
    let (at, len) = s
        .split_once('+')
        .ok_or_else(|| format!("`{s}`: expected AT+FOR, e.g. 5s+2s"))?;
    Ok((parse_duration(at)?, parse_duration(len)?))
}

/// When the proxy started and when it holds traffic.
#[derive(Debug)]
struct Schedule {
    start: Instant,
    stalls: Vec<(Duration, Duration)>,
}

impl Schedule {
    /// The end of the stall `now` falls in, if any.
    fn stalled_until(&self, now: Instant) -> Option<Instant> {
        let t = now.duration_since(self.start);
        self.stalls
            .iter()
            .find(|(at, len)| t >= *at && t < *at + *len)
            .map(|(at, len)| self.start + *at + *len)
    }
}

/// Largest chunk read at once.
const CHUNK: usize = 64 * 1024;

/// Waits until `due`: sleeps until `spin` before it, then spins.
fn wait_until(due: Instant, spin: Duration) {
    loop {
        let now = Instant::now();
        if now >= due {
            return;
        }
        let left = due - now;
        if left > spin {
            std::thread::sleep(left - spin);
        } else {
            std::hint::spin_loop();
        }
    }
}

/// How a direction forwards: its delay and the spin margin of [`wait_until`].
#[derive(Clone, Copy, Debug)]
struct Pace {
    delay: Duration,
    spin: Duration,
}

/// Copies `from` to `to` with `delay`, holding traffic during the schedule's stalls. Ends when
/// either side ends; then shuts both down so the other direction ends too.
fn pump(mut from: TcpStream, mut to: TcpStream, pace: Pace, sched: Arc<Schedule>) {
    let Pace { delay, spin } = pace;
    let close = |a: &TcpStream, b: &TcpStream| {
        let _ = a.shutdown(Shutdown::Both);
        let _ = b.shutdown(Shutdown::Both);
    };
    if delay.is_zero() && sched.stalls.is_empty() {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        close(&from, &to);
        return;
    }
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let (from2, to2) = (from.try_clone(), to.try_clone());
    let writer = std::thread::spawn(move || {
        for (arrived, chunk) in rx {
            wait_until(arrived + delay, spin);
            if let Some(end) = sched.stalled_until(Instant::now()) {
                wait_until(end, spin);
            }
            if to.write_all(&chunk).is_err() {
                break;
            }
        }
        if let (Ok(a), Ok(b)) = (from2, to2) {
            close(&a, &b);
        }
    });
    let mut buf = vec![0u8; CHUNK];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    }
    // Let the writer send what is queued (the delay holds a FIN back as it does data), then
    // end the connection.
    drop(tx);
    let _ = writer.join();
}

/// Connections open now, so `--reset-at` can close them.
type Open = Arc<Mutex<Vec<TcpStream>>>;

fn serve(args: &Args, listen: &str, connect: &str) -> Result<(), String> {
    let listener = TcpListener::bind(listen).map_err(|e| format!("--listen {listen}: {e}"))?;
    let sched = Arc::new(Schedule {
        start: Instant::now(),
        stalls: args.stall.clone(),
    });
    let open: Open = Arc::default();
    for &at in &args.reset_at {
        let (open, start) = (Arc::clone(&open), sched.start);
        std::thread::spawn(move || {
            wait_until(start + at, Duration::ZERO);
            let conns = std::mem::take(&mut *open.lock().unwrap_or_else(|e| e.into_inner()));
            for c in conns {
                let _ = c.shutdown(Shutdown::Both);
            }
        });
    }
    let (up, down) = delays(args);
    println!(
        "nvmirror-netdelay: listening on {} -> {connect} (up {:?}, down {:?})",
        listener.local_addr().map_err(|e| e.to_string())?,
        up.delay,
        down.delay
    );
    forward(&listener, connect, up, down, &sched, &open);
    Ok(())
}

fn delays(args: &Args) -> (Pace, Pace) {
    let pace = |d: Option<Duration>| Pace {
        delay: d.unwrap_or(args.delay),
        spin: args.spin,
    };
    (pace(args.delay_up), pace(args.delay_down))
}

/// Joins every connection accepted on `listener` to a new one to `connect`.
fn forward(
    listener: &TcpListener,
    connect: &str,
    up: Pace,
    down: Pace,
    sched: &Arc<Schedule>,
    open: &Open,
) {
    for client in listener.incoming() {
        let client = match client {
            Ok(c) => c,
            Err(e) => {
                eprintln!("nvmirror-netdelay: accept: {e}");
                continue;
            }
        };
        let server = match TcpStream::connect(connect) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("nvmirror-netdelay: connect {connect}: {e}");
                continue;
            }
        };
        let streams = (|| {
            client.set_nodelay(true)?;
            server.set_nodelay(true)?;
            let mut o = open.lock().unwrap_or_else(|e| e.into_inner());
            o.push(client.try_clone()?);
            o.push(server.try_clone()?);
            Ok::<_, std::io::Error>((client.try_clone()?, server.try_clone()?))
        })();
        let (client2, server2) = match streams {
            Ok(s) => s,
            Err(e) => {
                eprintln!("nvmirror-netdelay: {e}");
                continue;
            }
        };
        let s = Arc::clone(sched);
        std::thread::spawn(move || pump(client, server, up, s));
        let s = Arc::clone(sched);
        std::thread::spawn(move || pump(server2, client2, down, s));
    }
}

/// Bytes of one `--measure` round trip.
const PROBE: usize = 4096;

/// `n` round trips of [`PROBE`] bytes to `addr`: their latencies, sorted.
fn round_trips(addr: std::net::SocketAddr, n: usize) -> std::io::Result<Vec<Duration>> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let out = vec![0x5au8; PROBE];
    let mut back = vec![0u8; PROBE];
    let mut lat = Vec::with_capacity(n);
    for i in 0..n + n / 10 {
        let t = Instant::now();
        s.write_all(&out)?;
        s.read_exact(&mut back)?;
        // The first tenth warms up (connection, caches, thread wake-ups).
        if i >= n / 10 {
            lat.push(t.elapsed());
        }
    }
    lat.sort();
    Ok(lat)
}

fn measure(args: &Args, n: usize) -> Result<(), String> {
    let io = |e: std::io::Error| e.to_string();
    let echo = TcpListener::bind("127.0.0.1:0").map_err(io)?;
    let echo_addr = echo.local_addr().map_err(io)?;
    std::thread::spawn(move || {
        for conn in echo.incoming().flatten() {
            std::thread::spawn(move || {
                let mut conn = conn;
                let _ = conn.set_nodelay(true);
                let mut buf = vec![0u8; CHUNK];
                while let Ok(k) = conn.read(&mut buf) {
                    if k == 0 || conn.write_all(&buf[..k]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let front = TcpListener::bind("127.0.0.1:0").map_err(io)?;
    let front_addr = front.local_addr().map_err(io)?;
    let (up, down) = delays(args);
    let sched = Arc::new(Schedule {
        start: Instant::now(),
        stalls: Vec::new(),
    });
    let target = echo_addr.to_string();
    std::thread::spawn(move || forward(&front, &target, up, down, &sched, &Open::default()));
    let direct = round_trips(echo_addr, n).map_err(io)?;
    let proxied = round_trips(front_addr, n).map_err(io)?;
    let pct = |v: &[Duration], p: f64| v[((v.len() - 1) as f64 * p) as usize];
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let added = us(pct(&proxied, 0.5)) - us(pct(&direct, 0.5)) - us(up.delay + down.delay);
    println!(
        "nvmirror-netdelay: {n} round trips of {PROBE} B on loopback, delay up {:?} down {:?} \
         (spin {:?})\n\
         direct:  p50 {:.1} us  p99 {:.1} us\n\
         proxied: p50 {:.1} us  p99 {:.1} us\n\
         added beyond the delay: p50 {added:.1} us",
        up.delay,
        down.delay,
        args.spin,
        us(pct(&direct, 0.5)),
        us(pct(&direct, 0.99)),
        us(pct(&proxied, 0.5)),
        us(pct(&proxied, 0.99)),
    );
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let run = match (&args.measure, &args.listen, &args.connect) {
        (Some(n), _, _) if *n > 0 => measure(&args, *n),
        (Some(_), _, _) => Err("--measure: at least one round trip".into()),
        (None, Some(l), Some(c)) => serve(&args, l, c),
        _ => Err("--listen and --connect are both needed".into()),
    };
    match run {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nvmirror-netdelay: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_stalls_parse() {
        assert_eq!(parse_duration("1ms"), Ok(Duration::from_millis(1)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("0.5s"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("1m").unwrap_err().contains("unit"));
        assert!(parse_duration("x").is_err());
        assert_eq!(
            parse_stall("5s+2s"),
            Ok((Duration::from_secs(5), Duration::from_secs(2)))
        );
        assert!(parse_stall("5s").is_err());
    }

    #[test]
    fn a_stall_holds_only_inside_its_window() {
        let start = Instant::now();
        let s = Schedule {
            start,
            stalls: vec![(Duration::from_secs(1), Duration::from_secs(2))],
        };
        assert_eq!(s.stalled_until(start), None);
        let end = start + Duration::from_secs(3);
        assert_eq!(s.stalled_until(start + Duration::from_secs(1)), Some(end));
        assert_eq!(
            s.stalled_until(start + Duration::from_millis(2999)),
            Some(end)
        );
        assert_eq!(s.stalled_until(end), None);
    }

    /// A round trip through the proxy takes at least both delays, and the bytes arrive intact
    /// and in order.
    #[test]
    fn delays_both_directions_and_keeps_the_stream() {
        let echo = TcpListener::bind("127.0.0.1:0").unwrap();
        let echo_addr = echo.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = echo.accept().unwrap();
            let mut buf = [0u8; 4096];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 || s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        let front = TcpListener::bind("127.0.0.1:0").unwrap();
        let front_addr = front.local_addr().unwrap();
        let sched = Arc::new(Schedule {
            start: Instant::now(),
            stalls: Vec::new(),
        });
        let delay = Duration::from_millis(20);
        let pace = Pace {
            delay,
            spin: Duration::from_micros(200),
        };
        std::thread::spawn(move || {
            let (client, _) = front.accept().unwrap();
            let server = TcpStream::connect(echo_addr).unwrap();
            let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let s = Arc::clone(&sched);
            std::thread::spawn(move || pump(client, server, pace, s));
            pump(s2, c2, pace, sched);
        });
        let mut c = TcpStream::connect(front_addr).unwrap();
        let msg: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let t = Instant::now();
        c.write_all(&msg).unwrap();
        let mut back = vec![0u8; msg.len()];
        c.read_exact(&mut back).unwrap();
        assert!(t.elapsed() >= delay * 2, "round trip {:?}", t.elapsed());
        assert_eq!(back, msg);
    }
}
