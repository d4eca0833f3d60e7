//! JSON-RPC 2.0 over a Unix socket (the shape SPDK users know from `rpc.py`).
//!
//! Requests are JSON objects, one after another on the stream (newlines optional); each gets
//! one response object followed by a newline. The socket is created with 0600 permissions.
//! Methods are registered by name; a method gets the `params` value and returns a result value
//! or an [`RpcError`].
//!
//! Bounds: at most [`MAX_CONNECTIONS`] connections at once (a further one gets an error reply
//! and is closed), one request at most [`MAX_REQUEST_BYTES`], and a connection idle for
//! [`IDLE_TIMEOUT`] between requests is closed.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Value};

/// RPC connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// The largest request accepted.
pub const MAX_REQUEST_BYTES: u64 = 1 << 20;
/// A connection that sends nothing for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// JSON-RPC error codes (JSON-RPC 2.0 §5.1).
pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;
pub const METHOD_NOT_FOUND: i64 = -32601;
pub const INVALID_PARAMS: i64 = -32602;
pub const INTERNAL_ERROR: i64 = -32603;

/// An error returned to the caller.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{message} (code {code})")]
pub struct RpcError {
    pub code: i64,
    pub message: String,
}

impl RpcError {
    /// Bad or missing parameters.
    pub fn invalid_params(message: impl Into<String>) -> Self {
        Self {
            code: INVALID_PARAMS,
            message: message.into(),
        }
    }

    /// The method ran and failed.
    pub fn failed(message: impl Into<String>) -> Self {
        Self {
            code: INTERNAL_ERROR,
            message: message.into(),
        }
    }
}

/// A method handler.
pub type Method = Box<dyn Fn(&Value) -> Result<Value, RpcError> + Send + Sync>;

/// The registered methods.
#[derive(Default)]
pub struct Methods {
    map: BTreeMap<String, Method>,
}

impl std::fmt::Debug for Methods {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.map.keys()).finish()
    }
}

impl Methods {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `name`; a later registration of the same name replaces it.
    pub fn add(
        &mut self,
        name: &str,
        f: impl Fn(&Value) -> Result<Value, RpcError> + Send + Sync + 'static,
    ) {
        self.map.insert(name.to_string(), Box::new(f));
    }

    /// Names of the registered methods.
    pub fn names(&self) -> Vec<String> {
        self.map.keys().cloned().collect()
    }

    /// Handles one request object and builds its response (`None` for notifications).
    pub fn handle(&self, req: &Value) -> Option<Value> {
        let id = req.get("id").cloned();
        let reply = |body: Result<Value, RpcError>| {
            let id = id.clone().unwrap_or(Value::Null);
            match body {
                Ok(result) => json!({"jsonrpc": "2.0", "id": id, "result": result}),
                Err(e) => json!({"jsonrpc": "2.0", "id": id,
                                 "error": {"code": e.code, "message": e.message}}),
            }
        };
        let Some(obj) = req.as_object() else {
            return Some(reply(Err(RpcError {
                code: INVALID_REQUEST,
                message: "a request is a JSON object".into(),
            })));
        };
        if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
            return Some(reply(Err(RpcError {
                code: INVALID_REQUEST,
                message: "\"jsonrpc\" must be \"2.0\"".into(),
            })));
        }
        let Some(method) = obj.get("method").and_then(Value::as_str) else {
            return Some(reply(Err(RpcError {
                code: INVALID_REQUEST,
                message: "\"method\" must be a string".into(),
            })));
        };
        let params = obj.get("params").cloned().unwrap_or(Value::Null);
        let result = match self.map.get(method) {
            Some(f) => f(&params),
            None => Err(RpcError {
                code: METHOD_NOT_FOUND,
                message: format!("no method '{method}' (try rpc_get_methods)"),
            }),
        };
        id.is_some().then(|| reply(result))
    }
}

