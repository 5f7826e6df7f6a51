//! `log-replay` from the outside: a dm-log-writes log image built here byte
//! by byte the way the kernel lays it out (super block in sector 0, then per
//! entry a header sector and its data), listed and replayed onto a file.

use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_log-replay");
const SS: usize = 512;
const MAGIC: u64 = 0x006a_7366_7773_6872;
const FLUSH: u64 = 1;
const FUA: u64 = 2;
const DISCARD: u64 = 4;
const MARK: u64 = 8;

fn header(sector: u64, nr: u64, flags: u64, name: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; SS];
    h[0..8].copy_from_slice(&sector.to_le_bytes());
    h[8..16].copy_from_slice(&nr.to_le_bytes());
    h[16..24].copy_from_slice(&flags.to_le_bytes());
    h[24..32].copy_from_slice(&(name.len() as u64).to_le_bytes());
    h[32..32 + name.len()].copy_from_slice(name);
    h
}

/// write 0xaa x2 at 0, FLUSH, mark "one", FUA write 0xbb at 3, discard of
/// sector 1, mark "two", write 0xcc at 5
fn image() -> Vec<u8> {
    let mut img = vec![0u8; SS];
    let mut n = 0u64;
    let mut push = |img: &mut Vec<u8>, h: Vec<u8>, data: &[u8]| {
        img.extend_from_slice(&h);
        img.extend_from_slice(data);
        n += 1;
    };
    push(&mut img, header(0, 2, 0, b""), &[0xaa; 2 * SS]);
    push(&mut img, header(0, 0, FLUSH, b""), &[]);
    push(&mut img, header(0, 0, MARK, b"one"), &[]);
    push(&mut img, header(3, 1, FUA, b""), &[0xbb; SS]);
    push(&mut img, header(1, 1, DISCARD, b""), &[]);
    push(&mut img, header(0, 0, MARK, b"two"), &[]);
    push(&mut img, header(5, 1, 0, b""), &[0xcc; SS]);
    img[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    img[8..16].copy_from_slice(&1u64.to_le_bytes());
    img[16..24].copy_from_slice(&n.to_le_bytes());
    img[24..28].copy_from_slice(&(SS as u32).to_le_bytes());
    img
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run log-replay")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn setup() -> (tempfile::TempDir, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let target = dir.path().join("target");
    std::fs::write(&log, image()).unwrap();
    std::fs::write(&target, vec![0x11u8; 8 * SS]).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    (dir, s(&log), s(&target))
}

#[test]
fn lists_entries_and_points() {
    let (_d, log, _) = setup();
    let o = run(&["list", &log]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "0 - 0 2\n1 FLUSH 0 0\n2 MARK 0 0 one\n3 FUA 3 1\n4 DISCARD 1 1\n5 MARK 0 0 two\n6 - 5 1\n"
    );
    let o = run(&["list", "--points", &log]);
    assert_eq!(
        stdout(&o),
        "1 FLUSH 0 0\n2 MARK 0 0 one\n3 FUA 3 1\n5 MARK 0 0 two\n"
    );
    let o = run(&["info", &log]);
    assert_eq!(stdout(&o), "entries 7 sectorsize 512\n");
}

#[test]
fn replays_to_a_mark_then_on_to_the_end() {
    let (_d, log, target) = setup();
    let o = run(&["replay", &log, &target, "--mark", "one"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "replayed entries 0..=2: 1 writes, 0 discards, 1024 bytes\n"
    );
    let t = std::fs::read(&target).unwrap();
    assert!(t[..2 * SS].iter().all(|&b| b == 0xaa));
    assert!(t[2 * SS..].iter().all(|&b| b == 0x11));

    // incremental: entries 3.. on top of the state at "one"
    let o = run(&["replay", &log, &target, "--from", "3", "--end"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let t = std::fs::read(&target).unwrap();
    let sector = |i: usize| &t[i * SS..(i + 1) * SS];
    assert!(sector(0).iter().all(|&b| b == 0xaa));
    assert!(
        sector(1).iter().all(|&b| b == 0),
        "the discard reads as zeros"
    );
    assert!(sector(2).iter().all(|&b| b == 0x11));
    assert!(sector(3).iter().all(|&b| b == 0xbb));
    assert!(sector(4).iter().all(|&b| b == 0x11));
    assert!(sector(5).iter().all(|&b| b == 0xcc));
}

#[test]
fn bad_input_is_one_line_and_exit_2() {
    let (d, log, target) = setup();
    for (args, want) in [
        (
            vec!["replay", &log, &target, "--mark", "nope"],
            "the log has no mark named 'nope'",
        ),
        (
            vec!["replay", &log, &target, "--to", "7"],
            "entry 7 is past the log's last entry (6)",
        ),
        (
            vec!["replay", &log, &target, "--from", "5", "--to", "4"],
            "--from 5 is after the last entry to apply (4)",
        ),
        (vec!["list", &target], "not a dm-log-writes log"),
    ] {
        let o = run(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        let e = stderr(&o);
        assert_eq!(e.lines().count(), 1, "{args:?}: {e}");
        assert!(
            e.starts_with("log-replay: ") && e.contains(want),
            "{args:?}: {e}"
        );
    }
    // a target too small for the log's writes
    let small = d.path().join("small");
    std::fs::write(&small, vec![0u8; 2 * SS]).unwrap();
    let o = run(&["replay", &log, small.to_str().unwrap(), "--end"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("entry 3 writes bytes 1536..2048"),
        "{}",
        stderr(&o)
    );
    // neither --to, --mark nor --end: usage error
    assert_eq!(run(&["replay", &log, &target]).status.code(), Some(2));
}
