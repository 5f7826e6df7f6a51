//! The user contract of docs/interface.md from the outside: the
//! binary's help, usage and config errors and exit codes, and the control
//! socket against a fake server target run in this process.

use splitmirror::core::{Command, OperationKind, VolumeState};
use splitmirror::edge::config::Config;
use splitmirror::edge::control::{
    self, client, ControlTarget, OperationStatus, Status, VerifyReport,
};
use splitmirror::edge::live::{self, Live};
use splitmirror::error::{Error, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_splitmirror");
const CLIENT_COMMANDS: [&str; 6] = ["split", "establish", "restore", "status", "wait", "verify"];
/// Client commands that also take KEY=VALUE arguments.
const SET: &str = "set";
const ALL_COMMANDS: [&str; 11] = [
    "format",
    "run",
    "split",
    "establish",
    "restore",
    "status",
    "wait",
    "verify",
    "list",
    "set",
    "completions",
];
/// The commands that read a volume's config (`-c`); `set` also needs a
/// setting, given in the test.
const CONFIG_COMMANDS: &[&str] = ALL_COMMANDS.split_at(8).0;

fn splitmirror(args: &[&str]) -> Output {
    std::process::Command::new(BIN)
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LOG")
        // `wait` watches a paused copy for one server retry (35 s) before
        // it gives up; the fake server never retries.
        .env("SPLITMIRROR_WAIT_PAUSED_GRACE", "2")
        .output()
        .expect("run the splitmirror binary")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The contract for every failure: the exit code, and exactly one line on
/// stderr, `splitmirror: ...`, never a panic or a backtrace.
#[track_caller]
fn assert_fails(o: &Output, code: i32, what: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "{what}: stderr {err:?}");
    assert_eq!(err.lines().count(), 1, "{what}: stderr {err:?}");
    assert!(err.starts_with("splitmirror: "), "{what}: stderr {err:?}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{what}: stderr {err:?}"
    );
}

// ---------------------------------------------------------------------------
// help and usage

#[test]
fn help_exits_0_and_lists_options() {
    let expect: [(&str, &[&str]); 11] = [
        ("format", &["--config", "--assume-clean", "--force"]),
        ("run", &["--config"]),
        ("split", &["--config", "--socket", "--wait", "--timeout"]),
        (
            "establish",
            &["--config", "--socket", "--full", "--wait", "--timeout"],
        ),
        (
            "restore",
            &[
                "--config",
                "--socket",
                "--incremental",
                "--protect",
                "--wait",
                "--timeout",
            ],
        ),
        (
            "status",
            &["--config", "--socket", "--json", "--all", "--config-dir"],
        ),
        ("wait", &["--config", "--socket", "--timeout"]),
        ("verify", &["--config", "--socket", "--json"]),
        ("list", &["--json", "--config-dir"]),
        (
            "set",
            &["--config", "--socket", "KEY=VALUE", "restore.rate_limit"],
        ),
        ("completions", &["SHELL"]),
    ];
    for (cmd, opts) in expect {
        let o = splitmirror(&[cmd, "--help"]);
        assert_eq!(o.status.code(), Some(0), "{cmd} --help");
        let out = stdout(&o);
        for opt in opts {
            assert!(out.contains(opt), "{cmd} --help lacks {opt}: {out}");
        }
    }
    let top = splitmirror(&["--help"]);
    assert_eq!(top.status.code(), Some(0));
    for cmd in ALL_COMMANDS {
        assert!(stdout(&top).contains(cmd), "--help lacks {cmd}");
    }
    assert_eq!(splitmirror(&["--version"]).status.code(), Some(0));
}

#[test]
fn usage_errors_exit_2() {
    let cases: &[&[&str]] = &[
        &[],
        &["frobnicate"],
        &["status"],
        &["format"],
        &["run"],
        &["run", "--socket", "/tmp/x.sock"],
        &["status", "--bogus", "--socket", "/tmp/x.sock"],
        &["status", "-c", "a.yaml", "--socket", "/tmp/x.sock"],
        &["split", "--timeout", "5", "--socket", "/tmp/x.sock"],
        &["wait", "--timeout", "soon", "--socket", "/tmp/x.sock"],
        &["wait", "--timeout", "-3", "--socket", "/tmp/x.sock"],
        &["establish", "--full=maybe", "--socket", "/tmp/x.sock"],
        &["format", "-c"],
    ];
    for args in cases {
        assert_fails(&splitmirror(args), 2, &format!("{args:?}"));
    }
}

#[test]
fn client_commands_without_server_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nobody-home.sock");
    let cfg = write_config(
        dir.path(),
        &config_with("control:\n  socket: nobody-home.sock\n"),
    );
    for cmd in CLIENT_COMMANDS {
        let o = splitmirror(&[cmd, "--socket", sock.to_str().unwrap()]);
        assert_fails(&o, 1, cmd);
        assert!(
            stderr(&o).contains("cannot reach splitmirror server"),
            "{}",
            stderr(&o)
        );
        let o = splitmirror(&[cmd, "-c", cfg.to_str().unwrap()]);
        assert_fails(&o, 1, cmd);
        assert!(
            stderr(&o).contains(sock.to_str().unwrap()),
            "{}",
            stderr(&o)
        );
    }
}

