//! The control socket: a JSON-lines protocol over a root-only Unix socket.
//! [`serve`] runs in the server, [`client`] in the CLI.
//!
//! One connection carries one exchange: the client writes one request line,
//! the server answers with one response line and closes. Requests:
//! `{"op":"status"}`, `{"op":"command","command":{"command":"restore",
//! "incremental":false,"protect":false}}`, `{"op":"verify"}`, `{"op":"set","settings":["restore.rate_limit=200MiB"]}`,
//! `{"op":"attach","replace":false}`.
//! Responses:
//! `{"ok":true,"status":{...}}` / `{"ok":true}` / `{"ok":true,"verify":{...}}`
//! or `{"ok":false,"code":N,"error":"..."}`, where `N` is the exit code the
//! server-side [`Error`] maps to, so the CLI exits exactly as if the error
//! had happened in-process.

use crate::core::{Command, OperationKind, VolumeState};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// The longest request line the server reads. Real requests are well under
/// 200 bytes; the cap keeps a misbehaving peer from growing server memory.
pub const MAX_REQUEST: usize = 64 << 10;
/// The longest response line the client reads (a status with a long error
/// list, a verify report with many mismatches).
pub const MAX_RESPONSE: usize = 64 << 20;
/// How long the server waits for a peer to send its request or take the
/// response, so a stalled peer only ever ties up its own thread, briefly.
const PEER_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections handled at once; more are answered "busy". Verify can run for
/// a long time, so connections run on threads of their own, but a flood of
/// them must not exhaust the server's threads.
const MAX_CONNECTIONS: usize = 32;
/// How often the accept loop looks at the stop flag.
const ACCEPT_POLL_MS: i32 = 100;

/// The version of the `status --json` document: raised when a field's
/// meaning changes (fields are only ever added; see docs/interface.md).
pub const STATUS_SCHEMA_VERSION: u32 = 1;

fn schema_version() -> u32 {
    STATUS_SCHEMA_VERSION
}

/// `status --json`, field for field as docs/interface.md gives it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    #[serde(default = "schema_version")]
    pub schema_version: u32,
    pub name: String,
    pub device: Option<String>,
    /// The primary and secondary as configured (an extension of the
    /// contract's fields, for the human `status`).
    #[serde(default)]
    pub primary: String,
    #[serde(default)]
    pub secondary: String,
    /// Who each device is, as the metadata records it (see
    /// `metadata::identity`): `wwid:…`, `serial:…`, `dm-uuid:…`, `file:…`.
    #[serde(default)]
    pub primary_id: String,
    #[serde(default)]
    pub secondary_id: String,
    pub state: VolumeState,
    pub track_size: u64,
    pub tracks: u64,
    pub changed_since_split: u64,
    pub restore_pending: u64,
    pub secondary_stale: u64,
    pub operation: Option<OperationStatus>,
    pub errors: Vec<String>,
    /// Primary read errors served from the secondary and rewritten on the
    /// primary since the server started (read repair). An extension of the
    /// contract's fields.
    #[serde(default)]
    pub read_repairs: u64,
    /// When the secondary's image was frozen (Unix seconds): by `split`
    /// (states split, restoring) or by a failed secondary (degraded);
    /// `None` in other states or when unknown.
    #[serde(default)]
    pub split_time: Option<u64>,
    /// Seconds since `split_time`.
    #[serde(default)]
    pub split_age_secs: Option<u64>,
    /// The secondary is not open (absent or unopenable at start, or its
    /// reopening by `attach-secondary` failed); the volume is `degraded`.
    /// An extension of the contract's fields.
    #[serde(default)]
    pub secondary_missing: bool,
    /// The device runs with ublk zero copy (`ublk.zero_copy`). An
    /// extension of the contract's fields.
    #[serde(default)]
    pub zero_copy: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperationStatus {
    pub kind: OperationKind,
    pub incremental: bool,
    pub protect: bool,
    pub total: u64,
    pub done: u64,
    pub percent: f64,
    pub bytes_per_sec: u64,
    pub eta_secs: Option<f64>,
    /// Copying stopped on a read error (`on_error: pause`); the server
    /// retries now and then. An extension of the contract's fields.
    #[serde(default)]
    pub paused: bool,
    /// `restore.priority` now (`host`, `balanced`, `restore`). An extension
    /// of the contract's fields.
    #[serde(default)]
    pub priority: String,
    /// Tracks the copy engine allows itself in flight now (it adapts this
    /// to the host's latency; 0 while it holds back for host requests). An
    /// extension of the contract's fields.
    #[serde(default)]
    pub copy_depth: u64,
}

