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
    #[arg(long)]
    listen: String,
    /// Address every accepted connection is forwarded to.
    #[arg(long)]
    connect: String,
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

/// Below this the writer spins instead of sleeping: a sleep overshoots by tens of microseconds.
const SPIN: Duration = Duration::from_micros(200);
/// Largest chunk read at once.
const CHUNK: usize = 64 * 1024;

/// Waits until `due`: sleeps until [`SPIN`] before it, then spins.
fn wait_until(due: Instant) {
    loop {
        let now = Instant::now();
        if now >= due {
            return;
        }
        let left = due - now;
        if left > SPIN {
            std::thread::sleep(left - SPIN);
        } else {
            std::hint::spin_loop();
        }
    }
}

/// Copies `from` to `to` with `delay`, holding traffic during the schedule's stalls. Ends when
/// either side ends; then shuts both down so the other direction ends too.
fn pump(mut from: TcpStream, mut to: TcpStream, delay: Duration, sched: Arc<Schedule>) {
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
            wait_until(arrived + delay);
            if let Some(end) = sched.stalled_until(Instant::now()) {
                wait_until(end);
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

fn serve(args: &Args) -> Result<(), String> {
    let listener =
        TcpListener::bind(&args.listen).map_err(|e| format!("--listen {}: {e}", args.listen))?;
    let sched = Arc::new(Schedule {
        start: Instant::now(),
        stalls: args.stall.clone(),
    });
    let open: Open = Arc::default();
    for &at in &args.reset_at {
        let (open, start) = (Arc::clone(&open), sched.start);
        std::thread::spawn(move || {
            wait_until(start + at);
            let conns = std::mem::take(&mut *open.lock().unwrap_or_else(|e| e.into_inner()));
            for c in conns {
                let _ = c.shutdown(Shutdown::Both);
            }
        });
    }
    let up = args.delay_up.unwrap_or(args.delay);
    let down = args.delay_down.unwrap_or(args.delay);
    println!(
        "nvmirror-netdelay: listening on {} -> {} (up {up:?}, down {down:?})",
        listener.local_addr().map_err(|e| e.to_string())?,
        args.connect
    );
    for client in listener.incoming() {
        let client = match client {
            Ok(c) => c,
            Err(e) => {
                eprintln!("nvmirror-netdelay: accept: {e}");
                continue;
            }
        };
        let server = match TcpStream::connect(&args.connect) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("nvmirror-netdelay: connect {}: {e}", args.connect);
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
        let s = Arc::clone(&sched);
        std::thread::spawn(move || pump(client, server, up, s));
        let s = Arc::clone(&sched);
        std::thread::spawn(move || pump(server2, client2, down, s));
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match serve(&args) {
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
        std::thread::spawn(move || {
            let (client, _) = front.accept().unwrap();
            let server = TcpStream::connect(echo_addr).unwrap();
            let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let s = Arc::clone(&sched);
            std::thread::spawn(move || pump(client, server, delay, s));
            pump(s2, c2, delay, sched);
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
