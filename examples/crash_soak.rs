//! Crash soak with real processes: `cargo run --release --example crash_soak -- --trials N`.
//!
//! Each trial runs a child process that is the server without ublk: the real
//! metadata store and committer thread, the real copy engine (`run_copies`
//! on an io_uring thread), and a host writer that sends its writes through
//! `host::write` on an io_uring backend — the code a ublk queue calls.
//! The child loops through split → restore → establish while writing, and
//! reports on stdout every write it is about to issue (`ISSUE`) and every
//! write acknowledged (`ACK`). The parent kills it with SIGKILL at a random
//! moment, restarts it in recovery mode (which resumes the interrupted
//! operation and runs it to its end), then checks every 4 KiB block of the
//! volume: it must hold the last acknowledged write (or one that was in
//! flight), with the rollback a restore makes taken into account.
//!
//! The last line is `crash trials: N, acked writes lost: M`; exit 0 only if
//! M is 0. `--seed S` picks the first trial's seed; `--dir D` the scratch
//! directory (default: a temp dir under target/).

use splitmirror::backend::uring::{UringBackend, UringOptions};
use splitmirror::core::{Command, Geometry, Volume};
use splitmirror::exec::engine::{self, EngineConfig};
use splitmirror::exec::host;
use splitmirror::exec::load::HostLoad;
use splitmirror::metadata::{Binding, Committer, DataFlush, MetadataStore};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BLOCK: u64 = 4096;
const SIZE: u64 = 16 << 20;
const TRACK: u64 = 64 << 10;
const BLOCKS: usize = (SIZE / BLOCK) as usize;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--child") {
        let dir = PathBuf::from(&args[2]);
        let seed: u64 = args[3].parse().unwrap();
        let recover = args[4] == "recover";
        child(&dir, seed, recover);
        return;
    }
    let mut trials = 20u64;
    let mut seed = 1u64;
    let mut dir: Option<PathBuf> = None;
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().unwrap_or_else(|| usage(a));
        match a.as_str() {
            "--trials" => trials = val().parse().unwrap_or_else(|_| usage("--trials")),
            "--seed" => seed = val().parse().unwrap_or_else(|_| usage("--seed")),
            "--dir" => dir = Some(PathBuf::from(val())),
            _ => usage(a),
        }
    }
    let scratch = dir.unwrap_or_else(|| {
        let base = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target");
        std::fs::create_dir_all(&base).unwrap();
        tempfile::Builder::new()
            .prefix("crash-soak")
            .tempdir_in(base)
            .unwrap()
            .keep()
    });
    let mut lost_total = 0u64;
    for t in 0..trials {
        let s = seed + t;
        let lost = trial(&scratch.join(format!("t{s}")), s);
        lost_total += lost;
    }
    let _ = std::fs::remove_dir_all(&scratch);
    println!("crash trials: {trials}, acked writes lost: {lost_total}");
    std::process::exit(if lost_total == 0 { 0 } else { 1 });
}

fn usage(what: &str) -> ! {
    eprintln!(
        "crash_soak: bad argument {what}; usage: crash_soak [--trials N] [--seed S] [--dir D]"
    );
    std::process::exit(2)
}

/// The bytes write `seq` puts into volume block `block`.
fn block_pattern(seq: u64, block: u64) -> Vec<u8> {
    let mut r = fastrand::Rng::with_seed(seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ block);
    let mut v = vec![0u8; BLOCK as usize];
    // Stamp the identity too, so a mismatch names what it found.
    v[..8].copy_from_slice(&seq.to_le_bytes());
    v[8..16].copy_from_slice(&block.to_le_bytes());
    r.fill(&mut v[16..]);
    v
}

// ---------------------------------------------------------------- parent

/// What each block may hold: the last acknowledged write (`None` = the
/// initial zeros) and writes issued since that may or may not have landed.
#[derive(Clone, Default)]
struct BlockModel {
    acked: Option<u64>,
    maybe: Vec<u64>,
}

#[derive(Default)]
struct Model {
    blocks: Vec<BlockModel>,
    split_image: Option<Vec<BlockModel>>,
    restore_begun: bool,
    issued: HashMap<u64, (u64, u64)>,
    acks: u64,
}

