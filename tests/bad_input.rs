//! Misuse is a clear, harmless error. Every case here checks:
//! - the exit code of docs/interface.md (2 usage/config, 3 wrong
//!   state, 1 runtime);
//! - one to three lines on stderr, no panic, no backtrace;
//! - no byte of any device or metadata file changed (hashes before/after).
//!
//! Cases that need a running server with a real ublk device (wrong state,
//! two `run`s, devices in use) are in the VM tier; cases that need only
//! the control socket are in tests/cli.rs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_splitmirror");
const MIB: u64 = 1 << 20;

/// A test that opens a metadata store in this process holds it for
/// writing; spawning the binary holds it for reading. Without it, a child
/// forked by another test thread while a store is open inherits the
/// store's descriptor until it execs, and with it the metadata lock: the
/// command under test then sees "in use by another splitmirror process".
static STORE_GUARD: std::sync::RwLock<()> = std::sync::RwLock::new(());

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    /// Two 4 MiB data files, a formatted metadata file and a config.
    fn formatted() -> Self {
        let f = Self::unformatted();
        let o = f.run(&[
            "format",
            "-c",
            f.config().to_str().unwrap(),
            "--assume-clean",
        ]);
        assert!(
            o.status.success(),
            "format: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        f
    }

    fn unformatted() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let f = Fixture { dir };
        f.data_file("primary.img", 4 * MIB);
        f.data_file("secondary.img", 4 * MIB);
        f.write_config("");
        f
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn config(&self) -> PathBuf {
        self.path("vol.yaml")
    }

    fn data_file(&self, name: &str, size: u64) {
        let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(self.path(name), data).unwrap();
    }

    /// The base config plus `extra` lines (which may override keys by
    /// being the only occurrence: the base has just the four required ones).
    fn write_config(&self, extra: &str) {
        self.write_config_with("primary.img", "secondary.img", "vol.meta", extra);
    }

    fn write_config_with(&self, primary: &str, secondary: &str, meta: &str, extra: &str) {
        let text = format!(
            "name: vol0\nprimary: {primary}\nsecondary: {secondary}\nmetadata: {meta}\n\
             track_size: 64KiB\ncontrol:\n  socket: {}\n{extra}",
            self.path("vol0.sock").display()
        );
        std::fs::write(self.config(), text).unwrap();
    }

    fn run(&self, args: &[&str]) -> Output {
        let _no_store_open_here = STORE_GUARD.read().unwrap_or_else(|e| e.into_inner());
        Command::new(BIN)
            .args(args)
            .env("RUST_BACKTRACE", "1")
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    }

    /// Hash of every file under the fixture directory.
    fn hashes(&self) -> BTreeMap<PathBuf, u32> {
        let mut out = BTreeMap::new();
        hash_dir(self.dir.path(), &mut out);
        out
    }

    /// Runs `args` and asserts the error contract; returns stderr.
    fn refuses(&self, args: &[&str], code: i32) -> String {
        let before = self.hashes();
        let o = self.run(args);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert_eq!(
            o.status.code(),
            Some(code),
            "{args:?}: exit code; stderr: {err}"
        );
        let lines = err.lines().filter(|l| !l.trim().is_empty()).count();
        assert!(
            (1..=3).contains(&lines),
            "{args:?}: want 1-3 stderr lines, got: {err}"
        );
        for bad in ["panicked", "backtrace", "RUST_BACKTRACE"] {
            assert!(!err.contains(bad), "{args:?}: {bad} in stderr: {err}");
        }
        assert_eq!(
            before,
            self.hashes(),
            "{args:?}: a device or metadata file changed"
        );
        err
    }

    fn cfg_args<'a>(&'a self, cmd: &'a str, buf: &'a str) -> Vec<&'a str> {
        vec![cmd, "-c", buf]
    }
}

