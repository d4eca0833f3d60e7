//! Prometheus text exposition on `/metrics` (loopback by default): a tiny HTTP/1.1 server on
//! its own thread, and a writer for the text format (version 0.0.4).

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Scrapes answered at once; a further connection is closed at once.
pub const MAX_SCRAPES: usize = 8;
/// The whole request (line and headers) must arrive within this time...
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// ...and within this many bytes.
pub const MAX_REQUEST_BYTES: u64 = 16 * 1024;

/// Renders the whole exposition on each scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Builds exposition text: one `# HELP`/`# TYPE` header per metric family, and every sample
/// of a family together under it (in the order families first appear), however the caller
/// interleaves them.
#[derive(Debug, Default)]
pub struct PromWriter {
    /// Family name → its index in `families`.
    index: std::collections::HashMap<String, usize>,
    /// Each family's header and samples, in first-seen order.
    families: Vec<String>,
}

impl PromWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// The text of family `name`, created with its header on first use.
    fn family(&mut self, name: &str, kind: &str, help: &str) -> &mut String {
        let i = match self.index.get(name) {
            Some(&i) => i,
            None => {
                let mut text = String::new();
                let _ = writeln!(text, "# HELP {name} {help}");
                let _ = writeln!(text, "# TYPE {name} {kind}");
                self.families.push(text);
                self.index.insert(name.to_string(), self.families.len() - 1);
                self.families.len() - 1
            }
        };
        &mut self.families[i]
    }

    fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: f64) {
        out.push_str(name);
        if !labels.is_empty() {
            out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                let v = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(out, "{k}=\"{v}\"");
            }
            out.push('}');
        }
        let _ = writeln!(out, " {value}");
    }

    /// A monotonically increasing count.
    pub fn counter(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: f64) {
        Self::sample(self.family(name, "counter", help), name, labels, value);
    }

    /// A value that goes up and down.
    pub fn gauge(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: f64) {
        Self::sample(self.family(name, "gauge", help), name, labels, value);
    }

    /// A histogram from cumulative `(upper bound, count)` buckets, the sum and the count.
    pub fn histogram(
        &mut self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        buckets: &[(f64, u64)],
        sum: f64,
        count: u64,
    ) {
        let out = self.family(name, "histogram", help);
        let bucket = format!("{name}_bucket");
        for (le, c) in buckets {
            let le = le.to_string();
            let mut l = labels.to_vec();
            l.push(("le", &le));
            Self::sample(out, &bucket, &l, *c as f64);
        }
        let mut l = labels.to_vec();
        l.push(("le", "+Inf"));
        Self::sample(out, &bucket, &l, count as f64);
        Self::sample(out, &format!("{name}_sum"), labels, sum);
        Self::sample(out, &format!("{name}_count"), labels, count as f64);
    }

    pub fn finish(self) -> String {
        self.families.concat()
    }
}