// ---------------------------------------------------------------------------
// config errors

const BASE: &str = "name: vol0\nprimary: p.img\nsecondary: s.img\nmetadata: m.meta\n";

fn config_with(extra: &str) -> String {
    format!("{BASE}{extra}")
}

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join(format!("cfg-{}.yaml", fastrand::u64(..)));
    std::fs::write(&path, text).unwrap();
    path
}

/// Each bad config, and a word its error message must contain.
fn bad_configs(dir: &Path) -> Vec<(String, PathBuf, &'static str)> {
    let texts: Vec<(&str, String, &str)> = vec![
        ("empty", String::new(), "empty"),
        ("unparsable", "name: [vol0\nprimary: {".into(), "line"),
        ("unknown key", config_with("bogus: 1\n"), "bogus"),
        ("bad name", BASE.replace("vol0", "Vol 0"), "name"),
        (
            "bad suffix",
            config_with("track_size: 128KB\n"),
            "track_size",
        ),
        (
            "unknown suffix",
            config_with("track_size: 128XiB\n"),
            "track_size",
        ),
        (
            "not power of two",
            config_with("track_size: 96KiB\n"),
            "power of two",
        ),
        (
            "track too small",
            config_with("track_size: 2KiB\n"),
            "too small",
        ),
        (
            "track too large",
            config_with("track_size: 32MiB\n"),
            "too large",
        ),
        ("queues 0", config_with("ublk:\n  queues: 0\n"), "CPUs"),
        (
            "depth 0",
            config_with("ublk:\n  depth: 0\n"),
            "out of range",
        ),
        (
            "depth huge",
            config_with("ublk:\n  depth: 100000\n"),
            "ublk limit",
        ),
        (
            "negative rate",
            config_with("restore:\n  rate_limit: -1\n"),
            "negative",
        ),
        ("same device", BASE.replace("s.img", "p.img"), "same path"),
        (
            "missing key",
            "name: vol0\nprimary: p.img\n".into(),
            "secondary",
        ),
    ];
    let mut out: Vec<(String, PathBuf, &str)> = texts
        .into_iter()
        .map(|(what, text, word)| (what.to_string(), write_config(dir, &text), word))
        .collect();
    out.push((
        "missing file".into(),
        dir.join("absent.yaml"),
        "does not exist",
    ));
    out.push(("directory".into(), dir.to_path_buf(), "directory"));
    out
}