/// Result of `verify`: tracks the tables say are identical, compared.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyReport {
    pub compared: u64,
    pub mismatches: Vec<u64>,
}

/// What the server offers the control socket.
pub trait ControlTarget: Send + Sync {
    fn status(&self) -> Status;
    /// Starts `cmd`; returns once host I/O sees its effect (for restore: the
    /// split image). Wrong state → `Error::State`.
    fn command(&self, cmd: Command) -> Result<()>;
    /// Compares primary and secondary on every track the tables say is
    /// identical, each track locked while compared, throttled.
    fn verify(&self) -> Result<VerifyReport>;
    /// Changes engine settings of the running server (`KEY=VALUE`, keys as
    /// in the config file); returns one line per applied setting. Either
    /// every setting applies or none does.
    fn set(&self, settings: &[String]) -> Result<Vec<String>> {
        let _ = settings;
        Err(Error::runtime(
            "this server cannot change settings while running",
        ))
    }
    /// Reopens the configured secondary of a degraded volume and starts the
    /// establish that brings it up to date: only the changed tracks when it
    /// is the volume's disk, every track when it is another disk and
    /// `replace` is given (refused otherwise). Returns one line saying what
    /// was done.
    fn attach_secondary(&self, replace: bool) -> Result<String> {
        let _ = replace;
        Err(Error::runtime("this server cannot attach a secondary"))
    }
}

/// One request line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    Status,
    Command {
        command: Command,
    },
    Verify,
    Set {
        settings: Vec<String>,
    },
    Attach {
        #[serde(default)]
        replace: bool,
    },
}

/// One response line; which payload is present depends on the request.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifyReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied: Option<Vec<String>>,
    /// What a command did, in one line (`attach`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl Response {
    fn success() -> Response {
        Response {
            ok: true,
            ..Response::default()
        }
    }

    fn failure(e: &Error) -> Response {
        Response {
            ok: false,
            code: Some(e.exit_code()),
            error: Some(e.to_string()),
            ..Response::default()
        }
    }

    /// Turns a failure back into the [`Error`] the server had, by its code.
    fn into_result(self) -> Result<Response> {
        if self.ok {
            return Ok(self);
        }
        let msg = self
            .error
            .unwrap_or_else(|| "the server gave no reason".into());
        Err(match self.code {
            Some(2) => Error::Config(msg),
            Some(3) => Error::State(msg),
            _ => Error::Runtime(msg),
        })
    }
}

/// Parses one request line (trailing newline optional). Pure, so that it can
/// be fuzzed: any bytes give `Ok` or a message, never a panic.
pub fn parse_request(line: &[u8]) -> std::result::Result<Request, String> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.len() > MAX_REQUEST {
        return Err(format!("request longer than {MAX_REQUEST} bytes"));
    }
    let text = std::str::from_utf8(line).map_err(|_| "request is not UTF-8".to_string())?;
    if text.trim().is_empty() {
        return Err("empty request".into());
    }
    serde_json::from_str(text).map_err(|e| format!("bad request: {e}"))
}

/// A running control listener; dropping or `stop` removes the socket.
pub struct ControlServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
    /// (dev, ino) of the socket we bound, so that shutting down never
    /// removes a socket another server has put at the same path since.
    ident: (u64, u64),
}

impl ControlServer {
    /// Stops accepting connections and removes the socket. Requests already
    /// being handled finish on their own threads. (The work is in `Drop`, so
    /// that a server that unwinds removes its socket too.)
    pub fn stop(self) {}

