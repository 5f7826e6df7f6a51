//! When the secondary's frozen image was taken, for `status` and `list`.
//!
//! The metadata header does not (yet) record it, so the server keeps it in a
//! small file of its own next to the metadata (`META.split-time`; for a
//! metadata block device `/var/lib/splitmirror/NAME.split-time`), one line
//! `split 1764487200` or `degraded 1764487200` (Unix seconds).
//!
//! Why this is crash-consistent enough without being in the metadata:
//! - `split`: the file is written and fsynced *before* the split is
//!   committed. A crash between the two leaves the volume `established`,
//!   where the file is ignored; the volume can only be `split` with the file
//!   already saying when (at most the commit's duration early).
//! - `degraded`: the core degrades on an I/O error, so the file is written
//!   just after. A crash in between leaves a file of another kind (or none):
//!   the kind must match the state, so `status` shows no time rather than a
//!   wrong one.
//! - An `established` volume removes the file (at start and when the state
//!   is seen there), so an old `degraded` line cannot stand for a new one.

use crate::core::VolumeState;
use crate::edge::config::Config;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// What froze the secondary: an operator's `split` or a failed secondary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frozen {
    Split,
    Degraded,
}

impl Frozen {
    fn word(self) -> &'static str {
        match self {
            Frozen::Split => "split",
            Frozen::Degraded => "degraded",
        }
    }

    /// The kind of freeze whose time applies in `state`, if any: the split
    /// image is still the secondary's content while split or restoring.
    pub fn for_state(state: VolumeState) -> Option<Frozen> {
        match state {
            VolumeState::Split | VolumeState::Restoring => Some(Frozen::Split),
            VolumeState::Degraded => Some(Frozen::Degraded),
            _ => None,
        }
    }
}

/// The file that records the time for the volume of `cfg`.
pub fn path(cfg: &Config) -> PathBuf {
    let is_file = std::fs::metadata(&cfg.metadata).is_ok_and(|m| m.is_file());
    if is_file {
        let mut p = cfg.metadata.clone().into_os_string();
        p.push(".split-time");
        PathBuf::from(p)
    } else {
        PathBuf::from(format!("/var/lib/splitmirror/{}.split-time", cfg.name))
    }
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Records `kind` at `when`, durably (temporary file, fsync, rename, fsync
/// of the directory).
pub fn record(path: &Path, kind: Frozen, when: u64) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("split-time.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{} {when}", kind.word())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// The recorded time if it is of the kind that `state` needs.
pub fn read(path: &Path, state: VolumeState) -> Option<u64> {
    let want = Frozen::for_state(state)?;
    let text = std::fs::read_to_string(path).ok()?;
    parse(&text, want)
}

fn parse(text: &str, want: Frozen) -> Option<u64> {
    let mut words = text.split_whitespace();
    let kind = words.next()?;
    let when = words.next()?.parse().ok()?;
    (kind == want.word()).then_some(when)
}

/// Forgets the time (the volume is established again).
pub fn clear(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => log::warn!("cannot remove {}: {e}", path.display()),
    }
}

/// `2026-11-30T07:21:22Z`
pub fn rfc3339(unix: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + std::time::Duration::from_secs(unix)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_must_match_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.meta.split-time");
        record(&p, Frozen::Split, 1000).unwrap();
        assert_eq!(read(&p, VolumeState::Split), Some(1000));
        assert_eq!(read(&p, VolumeState::Restoring), Some(1000));
        // a crash between degrading and recording leaves the split line
        assert_eq!(read(&p, VolumeState::Degraded), None);
        assert_eq!(read(&p, VolumeState::Established), None);
        record(&p, Frozen::Degraded, 2000).unwrap();
        assert_eq!(read(&p, VolumeState::Degraded), Some(2000));
        assert_eq!(read(&p, VolumeState::Split), None);
        clear(&p);
        assert_eq!(read(&p, VolumeState::Degraded), None);
        assert_eq!(parse("split x", Frozen::Split), None);
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    }
}