#[test]
fn bad_configs_exit_2_for_every_command() {
    let dir = tempfile::tempdir().unwrap();
    for (what, path, word) in bad_configs(dir.path()) {
        for cmd in CONFIG_COMMANDS.iter().chain(&[SET]) {
            let mut args = vec![*cmd, "-c", path.to_str().unwrap()];
            if *cmd == SET {
                args.push("rate_limit=1MiB");
            }
            let o = splitmirror(&args);
            assert_fails(&o, 2, &format!("{cmd} with {what}"));
            assert!(
                stderr(&o).contains(word),
                "{cmd} with {what}: expected {word:?} in {:?}",
                stderr(&o)
            );
        }
    }
}

// ---------------------------------------------------------------------------
// the control socket, against a fake server

/// A stand-in for the server: a state name, a scripted copy, the commands
/// it was sent.
struct Fake {
    status: Mutex<Status>,
    commands: Mutex<Vec<Command>>,
    mismatches: Vec<u64>,
    /// The settings `set` changed, through the server's own rules.
    live: Mutex<Live>,
}

impl Fake {
    fn new(state: VolumeState, mismatches: Vec<u64>) -> Arc<Fake> {
        Arc::new(Fake {
            status: Mutex::new(Status {
                name: "vol0".into(),
                device: Some("/dev/ublkb7".into()),
                primary: "/dev/a".into(),
                secondary: "/dev/b".into(),
                primary_id: "wwid:naa.5000c500a1b2c3d4".into(),
                secondary_id: "serial:S3Z9NB0K".into(),
                state,
                track_size: 128 << 10,
                tracks: 8192,
                changed_since_split: 120,
                restore_pending: 0,
                secondary_stale: 0,
                operation: None,
                errors: vec![],
                read_repairs: 0,
                schema_version: control::STATUS_SCHEMA_VERSION,
                split_time: None,
                split_age_secs: None,
                secondary_missing: false,
                zero_copy: false,
            }),
            commands: Mutex::new(vec![]),
            mismatches,
            live: Mutex::new(Live::of(&Config::new("vol0", "/a", "/b", "/m"))),
        })
    }

    fn named(name: &str, state: VolumeState) -> Arc<Fake> {
        let f = Fake::new(state, vec![]);
        f.status.lock().unwrap().name = name.into();
        f
    }

    /// Starts a fake restore that advances with every status request.
    fn start_restore(&self) {
        let mut st = self.status.lock().unwrap();
        st.state = VolumeState::Restoring;
        st.operation = Some(OperationStatus {
            kind: OperationKind::Restore,
            incremental: false,
            protect: false,
            total: 8192,
            done: 0,
            percent: 0.0,
            bytes_per_sec: 410 << 20,
            eta_secs: Some(3.0),
            paused: false,
            priority: "host".into(),
            copy_depth: 8,
        });
    }
}

impl ControlTarget for Fake {
    fn status(&self) -> Status {
        let mut st = self.status.lock().unwrap();
        let snapshot = st.clone();
        if let Some(op) = st.operation.as_mut().filter(|op| !op.paused) {
            op.done = (op.done + 2048).min(op.total);
            op.percent = 100.0 * op.done as f64 / op.total as f64;
            if op.done == op.total {
                st.operation = None;
                st.state = VolumeState::Established;
            }
        }
        snapshot
    }

    fn command(&self, cmd: Command) -> Result<()> {
        self.commands.lock().unwrap().push(cmd);
        let state = self.status.lock().unwrap().state;
        match (cmd, state) {
            (Command::Split, VolumeState::Established) => {
                self.status.lock().unwrap().state = VolumeState::Split;
                Ok(())
            }
            (Command::Restore { .. }, VolumeState::Split) => {
                self.start_restore();
                Ok(())
            }
            _ => Err(Error::state(format!(
                "cannot {} while the volume is {state}",
                cmd.name()
            ))),
        }
    }

    fn verify(&self) -> Result<VerifyReport> {
        Ok(VerifyReport {
            compared: 8000,
            mismatches: self.mismatches.clone(),
        })
    }

    fn set(&self, settings: &[String]) -> Result<Vec<String>> {
        let mut live = self.live.lock().unwrap();
        let (next, lines) = live::apply(&live, settings, 64)?;
        *live = next;
        Ok(lines)
    }

