//! Settings a running server changes without a restart: `splitmirror set`
//! (through the control socket) and SIGHUP (the config file read again).
//!
//! Live: the copy engine's `restore.*` keys (`priority`, `max_inflight` up to the value
//! the server started with, since the copy buffers were sized then) and
//! `events.program`. Everything else names devices, the ublk device's
//! shape, sockets or listeners, which only a restart can change.

use crate::edge::config::{Config, EventsConfig, RestoreConfig};
use crate::error::{Error, Result};
use std::path::PathBuf;

/// The keys `set` accepts (also without the `restore.` prefix).
pub const LIVE_KEYS: [&str; 6] = [
    "restore.rate_limit",
    "restore.priority",
    "restore.on_error",
    "restore.batch",
    "restore.max_inflight",
    "events.program",
];

/// What may change live, as one value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Live {
    pub restore: RestoreConfig,
    pub events: EventsConfig,
}

impl Live {
    pub fn of(cfg: &Config) -> Live {
        Live {
            restore: cfg.restore.clone(),
            events: cfg.events.clone(),
        }
    }
}

/// Applies `KEY=VALUE` settings to `live`: all of them or, on the first
/// bad one, none. `inflight_cap` is the largest `max_inflight` the running
/// engine can take. Returns the new settings and one line per change.
pub fn apply(live: &Live, settings: &[String], inflight_cap: u32) -> Result<(Live, Vec<String>)> {
    if settings.is_empty() {
        return Err(Error::config(format!(
            "give at least one KEY=VALUE; live keys: {}",
            LIVE_KEYS.join(", ")
        )));
    }
    let mut next = live.clone();
    let mut lines = Vec::new();
    for s in settings {
        let (key, value) = s.split_once('=').ok_or_else(|| {
            Error::config(format!(
                "{s:?} is not KEY=VALUE (e.g. restore.rate_limit=200MiB)"
            ))
        })?;
        let key = full_key(key.trim());
        let value = value.trim();
        set_one(&mut next, &key, value).map_err(|e| Error::config(format!("{key}: {e}")))?;
        lines.push(format!("{key}={value}"));
    }
    check(&next, inflight_cap)?;
    Ok((next, lines))
}

fn full_key(key: &str) -> String {
    if key.contains('.') {
        key.to_string()
    } else if key == "program" {
        "events.program".into()
    } else {
        format!("restore.{key}")
    }
}

fn set_one(live: &mut Live, key: &str, value: &str) -> std::result::Result<(), String> {
    if key == "events.program" {
        live.events.program = PathBuf::from(value);
        return Ok(());
    }
    let Some(field) = key
        .strip_prefix("restore.")
        .filter(|_| LIVE_KEYS.contains(&key))
    else {
        return Err(format!(
            "cannot be changed while the server runs (live keys: {}); edit the config and restart",
            LIVE_KEYS.join(", ")
        ));
    };
    // Through the config file's own parser, so the same values and messages
    // apply as in the file.
    let parsed: RestoreConfig =
        serde_yaml_ng::from_str(&format!("{field}: {value}")).map_err(|e| {
            e.to_string()
                .split(" at line ")
                .next()
                .unwrap_or("")
                .to_string()
        })?;
    let r = &mut live.restore;
    match field {
        "rate_limit" => r.rate_limit = parsed.rate_limit,
        "on_error" => r.on_error = parsed.on_error,
        "batch" => r.batch = parsed.batch,
        "max_inflight" => r.max_inflight = parsed.max_inflight,
        "priority" => r.priority = parsed.priority,
        _ => unreachable!("LIVE_KEYS lists every restore field matched here"),
    }
    Ok(())
}

fn check(live: &Live, inflight_cap: u32) -> Result<()> {
    let r = &live.restore;
    if r.max_inflight > inflight_cap {
        return Err(Error::config(format!(
            "restore.max_inflight {} is more than the {inflight_cap} the server started with \
             (its copy buffers are sized at start); restart the server to raise it",
            r.max_inflight
        )));
    }
    if r.batch > r.max_inflight {
        return Err(Error::config(format!(
            "restore.batch ({}) is larger than restore.max_inflight ({})",
            r.batch, r.max_inflight
        )));
    }
    let p = &live.events.program;
    if !p.as_os_str().is_empty() && !p.is_absolute() {
        return Err(Error::config(format!(
            "events.program {} must be an absolute path",
            p.display()
        )));
    }
    Ok(())
}

