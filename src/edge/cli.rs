//! The command line (docs/interface.md): parses arguments with clap,
//! runs the command and turns every failure into one stderr line and the
//! exit code of its [`Error`] (1 runtime, 2 usage/config, 3 wrong state).

use crate::core::{Command, OperationKind};
use crate::edge::config::Config;
use crate::edge::control::{client, OperationStatus, Status, VerifyReport};
use crate::error::{Error, Result};
use clap::{Args, CommandFactory, Parser, Subcommand};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, Parser)]
#[command(
    name = "splitmirror",
    version,
    about = "ublk server: primary + secondary as one block device with mirror, split and instant restore"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Write fresh metadata for the configured devices
    Format {
        #[command(flatten)]
        config: ConfigArg,
        /// The devices are known to be identical: start established, copy nothing
        #[arg(long)]
        assume_clean: bool,
        /// Overwrite existing metadata (or other data at the metadata path), and a secondary holding a filesystem
        #[arg(long)]
        force: bool,
        /// With --force: overwrite metadata even in the middle of a restore (the split image is lost)
        #[arg(long, requires = "force")]
        discard_restore: bool,
    },
    /// Record a new secondary disk (server stopped); the next establish copies every track
    ReplaceSecondary {
        #[command(flatten)]
        config: ConfigArg,
        /// Go ahead: the old secondary's contents (a split image included) are given up
        #[arg(long)]
        yes: bool,
    },
    /// Serve the block device in the foreground until SIGINT/SIGTERM
    Run {
        #[command(flatten)]
        config: ConfigArg,
        /// Start degraded if the secondary is absent or cannot be opened
        /// (as the config's `secondary_missing: degraded`)
        #[arg(long)]
        allow_missing_secondary: bool,
    },
    /// degraded -> syncing -> established: reopen the configured secondary and resync it
    AttachSecondary {
        /// Accept another disk than the volume's secondary: every track is copied to it
        #[arg(long)]
        replace: bool,
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// established -> split: freeze the secondary, track primary changes
    Split {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// split -> syncing -> established: copy primary to secondary
    Establish {
        /// Copy every track, not only the tracks changed since the split
        #[arg(long)]
        full: bool,
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// split -> restoring -> resyncing -> established: bring back the split image
    Restore {
        /// Restore only the tracks changed since the split
        #[arg(long)]
        incremental: bool,
        /// End in split with the secondary unchanged
        #[arg(long)]
        protect: bool,
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Show the volume's state and progress (--all: every volume on the host)
    Status {
        /// Print the status as JSON
        #[arg(long)]
        json: bool,
        /// With --all: directory of volume configs [env: SPLITMIRROR_CONFIG_DIR]
        #[arg(long = "config-dir", value_name = "DIR")]
        config_dir: Option<PathBuf>,
        #[command(flatten)]
        target: StatusTarget,
    },
    /// Block until no copy operation is running
    Wait {
        /// Give up (exit 1) after SECS seconds
        #[arg(long, value_name = "SECS", value_parser = parse_secs)]
        timeout: Option<f64>,
        #[command(flatten)]
        target: Target,
    },
    /// Compare primary and secondary on every track that should be identical
    Verify {
        /// Print the report as JSON (exit 1 still when tracks differ)
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
    /// List every volume on the host: configs and running servers
    List {
        /// Print the list as JSON
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        dir: ConfigDir,
    },
    /// Change engine settings of the running server (e.g. restore.rate_limit=200MiB)
    Set {
        #[command(flatten)]
        target: Target,
        /// KEY=VALUE, keys as in the config file: restore.rate_limit, restore.on_error,
        /// restore.batch, restore.max_inflight, events.program
        #[arg(value_name = "KEY=VALUE", required = true)]
        settings: Vec<String>,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    Completions {
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Write the man pages into DIR (used by packaging)
    #[command(hide = true)]
    Man {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

#[derive(Debug, Args)]
struct ConfigDir {
    /// Directory of volume configs [env: SPLITMIRROR_CONFIG_DIR; default /etc/splitmirror]
    #[arg(long = "config-dir", value_name = "DIR")]
    config_dir: Option<PathBuf>,
}

/// `status` of one volume, or of every volume with `--all`.
#[derive(Debug, Args)]
#[group(required = true, multiple = false, id = "status_target")]
struct StatusTarget {
    /// Volume config file (YAML); its control.socket is used
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Control socket of the running server
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Every volume on the host (see `list`)
    #[arg(long)]
    all: bool,
}

#[derive(Debug, Args)]
struct ConfigArg {
    /// Volume config file (YAML)
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    config: PathBuf,
}

/// Client commands reach the server through its socket: named by the config
/// file, or given directly.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
struct Target {
    /// Volume config file (YAML); its control.socket is used
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Control socket of the running server
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct WaitArgs {
    /// Then wait until the copy operation has finished
    #[arg(long)]
    wait: bool,
    /// With --wait: give up (exit 1) after SECS seconds
    #[arg(long, value_name = "SECS", requires = "wait", value_parser = parse_secs)]
    timeout: Option<f64>,
}

fn parse_secs(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds (e.g. 30 or 0.5)")),
    }
}

impl Target {
    /// The socket to talk to; loading the config also validates it, so a bad
    /// config is reported (exit 2) before any connection is tried.
    fn socket(&self) -> Result<PathBuf> {
        match (&self.config, &self.socket) {
            (Some(c), _) => Ok(Config::load(c)?.socket_path()),
            (None, Some(s)) => Ok(s.clone()),
            (None, None) => Err(Error::config("give -c CONFIG or --socket PATH")),
        }
    }
}

/// Runs the command line and returns the process exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return report_clap_error(&e),
    };
    let server = matches!(cli.command, Cmd::Run { .. });
    init_logging(server);
    install_panic_hook(server);
    let result = std::panic::catch_unwind(|| run(cli));
    match result {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            eprintln!("splitmirror: {}", one_line(&e.to_string()));
            e.exit_code()
        }
        // The hook has printed the one line already.
        Err(_) => 1,
    }
}

/// Help and version go to stdout (exit 0); a usage error becomes one line
/// with the usage of the command concerned (exit 2).
fn report_clap_error(e: &clap::Error) -> i32 {
    use clap::error::ErrorKind;
    if !e.use_stderr() {
        let _ = e.print();
        return e.exit_code();
    }
    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        eprintln!(
            "splitmirror: no command given; use one of format, run, split, establish, \
             restore, status, wait, verify, list, set, replace-secondary, attach-secondary (see `splitmirror --help`)"
        );
        return e.exit_code();
    }
    eprintln!("splitmirror: {}", clap_one_line(&e.render().to_string()));
    e.exit_code()
}

/// Clap's message is a paragraph ("error: ..." and indented details), then
/// tips and the usage; the contract wants one line, so this keeps the first
/// paragraph and the usage.
fn clap_one_line(text: &str) -> String {
    let first: Vec<&str> = text
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let what = first.join(" ");
    let what = what.trim_start_matches("error: ").trim_end_matches(':');
    let usage = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Usage: "))
        .map(|u| format!("; usage: {u}"))
        .unwrap_or_else(|| "; see `splitmirror --help`".into());
    format!("{what}{usage}")
}

fn init_logging(server: bool) {
    let default = if server { "info" } else { "warn" };
    let env = env_logger::Env::default().default_filter_or(default);
    let mut builder = env_logger::Builder::from_env(env);
    if stderr_is_journal() {
        // The journal reads a `<N>` prefix as the line's syslog priority
        // and keeps its own timestamps, so the line carries only the rest.
        builder.format(|f, record| {
            writeln!(
                f,
                "<{}>{}: {}",
                syslog_priority(record.level()),
                record.target(),
                record.args()
            )
        });
    }
    let _ = builder.try_init();
}

/// systemd sets JOURNAL_STREAM=DEV:INO for a service whose stderr is the
/// journal; the check against stderr's own device and inode keeps a
/// program started from such a service (with stderr elsewhere) plain.
fn stderr_is_journal() -> bool {
    let Some(want) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(st) = nix::sys::stat::fstat(libc::STDERR_FILENO) else {
        return false;
    };
    journal_stream_matches(&want.to_string_lossy(), st.st_dev, st.st_ino)
}

fn journal_stream_matches(value: &str, dev: u64, ino: u64) -> bool {
    value
        .split_once(':')
        .is_some_and(|(d, i)| d.parse() == Ok(dev) && i.parse() == Ok(ino))
}

/// syslog(3) priorities: err 3, warning 4, info 6, debug 7.
pub fn syslog_priority(level: log::Level) -> u8 {
    match level {
        log::Level::Error => 3,
        log::Level::Warn => 4,
        log::Level::Info => 6,
        log::Level::Debug | log::Level::Trace => 7,
    }
}

/// A bug must still end in one line, not a backtrace. Only the server
/// honours RUST_BACKTRACE (the default hook): its log is where a backtrace
/// helps, while client output stays one line whatever the environment says.
fn install_panic_hook(server: bool) {
    if server && std::env::var_os("RUST_BACKTRACE").is_some() {
        return;
    }
    std::panic::set_hook(Box::new(|info| {
        let msg = one_line(&info.to_string());
        eprintln!("splitmirror: internal error (please report): {msg}");
    }));
}

/// Error messages may carry newlines from lower layers; the contract is one
/// line per error.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::Format {
            config,
            assume_clean,
            force,
            discard_restore,
        } => {
            let opts = crate::metadata::FormatOptions {
                force,
                discard_restore,
            };
            crate::edge::server::format(&Config::load(&config.config)?, assume_clean, opts)
        }
        Cmd::ReplaceSecondary { config, yes } => {
            let done = crate::edge::server::replace_secondary(&Config::load(&config.config)?, yes)?;
            println!("{done}");
            Ok(())
        }
        Cmd::Run {
            config,
            allow_missing_secondary,
        } => crate::edge::server::run(&Config::load(&config.config)?, allow_missing_secondary),
        Cmd::AttachSecondary {
            replace,
            target,
            wait: w,
        } => {
            let socket = target.socket()?;
            println!("{}", client::attach(&socket, replace)?);
            if w.wait {
                wait(&socket, w.timeout)?;
            }
            Ok(())
        }
        Cmd::Split { target, wait } => command(&target, Command::Split, &wait),
        Cmd::Establish { full, target, wait } => {
            command(&target, Command::Establish { full }, &wait)
        }
        Cmd::Restore {
            incremental,
            protect,
            target,
            wait,
        } => {
            let cmd = Command::Restore {
                incremental,
                protect,
            };
            command(&target, cmd, &wait)
        }
        Cmd::Status {
            json,
            config_dir,
            target,
        } if target.all => status_all(&crate::edge::fleet::config_dir(config_dir.as_deref()), json),
        Cmd::Status {
            config_dir: Some(_),
            ..
        } => Err(Error::config(
            "--config-dir goes with --all; usage: splitmirror status --all [--config-dir DIR] [--json]",
        )),
        Cmd::Status { json, target, .. } => {
            let t = Target {
                config: target.config,
                socket: target.socket,
            };
            status(&t.socket()?, json)
        }
        Cmd::Wait { timeout, target } => wait(&target.socket()?, timeout),
        Cmd::Verify { json, target } => verify(&target.socket()?, json),
        Cmd::List { json, dir } => list(
            &crate::edge::fleet::config_dir(dir.config_dir.as_deref()),
            json,
        ),
        Cmd::Set { target, settings } => set(&target.socket()?, &settings),
        Cmd::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "splitmirror",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Cmd::Man { dir } => man_pages(&dir),
    }
}

fn command(target: &Target, cmd: Command, opts: &WaitArgs) -> Result<()> {
    let socket = target.socket()?;
    client::command(&socket, cmd)?;
    println!("{}", command_done(cmd));
    if opts.wait {
        wait(&socket, opts.timeout)?;
    }
    Ok(())
}

fn command_done(cmd: Command) -> &'static str {
    match cmd {
        Command::Split => "split: done; the secondary is frozen, primary changes are tracked",
        Command::Establish { .. } => {
            "establish: started; `splitmirror wait` blocks until the secondary is in sync"
        }
        Command::Restore { .. } => {
            "restore: started; the device shows the restored data now, \
             `splitmirror wait` blocks until the copy is done"
        }
    }
}