    /// The path the server listens on.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == self.ident {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Binds `socket` (directory 0700, socket 0600, root-only peers) and serves
/// requests on a thread of its own.
pub fn serve(socket: &Path, target: Arc<dyn ControlTarget>) -> Result<ControlServer> {
    prepare_dir(socket)?;
    clear_stale(socket)?;
    let listener = UnixListener::bind(socket).map_err(|e| {
        Error::runtime(format!(
            "cannot create control socket {}: {e}; check control.socket in the config",
            socket.display()
        ))
    })?;
    // Between bind and chmod the socket has the umask's mode; that window is
    // harmless because every connection's peer is checked anyway.
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    let m = std::fs::symlink_metadata(socket)?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::Builder::new()
        .name("control".into())
        .spawn(move || accept_loop(listener, target, flag))?;
    Ok(ControlServer {
        stop,
        thread: Some(thread),
        path: socket.to_path_buf(),
        ident: (m.dev(), m.ino()),
    })
}

/// Creates the socket's directory 0700 if it is missing; an existing one is
/// left as the administrator made it.
fn prepare_dir(socket: &Path) -> Result<()> {
    let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(());
    };
    if dir.exists() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| {
            Error::runtime(format!(
                "cannot create the control socket directory {}: {e}; create it or change control.socket",
                dir.display()
            ))
        })
}

/// A socket file left by a server that died is removed; one that a live
/// server answers on is not, since taking it over would cut that server off.
fn clear_stale(socket: &Path) -> Result<()> {
    let shown = socket.display();
    let Ok(m) = std::fs::symlink_metadata(socket) else {
        return Ok(());
    };
    if !m.file_type().is_socket() {
        return Err(Error::runtime(format!(
            "{shown} exists and is not a socket; remove it or change control.socket"
        )));
    }
    if UnixStream::connect(socket).is_ok() {
        let who = client::status(socket)
            .map(|s| format!("for volume {:?}", s.name))
            .unwrap_or_else(|_| "(it did not say which volume)".into());
        return Err(Error::runtime(format!(
            "another splitmirror server {who} is listening on {shown}; stop it first \
             or give this volume its own control.socket"
        )));
    }
    std::fs::remove_file(socket)
        .map_err(|e| Error::runtime(format!("cannot remove stale control socket {shown}: {e}")))
}

fn accept_loop(listener: UnixListener, target: Arc<dyn ControlTarget>, stop: Arc<AtomicBool>) {
    let active = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::SeqCst) {
        if !wait_readable(&listener) {
            continue;
        }
        match listener.accept() {
            Ok((stream, _)) => dispatch(stream, &target, &active),
            Err(e) => {
                log::warn!("control socket: accept failed: {e}");
                // Out of file descriptors and the like: do not spin.
                std::thread::sleep(Duration::from_millis(ACCEPT_POLL_MS as u64));
            }
        }
    }
}

/// Waits a short while for a connection, so the loop can see the stop flag.
/// (libc directly: nix's poll module is behind a feature this crate does
/// not enable.)
fn wait_readable(listener: &UnixListener) -> bool {
    use std::os::fd::AsRawFd;
    let mut fd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, owned by this frame, for the whole call.
    let n = unsafe { libc::poll(&mut fd, 1, ACCEPT_POLL_MS) };
    n > 0
}

/// Runs one connection on a thread of its own, or answers "busy".
fn dispatch(mut stream: UnixStream, target: &Arc<dyn ControlTarget>, active: &Arc<AtomicUsize>) {
    if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
        active.fetch_sub(1, Ordering::SeqCst);
        let e = Error::runtime("the server is busy with other control requests; retry");
        let _ = stream.set_write_timeout(Some(PEER_TIMEOUT));
        let _ = write_response(&mut stream, &Response::failure(&e));
        return;
    }
    let (target, active2) = (target.clone(), active.clone());
    let spawned = std::thread::Builder::new()
        .name("control-conn".into())
        .spawn(move || {
            handle_connection(stream, target.as_ref());
            active2.fetch_sub(1, Ordering::SeqCst);
        });
    if let Err(e) = spawned {
        active.fetch_sub(1, Ordering::SeqCst);
        log::warn!("control socket: cannot start a thread: {e}");
    }
}

/// One exchange: read one request, check the peer, answer it.
fn handle_connection(mut stream: UnixStream, target: &dyn ControlTarget) {
    let _ = stream.set_read_timeout(Some(PEER_TIMEOUT));
    let _ = stream.set_write_timeout(Some(PEER_TIMEOUT));
    // Read (bounded) before refusing a peer: closing on an unread request
    // would hand the client EPIPE instead of the reason.
    let request = read_request(&stream);
    let response = match check_peer(&stream).and(request) {
        Ok(req) => answer(target, req),
        Err(e) => Response::failure(&e),
    };
    if let Err(e) = write_response(&mut stream, &response) {
        log::debug!("control socket: cannot send the response: {e}");
    }
}