/// What a config file read again (SIGHUP) changes: the new live settings,
/// and the names of the changed keys that need a restart.
pub fn reload(running: &Config, reread: &Config) -> (Live, Vec<&'static str>) {
    let mut fixed = Vec::new();
    let pairs: [(&'static str, bool); 10] = [
        ("name", running.name == reread.name),
        ("primary", running.primary == reread.primary),
        ("secondary", running.secondary == reread.secondary),
        ("metadata", running.metadata == reread.metadata),
        ("track_size", running.track_size == reread.track_size),
        (
            "secondary_missing",
            running.secondary_missing == reread.secondary_missing,
        ),
        ("ublk", running.ublk == reread.ublk),
        ("control", running.control == reread.control),
        ("metrics", running.metrics == reread.metrics),
        (
            "restore.max_inflight (above the start value)",
            reread.restore.max_inflight <= running.restore.max_inflight,
        ),
    ];
    for (key, same) in pairs {
        if !same {
            fixed.push(key);
        }
    }
    let mut live = Live::of(reread);
    if live.restore.max_inflight > running.restore.max_inflight {
        live.restore.max_inflight = running.restore.max_inflight;
        live.restore.batch = live.restore.batch.min(live.restore.max_inflight);
    }
    (live, fixed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::config::OnError;

    fn base() -> Live {
        Live::of(&Config::new("v", "/a", "/b", "/m"))
    }

    #[test]
    fn applies_all_or_nothing() {
        let live = base();
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let (next, lines) = apply(
            &live,
            &s(&[
                "rate_limit=200MiB",
                "restore.on_error=skip",
                "priority=balanced",
            ]),
            64,
        )
        .unwrap();
        assert_eq!(
            next.restore.priority,
            crate::edge::config::RestorePriority::Balanced
        );
        assert_eq!(next.restore.rate_limit, 200 << 20);
        assert_eq!(next.restore.on_error, OnError::Skip);
        assert_eq!(
            lines,
            [
                "restore.rate_limit=200MiB",
                "restore.on_error=skip",
                "restore.priority=balanced"
            ]
        );
        let e = apply(&live, &s(&["priority=fast"]), 64).unwrap_err();
        assert!(
            e.to_string().contains("restore.priority") && e.to_string().contains("host"),
            "{e}"
        );
        let e = apply(&live, &s(&["rate_limit=1MB"]), 64).unwrap_err();
        assert!(e.to_string().contains("restore.rate_limit"), "{e}");
        assert_eq!(e.exit_code(), 2);
        let e = apply(&live, &s(&["ublk.depth=4"]), 64).unwrap_err();
        assert!(e.to_string().contains("cannot be changed while"), "{e}");
        let e = apply(&live, &s(&["max_inflight=65"]), 64).unwrap_err();
        assert!(e.to_string().contains("started with"), "{e}");
        let e = apply(&live, &s(&["batch=64", "max_inflight=8"]), 64).unwrap_err();
        assert!(e.to_string().contains("larger than"), "{e}");
        assert!(apply(&live, &s(&["rate_limit"]), 64).is_err());
        assert!(apply(&live, &[], 64).is_err());
        let e = apply(&live, &s(&["program=hook.sh"]), 64).unwrap_err();
        assert!(e.to_string().contains("absolute"), "{e}");
    }

    #[test]
    fn reload_names_what_needs_a_restart() {
        let running = Config::new("v", "/a", "/b", "/m");
        let mut reread = running.clone();
        reread.restore.rate_limit = 5 << 20;
        reread.ublk.depth = 64;
        reread.restore.max_inflight = 128;
        let (live, fixed) = reload(&running, &reread);
        assert_eq!(live.restore.rate_limit, 5 << 20);
        assert_eq!(live.restore.max_inflight, 64);
        assert_eq!(
            fixed,
            ["ublk", "restore.max_inflight (above the start value)"]
        );
    }
}