// ---------------------------------------------------------------------------
// status

fn status(socket: &Path, json: bool) -> Result<()> {
    let st = client::status(socket)?;
    if json {
        let text = serde_json::to_string_pretty(&st).map_err(|e| Error::runtime(e.to_string()))?;
        println!("{text}");
    } else {
        print!("{}", render_status(&st));
    }
    Ok(())
}

/// The human form, in the spirit of `mdadm --detail`: right-aligned labels.
pub fn render_status(st: &Status) -> String {
    let rows = status_rows(st);
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(k, v)| format!("{k:>width$} : {v}\n"))
        .collect()
}

fn status_rows(st: &Status) -> Vec<(&'static str, String)> {
    let mut rows = vec![
        ("Name", st.name.clone()),
        (
            "Device",
            match (&st.device, st.zero_copy) {
                (None, _) => "-".into(),
                (Some(d), false) => d.clone(),
                (Some(d), true) => format!("{d} (zero copy)"),
            },
        ),
        ("State", st.state.to_string()),
        ("Primary", st.primary.clone()),
        (
            "Secondary",
            if st.secondary_missing {
                format!("{} (missing)", st.secondary)
            } else {
                st.secondary.clone()
            },
        ),
        ("Primary Id", id_or_dash(&st.primary_id)),
        ("Secondary Id", id_or_dash(&st.secondary_id)),
        ("Track Size", human_bytes(st.track_size)),
        (
            "Tracks",
            format!("{} ({})", st.tracks, human_bytes(st.tracks * st.track_size)),
        ),
        ("Changed Since Split", st.changed_since_split.to_string()),
        ("Restore Pending", st.restore_pending.to_string()),
        ("Secondary Stale", st.secondary_stale.to_string()),
        ("Split Time", split_time_line(st)),
    ];
    match &st.operation {
        None => rows.push(("Operation", "none".into())),
        Some(op) => {
            rows.push(("Operation", operation_line(op)));
            if op.paused {
                rows.push((
                    "Copy",
                    format!(
                        "paused by a read error; retried every {} s (see Errors)",
                        crate::edge::server::PAUSE_RETRY.as_secs()
                    ),
                ));
            }
            if !op.priority.is_empty() {
                rows.push((
                    "Priority",
                    format!(
                        "{} ({} tracks in flight now)",
                        match op.priority.as_str() {
                            "balanced" => "balanced".to_string(),
                            p => format!("{p} first"),
                        },
                        op.copy_depth
                    ),
                ));
            }
            rows.push(("Rate", human_rate(op.bytes_per_sec)));
            rows.push(("ETA", op.eta_secs.map_or("-".into(), human_secs)));
        }
    }
    let errors = if st.errors.is_empty() {
        "none".to_string()
    } else {
        st.errors.join("; ")
    };
    rows.push(("Errors", errors));
    rows
}