fn hash_dir(dir: &Path, out: &mut BTreeMap<PathBuf, u32>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            hash_dir(&p, out);
        } else if p.is_file() {
            out.insert(p.clone(), crc32c::crc32c(&std::fs::read(&p).unwrap()));
        }
    }
}

/// A config error on `format` (which would otherwise write metadata).
fn format_refuses(extra: &str, needle: &str) {
    let f = Fixture::formatted();
    f.write_config(extra);
    let c = f.config();
    let err = f.refuses(&["format", "-c", c.to_str().unwrap(), "--force"], 2);
    assert!(
        err.to_lowercase().contains(needle),
        "want {needle:?} in: {err}"
    );
}

#[test]
fn missing_config_file() {
    let f = Fixture::formatted();
    let err = f.refuses(&["format", "-c", f.path("nope.yaml").to_str().unwrap()], 2);
    assert!(err.contains("nope.yaml"), "{err}");
}

#[test]
fn empty_config_file() {
    let f = Fixture::formatted();
    std::fs::write(f.path("empty.yaml"), "").unwrap();
    f.refuses(
        &[
            "format",
            "-c",
            f.path("empty.yaml").to_str().unwrap(),
            "--force",
        ],
        2,
    );
}

#[test]
fn unparsable_config_file() {
    let f = Fixture::formatted();
    std::fs::write(f.path("bad.yaml"), "name: [unclosed\n  primary: :\n").unwrap();
    f.refuses(
        &[
            "format",
            "-c",
            f.path("bad.yaml").to_str().unwrap(),
            "--force",
        ],
        2,
    );
}

#[test]
fn config_path_is_a_directory() {
    let f = Fixture::formatted();
    std::fs::create_dir(f.path("cfgdir")).unwrap();
    f.refuses(
        &[
            "format",
            "-c",
            f.path("cfgdir").to_str().unwrap(),
            "--force",
        ],
        2,
    );
}

#[test]
fn unknown_key() {
    format_refuses("restore:\n  batchsize: 4\n", "batchsize");
}

#[test]
fn bad_name() {
    let f = Fixture::formatted();
    let text = std::fs::read_to_string(f.config())
        .unwrap()
        .replace("name: vol0", "name: Vol 0!");
    std::fs::write(f.config(), text).unwrap();
    let c = f.config();
    let err = f.refuses(&["format", "-c", c.to_str().unwrap(), "--force"], 2);
    assert!(err.contains("name"), "{err}");
}

#[test]
fn ambiguous_size_suffix() {
    format_refuses("ublk:\n  max_io: 512KB\n", "max_io");
}

#[test]
fn bad_size_value() {
    format_refuses("restore:\n  rate_limit: lots\n", "rate_limit");
}

#[test]
fn track_size_not_power_of_two() {
    let f = Fixture::formatted();
    let text = std::fs::read_to_string(f.config())
        .unwrap()
        .replace("64KiB", "96KiB");
    std::fs::write(f.config(), text).unwrap();
    let err = f.refuses(
        &["format", "-c", f.config().to_str().unwrap(), "--force"],
        2,
    );
    assert!(err.contains("track_size"), "{err}");
}

#[test]
fn track_size_too_small() {
    let f = Fixture::formatted();
    let text = std::fs::read_to_string(f.config())
        .unwrap()
        .replace("64KiB", "2KiB");
    std::fs::write(f.config(), text).unwrap();
    f.refuses(
        &["format", "-c", f.config().to_str().unwrap(), "--force"],
        2,
    );
}

#[test]
fn track_size_too_large() {
    let f = Fixture::formatted();
    let text = std::fs::read_to_string(f.config())
        .unwrap()
        .replace("64KiB", "32MiB");
    std::fs::write(f.config(), text).unwrap();
    f.refuses(
        &["format", "-c", f.config().to_str().unwrap(), "--force"],
        2,
    );
}

#[test]
fn queues_zero() {
    format_refuses("ublk:\n  queues: 0\n", "queues");
}