/// The running endpoint; dropping it stops it.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Listens on `addr` and answers `GET /metrics` with `render()`.
    pub fn start(addr: SocketAddr, render: Render) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let active = Arc::new(AtomicUsize::new(0));
        let thread = std::thread::Builder::new()
            .name("nvmirror-metrics".into())
            .spawn(move || {
                while !stop2.load(Ordering::Acquire) {
                    // One thread per scrape, at most MAX_SCRAPES at once, each bounded in time
                    // and size: a slow client cannot hold /metrics. When all are busy, new
                    // connections wait in the listen backlog until one finishes.
                    if active.load(Ordering::Acquire) >= MAX_SCRAPES {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                    match listener.accept() {
                        Ok((s, _)) => {
                            active.fetch_add(1, Ordering::AcqRel);
                            let render = Arc::clone(&render);
                            let active2 = Arc::clone(&active);
                            let spawned = std::thread::Builder::new()
                                .name("nvmirror-scrape".into())
                                .spawn(move || {
                                    let _ = answer(s, &render);
                                    active2.fetch_sub(1, Ordering::AcqRel);
                                });
                            if spawned.is_err() {
                                active.fetch_sub(1, Ordering::AcqRel);
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(20))
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(100)),
                    }
                }
            })?;
        Ok(Self {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads from a socket until a deadline for the whole request, not per read.
struct Deadline {
    stream: TcpStream,
    until: Instant,
}

impl Read for Deadline {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

fn answer(stream: TcpStream, render: &Render) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(REQUEST_DEADLINE))?;
    let mut out = stream.try_clone()?;
    let until = Instant::now() + REQUEST_DEADLINE;
    let mut reader = BufReader::new(Deadline { stream, until }.take(MAX_REQUEST_BYTES));
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = if method != "GET" {
        (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_string(),
        )
    } else if path == "/metrics" || path.starts_with("/metrics?") {
        (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render(),
        )
    } else {
        ("404 Not Found", "text/plain", "try /metrics\n".to_string())
    };
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        resp
    }

    #[test]
    fn exposition_format() {
        let mut w = PromWriter::new();
        w.counter(
            "nvmirror_leg_ops_total",
            "Leg operations.",
            &[("volume", "vol0"), ("leg", "0")],
            5.0,
        );
        w.counter(
            "nvmirror_leg_ops_total",
            "Leg operations.",
            &[("volume", "vol0"), ("leg", "1")],
            7.0,
        );
        w.histogram(
            "lat_seconds",
            "Latency.",
            &[("leg", "a\"b")],
            &[(0.001, 2), (0.01, 3)],
            0.02,
            4,
        );
        w.counter(
            "nvmirror_leg_ops_total",
            "Leg operations.",
            &[("volume", "vol1"), ("leg", "0")],
            9.0,
        );
        let text = w.finish();
        // Every sample of a family sits under its one header, before the next family.
        let ops: Vec<usize> = text
            .lines()
            .enumerate()
            .filter(|(_, l)| l.starts_with("nvmirror_leg_ops_total"))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(ops, vec![2, 3, 4], "{text}");
        assert_eq!(
            text.matches("# TYPE nvmirror_leg_ops_total counter")
                .count(),
            1
        );
        assert!(
            text.contains("nvmirror_leg_ops_total{volume=\"vol0\",leg=\"1\"} 7\n"),
            "{text}"
        );
        assert!(
            text.contains("lat_seconds_bucket{leg=\"a\\\"b\",le=\"0.001\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("lat_seconds_bucket{leg=\"a\\\"b\",le=\"+Inf\"} 4\n"),
            "{text}"
        );
        assert!(
            text.contains("lat_seconds_count{leg=\"a\\\"b\"} 4\n"),
            "{text}"
        );
    }

    #[test]
    fn serves_metrics_and_404s_the_rest() {
        let render: Render = Arc::new(|| "up 1\n".to_string());
        let srv = MetricsServer::start("127.0.0.1:0".parse().unwrap(), render).unwrap();
        let r = get(srv.local_addr(), "/metrics");
        assert!(
            r.starts_with("HTTP/1.1 200 OK") && r.ends_with("\r\n\r\nup 1\n"),
            "{r}"
        );
        assert!(get(srv.local_addr(), "/").starts_with("HTTP/1.1 404"));
    }

    #[test]
    fn slow_clients_do_not_hold_the_endpoint() {
        let render: Render = Arc::new(|| "up 1\n".to_string());
        let srv = MetricsServer::start("127.0.0.1:0".parse().unwrap(), render).unwrap();
        // Slowloris: connections that send half a request line and then nothing, more of them
        // than the endpoint answers at once.
        let mut slow = Vec::new();
        for _ in 0..MAX_SCRAPES + 4 {
            let mut s = TcpStream::connect(srv.local_addr()).unwrap();
            s.write_all(b"GET /metr").unwrap();
            slow.push(s);
        }
        // A real scrape gets through once the slow ones hit the request deadline (and before
        // that if a slot is free); it never waits on them forever.
        let t = Instant::now();
        let r = get(srv.local_addr(), "/metrics");
        assert!(r.starts_with("HTTP/1.1 200 OK"), "{r}");
        assert!(t.elapsed() < REQUEST_DEADLINE * 4, "{:?}", t.elapsed());
        // A request larger than the bound is refused rather than buffered.
        let mut big = TcpStream::connect(srv.local_addr()).unwrap();
        let _ = big.write_all(b"GET /metrics HTTP/1.1\r\n");
        let filler = vec![b'a'; 1024];
        for _ in 0..(MAX_REQUEST_BYTES / 1024 + 2) {
            if big.write_all(&filler).is_err() {
                break;
            }
        }
        let mut resp = String::new();
        let _ = big.read_to_string(&mut resp);
        assert!(
            !resp.contains("up 1"),
            "an oversized request was answered: {resp}"
        );
    }
}
