//! The host path: runs host reads, writes and flushes through the core's
//! plans against a [`Backend`]. A ublk queue calls exactly these functions;
//! so do the crash soak, the benches and the simulation, each with its own
//! backend. Everything here is async and never blocks the thread: a request
//! that must wait (for a track, a commit or a state change) yields to the
//! other requests of its executor.

use crate::backend::hostbuf::{HostBytes, HostBytesMut};
use crate::backend::Backend;
use crate::core::wake::WakeList;
use crate::core::{
    CommitSeq, Dev, Logged, Payload, ReadSeg, RepairLock, Ticket, Volume, Wait, WriteOutcome,
    WritePlan, WriteStep,
};
use std::io;
use std::task::{Poll, Waker};

/// Admits a request, waiting out any state change.
pub async fn admit<'v, B: Backend>(vol: &'v Volume, b: &B) -> crate::core::Ticket<'v> {
    loop {
        match vol.enter() {
            Ok(t) => return t,
            Err(_) => wait_on(b, vol.progress_wakes(), || !vol.gate_closed()).await,
        }
    }
}

/// Waits until `ready()` holds, without a timer: the core wakes `list`
/// after a change of what `ready` looks at. The waker is registered before
/// `ready` is looked at again, so a change between the caller's last look
/// and the registration is not missed.
///
/// Only `ready` ends the wait, never a wake-up alone: waiters on one queue
/// woken by each other's unrelated lock releases would otherwise retry
/// and wake each other again without end, and the queue would never go
/// back to its ring for the completion they all wait for.
pub async fn wait_on<B: Backend>(b: &B, list: &WakeList, mut ready: impl FnMut() -> bool) {
    if ready() {
        return;
    }
    let mut registered: Option<(Waker, Waker)> = None;
    std::future::poll_fn(|cx| {
        let waker = match &registered {
            Some((polled, wrapped)) if polled.will_wake(cx.waker()) => wrapped,
            _ => {
                &registered
                    .insert((cx.waker().clone(), b.waker(cx.waker())))
                    .1
            }
        };
        list.register(waker);
        if ready() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await
}

/// Waits until commit `seq` is durable.
pub async fn wait_commit<B: Backend>(vol: &Volume, b: &B, seq: CommitSeq) -> io::Result<()> {
    if vol.is_durable(seq) {
        return Ok(());
    }
    let _waiting = vol.wait_guard();
    while !vol.is_durable(seq) {
        if b.commit_failed() {
            return Err(io::Error::other("metadata commit failed"));
        }
        b.request_commit();
        // Woken by the commit's end, or by the committer when it fails.
        wait_on(b, vol.commit_wakes(), || {
            vol.is_durable(seq) || b.commit_failed()
        })
        .await;
    }
    Ok(())
}

/// Waits until restore log record `seq` is written; false: the log failed
/// first (wait for the commit instead).
async fn wait_log<B: Backend>(vol: &Volume, b: &B, seq: crate::core::RecordSeq) -> bool {
    if vol.restore_record_written(seq) == Some(true) {
        return true;
    }
    b.request_log();
    // Woken with the commit waiters when a record is written or fails.
    wait_on(b, vol.commit_wakes(), || {
        vol.restore_record_written(seq) != Some(false)
    })
    .await;
    vol.restore_record_written(seq) == Some(true)
}

/// Waits until the holders of track `t` changed (one left) or it is free.
/// Only `t` itself counts: retries caused by other tracks' releases could
/// wake two waiters of crossing multi-track writes alternately forever.
async fn wait_track<B: Backend>(vol: &Volume, b: &B, t: crate::core::Track) {
    // The copy holds its tracks until its group's flush: no new copies
    // while a host request waits, so that flush comes at once.
    let _ahead = vol.ahead_guard();
    let seen = vol.track_holders(t);
    wait_on(b, vol.progress_wakes(), || {
        let now = vol.track_holders(t);
        now == 0 || now != seen
    })
    .await
}

/// Host read of `buf.len()` bytes at `offset`.
pub async fn read<B: Backend>(
    vol: &Volume,
    b: &B,
    offset: u64,
    mut buf: HostBytesMut<'_>,
) -> io::Result<()> {
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
        match b.read_host(dev, offset, buf.part(range.clone())).await {
            Ok(()) => {}
            Err(e) if dev == Dev::Primary => {
                read_repair(vol, b, &ticket, offset, buf.part(range), e).await?
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A primary read failed: serves each track of the range whose secondary
/// copy is known identical from the secondary and rewrites the whole track
/// on the primary (a disk remaps bad sectors on write), as md raid1 does.
/// A track that cannot be repaired fails the read with the primary's error.
async fn read_repair<B: Backend>(
    vol: &Volume,
    b: &B,
    ticket: &Ticket<'_>,
    offset: u64,
    mut out: HostBytesMut<'_>,
    error: io::Error,
) -> io::Result<()> {
    for span in vol.geometry().spans(offset, out.len() as u64) {
        let mut part = out.part(span.buf_offset as usize..(span.buf_offset + span.len) as usize);
        // Only the tracks that still fail need the secondary.
        let whole = 0..part.len();
        if b.read_host(Dev::Primary, span.offset, part.part(whole))
            .await
            .is_ok()
        {
            continue;
        }
        loop {
            match vol.lock_for_repair(ticket, span.track) {
                RepairLock::NotIdentical => return Err(error),
                RepairLock::Busy => wait_track(vol, b, span.track).await,
                RepairLock::Locked => break,
            }
        }
        let repaired = repair_track(vol, b, span.track, span.offset, part).await;
        vol.unlock_repair(span.track);
        if let Err(e) = repaired {
            log::warn!(
                "track {}: primary read failed ({error}) and the secondary could not serve it: {e}",
                span.track
            );
            return Err(error);
        }
    }
    Ok(())
}

/// Under the track's exclusive lock: reads the secondary's track into
/// `part` (the host's bytes at `offset`) and rewrites the primary's track.
/// A registered host buffer is filled by a read of its own from the
/// secondary, which under this lock is what the primary is rewritten with.
async fn repair_track<B: Backend>(
    vol: &Volume,
    b: &B,
    track: crate::core::Track,
    offset: u64,
    mut part: HostBytesMut<'_>,
) -> io::Result<()> {
    let (track_offset, track_len) = vol.geometry().track_extent(track);
    let mut data = b.buffer(track_len as usize);
    b.read(Dev::Secondary, track_offset, &mut data).await?;
    let at = (offset - track_offset) as usize;
    if part.fill_from(&data[at..at + part.len()]).is_none() {
        b.read_host(Dev::Secondary, offset, part).await?;
    }
    match b.write(Dev::Primary, track_offset, &data, false).await {
        Ok(()) => {
            vol.note_read_repair();
            log::warn!("track {track}: primary read error repaired from the secondary");
        }
        // The host still gets the right bytes; the next read tries again.
        Err(e) => log::error!("track {track}: rewriting the primary after a read error: {e}"),
    }
    Ok(())
}

/// Host write of `buf` at `offset`; with `fua` the data is durable on
/// return. Returns once the write may be acknowledged.
pub async fn write<B: Backend>(
    vol: &Volume,
    b: &B,
    offset: u64,
    buf: HostBytes<'_>,
    fua: bool,
) -> io::Result<()> {
    let len = buf.len() as u64;
    run_write(vol, b, buf, fua, |t| vol.plan_write(t, offset, len)).await
}

/// Host discard (`unmap`) or write-zeroes of `offset..offset+len`: the range
/// reads back as zeros afterwards, on both devices where the state mirrors
/// (see [`Volume::plan_zero`] for what each state does).
pub async fn zero<B: Backend>(
    vol: &Volume,
    b: &B,
    offset: u64,
    len: u64,
    unmap: bool,
    fua: bool,
) -> io::Result<()> {
    let none = HostBytes::Mem(&[]);
    run_write(vol, b, none, fua, |t| vol.plan_zero(t, offset, len, unmap)).await
}

/// A host write or zeroing, from its plan to its acknowledgement; `buf`
/// holds the bytes of a [`Payload::Data`] plan.
async fn run_write<B: Backend>(
    vol: &Volume,
    b: &B,
    buf: HostBytes<'_>,
    fua: bool,
    plan_it: impl Fn(&Ticket<'_>) -> Result<WritePlan, Wait>,
) -> io::Result<()> {
    loop {
        let ticket = admit(vol, b).await;
        let plan = match plan_it(&ticket) {
            Ok(plan) => plan,
            Err(Wait::Track(t)) => {
                drop(ticket);
                wait_track(vol, b, t).await;
                continue;
            }
            Err(Wait::Transition) => {
                drop(ticket);
                wait_on(b, vol.progress_wakes(), || !vol.gate_closed()).await;
                continue;
            }
        };
        if let Some(seq) = plan.commit_before_issue {
            if let Err(e) = wait_commit(vol, b, seq).await {
                vol.finish_write(
                    plan,
                    WriteOutcome {
                        primary_failed: true,
                        not_issued: true,
                        ..Default::default()
                    },
                );
                return Err(e);
            }
        }
        let (outcome, primary_error) = run_steps(vol, b, &plan, buf, fua).await;
        let on_logged = plan.on_logged;
        let done = vol.finish_write(plan, outcome);
        if let Some(seq) = done.ack_after {
            wait_commit(vol, b, seq).await?;
        }
        if let Some(logged) = Logged::join(done.logged, on_logged.filter(|_| done.ok)) {
            // A FUA write is durable when acknowledged: its commit, then.
            if fua || !wait_log(vol, b, logged.record).await {
                wait_commit(vol, b, logged.settle).await?;
            }
        }
        drop(ticket);
        return match (done.ok, primary_error) {
            (true, _) => Ok(()),
            // The primary's own error (ENOSPC from a thin or file-backed
            // primary must reach the host as ENOSPC, not as EIO).
            (false, Some(e)) => Err(e),
            (false, None) => Err(io::Error::from_raw_os_error(libc::EIO)),
        };
    }
}

/// Runs a write's data I/O; returns what failed and the primary's error.
async fn run_steps<B: Backend>(
    vol: &Volume,
    b: &B,
    plan: &WritePlan,
    buf: HostBytes<'_>,
    fua: bool,
) -> (WriteOutcome, Option<io::Error>) {
    let mut out = WriteOutcome::default();
    let mut primary_error = None;
    for step in &plan.steps {
        match *step {
            WriteStep::Direct {
                devs,
                offset,
                len,
                buf_offset,
            } => {
                let data = match plan.payload {
                    Payload::Data => buf.part(buf_offset as usize..(buf_offset + len) as usize),
                    Payload::Zeros { .. } => HostBytes::Mem(&[]),
                };
                let put = |dev| put(b, dev, plan.payload, offset, len, data, fua);
                let (p, s) = smol::future::zip(
                    async {
                        if devs.primary {
                            put(Dev::Primary).await
                        } else {
                            Ok(())
                        }
                    },
                    async { !devs.secondary || put(Dev::Secondary).await.is_ok() },
                )
                .await;
                if let Err(e) = p {
                    out.primary_failed = true;
                    primary_error = Some(e);
                }
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
                let host = match plan.payload {
                    Payload::Data => {
                        Some(buf.part(buf_offset as usize..(buf_offset + len) as usize))
                    }
                    Payload::Zeros { .. } => None,
                };
                if let Err(e) = merge(vol, b, track_offset, track_len, offset, len, host).await {
                    out.primary_failed = true;
                    primary_error = Some(e);
                }
            }
        }
        if out.primary_failed {
            break;
        }
    }
    (out, primary_error)
}

/// One device's part of a `Direct` step: the host's bytes, or zeros.
async fn put<B: Backend>(
    b: &B,
    dev: Dev,
    payload: Payload,
    offset: u64,
    len: u64,
    data: HostBytes<'_>,
    fua: bool,
) -> io::Result<()> {
    match payload {
        Payload::Data => b.write_host(dev, offset, data, fua).await,
        Payload::Zeros { unmap } => b.zero(dev, offset, len, unmap, fua).await,
    }
}

/// Claim 6: the secondary's track combined with the host's bytes (`host`;
/// `None`: zeros, for a discard or write-zeroes) at `offset..offset+len`
/// lands on the primary as one whole track. With the restore log it is a
/// plain write, acknowledged after a log record; without it, a FUA write,
/// durable on its own so that the commit the acknowledgement waits for
/// need not flush the whole primary (`Volume::finish_write`). While it runs
/// the copy engine starts no new copies, so its I/Os do not queue behind
/// them.
///
/// Host bytes in a registered buffer (zero copy) reach the track buffer by
/// a fixed-buffer write into it where the backend can (its buffers are
/// ranges of a memfd). Where it cannot, the secondary's bytes around them
/// and the host's bytes go to the primary as up to three writes at once:
/// the track is whole on the primary once all of them are done, before
/// anything marks it restored.
async fn merge<B: Backend>(
    vol: &Volume,
    b: &B,
    track_offset: u64,
    track_len: u64,
    offset: u64,
    len: u64,
    host: Option<HostBytes<'_>>,
) -> io::Result<()> {
    let _ahead = vol.ahead_guard();
    let mut track = b.buffer(track_len as usize);
    b.read(Dev::Secondary, track_offset, &mut track).await?;
    let range = (offset - track_offset) as usize..(offset - track_offset + len) as usize;
    let fua = !vol.restore_log_enabled();
    match host {
        Some(HostBytes::Mem(host)) => track[range].copy_from_slice(host),
        None => track[range].fill(0),
        Some(HostBytes::Fixed(f)) if b.copy_fixed(f, &mut track, range.start).await? => {}
        Some(host @ HostBytes::Fixed(_)) => {
            async fn around<B: Backend>(b: &B, at: u64, bytes: &[u8], fua: bool) -> io::Result<()> {
                match bytes.is_empty() {
                    true => Ok(()),
                    false => b.write(Dev::Primary, at, bytes, fua).await,
                }
            }
            let ((head, tail), mid) = smol::future::zip(
                smol::future::zip(
                    around(b, track_offset, &track[..range.start], fua),
                    around(b, offset + len, &track[range.end..], fua),
                ),
                b.write_host(Dev::Primary, offset, host, fua),
            )
            .await;
            return head.and(tail).and(mid);
        }
    }
    b.write(Dev::Primary, track_offset, &track, fua).await
}

/// Host flush: every device that holds acknowledged data. Its result is
/// the primary's: a secondary whose flush fails is split off (degraded,
/// see `Volume::secondary_flush_failed`) and the host never hears of it.
pub async fn flush<B: Backend>(vol: &Volume, b: &B) -> io::Result<()> {
    let ticket = admit(vol, b).await;
    let devs = vol.plan_flush(&ticket);
    let (p, s) = smol::future::zip(
        async {
            if devs.primary {
                b.flush(Dev::Primary).await
            } else {
                Ok(())
            }
        },
        async {
            if devs.secondary {
                b.flush(Dev::Secondary).await
            } else {
                Ok(())
            }
        },
    )
    .await;
    // Still admitted: no state change runs between the flush and this.
    if let Err(e) = s {
        secondary_flush_failed(vol, &e);
    }
    // Tracks restored by logged writes: durable once the commit that
    // records them is (it flushes the primary first).
    if p.is_ok() {
        if let Some(seq) = vol.unsettled_restores() {
            wait_commit(vol, b, seq).await?;
        }
    }
    drop(ticket);
    p
}

/// A failed secondary flush anywhere (host flush, state change, commit):
/// the secondary is split off, with one log line.
pub fn secondary_flush_failed(vol: &Volume, e: &io::Error) -> bool {
    let changed = vol.secondary_flush_failed();
    if changed {
        log::error!(
            "secondary flush failed ({e}): its cache may have lost writes, so it is split off \
             (volume degraded, every track it may lack marked changed); host I/O goes on to the \
             primary; repair or replace the secondary, then `establish`"
        );
    }
    changed
}