impl Model {
    fn apply(&mut self, line: &str) {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["ISSUE", seq, off, len] => {
                let (seq, off, len) = (
                    seq.parse().unwrap(),
                    off.parse().unwrap(),
                    len.parse().unwrap(),
                );
                self.issued.insert(seq, (off, len));
                for b in off / BLOCK..(off + len) / BLOCK {
                    self.blocks[b as usize].maybe.push(seq);
                }
            }
            ["ACK", seq] => {
                let seq: u64 = seq.parse().unwrap();
                let (off, len) = self
                    .issued
                    .remove(&seq)
                    .expect("ACK of a write never issued");
                for b in off / BLOCK..(off + len) / BLOCK {
                    let m = &mut self.blocks[b as usize];
                    m.acked = Some(seq);
                    m.maybe.retain(|s| *s != seq);
                }
                self.acks += 1;
            }
            ["CMD", "split", "OK"] => self.split_image = Some(self.blocks.clone()),
            ["CMD", "restore", "BEGIN"] => self.restore_begun = true,
            ["CMD", "restore", "OK"] => self.restore_taken(),
            ["CMD", "restore", "REFUSED"] => self.restore_begun = false,
            _ => {}
        }
    }

    /// A restore brings back the split image: writes acked since the split
    /// are rolled back on purpose.
    fn restore_taken(&mut self) {
        self.restore_begun = false;
        self.blocks = self.split_image.clone().expect("restore without a split");
    }
}

fn spawn_child(dir: &Path, seed: u64, mode: &str) -> Child {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--child", dir.to_str().unwrap(), &seed.to_string(), mode])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child")
}

/// One trial; returns the number of acknowledged writes found lost.
fn trial(dir: &Path, seed: u64) -> u64 {
    std::fs::create_dir_all(dir).unwrap();
    format_volume(dir);
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut model = Model {
        blocks: vec![BlockModel::default(); BLOCKS],
        ..Default::default()
    };
    let kill_after = rng.u64(50..6000);
    let mut child = spawn_child(dir, seed, "run");
    let out = BufReader::new(child.stdout.take().unwrap());
    let mut lines = 0u64;
    let mut last_cmd = String::new();
    let mut killed = false;
    // Read to the end even after the kill: the child may have issued (and
    // had acknowledged) more writes than the lines read when it died; those
    // lines are still in the pipe, and the model must see every one.
    for line in out.lines() {
        let Ok(line) = line else { break };
        model.apply(&line);
        if line.starts_with("CMD") {
            last_cmd = line.clone();
        }
        lines += 1;
        if lines >= kill_after && !killed {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            killed = true;
        }
    }
    let _ = child.wait();
    // Recovery: resume and finish whatever operation was running.
    let mut rec = spawn_child(dir, seed, "recover");
    let out = BufReader::new(rec.stdout.take().unwrap());
    let mut loaded = String::new();
    let mut done = String::new();
    for line in out.lines().map_while(Result::ok) {
        if let Some(s) = line.strip_prefix("LOADED ") {
            loaded = s.to_string();
        }
        if let Some(s) = line.strip_prefix("DONE ") {
            done = s.to_string();
        }
    }
    let status = rec.wait().unwrap();
    assert!(status.success(), "seed {seed}: recovery failed ({status})");
    if model.restore_begun && loaded != "split" {
        // Killed between the restore's commit and its reply: it took.
        model.restore_taken();
    }
    let lost = check(dir, &model, seed, &done);
    eprintln!(
        "trial seed {seed}: killed after {lines} lines (last {last_cmd:?}), {} acked writes, recovered from {loaded} to {done}, lost {lost}",
        model.acks
    );
    let _ = std::fs::remove_dir_all(dir);
    lost
}

