//! The host path: runs host reads, writes and flushes through the core's
//! plans against a [`Backend`]. A ublk queue calls exactly these functions;
//! so do the crash soak, the benches and the simulation, each with its own
//! backend. Everything here is async and never blocks the thread: a request
//! that must wait (for a track, a commit or a state change) yields to the
//! other requests of its executor.

use crate::backend::Backend;
use crate::core::{CommitSeq, Dev, ReadSeg, Volume, Wait, WriteOutcome, WritePlan, WriteStep};
use std::io;

/// Admits a request, waiting out any state change.
pub async fn admit<'v, B: Backend>(vol: &'v Volume, b: &B) -> crate::core::Ticket<'v> {
    loop {
        match vol.enter() {
            Ok(t) => return t,
            Err(_) => b.pause().await,
        }
    }
}

/// Waits until commit `seq` is durable.
pub async fn wait_commit<B: Backend>(vol: &Volume, b: &B, seq: CommitSeq) -> io::Result<()> {
    if vol.clock.is_durable(seq) {
        return Ok(());
    }
    let _waiting = vol.clock.wait_guard();
    while !vol.clock.is_durable(seq) {
        if b.commit_failed() {
            return Err(io::Error::other("metadata commit failed"));
        }
        b.request_commit();
        b.pause().await;
    }
    Ok(())
}

/// Host read of `buf.len()` bytes at `offset`.
pub async fn read<B: Backend>(vol: &Volume, b: &B, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    let ticket = admit(vol, b).await;
    let segs = vol.plan_read(&ticket, offset, buf.len() as u64);
    for ReadSeg {
        dev,
        offset,
        len,
        buf_offset,
    } in segs
    {
        let range = buf_offset as usize..(buf_offset + len) as usize;
        b.read(dev, offset, &mut buf[range]).await?;
    }
    Ok(())
}

/// Host write of `buf` at `offset`; with `fua` the data is durable on
/// return. Returns once the write may be acknowledged.
pub async fn write<B: Backend>(
    vol: &Volume,
    b: &B,
    offset: u64,
    buf: &[u8],
    fua: bool,
) -> io::Result<()> {
    loop {
        let ticket = admit(vol, b).await;
        let plan = match vol.plan_write(&ticket, offset, buf.len() as u64) {
            Ok(plan) => plan,
            Err(Wait::Track(_)) | Err(Wait::Transition) => {
                drop(ticket);
                b.pause().await;
                continue;
            }
        };
        if let Some(seq) = plan.commit_before_issue {
            if let Err(e) = wait_commit(vol, b, seq).await {
                vol.finish_write(
                    plan,
                    WriteOutcome {
                        primary_failed: true,
                        ..Default::default()
                    },
                );
                return Err(e);
            }
        }
        let outcome = run_steps(b, &plan, buf, fua).await;
        let done = vol.finish_write(plan, outcome);
        if let Some(seq) = done.ack_after {
            wait_commit(vol, b, seq).await?;
        }
        drop(ticket);
        return if done.ok {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(libc::EIO))
        };
    }
}

async fn run_steps<B: Backend>(b: &B, plan: &WritePlan, buf: &[u8], fua: bool) -> WriteOutcome {
    let mut out = WriteOutcome::default();
    for step in &plan.steps {
        match *step {
            WriteStep::Direct {
                devs,
                offset,
                len,
                buf_offset,
            } => {
                let data = &buf[buf_offset as usize..(buf_offset + len) as usize];
                let (p, s) = smol::future::zip(
                    async {
                        !devs.primary || b.write(Dev::Primary, offset, data, fua).await.is_ok()
                    },
                    async {
                        !devs.secondary || b.write(Dev::Secondary, offset, data, fua).await.is_ok()
                    },
                )
                .await;
                out.primary_failed |= !p;
                out.secondary_failed |= !s;
            }
            WriteStep::Merge {
                track_offset,
                track_len,
                offset,
                len,
                buf_offset,
                ..
            } => {
                let host = &buf[buf_offset as usize..(buf_offset + len) as usize];
                if merge(b, track_offset, track_len, offset, host, fua)
                    .await
                    .is_err()
                {
                    out.primary_failed = true;
                }
            }
        }
        if out.primary_failed {
            break;
        }
    }
    out
}

/// Claim 6: the secondary's track combined with the host's bytes lands on
/// the primary as one whole track.
async fn merge<B: Backend>(
    b: &B,
    track_offset: u64,
    track_len: u64,
    offset: u64,
    host: &[u8],
    fua: bool,
) -> io::Result<()> {
    let mut track = b.buffer(track_len as usize);
    b.read(Dev::Secondary, track_offset, &mut track).await?;
    let at = (offset - track_offset) as usize;
    track[at..at + host.len()].copy_from_slice(host);
    b.write(Dev::Primary, track_offset, &track, fua).await
}

/// Host flush: every device that holds acknowledged data.
pub async fn flush<B: Backend>(vol: &Volume, b: &B) -> io::Result<()> {
    let ticket = admit(vol, b).await;
    let devs = vol.plan_flush(&ticket);
    for dev in devs.devs() {
        b.flush(dev).await?;
    }
    Ok(())
}
