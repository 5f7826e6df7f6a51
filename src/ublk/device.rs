//! The device's life across runs: adding it, recovering the one a dead
//! server left behind (user recovery), deleting it, and the id file that
//! names it between runs.

use super::DeviceParams;
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::{sys, UblkFlags};
use std::io;
use std::path::Path;

/// The device of an earlier run, as found on `run`.
pub(super) enum Previous {
    /// Nothing to do: none recorded, or it no longer exists.
    None,
    /// Quiesced by the death of its server: ready for `START_USER_RECOVERY`.
    Recoverable(u32),
    /// It exists but cannot be taken over; `delete` if it is ours.
    Stale { id: u32, why: String, delete: bool },
}

pub(super) fn add_device(p: &DeviceParams, flags: u64) -> Result<UblkCtrl, String> {
    UblkCtrlBuilder::default()
        .name("splitmirror")
        .id(p.id)
        .nr_queues(p.queues)
        .depth(p.depth)
        .io_buf_bytes(p.max_io)
        .ctrl_flags(flags)
        .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
        .build()
        .map_err(|e| format!("cannot create the ublk device: {e}"))
}

/// The device flags for user recovery, given the driver's features.
///
/// With `UBLK_F_USER_RECOVERY` a device outlives its server: when the
/// server dies the kernel quiesces the queues (host I/O waits, nothing
/// fails) until a new server takes over. `UBLK_F_USER_RECOVERY_REISSUE`
/// decides what happens to the requests the dead server had taken but not
/// completed: without it they fail with EIO (a filesystem sees a failed
/// journal write and shuts itself down); with it they are sent again to
/// the new server. Re-sending is safe here: none of them was acknowledged,
/// a write is redone with the same data at the same place (the write
/// intent / changed bits it needs are set again before it is
/// acknowledged), and reads and flushes are idempotent. So reissue when
/// the driver can.
pub(super) fn recovery_flags(features: u64) -> u64 {
    let rec = u64::from(sys::UBLK_F_USER_RECOVERY);
    let reissue = u64::from(sys::UBLK_F_USER_RECOVERY_REISSUE);
    if features & rec == 0 {
        0
    } else {
        rec | (features & reissue)
    }
}

/// The device flags for zero copy, given the driver's features and
/// whether the config allows it.
///
/// With `UBLK_F_AUTO_BUF_REG` the kernel registers each request's pages
/// in the queue's io_uring before handing the request over, and the
/// server's reads and writes of the data devices use them directly
/// instead of the kernel copying the bytes into the server and out again.
/// It is asked for with `UBLK_F_SUPPORT_ZERO_COPY`, as the driver's own
/// test servers do.
pub(super) fn zero_copy_flags(features: u64, allowed: bool) -> u64 {
    let auto = u64::from(sys::UBLK_F_AUTO_BUF_REG);
    if allowed && features & auto != 0 {
        auto | u64::from(sys::UBLK_F_SUPPORT_ZERO_COPY)
    } else {
        0
    }
}

pub(super) fn read_id(id_file: &Path) -> Option<u32> {
    let s = std::fs::read_to_string(id_file).ok()?;
    match s.trim().parse() {
        Ok(id) => Some(id),
        Err(_) => {
            log::warn!("ignoring {}: not a device id", id_file.display());
            None
        }
    }
}

pub(super) fn write_id(id_file: &Path, id: u32) -> io::Result<()> {
    if let Some(dir) = id_file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = id_file.with_extension("ublk-id.tmp");
    std::fs::write(&tmp, format!("{id}\n"))?;
    std::fs::rename(&tmp, id_file)
}

