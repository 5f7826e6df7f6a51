//! The volume's config file (docs/interface.md), parsed and checked.
//!
//! A typo in this file must never turn into data loss, so everything here is
//! strict: unknown keys are errors, every value is range-checked, and every
//! error is one line naming the key, the bad value and what to write instead.
//!
//! Checks that concern one value run while the YAML is parsed, so their
//! errors carry the line and column; [`Config::validate`] runs all of them
//! again (plus the checks that relate two values) for configs built in code.
//! Nothing here touches a device: [`crate::backend::device::check_layout`] does that.
//!
//! This file owns the config's types, their defaults and `Config::load` /
//! `Config::parse` (reading the file and turning serde's errors into ours).
//! Sizes and the serde deserializers are in `parse.rs`; every check of a
//! value, and `Config::validate`, in `check.rs`.
//!
//! # Paths
//!
//! Relative device, metadata and socket paths are taken relative to the
//! directory of the config file, not the current directory, so a config means
//! the same thing whether it is used from a shell, systemd or a test.

mod check;
mod parse;

pub use check::nr_cpus;
pub use parse::{format_size, parse_size};

use parse::{
    de_batch, de_depth, de_listen, de_max_inflight, de_max_io, de_name, de_path, de_path_or_empty,
    de_queues, de_section, de_size, de_track_size, de_ublk_id,
};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::Error;

/// The keys of each section, for the "valid keys are" hint of an error.
const TOP_KEYS: &str =
    "name, primary, secondary, metadata, track_size, ublk, restore, control, metrics";

/// The largest `ublk.depth`: ublk's tag field holds 4096 requests per queue
/// (`UBLK_MAX_QUEUE_DEPTH` in ublk_cmd.h).
pub const MAX_DEPTH: u32 = 4096;
/// The largest `ublk.max_io`: ublk addresses one request's buffer with 25
/// bits (`UBLK_IO_BUF_BITS`), and libublk refuses more (`MAX_BUF_SZ`).
pub const MAX_IO_LIMIT: u64 = 32 << 20;
/// `ublk.max_io` must be whole pages: libublk checks `io_buf_bytes` against
/// the page size, and 4096 is the page size the project supports.
pub const MAX_IO_ALIGN: u64 = 4096;
/// The largest explicit `ublk.id`: the kernel numbers ublk devices with one
/// minor number each (`UBLK_MINORS` = 2^20).
pub const MAX_UBLK_ID: i64 = (1 << 20) - 1;
/// Upper bound for `restore.batch` and `restore.max_inflight`: more tracks
/// than this in flight only costs memory (each holds a track-sized buffer).
pub const MAX_COPY_TRACKS: u32 = 4096;

/// The longest volume name: it becomes part of socket and log names.
pub const MAX_NAME_LEN: usize = 32;

/// A parsed and checked config. Paths are as written, except that relative
/// ones are resolved against the config file's directory by [`Config::load`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(deserialize_with = "de_name")]
    pub name: String,
    #[serde(deserialize_with = "de_path")]
    pub primary: PathBuf,
    #[serde(deserialize_with = "de_path")]
    pub secondary: PathBuf,
    #[serde(deserialize_with = "de_path")]
    pub metadata: PathBuf,
    /// Bytes; a power of two in `MIN_TRACK_SIZE..=MAX_TRACK_SIZE`.
    #[serde(default = "default_track_size", deserialize_with = "de_track_size")]
    pub track_size: u64,
    /// What `run` does when the secondary is absent or cannot be opened.
    #[serde(default)]
    pub secondary_missing: SecondaryMissing,
    #[serde(default, deserialize_with = "de_section")]
    pub ublk: UblkConfig,
    #[serde(default, deserialize_with = "de_section")]
    pub restore: RestoreConfig,
    #[serde(default, deserialize_with = "de_section")]
    pub control: ControlConfig,
    #[serde(default, deserialize_with = "de_section")]
    pub metrics: MetricsConfig,
    #[serde(default, deserialize_with = "de_section")]
    pub events: EventsConfig,
    /// The file this config was read from ([`Config::load`]), for SIGHUP.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// How the ublk block device is created.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UblkConfig {
    /// `-1`: the kernel picks the number N of `/dev/ublkbN`.
    #[serde(deserialize_with = "de_ublk_id")]
    pub id: i32,
    #[serde(deserialize_with = "de_queues")]
    pub queues: u32,
    #[serde(deserialize_with = "de_depth")]
    pub depth: u32,
    /// Bytes per host request; a multiple of 4096 up to [`MAX_IO_LIMIT`].
    #[serde(deserialize_with = "de_max_io")]
    pub max_io: u32,
    pub zero_copy: ZeroCopy,
}

/// Whether host data stays in the kernel's pages (`ublk.zero_copy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ZeroCopy {
    /// Zero copy when the driver offers automatic buffer registration
    /// (`UBLK_F_AUTO_BUF_REG`, Linux 6.16 and later); copies otherwise.
    #[default]
    Auto,
    /// The kernel copies every request's bytes to and from the server.
    Off,
}