/// An older server reports no identities.
fn id_or_dash(id: &str) -> String {
    if id.is_empty() {
        "-".into()
    } else {
        id.into()
    }
}

/// `2026-11-30T07:21:22Z (12m05s ago)`, or `-` outside split/restoring/degraded.
fn split_time_line(st: &Status) -> String {
    match (st.split_time, st.split_age_secs) {
        (Some(t), Some(age)) => format!(
            "{} ({} ago)",
            crate::edge::splittime::rfc3339(t),
            human_secs(age as f64)
        ),
        (Some(t), None) => crate::edge::splittime::rfc3339(t),
        _ => "-".into(),
    }
}

/// `restore (full, protect) 14.5% (1191/8192 tracks)`.
fn operation_line(op: &OperationStatus) -> String {
    let mut how = vec![if op.incremental {
        "incremental"
    } else {
        "full"
    }];
    if op.protect {
        how.push("protect");
    }
    format!(
        "{} ({}) {:.1}% ({}/{} tracks)",
        op.kind,
        how.join(", "),
        op.percent,
        op.done,
        op.total
    )
}

/// `128 KiB` for exact binary sizes, `1.5 GiB` otherwise.
pub fn human_bytes(v: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if v < 1024 {
        return format!("{v} B");
    }
    let mut x = v as f64;
    let mut unit = "B";
    for u in UNITS {
        if x < 1024.0 {
            break;
        }
        x /= 1024.0;
        unit = u;
    }
    if x.fract() == 0.0 {
        format!("{x:.0} {unit}")
    } else {
        format!("{x:.1} {unit}")
    }
}

