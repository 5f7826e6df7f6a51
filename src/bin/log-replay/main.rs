//! `log-replay`: lists and replays a dm-log-writes log (the kernel's
//! record of every write, flush, FUA, discard and mark a device saw), to
//! rebuild the device as a power cut at any logged point would have left it.
//! Used by the VM tier's power-loss scenario; written from the kernel's
//! documented log format (see `log.rs`).
//!
//! ```text
//! log-replay list LOG [--points]
//! log-replay replay LOG TARGET (--to N | --mark NAME | --end) [--from K]
//! ```

mod log;

use clap::{ArgGroup, Parser, Subcommand};
use log::{Entry, Log, LogError, ReadAt, WriteAt};
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "log-replay", about = "List and replay a dm-log-writes log")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// One line per entry: INDEX FLAGS SECTOR NR_SECTORS [MARK]
    /// (sectors in the log's sector size, see `info`).
    List {
        log: PathBuf,
        /// Only the points a power cut is worth checking at: FLUSH, FUA, MARK.
        #[arg(long)]
        points: bool,
    },
    /// The super block: `entries N sectorsize S`.
    Info { log: PathBuf },
    /// Applies entries FROM..=TO to TARGET. Replaying K..=M onto a target
    /// that holds the state after 0..K-1 gives the state after 0..=M.
    #[command(group(ArgGroup::new("end_at").required(true).args(["to", "mark", "end"])))]
    Replay {
        log: PathBuf,
        target: PathBuf,
        /// Last entry to apply (inclusive).
        #[arg(long)]
        to: Option<u64>,
        /// Apply up to and including the first mark with this name.
        #[arg(long)]
        mark: Option<String>,
        /// Apply every entry.
        #[arg(long)]
        end: bool,
        /// First entry to apply (the target already holds the ones before).
        #[arg(long, default_value_t = 0)]
        from: u64,
    },
}

/// Exit 2: the input is wrong (not a log, no such mark); 1: I/O failed.
enum Failure {
    Input(String),
    Io(String),
}

impl From<LogError> for Failure {
    fn from(e: LogError) -> Self {
        match e {
            LogError::Format(m) => Failure::Input(m),
            LogError::Io(e) => Failure::Io(e.to_string()),
        }
    }
}

struct Dev(File);

impl ReadAt for Dev {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }
    /// Works for block devices too, whose metadata length is 0.
    fn len(&self) -> io::Result<u64> {
        (&self.0).seek(SeekFrom::End(0))
    }
}

impl WriteAt for Dev {
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }
}

fn open(path: &Path, write: bool) -> Result<Dev, Failure> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)
        .map(Dev)
        .map_err(|e| Failure::Input(format!("cannot open {}: {e}", path.display())))
}

fn print_entry(e: &Entry) {
    let mark = e
        .mark
        .as_deref()
        .map(|m| format!(" {m}"))
        .unwrap_or_default();
    println!(
        "{} {} {} {}{mark}",
        e.index, e.flags, e.sector, e.nr_sectors
    );
}

fn list(path: &Path, points_only: bool) -> Result<(), Failure> {
    let dev = open(path, false)?;
    let log = Log::open(&dev)?;
    for entry in log.entries() {
        let entry = entry?;
        if !points_only || entry.flags.is_point() {
            print_entry(&entry);
        }
    }
    Ok(())
}

/// The index of the first mark called `name`.
fn find_mark(log: &Log<'_, Dev>, name: &str) -> Result<u64, Failure> {
    for entry in log.entries() {
        let entry = entry?;
        if entry.mark.as_deref() == Some(name) {
            return Ok(entry.index);
        }
    }
    Err(Failure::Input(format!(
        "the log has no mark named '{name}'"
    )))
}

fn replay(
    log_path: &Path,
    target_path: &Path,
    to: Option<u64>,
    mark: Option<&str>,
    from: u64,
) -> Result<(), Failure> {
    let dev = open(log_path, false)?;
    let log = Log::open(&dev)?;
    let last = match (to, mark) {
        (Some(n), _) => n,
        (None, Some(name)) => find_mark(&log, name)?,
        (None, None) => log.sup.nr_entries.saturating_sub(1),
    };
    if last >= log.sup.nr_entries {
        return Err(Failure::Input(format!(
            "entry {last} is past the log's last entry ({})",
            log.sup.nr_entries.saturating_sub(1)
        )));
    }
    if from > last {
        return Err(Failure::Input(format!(
            "--from {from} is after the last entry to apply ({last})"
        )));
    }
    let mut target = open(target_path, true)?;
    let target_len = target.len().map_err(|e| Failure::Io(e.to_string()))?;
    let stats = log::replay(&log, &mut target, target_len, from, last)?;
    target
        .0
        .sync_all()
        .map_err(|e| Failure::Io(format!("flushing {}: {e}", target_path.display())))?;
    println!(
        "replayed entries {from}..={last}: {} writes, {} discards, {} bytes",
        stats.writes, stats.discards, stats.bytes
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match &cli.cmd {
        Cmd::List { log, points } => list(log, *points),
        Cmd::Info { log } => open(log, false).and_then(|dev| {
            let log = Log::open(&dev)?;
            println!(
                "entries {} sectorsize {}",
                log.sup.nr_entries, log.sup.sectorsize
            );
            Ok(())
        }),
        Cmd::Replay {
            log,
            target,
            to,
            mark,
            end: _,
            from,
        } => replay(log, target, *to, mark.as_deref(), *from),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Input(m)) => {
            eprintln!("log-replay: {m}");
            ExitCode::from(2)
        }
        Err(Failure::Io(m)) => {
            eprintln!("log-replay: {m}");
            ExitCode::from(1)
        }
    }
}
