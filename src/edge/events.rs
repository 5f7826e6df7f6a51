//! Events for the operator's own program (`events.program`), in the manner
//! of mdadm's `--program`: the program is run once per event with the facts
//! in its environment, and its exit status is only logged.
//!
//! Events: `state-change` (every state change, including the ends of
//! operations), `degraded` (the secondary failed and was split off),
//! `device-error` (a copy could not read or write a track), `operation-end`
//! (a restore, establish or resync finished).

use std::path::{Path, PathBuf};
use std::process::Command;

/// One event: its name, the volume, and the variables particular to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub name: &'static str,
    pub volume: String,
    pub state: String,
    pub device: Option<String>,
    /// One human line, also `SPLITMIRROR_MESSAGE`.
    pub message: String,
    /// `(NAME, value)`: each becomes `SPLITMIRROR_NAME`.
    pub extra: Vec<(&'static str, String)>,
}

impl Event {
    /// The program's environment additions, `SPLITMIRROR_*`.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("SPLITMIRROR_EVENT".to_string(), self.name.to_string()),
            ("SPLITMIRROR_VOLUME".into(), self.volume.clone()),
            ("SPLITMIRROR_STATE".into(), self.state.clone()),
            (
                "SPLITMIRROR_DEVICE".into(),
                self.device.clone().unwrap_or_default(),
            ),
            ("SPLITMIRROR_MESSAGE".into(), self.message.clone()),
        ];
        for (k, v) in &self.extra {
            env.push((format!("SPLITMIRROR_{k}"), v.clone()));
        }
        env
    }
}

/// Runs `program` for `event` without waiting for it: a slow or hanging
/// program must not hold the server. A thread reaps it and logs a failure.
pub fn notify(program: &Path, event: &Event) {
    if program.as_os_str().is_empty() {
        return;
    }
    let mut cmd = Command::new(program);
    cmd.envs(event.env())
        .stdin(std::process::Stdio::null())
        .arg(event.name)
        .arg(&event.volume);
    let shown = program.display().to_string();
    match cmd.spawn() {
        Ok(mut child) => {
            let what = event.name;
            let spawned = std::thread::Builder::new()
                .name("event-program".into())
                .spawn(move || match child.wait() {
                    Ok(st) if st.success() => {}
                    Ok(st) => log::warn!("events.program {shown} ({what}) exited with {st}"),
                    Err(e) => log::warn!("events.program {shown} ({what}): {e}"),
                });
            if let Err(e) = spawned {
                log::warn!("events.program: cannot start a thread to reap it: {e}");
            }
        }
        Err(e) => log::error!(
            "events.program {shown} could not be run for {}: {e}",
            event.name
        ),
    }
}

/// The program from the config, or none.
pub fn program(p: &Path) -> Option<PathBuf> {
    (!p.as_os_str().is_empty()).then(|| p.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::time::{Duration, Instant};

    #[test]
    fn program_sees_the_facts() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let prog = dir.path().join("hook.sh");
        std::fs::write(
            &prog,
            format!(
                "#!/bin/sh\nenv | grep '^SPLITMIRROR_' | sort > {0}.tmp; echo \"args $1 $2\" >> {0}.tmp; mv {0}.tmp {0}\n",
                out.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).unwrap();
        let ev = Event {
            name: "degraded",
            volume: "vol0".into(),
            state: "degraded".into(),
            device: Some("/dev/ublkb0".into()),
            message: "secondary failed".into(),
            extra: vec![("PREVIOUS_STATE", "established".into())],
        };
        notify(&prog, &ev);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !out.exists() {
            assert!(Instant::now() < deadline, "the program did not run");
            std::thread::sleep(Duration::from_millis(20));
        }
        let text = std::fs::read_to_string(&out).unwrap();
        for want in [
            "SPLITMIRROR_EVENT=degraded",
            "SPLITMIRROR_VOLUME=vol0",
            "SPLITMIRROR_STATE=degraded",
            "SPLITMIRROR_DEVICE=/dev/ublkb0",
            "SPLITMIRROR_MESSAGE=secondary failed",
            "SPLITMIRROR_PREVIOUS_STATE=established",
            "args degraded vol0",
        ] {
            assert!(text.contains(want), "{want} missing in {text}");
        }
    }
}