#[test]
fn depth_out_of_range() {
    format_refuses("ublk:\n  depth: 5000\n", "depth");
}

#[test]
fn negative_rate_limit() {
    format_refuses("restore:\n  rate_limit: -5\n", "rate_limit");
}

#[test]
fn batch_larger_than_inflight() {
    format_refuses("restore:\n  batch: 64\n  max_inflight: 8\n", "batch");
}

#[test]
fn bad_on_error_value() {
    format_refuses("restore:\n  on_error: retry\n", "on_error");
}

#[test]
fn bad_zero_copy_value() {
    format_refuses("ublk:\n  zero_copy: maybe\n", "zero_copy");
}

#[test]
fn same_device_twice() {
    let f = Fixture::formatted();
    f.write_config_with("primary.img", "primary.img", "vol.meta", "");
    let err = f.refuses(
        &["format", "-c", f.config().to_str().unwrap(), "--force"],
        2,
    );
    assert!(
        err.contains("primary") && err.contains("secondary"),
        "{err}"
    );
}

#[test]
fn same_device_through_a_symlink() {
    let f = Fixture::formatted();
    std::os::unix::fs::symlink(f.path("primary.img"), f.path("alias.img")).unwrap();
    f.write_config_with("primary.img", "alias.img", "vol.meta", "");
    f.refuses(
        &["format", "-c", f.config().to_str().unwrap(), "--force"],
        2,
    );
}

#[test]
fn secondary_smaller_than_primary() {
    let f = Fixture::formatted();
    f.data_file("small.img", 2 * MIB);
    f.write_config_with("primary.img", "small.img", "vol.meta", "");
    let err = f.refuses(
        &["format", "-c", f.config().to_str().unwrap(), "--force"],
        2,
    );
    assert!(err.contains("smaller"), "{err}");
}

#[test]
fn metadata_on_a_data_device() {
    let f = Fixture::formatted();
    f.write_config_with("primary.img", "secondary.img", "primary.img", "");
    f.refuses(
        &["format", "-c", f.config().to_str().unwrap(), "--force"],
        2,
    );
}

#[test]
fn metadata_on_a_data_device_through_a_symlink() {
    let f = Fixture::formatted();
    std::os::unix::fs::symlink(f.path("secondary.img"), f.path("meta-link")).unwrap();
    f.write_config_with("primary.img", "secondary.img", "meta-link", "");
    f.refuses(
        &["format", "-c", f.config().to_str().unwrap(), "--force"],
        2,
    );
}

#[test]
fn missing_primary_device() {
    let f = Fixture::formatted();
    f.write_config_with("gone.img", "secondary.img", "vol.meta", "");
    let err = f.refuses(
        &["format", "-c", f.config().to_str().unwrap(), "--force"],
        2,
    );
    assert!(err.contains("gone.img"), "{err}");
}

#[test]
fn format_twice_without_force() {
    let f = Fixture::formatted();
    let err = f.refuses(&["format", "-c", f.config().to_str().unwrap()], 2);
    assert!(err.contains("--force"), "{err}");
}

#[test]
fn run_without_ublk_driver() {
    if Path::new("/dev/ublk-control").exists() {
        panic!("this host has /dev/ublk-control: the no-driver case is tested only where ublk_drv is absent (it runs in the VM tier otherwise)");
    }
    let f = Fixture::formatted();
    let err = f.refuses(&["run", "-c", f.config().to_str().unwrap()], 1);
    assert!(err.contains("ublk_drv"), "{err}");
}

#[test]
fn run_with_corrupt_metadata() {
    let f = Fixture::formatted();
    let mut meta = std::fs::read(f.path("vol.meta")).unwrap();
    // Inside the checksummed bytes of the superblock and of its backup
    // (the last block).
    let backup = meta.len() - 4096;
    meta[20] ^= 0xff;
    meta[backup + 20] ^= 0xff;
    std::fs::write(f.path("vol.meta"), meta).unwrap();
    let err = f.refuses(&["run", "-c", f.config().to_str().unwrap()], 2);
    assert!(err.contains("vol.meta"), "{err}");
}