/// The running server; dropping it stops accepting and removes the socket.
#[derive(Debug)]
pub struct RpcServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl RpcServer {
    /// Binds `path` (replacing a stale socket file) with 0600 permissions and serves `methods`.
    pub fn start(path: &Path, methods: Methods) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("{} is in use by a running server", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        let listener = bind_private(path)?;
        listener.set_nonblocking(true)?;
        let active = Arc::new(AtomicUsize::new(0));
        let methods = Arc::new(methods);
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("nvmirror-rpc".into())
            .spawn(move || {
                while !stop2.load(Ordering::Acquire) {
                    match listener.accept() {
                        Ok((mut stream, _)) => {
                            if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                                active.fetch_sub(1, Ordering::AcqRel);
                                let resp = json!({"jsonrpc": "2.0", "id": null, "error": {
                                    "code": INTERNAL_ERROR,
                                    "message": format!("too many RPC connections (at most {MAX_CONNECTIONS})")}});
                                let _ = stream.set_nonblocking(false);
                                let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
                                let _ = writeln!(stream, "{resp}");
                                continue;
                            }
                            let methods = Arc::clone(&methods);
                            let active2 = Arc::clone(&active);
                            let spawned = std::thread::Builder::new()
                                .name("nvmirror-rpc-conn".into())
                                .spawn(move || {
                                    serve_connection(stream, &methods);
                                    active2.fetch_sub(1, Ordering::AcqRel);
                                });
                            if spawned.is_err() {
                                active.fetch_sub(1, Ordering::AcqRel);
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Err(e) => {
                            tracing::warn!("rpc accept failed: {e}");
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
            })?;
        Ok(Self {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds the socket where no other user can reach it before its mode is 0600: in a fresh
/// 0700 directory next to `path`, then renamed into place.
fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("rpc");
    let private = dir.join(format!(".{name}.{}.bind", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let staged = private.join("sock");
    let bound = UnixListener::bind(&staged).and_then(|l| {
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&staged, path)?;
        Ok(l)
    });
    let _ = std::fs::remove_dir_all(&private);
    bound
}

/// Counts the bytes of the request being parsed and fails the read past the bound.
struct Bounded<R> {
    inner: R,
    used: std::rc::Rc<Cell<u64>>,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = MAX_REQUEST_BYTES.saturating_sub(self.used.get());
        if left == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("request larger than {MAX_REQUEST_BYTES} bytes"),
            ));
        }
        let n = buf.len().min(left as usize);
        let got = self.inner.read(&mut buf[..n])?;
        self.used.set(self.used.get() + got as u64);
        Ok(got)
    }
}

fn serve_connection(stream: UnixStream, methods: &Methods) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let used = std::rc::Rc::new(Cell::new(0));
    let reader = Bounded {
        inner: BufReader::new(stream),
        used: std::rc::Rc::clone(&used),
    };
    for req in serde_json::Deserializer::from_reader(reader).into_iter::<Value>() {
        used.set(0);
        let response = match req {
            Ok(req) => methods.handle(&req),
            Err(e) if e.is_io() && e.io_error_kind() == Some(std::io::ErrorKind::InvalidData) => {
                let resp = json!({"jsonrpc": "2.0", "id": null,
                                  "error": {"code": INVALID_REQUEST, "message": e.to_string()}});
                let _ = writeln!(out, "{resp}");
                return;
            }
            Err(e) if e.is_eof() || e.is_io() => return,
            Err(e) => {
                let resp = json!({"jsonrpc": "2.0", "id": null,
                                  "error": {"code": PARSE_ERROR, "message": e.to_string()}});
                let _ = writeln!(out, "{resp}");
                return;
            }
        };
        if let Some(resp) = response {
            if writeln!(out, "{resp}").is_err() {
                return;
            }
        }
    }
}

/// Calls `method` on the server at `path` and returns its result (waiting 60 s at most).
pub fn call(path: &Path, method: &str, params: Value) -> Result<Value, RpcError> {
    call_with_timeout(path, method, params, Duration::from_secs(60))
}

/// [`call`], waiting at most `timeout` for the reply.
pub fn call_with_timeout(
    path: &Path,
    method: &str,
    params: Value,
    timeout: Duration,
) -> Result<Value, RpcError> {
    let stream = UnixStream::connect(path).map_err(|e| RpcError {
        code: INTERNAL_ERROR,
        message: format!(
            "cannot connect to {}: {e} (is nvmirror serve running?)",
            path.display()
        ),
    })?;
    let _ = stream.set_read_timeout(Some(timeout));
    let mut w = stream
        .try_clone()
        .map_err(|e| RpcError::failed(e.to_string()))?;
    let req = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    writeln!(w, "{req}").map_err(|e| RpcError::failed(format!("send: {e}")))?;
    let mut it = serde_json::Deserializer::from_reader(BufReader::new(stream)).into_iter::<Value>();
    let resp = it
        .next()
        .ok_or_else(|| RpcError::failed("the server closed the connection"))?
        .map_err(|e| RpcError::failed(format!("bad response: {e}")))?;
    if let Some(err) = resp.get("error") {
        return Err(RpcError {
            code: err
                .get("code")
                .and_then(Value::as_i64)
                .unwrap_or(INTERNAL_ERROR),
            message: err
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("error")
                .to_string(),
        });
    }
    Ok(resp.get("result").cloned().unwrap_or(Value::Null))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn methods() -> Methods {
        let mut m = Methods::new();
        m.add("echo", |p| Ok(p.clone()));
        m.add("needs_name", |p| {
            p.get("name")
                .and_then(Value::as_str)
                .map(|n| json!({ "hello": n }))
                .ok_or_else(|| RpcError::invalid_params("missing string parameter 'name'"))
        });
        m
    }

    #[test]
    fn dispatch_and_errors() {
        let m = methods();
        let r = m
            .handle(&json!({"jsonrpc":"2.0","id":7,"method":"echo","params":[1,2]}))
            .unwrap();
        assert_eq!(r, json!({"jsonrpc":"2.0","id":7,"result":[1,2]}));
        let r = m
            .handle(&json!({"jsonrpc":"2.0","id":1,"method":"nope"}))
            .unwrap();
        assert_eq!(r["error"]["code"], METHOD_NOT_FOUND);
        let r = m
            .handle(&json!({"jsonrpc":"2.0","id":1,"method":"needs_name","params":{}}))
            .unwrap();
        assert_eq!(r["error"]["code"], INVALID_PARAMS);
        assert!(r["error"]["message"].as_str().unwrap().contains("'name'"));
        let r = m.handle(&json!({"id":1,"method":"echo"})).unwrap();
        assert_eq!(r["error"]["code"], INVALID_REQUEST);
        assert_eq!(
            m.handle(&json!({"jsonrpc":"2.0","method":"echo"})),
            None,
            "notification"
        );
    }

    #[test]
    fn socket_round_trip_with_private_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rpc.sock");
        let server = RpcServer::start(&path, methods()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            call(&path, "needs_name", json!({"name": "vol0"})).unwrap(),
            json!({"hello": "vol0"})
        );
        let err = call(&path, "needs_name", json!({})).unwrap_err();
        assert_eq!(err.code, INVALID_PARAMS);
        // A second server on a live socket is refused; garbage gets a parse error.
        assert!(RpcServer::start(&path, Methods::new()).is_err());
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(b"{not json}\n").unwrap();
        let resp: Value = serde_json::Deserializer::from_reader(BufReader::new(s))
            .into_iter()
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(resp["error"]["code"], PARSE_ERROR);
        drop(server);
        assert!(!path.exists());
        assert!(call(&path, "echo", Value::Null)
            .unwrap_err()
            .message
            .contains("cannot connect"));
    }

    fn first_reply(s: UnixStream) -> Value {
        serde_json::Deserializer::from_reader(BufReader::new(s))
            .into_iter()
            .next()
            .unwrap()
            .unwrap()
    }

    #[test]
    fn connections_and_requests_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rpc.sock");
        let _server = RpcServer::start(&path, methods()).unwrap();
        // Nothing but the socket is left in the directory (the private bind folder is gone).
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("rpc.sock")]);