    /// Degraded with the secondary missing: the same disk is back unless
    /// the fake's secondary id says another one is (then `replace` needed).
    fn attach_secondary(&self, replace: bool) -> Result<String> {
        let mut st = self.status.lock().unwrap();
        if st.state != VolumeState::Degraded {
            return Err(Error::state(format!(
                "attach-secondary is not valid in state {}",
                st.state
            )));
        }
        let other = st.secondary_id.starts_with("serial:OTHER");
        if other && !replace {
            return Err(Error::config(
                "secondary /dev/b is not the volume's secondary; pass --replace",
            ));
        }
        st.secondary_missing = false;
        st.state = VolumeState::Established;
        Ok(format!(
            "attach-secondary: /dev/b {}",
            if other { "replaces" } else { "is back" }
        ))
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn socket_round_trips_and_modes() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("run/splitmirror/vol0.sock");
    let fake = Fake::new(VolumeState::Established, vec![]);
    let server = control::serve(&sock, fake.clone()).unwrap();
    assert_eq!(mode(sock.parent().unwrap()), 0o700);
    assert_eq!(mode(&sock), 0o600);

    let st = client::status(&sock).unwrap();
    assert_eq!(st.name, "vol0");
    assert_eq!(st.state.name(), "established");
    client::command(&sock, Command::Split).unwrap();
    let e = client::command(&sock, Command::Split).unwrap_err();
    assert_eq!(e.exit_code(), 3, "{e}");
    assert!(e
        .to_string()
        .contains("cannot split while the volume is split"));
    let e = client::command(&sock, Command::Establish { full: true }).unwrap_err();
    assert_eq!(e.exit_code(), 3);
    assert_eq!(client::verify(&sock).unwrap().compared, 8000);
    assert_eq!(fake.commands.lock().unwrap().len(), 3);

    server.stop();
    assert!(!sock.exists(), "stop removes the socket");
    assert_eq!(client::status(&sock).unwrap_err().exit_code(), 1);
}

#[test]
fn stale_socket_is_replaced_live_one_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vol0.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists(), "a dead server's socket file");
    let server = control::serve(&sock, Fake::new(VolumeState::Split, vec![])).unwrap();
    assert_eq!(client::status(&sock).unwrap().state.name(), "split");

    let e = control::serve(&sock, Fake::new(VolumeState::Split, vec![]))
        .err()
        .unwrap();
    assert_eq!(e.exit_code(), 1);
    assert!(e.to_string().contains("another splitmirror server"), "{e}");
    assert!(e.to_string().contains("vol0"), "{e}");
    assert_eq!(
        client::status(&sock).unwrap().name,
        "vol0",
        "first server unharmed"
    );

    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    assert!(control::serve(&file, Fake::new(VolumeState::Split, vec![])).is_err());
    assert!(file.exists(), "a non-socket is never removed");
    drop(server);
}

/// Sends raw bytes, half-closes, and returns the response line (if any).
fn raw_exchange(sock: &Path, bytes: &[u8]) -> Option<serde_json::Value> {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).ok()?;
    serde_json::from_str(&line).ok()
}

#[track_caller]
fn assert_rejected(reply: Option<serde_json::Value>, what: &str) {
    if let Some(v) = reply {
        assert_eq!(v["ok"], false, "{what}: {v}");
        assert_eq!(v["code"], 2, "{what}: {v}");
        assert!(
            v["error"].as_str().unwrap().contains("request"),
            "{what}: {v}"
        );
    }
}

