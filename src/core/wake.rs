//! Wake-ups for requests that wait: the core keeps the wakers of whoever
//! waits for a commit, a track lock or a state change, and wakes them when
//! that happens. It does no I/O: an executor that sleeps in the kernel
//! (an io_uring) hands in a waker that also kicks its ring.
//!
//! Waiters register *before* they look again at what they wait for, and
//! notifiers change what is waited for *before* they look for waiters
//! (each side with a full fence in between), so a wake-up is never lost:
//! either the waiter's second look sees the change, or the notifier sees
//! the waiter.

use std::sync::atomic::{fence, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::Mutex;
use std::task::Waker;

#[derive(Default)]
pub struct WakeList {
    /// Wakers registered now: notifiers with nobody to wake touch nothing
    /// but this (read-only) counter, so the fast path shares no written
    /// cache line between queues.
    waiting: AtomicUsize,
    wakers: Mutex<Vec<Waker>>,
    /// Wake-ups delivered (tests and benches count them).
    woken: AtomicU64,
}

impl WakeList {
    /// Registers `w` (once: a waiter polled again does not pile up).
    pub fn register(&self, w: &Waker) {
        let mut list = self.wakers.lock().unwrap_or_else(|e| e.into_inner());
        if !list.iter().any(|x| x.will_wake(w)) {
            list.push(w.clone());
        }
        self.waiting.store(list.len(), SeqCst);
        // The waiter looks again next, possibly under a mutex (a lock
        // shard): order that look after this store on every architecture.
        fence(SeqCst);
    }

    /// Wakes every registered waiter (called after the change they wait for).
    pub fn wake_all(&self) {
        // The change was made just before, possibly by a mutex release
        // only: order it before this look at the waiters.
        fence(SeqCst);
        if self.waiting.load(SeqCst) == 0 {
            return;
        }
        let wakers = {
            let mut list = self.wakers.lock().unwrap_or_else(|e| e.into_inner());
            self.waiting.store(0, SeqCst);
            std::mem::take(&mut *list)
        };
        self.woken.fetch_add(wakers.len() as u64, SeqCst);
        wakers.into_iter().for_each(Waker::wake);
    }

    /// Wake-ups delivered so far.
    pub fn woken(&self) -> u64 {
        self.woken.load(SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, SeqCst);
        }
    }

    #[test]
    fn registered_waiters_are_woken_once_and_dropped() {
        let list = WakeList::default();
        let c = Arc::new(Count(AtomicUsize::new(0)));
        let w = Waker::from(c.clone());
        list.wake_all();
        list.register(&w);
        list.register(&w);
        list.wake_all();
        assert_eq!(c.0.load(SeqCst), 1, "same waker: registered once");
        list.wake_all();
        assert_eq!(c.0.load(SeqCst), 1, "woken waiters are forgotten");
        assert_eq!(list.woken(), 1);
    }
}
