//! Checks: each value on its own (run by the deserializers while parsing,
//! so their errors carry the line, and again by `Config::validate`), and
//! the checks that relate two values.

use super::*;
use crate::core::geometry::{MAX_TRACK_SIZE, MIN_TRACK_SIZE};

impl Config {
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
pub(super) fn at(key: &'static str) -> impl Fn(String) -> Error {
    move |msg| Error::config(format!("{key}: {msg}"))
}

// ---------------------------------------------------------------------------
// Single-value checks. Each returns "what is wrong; what to do" without the
// key name, which the caller (serde's path, or `validate`) puts in front.

pub(super) fn check_name(name: &str) -> Result<(), String> {
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

pub(super) fn check_path(path: &Path) -> Result<(), String> {
    let s = path.as_os_str().as_encoded_bytes();
    if s.is_empty() {
        return Err("the path is empty; give the path of a file or block device".into());
    }
    if s.contains(&0) {
        return Err("the path contains a NUL byte; remove it".into());
    }
    Ok(())
}

pub(super) fn check_track_size(v: u64) -> Result<(), String> {
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

pub(super) fn check_ublk_id(v: i64) -> Result<(), String> {
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

pub(super) fn check_queues(v: i64) -> Result<(), String> {
    let cpus = nr_cpus();
    if v < 1 || v > i64::from(cpus) {
        return Err(format!(
            "{v} is out of range; use 1 to {cpus} (the number of CPUs online)"
        ));
    }
    Ok(())
}

pub(super) fn check_depth(v: i64) -> Result<(), String> {
    if v < 1 || v > i64::from(MAX_DEPTH) {
        return Err(format!(
            "{v} is out of range; use 1 to {MAX_DEPTH} (the ublk limit), e.g. 128"
        ));
    }
    Ok(())
}

pub(super) fn check_max_io(v: u64) -> Result<(), String> {
    if !(MAX_IO_ALIGN..=MAX_IO_LIMIT).contains(&v) || !v.is_multiple_of(MAX_IO_ALIGN) {
        return Err(format!(
            "{} is not allowed; use a multiple of 4KiB from 4KiB to {} (the ublk limit), e.g. 512KiB",
            format_size(v),
            format_size(MAX_IO_LIMIT)
        ));
    }
    Ok(())
}

pub(super) fn check_copy_tracks(v: i64) -> Result<(), String> {
    if v < 1 || v > i64::from(MAX_COPY_TRACKS) {
        return Err(format!(
            "{v} is out of range; use 1 to {MAX_COPY_TRACKS} tracks"
        ));
    }
    Ok(())
}
