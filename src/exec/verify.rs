//! `verify`: compares the primary and the secondary track by track where
//! the core says they must be identical, while host I/O goes on.

use crate::backend::buf::AlignedBuf;
use crate::backend::Backend;
use crate::core::{Dev, VerifyLock, Volume};
use crate::edge::control::VerifyReport;
use crate::error::{Error, Result};
use crate::exec::engine::TokenBucket;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::thread;
use std::time::Duration;

/// Compares every track no table marks as different, at most `rate_limit`
/// bytes/s of reads (0 = unlimited), until done or `stop` is set. Each
/// track is compared under the volume's gate and an exclusive track lock,
/// so no state change or write lands mid-compare; a busy track is retried.
pub(crate) fn compare<B: Backend>(
    vol: &Volume,
    b: &B,
    rate_limit: u64,
    stop: &AtomicBool,
) -> Result<VerifyReport> {
    let g = vol.geometry();
    let mut p = AlignedBuf::new(g.track_size() as usize);
    let mut s = AlignedBuf::new(g.track_size() as usize);
    let mut bucket = TokenBucket::new(rate_limit, g.track_size());
    let mut report = VerifyReport {
        compared: 0,
        mismatches: Vec::new(),
    };
    let stopped = || Error::runtime("verify interrupted: the server is stopping");
    for t in 0..g.tracks() {
        let (offset, len) = g.track_extent(t);
        let len = len as usize;
        loop {
            if stop.load(SeqCst) {
                return Err(stopped());
            }
            // Admitted, so that no state change happens mid-compare.
            let Ok(ticket) = vol.enter() else {
                thread::sleep(Duration::from_millis(1));
                continue;
            };
            match vol.lock_identical(&ticket, t) {
                VerifyLock::NotIdentical => break,
                VerifyLock::Busy => {
                    drop(ticket);
                    thread::sleep(Duration::from_millis(1));
                    continue;
                }
                VerifyLock::Locked => {}
            }
            let r = smol::block_on(async {
                b.read(Dev::Primary, offset, &mut p[..len]).await?;
                b.read(Dev::Secondary, offset, &mut s[..len]).await
            });
            vol.unlock_identical(t);
            drop(ticket);
            r.map_err(|e| Error::runtime(format!("verify: reading track {t}: {e}")))?;
            report.compared += 1;
            if p[..len] != s[..len] {
                report.mismatches.push(t);
            }
            bucket.spend(2 * len as u64);
            if !bucket.wait_blocking(stop) {
                return Err(stopped());
            }
            break;
        }
    }
    Ok(report)
}