/// How copies run: restore, and also establish and resync.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RestoreConfig {
    /// Tracks per io_uring submission batch.
    #[serde(deserialize_with = "de_batch")]
    pub batch: u32,
    /// Tracks being copied at once.
    #[serde(deserialize_with = "de_max_inflight")]
    pub max_inflight: u32,
    /// Bytes per second; 0 means unlimited.
    #[serde(deserialize_with = "de_size")]
    pub rate_limit: u64,
    pub on_error: OnError,
    /// Who comes first while a copy runs: the host's I/O or the copy.
    pub priority: RestorePriority,
}

/// The balance between host I/O and a running copy (`restore.priority`).
/// The copy engine measures host latency and adapts how much it copies at
/// once; this sets how much host latency it accepts (see
/// `exec::pace::PaceConfig::for_priority`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RestorePriority {
    /// Host I/O stays near its idle latency; the copy takes what is left
    /// (never less than a floor, so a copy under constant load still ends).
    #[default]
    Host,
    /// Host latency may grow to about three times idle; the copy keeps a
    /// larger floor.
    Balanced,
    /// The copy runs at full depth whatever the host does.
    Restore,
}

impl RestorePriority {
    pub fn name(self) -> &'static str {
        match self {
            RestorePriority::Host => "host",
            RestorePriority::Balanced => "balanced",
            RestorePriority::Restore => "restore",
        }
    }
}

/// What a read error during a copy does (the one definition: the copy
/// engine uses it as is).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Stop the operation; host reads of the failing range get EIO.
    #[default]
    Pause,
    /// Leave the track as it is, list it, and go on.
    Skip,
}

/// What `run` does when the secondary is absent or cannot be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SecondaryMissing {
    /// Refuse to start (exit 2), naming the path.
    #[default]
    Error,
    /// Start `degraded` on the primary alone; `attach-secondary` later.
    Degraded,
}

/// Where the control socket lives.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    /// Empty only between parsing and [`Config::load`] / [`Config::new`],
    /// which put `/run/splitmirror/NAME.sock` there.
    #[serde(deserialize_with = "de_path")]
    pub socket: PathBuf,
}

/// Prometheus metrics over HTTP; off unless `listen` is set.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `ADDR:PORT` to serve `/metrics` on, e.g. `127.0.0.1:9477`; empty = off.
    #[serde(deserialize_with = "de_listen")]
    pub listen: String,
}

/// A program run on every event (state change, degraded, device error,
/// operation end), like mdadm's `--program`; off unless set.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Executable path; empty = off. The facts are in its environment.
    #[serde(deserialize_with = "de_path_or_empty")]
    pub program: PathBuf,
}

impl Default for UblkConfig {
    fn default() -> Self {
        UblkConfig {
            id: -1,
            queues: 1,
            depth: 128,
            max_io: 512 << 10,
            zero_copy: ZeroCopy::Auto,
        }
    }
}

impl Default for RestoreConfig {
    fn default() -> Self {
        RestoreConfig {
            batch: 32,
            max_inflight: 64,
            rate_limit: 0,
            on_error: OnError::Pause,
            priority: RestorePriority::Host,
        }
    }
}

/// `track_size` when the config names none.
pub const DEFAULT_TRACK_SIZE: u64 = 128 << 10;

fn default_track_size() -> u64 {
    DEFAULT_TRACK_SIZE
}

/// The socket a config without `control.socket` uses.
pub fn default_socket(name: &str) -> PathBuf {
    PathBuf::from(format!("/run/splitmirror/{name}.sock"))
}

impl Config {
    /// A config with every optional value at its default, for code and tests
    /// that build configs without a file. Not validated.
    pub fn new(
        name: impl Into<String>,
        primary: impl Into<PathBuf>,
        secondary: impl Into<PathBuf>,
        metadata: impl Into<PathBuf>,
    ) -> Config {
        let name = name.into();
        Config {
            control: ControlConfig {
                socket: default_socket(&name),
            },
            name,
            primary: primary.into(),
            secondary: secondary.into(),
            metadata: metadata.into(),
            track_size: default_track_size(),
            secondary_missing: SecondaryMissing::default(),
            ublk: UblkConfig::default(),
            restore: RestoreConfig::default(),
            metrics: MetricsConfig::default(),
            events: EventsConfig::default(),
            source: None,
        }
    }