fn human_rate(bytes_per_sec: u64) -> String {
    format!("{:.1} MiB/s", bytes_per_sec as f64 / (1u64 << 20) as f64)
}

/// `11s`, `2m05s`, `1h02m`.
pub fn human_secs(secs: f64) -> String {
    let s = secs.max(0.0).ceil() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// `restore: 45.2% (3700/8192 tracks), 410.0 MiB/s, eta 11s`.
pub fn progress_line(op: &OperationStatus) -> String {
    let eta = op.eta_secs.map_or("-".into(), human_secs);
    format!(
        "{}: {:.1}% ({}/{} tracks), {}, eta {eta}",
        op.kind,
        op.percent,
        op.done,
        op.total,
        human_rate(op.bytes_per_sec)
    )
}

// ---------------------------------------------------------------------------
// the host's volumes, live settings, man pages

fn list(dir: &Path, json: bool) -> Result<()> {
    let entries = crate::edge::fleet::discover(dir, &crate::edge::fleet::run_dir());
    if json {
        print_json(&crate::edge::fleet::list_json(&entries))
    } else {
        print!("{}", crate::edge::fleet::render_list(&entries));
        Ok(())
    }
}

fn status_all(dir: &Path, json: bool) -> Result<()> {
    let entries = crate::edge::fleet::discover(dir, &crate::edge::fleet::run_dir());
    if json {
        let doc = serde_json::json!({
            "schema_version": crate::edge::control::STATUS_SCHEMA_VERSION,
            "volumes": entries,
        });
        return print_json(&doc);
    }
    let blocks: Vec<String> = entries
        .iter()
        .map(|e| match &e.status {
            Some(st) => render_status(st),
            None => {
                let mut rows = vec![("Name", e.name.clone()), ("State", e.state())];
                if let Some(c) = &e.config {
                    rows.push(("Config", c.display().to_string()));
                }
                if let Some(err) = &e.error {
                    rows.push(("Errors", one_line(err)));
                }
                let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
                rows.iter()
                    .map(|(k, v)| format!("{k:>width$} : {v}\n"))
                    .collect()
            }
        })
        .collect();
    print!("{}", blocks.join("\n"));
    Ok(())
}

fn print_json(v: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::runtime(e.to_string()))?;
    println!("{text}");
    Ok(())
}