#[test]
fn garbage_never_hurts_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vol0.sock");
    let _server = control::serve(&sock, Fake::new(VolumeState::Established, vec![])).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("newline", b"\n".to_vec()),
        ("binary", (0..=255u8).collect()),
        ("not json", b"status please\n".to_vec()),
        ("truncated", b"{\"op\":\"sta".to_vec()),
        ("unknown op", b"{\"op\":\"reboot\"}\n".to_vec()),
        (
            "bad command",
            b"{\"op\":\"command\",\"command\":{\"command\":\"wipe\"}}\n".to_vec(),
        ),
        ("oversized", vec![b'x'; 200 << 10]),
        (
            "oversized json",
            format!(
                "{{\"op\":\"status\",\"pad\":\"{}\"}}\n",
                "y".repeat(100 << 10)
            )
            .into_bytes(),
        ),
    ];
    for (what, bytes) in cases {
        let reply = raw_exchange(&sock, &bytes);
        if what != "oversized" {
            assert!(reply.is_some(), "{what}: the server answers");
        }
        assert_rejected(reply, what);
        assert_eq!(
            client::status(&sock).unwrap().name,
            "vol0",
            "alive after {what}"
        );
    }
    let ok = raw_exchange(&sock, b"{\"op\":\"status\"}").expect("no newline needed at EOF");
    assert_eq!(ok["ok"], true);
}

#[test]
fn a_stalled_peer_does_not_block_others() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vol0.sock");
    let _server = control::serve(&sock, Fake::new(VolumeState::Established, vec![])).unwrap();
    let mut stalled = UnixStream::connect(&sock).unwrap();
    stalled.write_all(b"{\"op\":").unwrap();
    let t = Instant::now();
    assert_eq!(client::status(&sock).unwrap().state.name(), "established");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "answered while another peer stalls"
    );
    // The stalled peer is dropped after the server's read timeout.
    stalled
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut rest = String::new();
    let _ = stalled.read_to_string(&mut rest);
    assert!(rest.contains("\"ok\":false"), "{rest}");
}

// ---------------------------------------------------------------------------
// the binary against the fake server

#[test]
fn cli_against_fake_server() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vol0.sock");
    let s = sock.to_str().unwrap();
    let fake = Fake::new(VolumeState::Established, vec![]);
    let _server = control::serve(&sock, fake.clone()).unwrap();

    let o = splitmirror(&["status", "--socket", s]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("128 KiB"), "{}", stdout(&o));
    assert!(stdout(&o).contains("/dev/ublkb7"), "{}", stdout(&o));

    let o = splitmirror(&["status", "--json", "--socket", s]);
    let st: Status = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(st.state.name(), "established");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["operation"].is_null());

    assert_fails(
        &splitmirror(&["restore", "--socket", s]),
        3,
        "restore while established",
    );
    let o = splitmirror(&["split", "--socket", s]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_fails(&splitmirror(&["split", "--socket", s]), 3, "split twice");

    let o = splitmirror(&["restore", "--wait", "--timeout", "30", "--socket", s]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("vol0: established"), "{}", stdout(&o));
    assert_eq!(
        fake.commands.lock().unwrap().last(),
        Some(&Command::Restore {
            incremental: false,
            protect: false
        })
    );

    let o = splitmirror(&["verify", "--socket", s]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("compared: 8000"), "{}", stdout(&o));
}

#[test]
fn wait_times_out_and_verify_mismatch_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vol0.sock");
    let s = sock.to_str().unwrap();
    let fake = Fake::new(VolumeState::Syncing, vec![3, 9]);
    let _server = control::serve(&sock, fake).unwrap();
    // "syncing" without an operation that ever ends: wait must give up.
    let o = splitmirror(&["wait", "--timeout", "0.5", "--socket", s]);
    assert_fails(&o, 1, "wait timeout");
    assert!(stderr(&o).contains("timed out"), "{}", stderr(&o));

    let o = splitmirror(&["verify", "--socket", s]);
    assert_fails(&o, 1, "verify mismatch");
    assert!(stdout(&o).contains("3 9"), "{}", stdout(&o));

    let o = splitmirror(&["verify", "--json", "--socket", s]);
    assert_fails(&o, 1, "verify --json mismatch");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["compared"], 8000);
    assert_eq!(v["mismatches"], serde_json::json!([3, 9]));
    assert_eq!(v["schema_version"], control::STATUS_SCHEMA_VERSION);
}

// ---------------------------------------------------------------------------
// the host's volumes, live settings, completions and man pages

