//! `cargo bench --bench memory`: resident memory per track of 1 TiB, 8 TiB
//! and 16 TiB volumes (sparse files, 128 KiB tracks), and the time to open
//! each.
//!
//! Each size is measured in a fresh process (this binary run again with
//! `--one`), so that no allocation of one size is reused by the next. The
//! parent formats the metadata with `splitmirror format --assume-clean`
//! (the built binary); the child then opens the metadata with the store
//! `splitmirror run` opens (`MetadataStore::open`, which builds the
//! `Volume` and loads its tables), and drives the core as the queue threads
//! and the copy engine do, committing through the real metadata store (the
//! data files synced as a commit requires), in three states:
//!
//! - `established`: random 4 KiB writes (each marks write intent);
//! - `split`: split, then random 4 KiB writes (each marks "changed");
//! - `restoring`: full restore, then random 4 KiB writes (merges: "changed"
//!   set, "pending" cleared), random reads of pending tracks (the copy
//!   engine's "hot" list) and copies from the start of the volume.
//!
//! No data I/O is issued (the ublk device and its buffers are not part of
//! this measurement; see "fixed costs" in docs/performance.md). Enough
//! writes are made that every 4 MiB table chunk of the largest volume is
//! touched, the worst case for the tables. Figures, one per line:
//! `resident_bits_per_track: SIZE STATE X` (VmRSS growth since before the
//! open, in bits per track), `open_ms: SIZE X`, `first_write_ms: SIZE X`
//! (open + one write and its commit), and for each state the growth from
//! 1 TiB to 16 TiB: `resident_growth_bits_per_track: STATE X`.
//! `SPLITMIRROR_BENCH_DIR` sets where the files go (default
//! `target/bench-tmp`).

use splitmirror::backend::device::Devices;
use splitmirror::core::{Command, Volume, WriteOutcome};
use splitmirror::edge::config::Config;
use splitmirror::metadata::MetadataStore;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::Instant;

const TIB: u64 = 1 << 40;
const TRACK: u64 = 128 << 10;
/// Random writes per state: every chunk of 16 TiB (4096 per table) is hit
/// about 16 times, so each table a state writes is mixed everywhere.
const WRITES: u64 = 1 << 16;
/// Writes per group commit.
const WRITES_PER_COMMIT: u64 = 256;
/// Tracks the restore copies before the measurement.
const COPIES: u64 = 1 << 17;
const STATES: [&str; 3] = ["established", "split", "restoring"];

fn sizes() -> Vec<(&'static str, u64)> {
    // ext4 caps a file at 16 TiB - 4 KiB: one track less for the largest.
    vec![
        ("1TiB", TIB),
        ("8TiB", 8 * TIB),
        ("16TiB", 16 * TIB - TRACK),
    ]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir: PathBuf = std::env::var_os("SPLITMIRROR_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-tmp"));
    std::fs::create_dir_all(&dir).expect("bench dir");
    if let Some(i) = args.iter().position(|a| a == "--one") {
        let label = &args[i + 1];
        let size = args[i + 2].parse().expect("size");
        one(&config(&dir, label), label, size);
        return;
    }
    let mut resident = Vec::new();
    for (label, size) in sizes() {
        let cfg = config(&dir, label);
        create_sparse(&cfg.primary, size);
        create_sparse(&cfg.secondary, size);
        let _ = std::fs::remove_file(&cfg.metadata);
        let status = std::process::Command::new(env!("CARGO_BIN_EXE_splitmirror"))
            .args(["format", "--assume-clean", "-c"])
            .arg(&cfg.config)
            .status()
            .expect("run splitmirror format");
        assert!(status.success(), "splitmirror format: {status}");
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--one", label, &size.to_string()])
            .output()
            .expect("run the measurement");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        print!("{text}");
        assert!(
            out.status.success(),
            "{label}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for state in STATES {
            let bytes = field(&text, &format!("resident_bytes: {label} {state} "));
            resident.push((size, state, bytes));
        }
        for p in [&cfg.primary, &cfg.secondary, &cfg.metadata, &cfg.config] {
            let _ = std::fs::remove_file(p);
        }
    }
    let (small, large) = (sizes()[0].1, sizes()[2].1);
    for state in STATES {
        let at = |size| {
            resident
                .iter()
                .find(|r| r.0 == size && r.1 == state)
                .unwrap()
                .2
        };
        let tracks = (large.div_ceil(TRACK) - small.div_ceil(TRACK)) as f64;
        println!(
            "resident_growth_bits_per_track: {state} {:.2}",
            (at(large) as f64 - at(small) as f64) * 8.0 / tracks
        );
    }
}

/// The files of one volume.
struct Files {
    primary: PathBuf,
    secondary: PathBuf,
    metadata: PathBuf,
    config: PathBuf,
}

fn config(dir: &Path, label: &str) -> Files {
    let f = Files {
        primary: dir.join(format!("mem-{label}-primary")),
        secondary: dir.join(format!("mem-{label}-secondary")),
        metadata: dir.join(format!("mem-{label}.meta")),
        config: dir.join(format!("mem-{label}.yaml")),
    };
    let yaml = format!(
        "name: mem{}\nprimary: {}\nsecondary: {}\nmetadata: {}\ncontrol:\n  socket: {}\n",
        label.to_lowercase(),
        f.primary.display(),
        f.secondary.display(),
        f.metadata.display(),
        dir.join(format!("mem-{label}.sock")).display(),
    );
    std::fs::write(&f.config, yaml).expect("config file");
    f
}