fn set(socket: &Path, settings: &[String]) -> Result<()> {
    for line in client::set(socket, settings)? {
        println!("set {line}");
    }
    Ok(())
}

/// splitmirror.1 and one splitmirror-COMMAND.1 per command.
fn man_pages(dir: &Path) -> Result<()> {
    let io =
        |e: std::io::Error| Error::runtime(format!("writing man pages to {}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    let cmd = Cli::command();
    write_man(dir, "splitmirror", cmd.clone()).map_err(io)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("splitmirror-{}", sub.get_name());
        write_man(dir, &name, sub.clone()).map_err(io)?;
    }
    Ok(())
}

fn write_man(dir: &Path, name: &str, cmd: clap::Command) -> std::io::Result<()> {
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd).title(name).render(&mut out)?;
    std::fs::write(dir.join(format!("{name}.1")), out)
}

// ---------------------------------------------------------------------------
// wait

const POLL_INTERVAL: Duration = Duration::from_millis(250);
const PLAIN_INTERVAL: Duration = Duration::from_secs(5);

/// Whether a copy is running, or about to run (the state says so before the
/// operation shows up, e.g. between restore and resync).
fn busy(st: &Status) -> bool {
    st.operation.is_some() || st.state.copy_kind().is_some()
}

fn wait(socket: &Path, timeout: Option<f64>) -> Result<()> {
    let deadline = timeout.map(|t| Instant::now() + Duration::from_secs_f64(t));
    let mut shown = Progress::new(std::io::stderr().is_terminal());
    let result = wait_loop(socket, deadline, timeout, &mut shown);
    shown.finish();
    let st = result?;
    println!("{}: {}", st.name, st.state);
    Ok(())
}