    /// Reads, parses and validates the config file at `path`. Every failure
    /// is an [`Error::Config`] (exit 2) whose one line names the file.
    pub fn load(path: &Path) -> Result<Config, Error> {
        let text = read_config_text(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut cfg = Config::parse(&text, base).map_err(|e| prefix_error(path, e))?;
        cfg.source = Some(path.to_path_buf());
        Ok(cfg)
    }

    /// Parses and validates YAML text; relative paths are resolved against
    /// `base_dir`. Errors are not prefixed with a file name.
    pub fn parse(text: &str, base_dir: &Path) -> Result<Config, Error> {
        reject_empty(text)?;
        let mut cfg: Config = serde_yaml_ng::from_str(text).map_err(yaml_error)?;
        cfg.fill_defaults();
        cfg.resolve_paths(base_dir);
        cfg.validate()?;
        Ok(cfg)
    }

    /// The socket clients connect to: from the config, or the default.
    pub fn socket_path(&self) -> PathBuf {
        if self.control.socket.as_os_str().is_empty() {
            default_socket(&self.name)
        } else {
            self.control.socket.clone()
        }
    }

    /// Where a running server records its ublk device's id, so that the
    /// next `run` after a crash recovers that device.
    pub fn ublk_id_path(&self) -> PathBuf {
        PathBuf::from(format!("/run/splitmirror/{}.ublk-id", self.name))
    }

    fn fill_defaults(&mut self) {
        self.control.socket = self.socket_path();
    }

    fn resolve_paths(&mut self, base: &Path) {
        for p in [
            &mut self.primary,
            &mut self.secondary,
            &mut self.metadata,
            &mut self.control.socket,
            &mut self.events.program,
        ] {
            if p.is_relative() && !p.as_os_str().is_empty() {
                *p = base.join(&*p);
            }
        }
    }
}

/// Turns "what is wrong" into "which file, what is wrong".
fn prefix_error(path: &Path, e: Error) -> Error {
    match e {
        Error::Config(msg) if msg.starts_with("line ") => {
            Error::config(format!("config {} {msg}", path.display()))
        }
        Error::Config(msg) => Error::config(format!("config {}: {msg}", path.display())),
        other => other,
    }
}

/// Reads the file, turning each way it can be unreadable into its own
/// message, since "No such file or directory" alone names neither the file
/// nor the fix.
fn read_config_text(path: &Path) -> Result<String, Error> {
    let shown = path.display();
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::config(format!(
                "config file {shown} does not exist; create it or pass the right path with -c"
            )))
        }
        Err(e) => {
            return Err(Error::config(format!(
                "cannot read config file {shown}: {e}; check its path and permissions"
            )))
        }
        Ok(m) if m.is_dir() => {
            return Err(Error::config(format!(
                "config path {shown} is a directory; pass the YAML file inside it, e.g. {}",
                path.join("NAME.yaml").display()
            )))
        }
        Ok(_) => {}
    }
    let bytes = std::fs::read(path).map_err(|e| {
        Error::config(format!(
            "cannot read config file {shown}: {e}; check its permissions"
        ))
    })?;
    String::from_utf8(bytes).map_err(|_| {
        Error::config(format!(
            "config file {shown} is not UTF-8 text; is it the right file?"
        ))
    })
}

/// An empty file would otherwise surface as serde's "EOF while parsing",
/// which does not tell the user what the file should contain.
fn reject_empty(text: &str) -> Result<(), Error> {
    let only_comments = text
        .lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#') || l.trim() == "---");
    if only_comments {
        return Err(Error::config(
            "the file is empty; it needs at least name, primary, secondary and metadata",
        ));
    }
    Ok(())
}

/// Rewrites a serde_yaml_ng error as "line L column C: what; what to do".
fn yaml_error(e: serde_yaml_ng::Error) -> Error {
    let full = e.to_string();
    let (msg, place) = match e.location() {
        Some(loc) => {
            let suffix = format!(" at line {} column {}", loc.line(), loc.column());
            match full.strip_suffix(&suffix) {
                Some(m) => (
                    m.to_string(),
                    format!("line {} column {}: ", loc.line(), loc.column()),
                ),
                // A libyaml syntax error carries its own positions inside.
                None => (full.clone(), String::new()),
            }
        }
        None => (full.clone(), String::new()),
    };
    Error::config(format!("{place}{}", with_hint(&msg)))
}

/// Adds the "what to do" half to serde's messages, which only say what is
/// wrong. Our own messages already end with a hint and pass unchanged.
fn with_hint(msg: &str) -> String {
    let msg = msg.replace('\n', " ");
    if msg.contains("unknown field") {
        let msg = msg.replace("expected one of", "valid keys are");
        let msg = msg.replace("expected ", "the only valid key is ");
        return format!("{msg}; remove the key or correct its spelling");
    }
    if msg.contains("unknown variant") {
        return format!("{msg}; use one of the listed values");
    }
    if let Some(rest) = msg.strip_prefix("missing field ") {
        return format!("required key {rest} is missing; add it");
    }
    if msg.contains("missing field") {
        return format!("{msg}; add the key");
    }
    if msg.contains("invalid type: map, expected") || msg.contains("expected struct Config") {
        return format!("{msg}; the file must be a YAML mapping with the keys {TOP_KEYS}");
    }
    if msg.contains("; ") {
        return msg;
    }
    if msg.contains("invalid type") || msg.contains("invalid value") {
        return format!("{msg}; fix the value");
    }
    format!("{msg}; fix the YAML syntax there")
}