/// Only root and the server's own user may control the volume: the socket's
/// mode already says so, this also holds if the mode was changed.
fn check_peer(stream: &UnixStream) -> Result<()> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let creds = getsockopt(stream, PeerCredentials)
        .map_err(|e| Error::runtime(format!("permission denied: cannot identify the peer: {e}")))?;
    let me = nix::unistd::geteuid().as_raw();
    if creds.uid() != 0 && creds.uid() != me {
        log::warn!("control socket: refused uid {}", creds.uid());
        return Err(Error::runtime(format!(
            "permission denied: uid {} may not control this volume; run as root",
            creds.uid()
        )));
    }
    Ok(())
}

/// Reads up to one line of at most [`MAX_REQUEST`] bytes and parses it.
fn read_request(stream: &UnixStream) -> Result<Request> {
    let mut line = Vec::new();
    let mut limited = BufReader::new(stream).take(MAX_REQUEST as u64 + 1);
    limited
        .read_until(b'\n', &mut line)
        .map_err(|e| Error::config(format!("bad request: cannot read it: {e}")))?;
    if line.len() > MAX_REQUEST {
        return Err(Error::config(format!(
            "bad request: longer than {MAX_REQUEST} bytes"
        )));
    }
    parse_request(&line).map_err(Error::config)
}

/// Runs a request against the target. A panic in the target becomes an
/// error response, so the client hears about it instead of a closed socket.
fn answer(target: &dyn ControlTarget, req: Request) -> Response {
    let run = || -> Result<Response> {
        Ok(match req {
            Request::Status => Response {
                status: Some(target.status()),
                ..Response::success()
            },
            Request::Command { command } => {
                target.command(command)?;
                Response::success()
            }
            Request::Verify => Response {
                verify: Some(target.verify()?),
                ..Response::success()
            },
            Request::Set { settings } => Response {
                applied: Some(target.set(&settings)?),
                ..Response::success()
            },
            Request::Attach { replace } => Response {
                message: Some(target.attach_secondary(replace)?),
                ..Response::success()
            },
        })
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Response::failure(&e),
        Err(_) => Response::failure(&Error::runtime(
            "internal error in the server while handling the request; see its log",
        )),
    }
}

fn write_response(stream: &mut UnixStream, r: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(r).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    stream.flush()
}

pub mod client {
    use super::*;