fn wait_loop(
    socket: &Path,
    deadline: Option<Instant>,
    timeout: Option<f64>,
    shown: &mut Progress,
) -> Result<Status> {
    let grace = paused_grace();
    // Since when the copy looks paused without progress.
    let mut paused_since: Option<(Instant, u64)> = None;
    loop {
        let st = client::status(socket)?;
        if !busy(&st) {
            return Ok(st);
        }
        let done = st.operation.as_ref().map_or(0, |op| op.done);
        paused_since = match paused_since {
            _ if !paused(&st) => None,
            Some((t, d)) if d == done => Some((t, d)),
            _ => Some((Instant::now(), done)),
        };
        if paused_since.is_some_and(|(t, _)| t.elapsed() >= grace) {
            return Err(paused_error(&st));
        }
        shown.update(&st);
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(timed_out(&st, timeout.unwrap_or(0.0)));
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// How long `wait` watches a paused copy before it gives up: one retry of
/// the server's (every `PAUSE_RETRY`) and a margin, so a device repaired
/// while waiting resumes the copy and `wait` goes on.
/// `SPLITMIRROR_WAIT_PAUSED_GRACE` (seconds) overrides it.
fn paused_grace() -> Duration {
    std::env::var("SPLITMIRROR_WAIT_PAUSED_GRACE")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(crate::edge::server::PAUSE_RETRY + Duration::from_secs(5))
}

/// The copy stopped on a read error (`on_error: pause`), or a copy state
/// has no running operation but errors: waiting longer may never end.
fn paused(st: &Status) -> bool {
    match &st.operation {
        Some(op) => op.paused,
        None => !st.errors.is_empty(),
    }
}

fn paused_error(st: &Status) -> Error {
    let last = st.errors.last().map_or("", String::as_str);
    Error::runtime(format!(
        "the {} copy is paused by an error: {last}; the server retries every {}s, \
         fix the device (or set restore.on_error: skip) and run `splitmirror wait` again",
        st.state,
        crate::edge::server::PAUSE_RETRY.as_secs()
    ))
}

fn timed_out(st: &Status, secs: f64) -> Error {
    let what = st.operation.as_ref().map_or(st.state.to_string(), |op| {
        format!("{} at {:.1}%", op.kind, op.percent)
    });
    Error::runtime(format!(
        "timed out after {secs}s waiting for the copy ({what}); it goes on in the server, \
         run `splitmirror wait` again"
    ))
}

/// Progress as a bar on a terminal, or a plain line every few seconds.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    kind: Option<OperationKind>,
    terminal: bool,
    last_line: Option<Instant>,
}

impl Progress {
    fn new(terminal: bool) -> Progress {
        Progress {
            bar: None,
            kind: None,
            terminal,
            last_line: None,
        }
    }

    fn update(&mut self, st: &Status) {
        let Some(op) = &st.operation else { return };
        if self.terminal {
            self.update_bar(op);
        } else if self.last_line.is_none_or(|t| t.elapsed() >= PLAIN_INTERVAL) {
            println!("{}", progress_line(op));
            self.last_line = Some(Instant::now());
        }
    }

    /// A new bar per operation kind, since restore is followed by resync.
    fn update_bar(&mut self, op: &OperationStatus) {
        if self.bar.is_none() || self.kind != Some(op.kind) {
            self.finish();
            self.bar = Some(new_bar(op));
            self.kind = Some(op.kind);
        }
        if let Some(bar) = &self.bar {
            bar.set_length(op.total);
            bar.set_position(op.done);
            let eta = op.eta_secs.map_or("-".into(), human_secs);
            bar.set_message(format!("{}, eta {eta}", human_rate(op.bytes_per_sec)));
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
    }
}

fn new_bar(op: &OperationStatus) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(op.total);
    let style = indicatif::ProgressStyle::with_template(
        "{prefix:>9} [{bar:40}] {percent:>3}% {pos}/{len} tracks, {msg}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(op.kind.name());
    bar
}

// ---------------------------------------------------------------------------
// verify

fn verify(socket: &Path, json: bool) -> Result<()> {
    let report = client::verify(socket)?;
    if json {
        let doc = serde_json::json!({
            "schema_version": crate::edge::control::STATUS_SCHEMA_VERSION,
            "compared": report.compared,
            "mismatches": report.mismatches,
        });
        println!("{doc}");
    } else {
        print!("{}", render_verify(&report));
    }
    if report.mismatches.is_empty() {
        return Ok(());
    }
    Err(Error::runtime(format!(
        "verify found {} mismatching track(s) that should be identical; \
         run `splitmirror establish --full` to copy them again",
        report.mismatches.len()
    )))
}

/// How many mismatching track numbers to print; the count is always shown.
const MAX_LISTED: usize = 100;

pub fn render_verify(r: &VerifyReport) -> String {
    let mut out = format!(
        "compared: {} tracks\nmismatching: {} tracks\n",
        r.compared,
        r.mismatches.len()
    );
    if !r.mismatches.is_empty() {
        let listed: Vec<String> = r
            .mismatches
            .iter()
            .take(MAX_LISTED)
            .map(u64::to_string)
            .collect();
        let more = r.mismatches.len().saturating_sub(MAX_LISTED);
        let tail = if more > 0 {
            format!(" (and {more} more)")
        } else {
            String::new()
        };
        out.push_str(&format!("mismatching tracks: {}{tail}\n", listed.join(" ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::VolumeState;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn journal_lines_keep_their_priority() {
        assert_eq!(syslog_priority(log::Level::Error), 3);
        assert_eq!(syslog_priority(log::Level::Warn), 4);
        assert_eq!(syslog_priority(log::Level::Info), 6);
        assert_eq!(syslog_priority(log::Level::Debug), 7);
        assert!(journal_stream_matches("8:1234", 8, 1234));
        assert!(!journal_stream_matches("8:1234", 8, 99));
        assert!(!journal_stream_matches("garbage", 8, 1234));
    }

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(128 << 10), "128 KiB");
        assert_eq!(human_bytes(1536 << 20), "1.5 GiB");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_secs(11.2), "12s");
        assert_eq!(human_secs(125.0), "2m05s");
        assert_eq!(human_secs(3720.0), "1h02m");
    }

    fn sample() -> Status {
        Status {
            name: "vol0".into(),
            device: Some("/dev/ublkb0".into()),
            primary: "/dev/a".into(),
            secondary: "/dev/b".into(),
            primary_id: "wwid:naa.5000c500a1b2c3d4".into(),
            secondary_id: "serial:S3Z9NB0K".into(),
            state: VolumeState::Restoring,
            track_size: 128 << 10,
            tracks: 8192,
            changed_since_split: 120,
            restore_pending: 7001,
            secondary_stale: 14,
            operation: Some(OperationStatus {
                kind: OperationKind::Restore,
                incremental: false,
                protect: false,
                total: 8192,
                done: 3700,
                percent: 45.17,
                bytes_per_sec: 410 << 20,
                eta_secs: Some(10.2),
                paused: false,
                priority: "host".into(),
                copy_depth: 8,
            }),
            errors: vec![],
            read_repairs: 0,
            schema_version: 1,
            split_time: Some(1_764_487_200),
            split_age_secs: Some(725),
            secondary_missing: false,
            zero_copy: false,
        }
    }

    #[test]
    fn renders_progress_and_status() {
        let st = sample();
        let op = st.operation.as_ref().unwrap();
        assert_eq!(
            progress_line(op),
            "restore: 45.2% (3700/8192 tracks), 410.0 MiB/s, eta 11s"
        );
        let text = render_status(&st);
        assert!(text.contains("Track Size : 128 KiB"), "{text}");
        assert!(text.contains("Secondary Id : serial:S3Z9NB0K"), "{text}");
        assert!(
            text.contains("Split Time : 2025-11-30T07:20:00Z (12m05s ago)"),
            "{text}"
        );
        assert!(
            text.contains("restore (full) 45.2% (3700/8192 tracks)"),
            "{text}"
        );
        assert!(
            text.contains("Priority : host first (8 tracks in flight now)"),
            "{text}"
        );
        assert!(busy(&st));
    }

    #[test]
    fn paused_copy_ends_the_wait() {
        let mut st = sample();
        st.operation = None;
        assert!(!paused(&st));
        st.errors.push("read error on track 5".into());
        assert!(paused(&st));
        assert!(paused_error(&st).to_string().contains("track 5"));
    }
}