/// What became of the device recorded in `id_file`. It is taken for ours
/// when its queues, depth, buffer size and size match this volume's.
pub(super) fn previous(id_file: &Path, p: &DeviceParams, can_recover: bool) -> Previous {
    // Without a record (e.g. /run was cleared), a fixed `ublk.id` names
    // the candidate.
    let recorded = read_id(id_file);
    let Some(id) = recorded.or(u32::try_from(p.id).ok()) else {
        return Previous::None;
    };
    if !Path::new(&format!("/sys/class/ublk-char/ublkc{id}")).exists() {
        if recorded.is_some() {
            log::info!("/dev/ublkb{id} of an earlier run is gone: creating a new device");
        }
        return Previous::None;
    }
    let ctrl = match UblkCtrl::new_simple(id as i32) {
        Ok(c) => c,
        Err(e) => {
            return Previous::Stale {
                id,
                why: format!("cannot be inspected ({e}): left alone"),
                delete: false,
            }
        }
    };
    let info = ctrl.dev_info();
    let mut params = sys::ublk_params {
        len: std::mem::size_of::<sys::ublk_params>() as u32,
        types: sys::UBLK_PARAM_TYPE_BASIC,
        ..Default::default()
    };
    let size = ctrl
        .get_params(&mut params)
        .ok()
        .map(|_| params.basic.dev_sectors << 9);
    let ours = info.nr_hw_queues == p.queues
        && info.queue_depth == p.depth
        && info.max_io_buf_bytes == p.max_io
        && size == Some(p.size);
    if !ours {
        return Previous::Stale {
            id,
            why: "does not match this volume (another device took its number): left alone".into(),
            delete: false,
        };
    }
    if p.id >= 0 && id != p.id as u32 {
        return Previous::Stale {
            id,
            why: format!("is not the configured ublk.id {}: deleting it", p.id),
            delete: info.state != sys::UBLK_S_DEV_LIVE as u16,
        };
    }
    let state = u32::from(info.state);
    if state == sys::UBLK_S_DEV_LIVE {
        // Its server is alive (the data devices' O_EXCL opens make that
        // unlikely): not ours to take.
        return Previous::Stale {
            id,
            why: format!("is live (server pid {}): left alone", info.ublksrv_pid),
            delete: false,
        };
    }
    let can = info.flags & u64::from(sys::UBLK_F_USER_RECOVERY) != 0;
    if state == sys::UBLK_S_DEV_QUIESCED && can && can_recover {
        return Previous::Recoverable(id);
    }
    Previous::Stale {
        id,
        why: format!(
            "cannot be recovered (state {}, {}): deleting it",
            match state {
                sys::UBLK_S_DEV_DEAD => "dead".to_string(),
                sys::UBLK_S_DEV_QUIESCED => "quiesced".to_string(),
                s => s.to_string(),
            },
            if can {
                "created with user recovery"
            } else {
                "created without user recovery"
            }
        ),
        delete: true,
    }
}

pub(super) fn delete_device(id: u32) {
    match UblkCtrl::new_simple(id as i32).and_then(|c| {
        let _ = c.kill_dev();
        c.del_dev()
    }) {
        Ok(_) => log::info!("deleted the stale /dev/ublkb{id}"),
        Err(e) => log::warn!("cannot delete the stale /dev/ublkb{id}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_flags_follow_the_driver() {
        let rec = u64::from(sys::UBLK_F_USER_RECOVERY);
        let reissue = u64::from(sys::UBLK_F_USER_RECOVERY_REISSUE);
        assert_eq!(recovery_flags(0), 0);
        assert_eq!(recovery_flags(0x1fe), rec | reissue); // 6.12
        assert_eq!(recovery_flags(rec), rec);
        assert_eq!(recovery_flags(reissue), 0);
    }

    #[test]
    fn zero_copy_only_where_the_driver_registers_buffers_and_the_config_allows() {
        let auto = u64::from(sys::UBLK_F_AUTO_BUF_REG);
        assert_eq!(
            zero_copy_flags(0x1fe, true),
            0,
            "6.12 has no auto registration"
        );
        let on = zero_copy_flags(0x1fffff, true); // 7.3
        assert_ne!(on & auto, 0);
        assert_eq!(zero_copy_flags(0x1fffff, false), 0, "ublk.zero_copy: off");
    }

    #[test]
    fn id_file_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("sub/vol.ublk-id");
        assert_eq!(read_id(&f), None);
        write_id(&f, 7).unwrap();
        assert_eq!(read_id(&f), Some(7));
        std::fs::write(&f, "junk").unwrap();
        assert_eq!(read_id(&f), None);
    }
}
