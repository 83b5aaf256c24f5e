//! The inbound queue of one connection: received datagrams on their way from the router to
//! the connection's task, bounded both in datagrams and in bytes.
//!
//! A datagram count alone does not bound memory when datagrams may be up to 64 KiB
//! (`max_recv_udp_payload`): 256 of them are 16 MiB per connection. The byte bound makes a
//! queue's memory a setting (`inbound_queue_bytes`) whatever the peer sends. A datagram that
//! does not fit is refused, and the router drops it as a congested network would.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use super::config::Settings;
use super::endpoint::Datagram;

/// A new queue with the configured bounds.
pub(crate) fn channel(s: &Settings) -> (Sender, Receiver) {
    let (tx, rx) = mpsc::channel(s.inbound_queue);
    let queued = Arc::new(AtomicUsize::new(0));
    (
        Sender {
            tx,
            queued: Arc::clone(&queued),
            max_bytes: s.inbound_queue_bytes,
        },
        Receiver { rx, queued },
    )
}

/// The router's end (one per routed connection ID, all clones of one another).
#[derive(Clone)]
pub(crate) struct Sender {
    tx: mpsc::Sender<Datagram>,
    /// Bytes of the datagrams in the queue, shared with the receiver.
    queued: Arc<AtomicUsize>,
    max_bytes: usize,
}

impl Sender {
    /// Queues `datagram` unless either bound is reached or the connection is gone.
    pub(crate) fn try_send(&self, datagram: Datagram) -> Result<(), TrySendError<Datagram>> {
        let len = datagram.data.len();
        // Reserve the bytes first, so two senders cannot both squeeze past the bound.
        let reserved = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q + len <= self.max_bytes).then_some(q + len)
            })
            .is_ok();
        if !reserved {
            return Err(TrySendError::Full(datagram));
        }
        self.tx.try_send(datagram).inspect_err(|_| {
            self.queued.fetch_sub(len, Ordering::AcqRel);
        })
    }
}

/// The connection task's end.
pub(crate) struct Receiver {
    rx: mpsc::Receiver<Datagram>,
    queued: Arc<AtomicUsize>,
}

impl Receiver {
    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Datagram>> {
        self.rx.poll_recv(cx).map(|d| {
            d.inspect(|d| {
                self.queued.fetch_sub(d.data.len(), Ordering::AcqRel);
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;

    use super::*;

    fn datagram(len: usize) -> Datagram {
        Datagram {
            data: BytesMut::zeroed(len),
            from: "127.0.0.1:1".parse().unwrap(),
        }
    }

    #[test]
    fn the_queue_is_bounded_in_bytes_as_well_as_in_datagrams() {
        let s = Settings {
            inbound_queue: 4,
            inbound_queue_bytes: 10_000,
            ..Settings::default()
        };
        let (tx, mut rx) = channel(&s);
        tx.try_send(datagram(6_000)).unwrap();
        assert!(
            matches!(tx.try_send(datagram(6_000)), Err(TrySendError::Full(_))),
            "bytes"
        );
        tx.try_send(datagram(4_000)).unwrap();
        assert!(
            matches!(tx.try_send(datagram(1)), Err(TrySendError::Full(_))),
            "exactly full"
        );
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let Poll::Ready(Some(first)) = rx.poll_recv(&mut cx) else {
            panic!("a queued datagram")
        };
        assert_eq!(first.data.len(), 6_000);
        // Taking one out frees its bytes.
        tx.try_send(datagram(5_000)).unwrap();
        // The datagram bound still holds for small datagrams.
        tx.try_send(datagram(1)).unwrap();
        tx.try_send(datagram(1)).unwrap();
        assert!(
            matches!(tx.try_send(datagram(1)), Err(TrySendError::Full(_))),
            "datagrams"
        );
        drop(rx);
        assert!(matches!(tx.try_send(datagram(1)), Err(TrySendError::Closed(_))));
    }
}