#[test]
fn run_with_foreign_metadata() {
    let f = Fixture::formatted();
    std::fs::write(f.path("vol.meta"), vec![0x5au8; 64 << 10]).unwrap();
    let err = f.refuses(&["run", "-c", f.config().to_str().unwrap()], 2);
    assert!(err.contains("vol.meta"), "{err}");
}

#[test]
fn run_with_metadata_of_other_devices() {
    let f = Fixture::formatted();
    // Same files, but a different track size than the metadata records.
    let text = std::fs::read_to_string(f.config())
        .unwrap()
        .replace("64KiB", "128KiB");
    std::fs::write(f.config(), text).unwrap();
    let err = f.refuses(&["run", "-c", f.config().to_str().unwrap()], 2);
    assert!(err.contains("track"), "{err}");
}

#[test]
fn run_without_format() {
    let f = Fixture::unformatted();
    let err = f.refuses(&["run", "-c", f.config().to_str().unwrap()], 2);
    assert!(err.contains("format"), "{err}");
}

fn client_without_server(cmd: &[&str]) {
    let f = Fixture::formatted();
    let c = f.config();
    let mut args = f.cfg_args(cmd[0], c.to_str().unwrap());
    args.extend_from_slice(&cmd[1..]);
    let err = f.refuses(&args, 1);
    assert!(err.contains("vol0.sock"), "{err}");
}

#[test]
fn split_without_server() {
    client_without_server(&["split"]);
}

#[test]
fn restore_without_server() {
    client_without_server(&["restore", "--incremental"]);
}

#[test]
fn establish_without_server() {
    client_without_server(&["establish", "--full"]);
}

#[test]
fn status_without_server() {
    client_without_server(&["status", "--json"]);
}

#[test]
fn wait_without_server() {
    client_without_server(&["wait", "--timeout", "1"]);
}

#[test]
fn verify_without_server() {
    client_without_server(&["verify"]);
}

#[test]
fn unknown_command_and_flag() {
    let f = Fixture::formatted();
    f.refuses(&["frobnicate"], 2);
    f.refuses(
        &["restore", "--sideways", "-c", f.config().to_str().unwrap()],
        2,
    );
}

#[test]
fn run_after_a_device_size_changed() {
    let f = Fixture::formatted();
    for d in ["primary.img", "secondary.img"] {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(f.path(d))
            .unwrap();
        file.set_len(8 * MIB).unwrap();
    }
    let err = f.refuses(&["run", "-c", f.config().to_str().unwrap()], 2);
    assert!(err.contains("size"), "{err}");
}

#[test]
fn run_with_metadata_of_an_older_format() {
    let f = Fixture::formatted();
    let mut meta = std::fs::read(f.path("vol.meta")).unwrap();
    // Version 1 in an otherwise valid superblock (crc32c of bytes 0..4092
    // at 4092, as the format keeps it).
    meta[8..12].copy_from_slice(&1u32.to_le_bytes());
    let crc = crc32c::crc32c(&meta[..4092]);
    meta[4092..4096].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(f.path("vol.meta"), meta).unwrap();
    let err = f.refuses(&["run", "-c", f.config().to_str().unwrap()], 2);
    assert!(
        err.contains("format version 1") && err.contains("format --force"),
        "{err}"
    );
}

#[test]
fn run_with_primary_and_secondary_swapped() {
    let f = Fixture::formatted();
    f.write_config_with("secondary.img", "primary.img", "vol.meta", "");
    let err = f.refuses(&["run", "-c", f.config().to_str().unwrap()], 2);
    assert!(
        err.contains("primary ") && err.contains("secondary.img"),
        "{err}"
    );
    assert!(
        err.contains("expected file:") && err.contains("found file:") && err.contains("swapped"),
        "{err}"
    );
}