fn check(dir: &Path, model: &Model, seed: u64, state: &str) -> u64 {
    let primary = std::fs::read(dir.join("primary.img")).unwrap();
    let secondary = std::fs::read(dir.join("secondary.img")).unwrap();
    let mut lost = std::collections::BTreeSet::new();
    for (b, m) in model.blocks.iter().enumerate() {
        let r = b * BLOCK as usize..(b + 1) * BLOCK as usize;
        let got = &primary[r.clone()];
        let ok_value = |seq: Option<u64>| match seq {
            None => got.iter().all(|x| *x == 0),
            Some(s) => got == block_pattern(s, b as u64).as_slice(),
        };
        if !(ok_value(m.acked) || m.maybe.iter().any(|s| ok_value(Some(*s)))) {
            let found = u64::from_le_bytes(got[..8].try_into().unwrap());
            eprintln!(
                "seed {seed}: block {b} (track {}) lost write {:?}; found stamp {found}",
                b as u64 * BLOCK / TRACK,
                m.acked
            );
            lost.insert(m.acked.unwrap_or(0));
        }
        if state == "established" && primary[r.clone()] != secondary[r] {
            eprintln!(
                "seed {seed}: established but block {b} differs between primary and secondary"
            );
            lost.insert(u64::MAX - b as u64);
        }
    }
    lost.len() as u64
}

fn format_volume(dir: &Path) {
    for f in ["primary.img", "secondary.img"] {
        let file = File::create(dir.join(f)).unwrap();
        file.set_len(SIZE).unwrap();
    }
    let geometry = Geometry::new(SIZE, TRACK).unwrap();
    let vol = Volume::formatted(geometry, true);
    MetadataStore::format(&dir.join("meta"), &binding(), &vol, true).unwrap();
}

fn binding() -> Binding {
    Binding {
        volume_size: SIZE,
        track_size: TRACK,
        primary_size: SIZE,
        secondary_size: SIZE,
        ..Binding::default()
    }
}

// ---------------------------------------------------------------- child

fn open_data(path: &Path) -> File {
    let direct = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path);
    direct.unwrap_or_else(|_| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    })
}

fn emit(line: std::fmt::Arguments) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_fmt(line);
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

fn child(dir: &Path, seed: u64, recover: bool) {
    let primary = open_data(&dir.join("primary.img"));
    let secondary = open_data(&dir.join("secondary.img"));
    let (store, vol) = MetadataStore::open(&dir.join("meta"), &binding()).unwrap_or_else(|e| {
        eprintln!("crash_soak child: {e}");
        std::process::exit(1)
    });
    emit(format_args!("LOADED {}", vol.state().name()));
    let vol = Arc::new(vol);
    let (pfd, sfd) = (primary.as_raw_fd(), secondary.as_raw_fd());
    let flush: DataFlush = Box::new(move |set| {
        for d in set.devs() {
            let fd = match d {
                splitmirror::core::Dev::Primary => pfd,
                splitmirror::core::Dev::Secondary => sfd,
            };
            nix::unistd::fdatasync(fd).map_err(std::io::Error::from)?;
        }
        Ok(())
    });
    let committer = Committer::start(store, vol.clone(), flush, Duration::from_millis(20));
    let load = Arc::new(HostLoad::default());
    let stop = Arc::new(AtomicBool::new(false));
    let engine = spawn_engine(
        vol.clone(),
        &committer,
        load.clone(),
        stop.clone(),
        pfd,
        sfd,
    );
    if recover {
        while vol.state().copy_kind().is_some() {
            std::thread::sleep(Duration::from_millis(5));
        }
    } else {
        writer(&vol, &committer, &load, seed, pfd, sfd);
    }
    stop.store(true, Ordering::Relaxed);
    engine.join().unwrap();
    committer.stop().expect("final commit");
    emit(format_args!("DONE {}", vol.state().name()));
}

fn backend(pfd: i32, sfd: i32, committer: &Committer) -> UringBackend {
    let opts = UringOptions {
        buffer_size: TRACK as usize,
        ..Default::default()
    };
    UringBackend::new(pfd, sfd, opts)
        .expect("io_uring")
        .with_committer(&committer.handle())
}