    /// Status answers at once; commands return when host I/O sees their
    /// effect, which may take a metadata commit or a drain of host I/O.
    const STATUS_TIMEOUT: Duration = Duration::from_secs(30);
    const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);

    /// One request/response round trip.
    pub fn status(socket: &Path) -> Result<Status> {
        let r = round_trip(socket, &Request::Status, Some(STATUS_TIMEOUT))?;
        r.status.ok_or_else(|| missing_payload(socket, "status"))
    }

    pub fn command(socket: &Path, cmd: Command) -> Result<()> {
        let req = Request::Command { command: cmd };
        round_trip(socket, &req, Some(COMMAND_TIMEOUT)).map(|_| ())
    }

    /// No timeout: verify reads every identical track, which takes as long
    /// as the devices need.
    pub fn verify(socket: &Path) -> Result<VerifyReport> {
        let r = round_trip(socket, &Request::Verify, None)?;
        r.verify.ok_or_else(|| missing_payload(socket, "verify"))
    }

    pub fn set(socket: &Path, settings: &[String]) -> Result<Vec<String>> {
        let req = Request::Set {
            settings: settings.to_vec(),
        };
        let r = round_trip(socket, &req, Some(COMMAND_TIMEOUT))?;
        r.applied.ok_or_else(|| missing_payload(socket, "set"))
    }

    /// `attach-secondary`: reopens the configured secondary and starts its
    /// establish; returns the server's line about it.
    pub fn attach(socket: &Path, replace: bool) -> Result<String> {
        let req = Request::Attach { replace };
        let r = round_trip(socket, &req, Some(COMMAND_TIMEOUT))?;
        r.message.ok_or_else(|| missing_payload(socket, "attach"))
    }

    fn missing_payload(socket: &Path, what: &str) -> Error {
        Error::runtime(format!(
            "the server at {} answered without a {what} report; is it the same splitmirror version?",
            socket.display()
        ))
    }

    fn round_trip(socket: &Path, req: &Request, timeout: Option<Duration>) -> Result<Response> {
        let mut stream = connect(socket)?;
        let io_err = |e: std::io::Error| {
            Error::runtime(format!(
                "control socket {}: {e}; check the server's log",
                socket.display()
            ))
        };
        stream.set_read_timeout(timeout).map_err(io_err)?;
        stream
            .set_write_timeout(Some(STATUS_TIMEOUT))
            .map_err(io_err)?;
        let mut line = serde_json::to_vec(req).map_err(|e| Error::runtime(e.to_string()))?;
        line.push(b'\n');
        stream.write_all(&line).map_err(io_err)?;
        read_response(&stream, socket)?.into_result()
    }

    fn read_response(stream: &UnixStream, socket: &Path) -> Result<Response> {
        let mut line = Vec::new();
        let mut limited = BufReader::new(stream).take(MAX_RESPONSE as u64);
        limited.read_until(b'\n', &mut line).map_err(|e| {
            let why = if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) {
                "timed out waiting for an answer".to_string()
            } else {
                e.to_string()
            };
            Error::runtime(format!(
                "control socket {}: {why}; check the server's log",
                socket.display()
            ))
        })?;
        if line.is_empty() {
            return Err(Error::runtime(format!(
                "the server at {} closed the connection without answering; check its log",
                socket.display()
            )));
        }
        serde_json::from_slice(&line).map_err(|e| {
            Error::runtime(format!(
                "the server at {} gave an unreadable answer ({e}); is it the same splitmirror version?",
                socket.display()
            ))
        })
    }

    fn connect(socket: &Path) -> Result<UnixStream> {
        use std::io::ErrorKind::*;
        let shown = socket.display();
        UnixStream::connect(socket).map_err(|e| match e.kind() {
            PermissionDenied => Error::runtime(format!(
                "permission denied on control socket {shown}; run as root"
            )),
            NotFound | ConnectionRefused => Error::runtime(format!(
                "cannot reach splitmirror server at {shown}: {e}; is `splitmirror run -c CFG` running?"
            )),
            _ => Error::runtime(format!(
                "cannot connect to splitmirror server at {shown}: {e}"
            )),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_requests() {
        assert_eq!(parse_request(b"{\"op\":\"status\"}\n"), Ok(Request::Status));
        assert_eq!(
            parse_request(b"{\"op\":\"verify\"}\r\n"),
            Ok(Request::Verify)
        );
        let cmd = br#"{"op":"command","command":{"command":"restore","incremental":true,"protect":false}}"#;
        assert_eq!(
            parse_request(cmd),
            Ok(Request::Command {
                command: Command::Restore {
                    incremental: true,
                    protect: false
                }
            })
        );
        assert!(parse_request(b"").is_err());
        assert!(parse_request(b"{\"op\":\"reboot\"}").is_err());
        assert!(parse_request(b"{\"op\":\"status\"").is_err());
        assert!(parse_request(b"\xff\xfe").is_err());
        assert!(parse_request(br#"{"op":"command"}"#).is_err());
    }

    #[test]
    fn request_round_trips_through_json() {
        for req in [
            Request::Status,
            Request::Verify,
            Request::Command {
                command: Command::Split,
            },
            Request::Command {
                command: Command::Establish { full: true },
            },
        ] {
            let line = serde_json::to_vec(&req).unwrap();
            assert_eq!(parse_request(&line), Ok(req));
        }
    }

    #[test]
    fn failures_keep_their_exit_code() {
        for e in [Error::config("c"), Error::state("s"), Error::runtime("r")] {
            let code = e.exit_code();
            let back = Response::failure(&e).into_result().unwrap_err();
            assert_eq!(back.exit_code(), code);
            assert_eq!(back.to_string(), e.to_string());
        }
    }

    proptest! {
        #[test]
        fn parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_request(&bytes);
        }

        #[test]
        fn parser_never_panics_on_json_like(s in r#"[{}\[\]":,a-z0-9 \\]{0,200}"#) {
            let _ = parse_request(s.as_bytes());
            let with_op = format!("{{\"op\":\"command\",\"command\":{s}}}");
            let _ = parse_request(with_op.as_bytes());
        }
    }
}
