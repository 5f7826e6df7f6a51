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
//! # Sizes
//!
//! A size is a plain integer (bytes) or a string: digits, optional spaces,
//! then a suffix. Suffixes are binary and case-insensitive: `B`, `K`/`KiB`,
//! `M`/`MiB`, `G`/`GiB`, `T`/`TiB`. Decimal-looking suffixes (`KB`, `MB`,
//! `GB`, `TB`) are refused because half of all readers take them as powers
//! of ten: an ambiguous size is rejected rather than guessed. Negative,
//! fractional and overflowing sizes are errors.
//!
//! # Paths
//!
//! Relative device, metadata and socket paths are taken relative to the
//! directory of the config file, not the current directory, so a config means
//! the same thing whether it is used from a shell, systemd or a test.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use crate::core::geometry::{MAX_TRACK_SIZE, MIN_TRACK_SIZE};
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
        }
    }
}

fn default_track_size() -> u64 {
    128 << 10
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

    /// Checks every value and the relations between them, without touching
    /// any device. Configs from [`Config::parse`] have passed this already.
    pub fn validate(&self) -> Result<(), Error> {
        check_name(&self.name).map_err(at("name"))?;
        check_path(&self.primary).map_err(at("primary"))?;
        check_path(&self.secondary).map_err(at("secondary"))?;
        check_path(&self.metadata).map_err(at("metadata"))?;
        check_path(&self.control.socket).map_err(at("control.socket"))?;
        check_track_size(self.track_size).map_err(at("track_size"))?;
        check_ublk_id(self.ublk.id.into()).map_err(at("ublk.id"))?;
        check_queues(self.ublk.queues.into()).map_err(at("ublk.queues"))?;
        check_depth(self.ublk.depth.into()).map_err(at("ublk.depth"))?;
        check_max_io(self.ublk.max_io.into()).map_err(at("ublk.max_io"))?;
        check_copy_tracks(self.restore.batch.into()).map_err(at("restore.batch"))?;
        check_copy_tracks(self.restore.max_inflight.into()).map_err(at("restore.max_inflight"))?;
        self.check_batch_fits_inflight()?;
        self.check_paths_distinct()
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

    /// A batch larger than the tracks allowed in flight could never be
    /// submitted whole; the user most likely swapped the two values.
    fn check_batch_fits_inflight(&self) -> Result<(), Error> {
        let r = &self.restore;
        if r.batch > r.max_inflight {
            return Err(Error::config(format!(
                "restore.batch ({}) is larger than restore.max_inflight ({}); \
                 set batch to at most max_inflight",
                r.batch, r.max_inflight
            )));
        }
        Ok(())
    }

    /// Catches the same path written twice before any device is looked at;
    /// [`crate::backend::device::check_layout`] catches the subtler aliases (symlinks,
    /// two nodes of one device) by identity.
    fn check_paths_distinct(&self) -> Result<(), Error> {
        let named = [
            ("primary", &self.primary),
            ("secondary", &self.secondary),
            ("metadata", &self.metadata),
        ];
        for (i, (ka, pa)) in named.iter().enumerate() {
            for (kb, pb) in &named[i + 1..] {
                if pa == pb {
                    return Err(Error::config(format!(
                        "{ka} and {kb} are the same path {}; each must be a different device or file",
                        pa.display()
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Names the key in a one-value check's message.
fn at(key: &'static str) -> impl Fn(String) -> Error {
    move |msg| Error::config(format!("{key}: {msg}"))
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

// ---------------------------------------------------------------------------
// Single-value checks. Each returns "what is wrong; what to do" without the
// key name, which the caller (serde's path, or `validate`) puts in front.

fn check_name(name: &str) -> Result<(), String> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if name.is_empty() || name.len() > MAX_NAME_LEN || !ok_chars {
        return Err(format!(
            "{name:?} is not a valid volume name; use 1 to {MAX_NAME_LEN} characters \
             from a-z, 0-9, '_' and '-' (e.g. vol0)"
        ));
    }
    Ok(())
}

fn check_path(path: &Path) -> Result<(), String> {
    let s = path.as_os_str().as_encoded_bytes();
    if s.is_empty() {
        return Err("the path is empty; give the path of a file or block device".into());
    }
    if s.contains(&0) {
        return Err("the path contains a NUL byte; remove it".into());
    }
    Ok(())
}

fn check_track_size(v: u64) -> Result<(), String> {
    let range = format!(
        "use a power of two from {} to {}, e.g. 128KiB",
        format_size(MIN_TRACK_SIZE),
        format_size(MAX_TRACK_SIZE)
    );
    if v < MIN_TRACK_SIZE {
        return Err(format!("{} is too small; {range}", format_size(v)));
    }
    if v > MAX_TRACK_SIZE {
        return Err(format!("{} is too large; {range}", format_size(v)));
    }
    if !v.is_power_of_two() {
        return Err(format!("{} is not a power of two; {range}", format_size(v)));
    }
    Ok(())
}

fn check_ublk_id(v: i64) -> Result<(), String> {
    if !(-1..=MAX_UBLK_ID).contains(&v) {
        return Err(format!(
            "{v} is out of range; use -1 (the kernel picks) or a device number 0..={MAX_UBLK_ID}"
        ));
    }
    Ok(())
}

/// The number of CPUs the system has online: ublk runs one queue per CPU at
/// most, and extra queues would only sit idle.
pub fn nr_cpus() -> u32 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    u32::try_from(n).ok().filter(|&n| n > 0).unwrap_or(1)
}

fn check_queues(v: i64) -> Result<(), String> {
    let cpus = nr_cpus();
    if v < 1 || v > i64::from(cpus) {
        return Err(format!(
            "{v} is out of range; use 1 to {cpus} (the number of CPUs online)"
        ));
    }
    Ok(())
}

fn check_depth(v: i64) -> Result<(), String> {
    if v < 1 || v > i64::from(MAX_DEPTH) {
        return Err(format!(
            "{v} is out of range; use 1 to {MAX_DEPTH} (the ublk limit), e.g. 128"
        ));
    }
    Ok(())
}

fn check_max_io(v: u64) -> Result<(), String> {
    if !(MAX_IO_ALIGN..=MAX_IO_LIMIT).contains(&v) || !v.is_multiple_of(MAX_IO_ALIGN) {
        return Err(format!(
            "{} is not allowed; use a multiple of 4KiB from 4KiB to {} (the ublk limit), e.g. 512KiB",
            format_size(v),
            format_size(MAX_IO_LIMIT)
        ));
    }
    Ok(())
}

fn check_copy_tracks(v: i64) -> Result<(), String> {
    if v < 1 || v > i64::from(MAX_COPY_TRACKS) {
        return Err(format!(
            "{v} is out of range; use 1 to {MAX_COPY_TRACKS} tracks"
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Sizes.

/// Parses a size string: digits, optional spaces, optional binary suffix
/// (see the module docs). The error says what is wrong and what to write.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, rest) = t.split_at(digits_end);
    let suffix = rest.trim_start();
    let example = "write bytes or a number with B, KiB, MiB or GiB, e.g. 128KiB";
    if t.starts_with('-') {
        return Err(format!("{s:?} is negative; {example}"));
    }
    if digits.is_empty() {
        return Err(format!("{s:?} is not a size; {example}"));
    }
    if suffix.starts_with(['.', ',']) {
        return Err(format!(
            "{s:?} is fractional; sizes are whole numbers, {example}"
        ));
    }
    let mult = suffix_multiplier(suffix).ok_or_else(|| {
        if matches!(
            suffix.to_ascii_lowercase().as_str(),
            "kb" | "mb" | "gb" | "tb"
        ) {
            format!(
                "{s:?} is ambiguous (decimal or binary?); write {}{}iB for a binary size, or give bytes",
                digits,
                &suffix[..1].to_ascii_uppercase()
            )
        } else {
            format!("{s:?} has an unknown suffix {suffix:?}; {example}")
        }
    })?;
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is too large; sizes must fit in 64 bits"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large; sizes must fit in 64 bits"))
}

fn suffix_multiplier(suffix: &str) -> Option<u64> {
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        _ => return None,
    };
    Some(1u64 << shift)
}

/// Shows a byte count the way a user would write it: `128KiB`, or plain
/// bytes when no suffix divides it exactly.
pub fn format_size(v: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if v != 0 && v.is_multiple_of(1u64 << shift) {
            return format!("{}{unit}", v >> shift);
        }
    }
    format!("{v}B")
}

// ---------------------------------------------------------------------------
// Deserializers: parse, then run the single-value check so that the error
// gets serde_yaml_ng's key path and line/column.

struct SizeVisitor;

impl Visitor<'_> for SizeVisitor {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a size: bytes, or a string like 128KiB")
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
        Ok(v)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
        u64::try_from(v).map_err(|_| {
            E::custom(format!(
                "{v} is negative; sizes are 0 or more bytes, e.g. 128KiB"
            ))
        })
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<u64, E> {
        u64::try_from(v)
            .map_err(|_| E::custom(format!("{v} is too large; sizes must fit in 64 bits")))
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<u64, E> {
        if v < 0 {
            return Err(E::custom(format!(
                "{v} is negative; sizes are 0 or more bytes, e.g. 128KiB"
            )));
        }
        self.visit_u128(v as u128)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<u64, E> {
        Err(E::custom(format!(
            "{v} is not a whole number of bytes; write bytes or a size like 128KiB"
        )))
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<u64, E> {
        parse_size(s).map_err(E::custom)
    }
}

fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    d.deserialize_any(SizeVisitor)
}

fn de_track_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let v = de_size(d)?;
    check_track_size(v).map_err(|m| de::Error::custom(format!("track_size: {m}")))?;
    Ok(v)
}

fn de_max_io<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let v = de_size(d)?;
    check_max_io(v).map_err(|m| de::Error::custom(format!("ublk.max_io: {m}")))?;
    Ok(v as u32)
}

/// Integers are read as i64 so that a negative or huge value gets our range
/// message rather than serde's "expected u32".
fn de_int<'de, D: Deserializer<'de>>(
    d: D,
    key: &str,
    check: fn(i64) -> Result<(), String>,
) -> Result<i64, D::Error> {
    let v = i64::deserialize(d)?;
    check(v).map_err(|m| de::Error::custom(format!("{key}: {m}")))?;
    Ok(v)
}

fn de_ublk_id<'de, D: Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
    Ok(de_int(d, "ublk.id", check_ublk_id)? as i32)
}
fn de_queues<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    Ok(de_int(d, "ublk.queues", check_queues)? as u32)
}
fn de_depth<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    Ok(de_int(d, "ublk.depth", check_depth)? as u32)
}
fn de_batch<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    Ok(de_int(d, "restore.batch", check_copy_tracks)? as u32)
}
fn de_max_inflight<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    Ok(de_int(d, "restore.max_inflight", check_copy_tracks)? as u32)
}

fn de_listen<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    if !s.is_empty() && s.parse::<std::net::SocketAddr>().is_err() {
        return Err(de::Error::custom(format!(
            "metrics.listen {s:?} is not an ADDR:PORT (e.g. 127.0.0.1:9477)"
        )));
    }
    Ok(s)
}

