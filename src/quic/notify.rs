//! [`ConnNotify`]: how tasks other than a connection's own tell that task which of its
//! streams need a look, without a lock per byte and without a wake-up per change.

use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Waker};

/// Streams whose state changed, for the connection task to look at, and the waker of that
/// task.
///
/// The owner of each stream queues it here once until the connection task has looked at it
/// (a flag in the stream's own state says whether it is queued), so a busy producer costs
/// one entry and one wake-up per turn of the connection task, not one per write.
#[derive(Default)]
pub(crate) struct ConnNotify {
    inner: Mutex<NotifyInner>,
}

/// A stream's shared state, which remembers whether the stream is in the ready list.
pub(crate) trait Queued {
    /// Whether the stream is in the connection's ready list already.
    fn queued(&mut self) -> &mut bool;
}

#[derive(Default)]
struct NotifyInner {
    ready: Vec<u64>,
    waker: Option<Waker>,
}

impl ConnNotify {
    fn lock(&self) -> MutexGuard<'_, NotifyInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `stream_id` and wakes the connection task.
    pub(crate) fn notify(&self, stream_id: u64) {
        let waker = {
            let mut inner = self.lock();
            inner.ready.push(stream_id);
            inner.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Runs `f` on a stream's state; queues the stream (its ID read from `id` once the lock
    /// is released) if `f` says the connection task has something to do, once until that
    /// task looks.
    pub(crate) fn update<S: Queued, R>(
        &self,
        state: &Mutex<S>,
        id: impl FnOnce() -> u64,
        f: impl FnOnce(&mut S) -> (R, bool),
    ) -> R {
        let (result, wake) = {
            let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
            let (result, wake) = f(&mut state);
            let queued = state.queued();
            let first = wake && !*queued;
            *queued |= wake;
            (result, first)
        };
        if wake {
            self.notify(id());
        }
        result
    }

    /// Wakes the connection task without queueing a stream (a change of the connection's
    /// own state).
    pub(crate) fn wake(&self) {
        let waker = self.lock().waker.take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Moves the ready streams into `out`, behind what it holds, and registers the
    /// connection task's waker.
    pub(crate) fn take_ready(&self, cx: &Context<'_>, out: &mut Vec<u64>) {
        let mut inner = self.lock();
        if out.is_empty() {
            // Trades allocations rather than copying: both lists keep their capacity.
            std::mem::swap(&mut inner.ready, out);
        } else {
            out.append(&mut inner.ready);
        }
        match &inner.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => inner.waker = Some(cx.waker().clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ConnNotify;
    use std::task::{Context, Waker};

    #[test]
    fn streams_taken_join_those_the_caller_already_holds() {
        let notify = ConnNotify::default();
        let cx = Context::from_waker(Waker::noop());
        notify.notify(5);
        // Streams the connection task carries over (to read again) stay in its list.
        let mut ready = vec![1, 2];
        notify.take_ready(&cx, &mut ready);
        assert_eq!(ready, [1, 2, 5]);
        ready.clear();
        notify.take_ready(&cx, &mut ready);
        assert!(ready.is_empty(), "each stream is taken once");
        notify.notify(7);
        notify.take_ready(&cx, &mut ready);
        assert_eq!(ready, [7]);
    }
}