        // A request past the bound is refused with an error, not buffered.
        let s = UnixStream::connect(&path).unwrap();
        let mut w = s.try_clone().unwrap();
        std::thread::spawn(move || {
            let _ = w.write_all(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"echo\",\"params\":\"");
            let chunk = vec![b'a'; 64 * 1024];
            for _ in 0..(MAX_REQUEST_BYTES / chunk.len() as u64 + 2) {
                if w.write_all(&chunk).is_err() {
                    return;
                }
            }
        });
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let resp = first_reply(s);
        assert_eq!(resp["error"]["code"], INVALID_REQUEST, "{resp}");
        assert!(resp["error"]["message"]
            .as_str()
            .unwrap()
            .contains("larger than"));

        // Connections past the bound get an error reply; the ones held keep working.
        let held: Vec<_> = (0..MAX_CONNECTIONS)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let refused = loop {
            let extra = UnixStream::connect(&path).unwrap();
            extra
                .set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let mut w = extra.try_clone().unwrap();
            let _ = writeln!(
                w,
                "{}",
                json!({"jsonrpc":"2.0","id":2,"method":"echo","params":1})
            );
            let got: Option<Value> = serde_json::Deserializer::from_reader(BufReader::new(extra))
                .into_iter()
                .next()
                .and_then(Result::ok);
            if let Some(v) = got.filter(|v| v.get("error").is_some()) {
                break v;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no connection was refused"
            );
        };
        assert!(refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("too many"));
        let mut first = held.into_iter().next().unwrap();
        writeln!(
            first,
            "{}",
            json!({"jsonrpc":"2.0","id":3,"method":"echo","params":5})
        )
        .unwrap();
        assert_eq!(first_reply(first)["result"], json!(5));
    }
}