/// A config directory with: vol0 (running, split 125 s ago), vol1 (not
/// running), broken.yaml (invalid), example.yaml (skipped); and a server
/// in the run directory that no config names (orphan).
struct Host {
    dir: tempfile::TempDir,
    _servers: Vec<control::ControlServer>,
}

impl Host {
    fn new() -> Host {
        let dir = tempfile::tempdir().unwrap();
        let (etc, run) = (dir.path().join("etc"), dir.path().join("run"));
        std::fs::create_dir_all(&etc).unwrap();
        let cfg = |name: &str| {
            format!(
                "name: {name}\nprimary: /dev/{name}-p\nsecondary: /dev/{name}-s\nmetadata: /var/{name}.meta\n\
                 control:\n  socket: {}/{name}.sock\n",
                run.display()
            )
        };
        for name in ["vol0", "vol1"] {
            std::fs::write(etc.join(format!("{name}.yaml")), cfg(name)).unwrap();
        }
        std::fs::write(etc.join("example.yaml"), cfg("example")).unwrap();
        std::fs::write(etc.join("broken.yaml"), "name: Broken!\n").unwrap();
        let vol0 = Fake::named("vol0", VolumeState::Split);
        {
            let mut st = vol0.status.lock().unwrap();
            st.split_time = Some(1_764_487_200);
            st.split_age_secs = Some(125);
        }
        let orphan = Fake::named("orphan", VolumeState::Restoring);
        orphan.start_restore();
        let servers = vec![
            control::serve(&run.join("vol0.sock"), vol0).unwrap(),
            control::serve(&run.join("orphan.sock"), orphan).unwrap(),
        ];
        Host {
            dir,
            _servers: servers,
        }
    }

    /// Runs the binary with the run directory pointed here.
    fn run(&self, args: &[&str], config_dir_env: bool) -> Output {
        let mut cmd = std::process::Command::new(BIN);
        cmd.args(args)
            .env_remove("RUST_LOG")
            .env("SPLITMIRROR_RUN_DIR", self.dir.path().join("run"));
        if config_dir_env {
            cmd.env("SPLITMIRROR_CONFIG_DIR", self.etc());
        } else {
            cmd.env_remove("SPLITMIRROR_CONFIG_DIR");
        }
        cmd.output().unwrap()
    }

    fn etc(&self) -> PathBuf {
        self.dir.path().join("etc")
    }
}

#[test]
fn list_shows_every_volume_on_the_host() {
    let host = Host::new();
    let etc = host.etc();
    let o = host.run(&["list", "--config-dir", etc.to_str().unwrap()], false);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 5, "header + 4 volumes: {out}");
    assert!(lines[0].starts_with("NAME"), "{out}");
    let line = |name: &str| {
        *lines
            .iter()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("{name} missing: {out}"))
    };
    let vol0 = line("vol0");
    for want in ["/dev/ublkb7", "split", "2m05s", "vol0.yaml"] {
        assert!(vol0.contains(want), "{want} not in {vol0:?}");
    }
    assert!(line("vol1").contains("stopped"), "{out}");
    assert!(line("broken").contains("invalid"), "{out}");
    assert!(line("orphan").contains("restore"), "{out}");
    assert!(
        !out.contains("example"),
        "example.yaml is not a volume: {out}"
    );

    // The environment names the directory as well; JSON carries the facts.
    let o = host.run(&["list", "--json"], true);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["schema_version"], control::STATUS_SCHEMA_VERSION);
    let vols = v["volumes"].as_array().unwrap();
    assert_eq!(vols.len(), 4, "{v}");
    let by = |n: &str| vols.iter().find(|x| x["name"] == n).unwrap().clone();
    assert_eq!(by("vol0")["state"], "split");
    assert_eq!(by("vol0")["running"], true);
    assert_eq!(by("vol0")["split_age_secs"], 125);
    assert_eq!(by("vol0")["device_link"], "/dev/splitmirror/vol0");
    assert_eq!(by("vol1")["state"], "stopped");
    assert_eq!(by("vol1")["running"], false);
    assert_eq!(by("broken")["state"], "invalid");
    assert!(
        by("broken")["errors"][0].as_str().unwrap().contains("name"),
        "{v}"
    );
    assert_eq!(by("orphan")["config"], serde_json::Value::Null);
    assert_eq!(by("orphan")["operation"], "restore");

    // Without configs, the running servers are still found by their sockets.
    let o = host.run(&["list", "--config-dir", "/nonexistent/dir"], false);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o).lines().count(), 3, "{}", stdout(&o));
}