fn create_sparse(path: &Path, size: u64) {
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)
        .expect("data file");
    f.set_len(size).expect("sparse size");
}

fn field(text: &str, prefix: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no '{prefix}' in the child's output"))
}

/// VmRSS of this process, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    field(&status, "VmRSS:") * 1024 // "VmRSS:   1234 kB"
}

/// The measuring child: one volume, three states.
fn one(cfg: &Files, label: &str, size: u64) {
    let before = rss();
    let t = Instant::now();
    let open = |p: &Path| OpenOptions::new().read(true).write(true).open(p);
    let data = [open(&cfg.primary).unwrap(), open(&cfg.secondary).unwrap()];
    // What `run` binds the metadata to: the devices' identities and sizes.
    let loaded = Config::load(&cfg.config).expect("config");
    let binding = Devices::open(&loaded).expect("devices").binding(TRACK);
    let (mut store, vol) = MetadataStore::open(&cfg.metadata, &binding).expect("metadata");
    println!("open_ms: {label} {:.1}", t.elapsed().as_secs_f64() * 1e3);
    let after_open = rss();
    let mut commit = |vol: &Volume| {
        store
            .commit_with(vol, |set| sync(&data, set))
            .expect("commit")
    };
    random_writes(&vol, size, 1, &mut commit);
    println!(
        "first_write_ms: {label} {:.1}",
        t.elapsed().as_secs_f64() * 1e3
    );
    println!(
        "resident_bytes: {label} open {}",
        after_open.saturating_sub(before)
    );
    let tracks = vol.geometry().tracks();
    let report = |state: &str| {
        let grown = rss().saturating_sub(before);
        println!("resident_bytes: {label} {state} {grown}");
        println!(
            "resident_bits_per_track: {label} {state} {:.2}",
            grown as f64 * 8.0 / tracks as f64
        );
    };
    let mut rng = fastrand::Rng::with_seed(16);

    random_writes_with(&vol, size, WRITES, &mut commit, &mut rng);
    report("established");

    apply(&vol, Command::Split);
    commit(&vol);
    random_writes_with(&vol, size, WRITES, &mut commit, &mut rng);
    report("split");

    apply(
        &vol,
        Command::Restore {
            incremental: false,
            protect: false,
        },
    );
    commit(&vol);
    random_writes_with(&vol, size, WRITES, &mut commit, &mut rng);
    random_reads(&vol, size, WRITES, &mut rng);
    copy(&vol, COPIES, &mut commit);
    report("restoring");
}

/// The data flush a commit asks for.
fn sync(data: &[File; 2], set: splitmirror::core::DevSet) -> std::io::Result<()> {
    if set.primary {
        data[0].sync_data()?;
    }
    if set.secondary {
        data[1].sync_data()?;
    }
    Ok(())
}

fn apply(vol: &Volume, cmd: Command) {
    assert!(vol.close_gate() && vol.is_drained());
    vol.apply(cmd).expect("command valid");
    vol.open_gate();
}

fn random_writes(vol: &Volume, size: u64, n: u64, commit: &mut impl FnMut(&Volume)) {
    random_writes_with(vol, size, n, commit, &mut fastrand::Rng::with_seed(1));
}

/// `n` 4 KiB writes at random offsets, as a queue thread plans and ends
/// them, with a group commit every [`WRITES_PER_COMMIT`].
fn random_writes_with(
    vol: &Volume,
    size: u64,
    n: u64,
    commit: &mut impl FnMut(&Volume),
    rng: &mut fastrand::Rng,
) {
    for i in 0..n {
        let offset = rng.u64(0..size / 4096) * 4096;
        let ticket = vol.enter().expect("gate open");
        let plan = vol.plan_write(&ticket, offset, 4096).expect("track free");
        vol.finish_write(plan, WriteOutcome::default());
        drop(ticket);
        if (i + 1) % WRITES_PER_COMMIT == 0 || i + 1 == n {
            commit(vol);
        }
    }
}

/// `n` 4 KiB reads at random offsets (pending tracks go on the hot list).
fn random_reads(vol: &Volume, size: u64, n: u64, rng: &mut fastrand::Rng) {
    for _ in 0..n {
        let offset = rng.u64(0..size / 4096) * 4096;
        let ticket = vol.enter().expect("gate open");
        std::hint::black_box(vol.plan_read(&ticket, offset, 4096));
    }
}

/// Copies `n` tracks as the copy engine does (hot ones first).
fn copy(vol: &Volume, n: u64, commit: &mut impl FnMut(&Volume)) {
    let mut done = 0;
    for batch in 1.. {
        let ticket = vol.enter().expect("gate open");
        let jobs = vol.next_copies(&ticket, 64);
        assert!(!jobs.is_empty(), "tracks left to copy");
        done += jobs.len() as u64;
        for job in jobs {
            vol.finish_copy(job, true);
        }
        drop(ticket);
        if batch % 16 == 0 || done >= n {
            commit(vol);
        }
        if done >= n {
            break;
        }
    }
}
