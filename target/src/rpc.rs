//! JSON-RPC 2.0 over a Unix socket (the shape SPDK users know from `rpc.py`).
//!
//! Requests are JSON objects, one after another on the stream (newlines optional); each gets
//! one response object followed by a newline. The socket is created with 0600 permissions.
//! Methods are registered by name; a method gets the `params` value and returns a result value
//! or an [`RpcError`].

use std::collections::BTreeMap;
use std::io::{BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Value};

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
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        let methods = Arc::new(methods);
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("nvmirror-rpc".into())
            .spawn(move || {
                while !stop2.load(Ordering::Acquire) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let methods = Arc::clone(&methods);
                            let _ = std::thread::Builder::new()
                                .name("nvmirror-rpc-conn".into())
                                .spawn(move || serve_connection(stream, &methods));
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

fn serve_connection(stream: UnixStream, methods: &Methods) {
    let _ = stream.set_nonblocking(false);
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let reader = BufReader::new(stream);
    for req in serde_json::Deserializer::from_reader(reader).into_iter::<Value>() {
        let response = match req {
            Ok(req) => methods.handle(&req),
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

/// Calls `method` on the server at `path` and returns its result.
pub fn call(path: &Path, method: &str, params: Value) -> Result<Value, RpcError> {
    let stream = UnixStream::connect(path).map_err(|e| RpcError {
        code: INTERNAL_ERROR,
        message: format!(
            "cannot connect to {}: {e} (is nvmirror serve running?)",
            path.display()
        ),
    })?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
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
}