fn spawn_engine(
    vol: Arc<Volume>,
    committer: &Committer,
    load: Arc<HostLoad>,
    stop: Arc<AtomicBool>,
    pfd: i32,
    sfd: i32,
) -> std::thread::JoinHandle<()> {
    let commit = committer.handle();
    std::thread::spawn(move || {
        let opts = UringOptions {
            buffer_size: TRACK as usize,
            ..Default::default()
        };
        let b = UringBackend::new(pfd, sfd, opts)
            .expect("io_uring")
            .with_committer(&commit);
        let cfg = EngineConfig {
            batch: 8,
            max_inflight: 16,
            busy_inflight: 4,
            ..Default::default()
        };
        b.block_on(async {
            while !stop.load(Ordering::Relaxed) {
                if vol.state().copy_kind().is_some() {
                    engine::run_copies(&vol, &b, &cfg, &stop, &load)
                        .await
                        .expect("copy engine");
                }
                splitmirror::backend::Backend::pause(&b).await;
            }
        });
    })
}

/// Host writes in concurrent batches of non-overlapping ranges, with
/// commands in between, forever (the parent kills the process).
fn writer(vol: &Volume, committer: &Committer, load: &HostLoad, seed: u64, pfd: i32, sfd: i32) {
    let b = backend(pfd, sfd, committer);
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut seq = 0u64;
    let script = [
        Command::Split,
        Command::Restore {
            incremental: false,
            protect: false,
        },
        Command::Split,
        Command::Establish { full: false },
        Command::Split,
        Command::Restore {
            incremental: true,
            protect: false,
        },
        Command::Split,
        Command::Establish { full: true },
    ];
    let started = Instant::now();
    let mut step = 0;
    loop {
        for _ in 0..rng.usize(2..12) {
            let batch = plan_batch(&mut rng, &mut seq);
            for (s, off, len) in &batch {
                emit(format_args!("ISSUE {s} {off} {len}"));
            }
            b.block_on(async {
                let writes = batch.iter().map(|&(s, off, len)| {
                    let b = &b;
                    async move {
                        let data: Vec<u8> = (off / BLOCK..(off + len) / BLOCK)
                            .flat_map(|blk| block_pattern(s, blk))
                            .collect();
                        let mut buf = splitmirror::backend::buf::AlignedBuf::new(data.len());
                        buf.copy_from_slice(&data);
                        let _g = load.enter();
                        let r = host::write(vol, b, off, (&buf[..]).into(), rng_fua(s)).await;
                        if r.is_ok() {
                            emit(format_args!("ACK {s}"));
                        }
                    }
                });
                engine::join_all(writes).await;
            });
        }
        let cmd = script[step % script.len()];
        // Let a restore or establish run a little before the next command.
        if vol.state().copy_kind().is_some() && rng.bool() {
            continue;
        }
        command(vol, &b, cmd);
        step += 1;
        if started.elapsed() > Duration::from_secs(60) {
            break;
        }
    }
}

fn rng_fua(seq: u64) -> bool {
    seq.is_multiple_of(7)
}

fn plan_batch(rng: &mut fastrand::Rng, seq: &mut u64) -> Vec<(u64, u64, u64)> {
    let mut taken: Vec<(u64, u64)> = Vec::new();
    let mut batch = Vec::new();
    for _ in 0..rng.usize(1..16) {
        let blocks = if rng.u8(0..4) == 0 {
            TRACK / BLOCK
        } else {
            rng.u64(1..=6)
        };
        let start = rng.u64(0..BLOCKS as u64 - blocks);
        let (off, len) = (start * BLOCK, blocks * BLOCK);
        if taken.iter().any(|&(o, l)| o < off + len && off < o + l) {
            continue;
        }
        taken.push((off, len));
        *seq += 1;
        batch.push((*seq, off, len));
    }
    batch
}

fn command(vol: &Volume, b: &UringBackend, cmd: Command) {
    let name = match cmd {
        Command::Split => "split",
        Command::Establish { .. } => "establish",
        Command::Restore { .. } => "restore",
    };
    if vol.check(cmd).is_err() {
        return;
    }
    emit(format_args!("CMD {name} BEGIN"));
    let r = b.block_on(engine::transition(vol, b, |v| v.apply(cmd)));
    match r {
        Ok(Ok(())) => emit(format_args!("CMD {name} OK")),
        Ok(Err(_)) => emit(format_args!("CMD {name} REFUSED")),
        Err(e) => {
            eprintln!("crash_soak child: {name}: {e}");
            std::process::exit(1)
        }
    }
}