/// The secondary file replaced by another of the same size (and content).
fn replace_secondary_file(f: &Fixture) {
    let tmp = f.path("new-secondary.img");
    std::fs::copy(f.path("secondary.img"), &tmp).unwrap();
    std::fs::rename(&tmp, f.path("secondary.img")).unwrap();
}

#[test]
fn run_with_a_replaced_secondary_of_the_same_size() {
    let f = Fixture::formatted();
    replace_secondary_file(&f);
    let err = f.refuses(&["run", "-c", f.config().to_str().unwrap()], 2);
    assert!(
        err.contains("secondary ") && err.contains("replace-secondary"),
        "{err}"
    );
}

#[test]
fn replace_secondary_wants_yes() {
    let f = Fixture::formatted();
    replace_secondary_file(&f);
    let c = f.config();
    let err = f.refuses(&["replace-secondary", "-c", c.to_str().unwrap()], 2);
    assert!(err.contains("--yes"), "{err}");
}

#[test]
fn replace_secondary_records_the_new_file() {
    use splitmirror::backend::device::Devices;
    use splitmirror::edge::config::Config;
    use splitmirror::metadata::MetadataStore;
    let f = Fixture::formatted();
    replace_secondary_file(&f);
    let c = f.config();
    let o = f.run(&["replace-secondary", "-c", c.to_str().unwrap(), "--yes"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        out.contains("degraded") && out.contains("establish"),
        "{out}"
    );
    // What `run` opens now passes the identity check, degraded with every
    // track to copy.
    let cfg = Config::load(&c).unwrap();
    let devs = Devices::open(&cfg).unwrap();
    let _store_open = STORE_GUARD.write().unwrap_or_else(|e| e.into_inner());
    let (_, vol) = MetadataStore::open(&cfg.metadata, &devs.binding(cfg.track_size)).unwrap();
    assert_eq!(vol.state().name(), "degraded");
    assert_eq!(
        vol.table(splitmirror::core::TableId::Changed).count(),
        vol.geometry().tracks()
    );
}

#[test]
fn format_over_a_metadata_path_holding_other_data() {
    let f = Fixture::unformatted();
    f.data_file("vol.meta", MIB);
    let c = f.config();
    let err = f.refuses(&["format", "-c", c.to_str().unwrap()], 2);
    assert!(
        err.contains("vol.meta") && err.contains("not splitmirror metadata"),
        "{err}"
    );
}

#[test]
fn format_refuses_a_secondary_holding_a_filesystem() {
    let f = Fixture::unformatted();
    let sec = std::fs::OpenOptions::new()
        .write(true)
        .open(f.path("secondary.img"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sec, &[0x53, 0xef], 1080).unwrap();
    let c = f.config();
    let err = f.refuses(&["format", "-c", c.to_str().unwrap()], 2);
    assert!(
        err.contains("secondary.img") && err.contains("ext2/3/4") && err.contains("--force"),
        "{err}"
    );
    let o = f.run(&["format", "-c", c.to_str().unwrap(), "--force"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn format_force_during_a_restore() {
    use splitmirror::backend::device::Devices;
    use splitmirror::core::Command as Cmd;
    use splitmirror::edge::config::Config;
    use splitmirror::metadata::MetadataStore;
    let f = Fixture::formatted();
    let c = f.config();
    {
        let _store_open = STORE_GUARD.write().unwrap_or_else(|e| e.into_inner());
        let cfg = Config::load(&c).unwrap();
        let devs = Devices::open(&cfg).unwrap();
        let (mut store, vol) =
            MetadataStore::open(&cfg.metadata, &devs.binding(cfg.track_size)).unwrap();
        for cmd in [
            Cmd::Split,
            Cmd::Restore {
                incremental: false,
                protect: false,
            },
        ] {
            assert!(vol.close_gate() && vol.is_drained());
            vol.apply(cmd).unwrap();
            vol.open_gate();
        }
        store.commit_with(&vol, |_| Ok(())).unwrap();
    }
    let err = f.refuses(&["format", "-c", c.to_str().unwrap(), "--force"], 2);
    assert!(
        err.contains("restore in progress") && err.contains("--discard-restore"),
        "{err}"
    );
    let o = f.run(&[
        "format",
        "-c",
        c.to_str().unwrap(),
        "--force",
        "--discard-restore",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Without the flag, a missing secondary is refused (exit 2) with the way
/// to start degraded; with it (or the config key) `run` gets past the
/// devices and the metadata, here to the missing ublk driver.
#[test]
fn run_with_the_secondary_missing() {
    if Path::new("/dev/ublk-control").exists() {
        panic!("this host has /dev/ublk-control: the missing-secondary start is tested only where ublk_drv is absent (the VM tier runs it for real)");
    }
    let f = Fixture::formatted();
    // Moved away, not removed: the file keeps its inode, so the other disk
    // created at the path below cannot reuse it (a file's identity is its
    // device and inode).
    std::fs::rename(f.path("secondary.img"), f.path("secondary.old")).unwrap();
    let c = f.config();
    let c = c.to_str().unwrap();
    let err = f.refuses(&["run", "-c", c], 2);
    assert!(
        err.contains("secondary.img")
            && err.contains("does not exist")
            && err.contains("--allow-missing-secondary"),
        "{err}"
    );
    let err = f.refuses(&["run", "-c", c, "--allow-missing-secondary"], 1);
    assert!(err.contains("ublk_drv"), "{err}");
    f.write_config("secondary_missing: degraded\n");
    let err = f.refuses(&["run", "-c", c], 1);
    assert!(err.contains("ublk_drv"), "{err}");
    f.write_config("secondary_missing: maybe\n");
    let err = f.refuses(&["run", "-c", c], 2);
    assert!(
        err.contains("secondary_missing") || err.contains("maybe"),
        "{err}"
    );
    // Another disk at the secondary's path is not "missing": refused as
    // before, flag or not.
    f.write_config("");
    f.data_file("secondary.img", 4 * MIB);
    let err = f.refuses(&["run", "-c", c, "--allow-missing-secondary"], 2);
    assert!(err.contains("replace-secondary"), "{err}");
}

/// A restoring volume cannot run without its secondary: the part of the
/// split image not yet restored is only there.
#[test]
fn run_with_the_secondary_missing_while_restoring() {
    use splitmirror::backend::device::Devices;
    use splitmirror::core::Command as Cmd;
    use splitmirror::edge::config::Config;
    use splitmirror::metadata::MetadataStore;
    let f = Fixture::formatted();
    let c = f.config();
    {
        let _store_open = STORE_GUARD.write().unwrap_or_else(|e| e.into_inner());
        let cfg = Config::load(&c).unwrap();
        let devs = Devices::open(&cfg).unwrap();
        let (mut store, vol) =
            MetadataStore::open(&cfg.metadata, &devs.binding(cfg.track_size)).unwrap();
        for cmd in [
            Cmd::Split,
            Cmd::Restore {
                incremental: false,
                protect: false,
            },
        ] {
            assert!(vol.close_gate() && vol.is_drained());
            vol.apply(cmd).unwrap();
            vol.open_gate();
        }
        store.commit_with(&vol, |_| Ok(())).unwrap();
    }
    std::fs::remove_file(f.path("secondary.img")).unwrap();
    let err = f.refuses(
        &[
            "run",
            "-c",
            c.to_str().unwrap(),
            "--allow-missing-secondary",
        ],
        2,
    );
    assert!(
        err.contains("restoring") && err.contains("secondary.img"),
        "{err}"
    );
}
