//! The host's view: every volume, from the config directory and from the
//! control sockets of the servers that run (`splitmirror list`,
//! `status --all`).

use crate::edge::config::Config;
use crate::edge::control::{client, Status, STATUS_SCHEMA_VERSION};
use serde::Serialize;
use std::path::{Path, PathBuf};

pub const DEFAULT_CONFIG_DIR: &str = "/etc/splitmirror";
pub const DEFAULT_RUN_DIR: &str = "/run/splitmirror";
/// Where the server keeps `/dev/splitmirror/NAME` → `/dev/ublkbN`.
pub const DEVICE_LINK_DIR: &str = "/dev/splitmirror";
/// The commented example install.sh puts next to the real configs.
const EXAMPLE: &str = "example.yaml";

/// `--config-dir`, else `SPLITMIRROR_CONFIG_DIR`, else /etc/splitmirror.
pub fn config_dir(arg: Option<&Path>) -> PathBuf {
    arg.map(Path::to_path_buf)
        .or_else(|| std::env::var_os("SPLITMIRROR_CONFIG_DIR").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_DIR))
}

/// `SPLITMIRROR_RUN_DIR`, else /run/splitmirror: where servers put their
/// sockets by default.
pub fn run_dir() -> PathBuf {
    std::env::var_os("SPLITMIRROR_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_RUN_DIR))
}

/// The stable name of a volume's device.
pub fn device_link(name: &str) -> PathBuf {
    Path::new(DEVICE_LINK_DIR).join(name)
}

/// One volume as `list` and `status --all` show it.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub name: String,
    /// The config file, or `None` for a server found only by its socket.
    pub config: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub running: bool,
    /// The server's `status`, when it runs.
    pub status: Option<Status>,
    /// Why the volume could not be read: a bad config, an unreachable
    /// socket other than "not running".
    pub error: Option<String>,
}

impl Entry {
    /// `stopped` and `invalid` besides the volume states.
    pub fn state(&self) -> String {
        match (&self.status, &self.error) {
            (Some(s), _) => s.state.name().to_string(),
            (None, Some(_)) if self.socket.is_none() => "invalid".into(),
            _ => "stopped".into(),
        }
    }
}

/// Every volume: one per `*.yaml` in `config_dir` (but the example), then
/// one per server socket in `run_dir` that no config names.
pub fn discover(config_dir: &Path, run_dir: &Path) -> Vec<Entry> {
    let mut entries: Vec<Entry> = files(config_dir, "yaml")
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n != EXAMPLE))
        .map(|p| from_config(&p))
        .collect();
    let known: Vec<PathBuf> = entries.iter().filter_map(|e| e.socket.clone()).collect();
    for sock in files(run_dir, "sock") {
        if !known.contains(&sock) {
            if let Ok(st) = client::status(&sock) {
                entries.push(Entry {
                    name: st.name.clone(),
                    config: None,
                    socket: Some(sock),
                    running: true,
                    status: Some(st),
                    error: None,
                });
            }
        }
    }
    entries
}

fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|d| d.path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    v.sort();
    v
}

fn from_config(path: &Path) -> Entry {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let cfg = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            return Entry {
                name: stem,
                config: Some(path.to_path_buf()),
                socket: None,
                running: false,
                status: None,
                error: Some(e.to_string()),
            }
        }
    };
    let socket = cfg.socket_path();
    let (status, error) = match client::status(&socket) {
        Ok(st) => (Some(st), None),
        // Not running is the normal case of a stopped volume, not an error.
        Err(_) if !socket.exists() => (None, None),
        Err(e) => (None, Some(e.to_string())),
    };
    Entry {
        name: cfg.name,
        config: Some(path.to_path_buf()),
        socket: Some(socket),
        running: status.is_some(),
        status,
        error,
    }
}

/// `list --json`: the entries with the fields a table shows.
#[derive(Debug, Serialize)]
pub struct ListJson {
    pub schema_version: u32,
    pub volumes: Vec<ListRow>,
}

#[derive(Debug, Serialize)]
pub struct ListRow {
    pub name: String,
    pub config: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub running: bool,
    pub device: Option<String>,
    /// `/dev/splitmirror/NAME` while the server runs.
    pub device_link: Option<PathBuf>,
    pub state: String,
    pub operation: Option<String>,
    pub percent: Option<f64>,
    pub split_time: Option<u64>,
    pub split_age_secs: Option<u64>,
    pub errors: Vec<String>,
}

pub fn list_json(entries: &[Entry]) -> ListJson {
    ListJson {
        schema_version: STATUS_SCHEMA_VERSION,
        volumes: entries.iter().map(row).collect(),
    }
}

fn row(e: &Entry) -> ListRow {
    let st = e.status.as_ref();
    let mut errors = st.map(|s| s.errors.clone()).unwrap_or_default();
    errors.extend(e.error.clone());
    ListRow {
        name: e.name.clone(),
        config: e.config.clone(),
        socket: e.socket.clone(),
        running: e.running,
        device: st.and_then(|s| s.device.clone()),
        device_link: st
            .and_then(|s| s.device.as_ref())
            .map(|_| device_link(&e.name)),
        state: e.state(),
        operation: st
            .and_then(|s| s.operation.as_ref())
            .map(|o| o.kind.name().to_string()),
        percent: st.and_then(|s| s.operation.as_ref()).map(|o| o.percent),
        split_time: st.and_then(|s| s.split_time),
        split_age_secs: st.and_then(|s| s.split_age_secs),
        errors,
    }
}

/// The `list` table: one line per volume.
pub fn render_list(entries: &[Entry]) -> String {
    let mut rows = vec![[
        "NAME".to_string(),
        "DEVICE".into(),
        "STATE".into(),
        "PROGRESS".into(),
        "SPLIT AGE".into(),
        "CONFIG".into(),
    ]];
    for e in entries {
        let r = row(e);
        let progress = match (&r.operation, r.percent) {
            (Some(k), Some(p)) => format!("{k} {p:.1}%"),
            _ => "-".into(),
        };
        let age = r
            .split_age_secs
            .map_or("-".into(), |a| crate::edge::cli::human_secs(a as f64));
        let config = r
            .config
            .as_ref()
            .map_or("-".into(), |c| c.display().to_string());
        let state = if r.errors.is_empty() || r.running {
            r.state.clone()
        } else {
            format!("{} ({})", r.state, r.errors.join("; "))
        };
        rows.push([
            r.name,
            r.device.unwrap_or_else(|| "-".into()),
            state,
            progress,
            age,
            config,
        ]);
    }
    let widths: Vec<usize> = (0..6)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|r| {
            let cells: Vec<String> = (0..6)
                .map(|i| format!("{:<w$}", r[i], w = widths[i]))
                .collect();
            format!("{}\n", cells.join("  ").trim_end())
        })
        .collect()
}