fn de_path_or_empty<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
    Ok(PathBuf::from(String::deserialize(d)?))
}

fn de_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    check_name(&s).map_err(de::Error::custom)?;
    Ok(s)
}

fn de_path<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
    let p = PathBuf::from(String::deserialize(d)?);
    check_path(&p).map_err(de::Error::custom)?;
    Ok(p)
}

/// A section written as a bare key (`ublk:` with nothing under it) is YAML
/// null; it means "all defaults", not an error.
fn de_section<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("128KiB"), Ok(128 << 10));
        assert_eq!(parse_size("128 k"), Ok(128 << 10));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("7B"), Ok(7));
        assert!(parse_size("1KB").unwrap_err().contains("ambiguous"));
        assert!(parse_size("-4KiB").unwrap_err().contains("negative"));
        assert!(parse_size("1.5MiB").unwrap_err().contains("fractional"));
        assert!(parse_size("4XiB").unwrap_err().contains("unknown suffix"));
        assert!(parse_size("99999999999TiB")
            .unwrap_err()
            .contains("too large"));
        assert!(parse_size("").is_err());
        assert!(parse_size("KiB").is_err());
    }

    #[test]
    fn format_sizes() {
        assert_eq!(format_size(131072), "128KiB");
        assert_eq!(format_size(1000), "1000B");
        assert_eq!(format_size(0), "0B");
        assert_eq!(format_size(16 << 20), "16MiB");
    }
}