#[test]
fn status_all_shows_every_volume() {
    let host = Host::new();
    let o = host.run(&["status", "--all"], true);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("Split Time : 2025-11-30T07:20:00Z (2m05s ago)"),
        "{out}"
    );
    assert!(out.contains("State : stopped"), "{out}");
    assert!(out.contains("restore (full)"), "{out}");
    let o = host.run(&["status", "--all", "--json"], true);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let vols = v["volumes"].as_array().unwrap();
    assert_eq!(vols.len(), 4, "{v}");
    let vol0 = vols.iter().find(|x| x["name"] == "vol0").unwrap();
    assert_eq!(vol0["status"]["split_time"], 1_764_487_200u64);
    assert_eq!(
        vol0["status"]["schema_version"],
        control::STATUS_SCHEMA_VERSION
    );
    // --all excludes one volume's target, and --config-dir needs --all.
    assert_fails(
        &host.run(&["status", "--all", "--socket", "/x.sock"], true),
        2,
        "--all with --socket",
    );
    assert_fails(
        &host.run(
            &["status", "--config-dir", "/x", "--socket", "/x.sock"],
            true,
        ),
        2,
        "--config-dir without --all",
    );
}

#[test]
fn set_changes_settings_through_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vol0.sock");
    let s = sock.to_str().unwrap();
    let fake = Fake::new(VolumeState::Restoring, vec![]);
    let _server = control::serve(&sock, fake.clone()).unwrap();
    let o = splitmirror(&[
        SET,
        "--socket",
        s,
        "rate_limit=200MiB",
        "restore.on_error=skip",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "set restore.rate_limit=200MiB\nset restore.on_error=skip\n"
    );
    assert_eq!(fake.live.lock().unwrap().restore.rate_limit, 200 << 20);
    // A bad value or a key that needs a restart: exit 2, nothing changed.
    for bad in [
        "rate_limit=fast",
        "ublk.depth=4",
        "max_inflight=1000",
        "nonsense",
    ] {
        let o = splitmirror(&[SET, "--socket", s, "batch=8", bad]);
        assert_fails(&o, 2, bad);
    }
    assert_eq!(
        fake.live.lock().unwrap().restore.batch,
        32,
        "all or nothing"
    );
    assert_fails(
        &splitmirror(&[SET, "--socket", s]),
        2,
        "set without settings",
    );
}

#[test]
fn completions_and_man_pages_come_from_the_cli() {
    let o = splitmirror(&["completions", "bash"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    for word in [
        "splitmirror",
        "restore",
        "--incremental",
        "list",
        "--config-dir",
    ] {
        assert!(out.contains(word), "bash completion lacks {word}");
    }
    assert_fails(&splitmirror(&["completions", "tcsh"]), 2, "unknown shell");
    let dir = tempfile::tempdir().unwrap();
    let man = dir.path().join("man1");
    let o = splitmirror(&["man", man.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let page = std::fs::read_to_string(man.join("splitmirror.1")).unwrap();
    assert!(page.contains(".TH splitmirror"), "{page}");
    let restore = std::fs::read_to_string(man.join("splitmirror-restore.1")).unwrap();
    assert!(restore.contains("incremental"), "{restore}");
    assert!(
        !man.join("splitmirror-man.1").exists(),
        "the hidden command has no page"
    );
}

/// Root runs the tests in CI; the checks need a second, unprivileged user.
fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[test]
fn other_users_are_refused() {
    use std::os::unix::process::CommandExt;
    if !is_root() {
        // Not silently green: without root this check fails unless the
        // run opts out of it by name, with a reason that is printed.
        match std::env::var("SPLITMIRROR_SKIP_ROOT_TESTS") {
            Ok(why) if !why.is_empty() => {
                eprintln!("other_users_are_refused SKIPPED on request: {why}");
                return;
            }
            _ => panic!(
                "other_users_are_refused needs root (a client as another user); \
                 run as root or set SPLITMIRROR_SKIP_ROOT_TESTS=reason"
            ),
        }
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = dir.path().join("vol0.sock");
    let _server = control::serve(&sock, Fake::new(VolumeState::Established, vec![])).unwrap();
    let as_nobody = || {
        std::process::Command::new(BIN)
            .args(["status", "--socket", sock.to_str().unwrap()])
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    };
    let o = as_nobody();
    assert_fails(&o, 1, "socket mode refuses nobody");
    assert!(stderr(&o).contains("run as root"), "{}", stderr(&o));

    // Even with the mode opened up, the peer check refuses.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let o = as_nobody();
    assert_fails(&o, 1, "peer check refuses nobody");
    assert!(stderr(&o).contains("permission denied"), "{}", stderr(&o));
}

#[test]
fn wait_gives_up_on_a_paused_copy() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vol0.sock");
    let fake = Fake::new(VolumeState::Restoring, vec![]);
    fake.status.lock().unwrap().errors = vec!["read error on track 12".into()];
    let _server = control::serve(&sock, fake).unwrap();
    let o = splitmirror(&[
        "wait",
        "--timeout",
        "30",
        "--socket",
        sock.to_str().unwrap(),
    ]);
    assert_fails(&o, 1, "paused copy");
    assert!(stderr(&o).contains("track 12"), "{}", stderr(&o));
}

#[test]
fn wait_gives_up_on_a_restore_paused_by_a_read_error() {
    // The real server's case: the restore operation still exists, copying
    // is paused and retried now and then.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vol0.sock");
    let fake = Fake::new(VolumeState::Restoring, vec![]);
    fake.start_restore();
    {
        let mut st = fake.status.lock().unwrap();
        st.operation.as_mut().unwrap().paused = true;
        st.errors = vec!["copy paused: track 77: Input/output error".into()];
    }
    let _server = control::serve(&sock, fake).unwrap();
    let o = splitmirror(&["wait", "--socket", sock.to_str().unwrap()]);
    assert_fails(&o, 1, "paused restore");
    let err = stderr(&o);
    assert!(err.contains("track 77") && err.contains("retries"), "{err}");
    let o = splitmirror(&["status", "--socket", sock.to_str().unwrap()]);
    assert!(
        stdout(&o).contains("paused by a read error"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn attach_secondary_through_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vol0.sock");
    let s = sock.to_str().unwrap();
    let fake = Fake::new(VolumeState::Established, vec![]);
    let _server = control::serve(&sock, fake.clone()).unwrap();
    assert_fails(
        &splitmirror(&["attach-secondary", "--socket", s]),
        3,
        "attach while established",
    );
    {
        let mut st = fake.status.lock().unwrap();
        st.state = VolumeState::Degraded;
        st.secondary_missing = true;
        st.secondary_id = "serial:OTHER".into();
    }
    let o = splitmirror(&["status", "--socket", s]);
    assert!(stdout(&o).contains("/dev/b (missing)"), "{}", stdout(&o));
    let o = splitmirror(&["status", "--json", "--socket", s]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["secondary_missing"], true);
    let o = splitmirror(&["attach-secondary", "--socket", s]);
    assert_fails(&o, 2, "another disk without --replace");
    assert!(stderr(&o).contains("--replace"), "{}", stderr(&o));
    let o = splitmirror(&["attach-secondary", "--replace", "--wait", "--socket", s]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("attach-secondary: /dev/b replaces"),
        "{}",
        stdout(&o)
    );
    assert_eq!(fake.status.lock().unwrap().state, VolumeState::Established);
}
