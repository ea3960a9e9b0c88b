//! The queue of one connection's replies, from the tasks that answer requests to the task that writes them.
//!
//! tokio's bounded channel allocates a block of 32 slots when it is made (2.4 KiB for replies); this queue
//! holds as many as are waiting, which for a client at queue depth 1 is one. It is unbounded: the caller
//! bounds it (every reply holds one of the connection's in-flight slots until it is written).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

struct Shared<T> {
    state: Mutex<State<T>>,
    /// Wakes the receiver (one receiver: `notify_one` keeps a permit if it is not waiting yet).
    ready: Notify,
}

struct State<T> {
    items: VecDeque<T>,
    senders: usize,
    receiver_gone: bool,
}

/// The sending end; clone it for each task that sends.
pub struct Sender<T>(Arc<Shared<T>>);

/// The receiving end.
pub struct Receiver<T>(Arc<Shared<T>>);

/// A queue: what is sent comes out in the order sent; `recv` gives `None` once every sender is gone and the
/// queue is empty.
pub fn queue<T>() -> (Sender<T>, Receiver<T>) {
    let s = Arc::new(Shared {
        // Room for one: a client at queue depth 1 never needs more (the deque grows for deeper queues).
        state: Mutex::new(State { items: VecDeque::with_capacity(1), senders: 1, receiver_gone: false }),
        ready: Notify::new(),
    });
    (Sender(s.clone()), Receiver(s))
}

fn lock<T>(s: &Shared<T>) -> std::sync::MutexGuard<'_, State<T>> {
    // Nothing here panics while holding the lock; a poisoned lock still holds a consistent queue.
    s.state.lock().unwrap_or_else(|p| p.into_inner())
}

impl<T> Sender<T> {
    /// Queues `v`; gives it back if the receiver is gone.
    pub fn send(&self, v: T) -> Result<(), T> {
        {
            let mut st = lock(&self.0);
            if st.receiver_gone {
                return Err(v);
            }
            st.items.push_back(v);
        }
        self.0.ready.notify_one();
        Ok(())
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        lock(&self.0).senders += 1;
        Sender(self.0.clone())
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let last = {
            let mut st = lock(&self.0);
            st.senders -= 1;
            st.senders == 0
        };
        if last {
            self.0.ready.notify_one();
        }
    }
}

impl<T> Receiver<T> {
    /// The next item, waiting for one; `None` when every sender is gone and nothing is left.
    pub async fn recv(&mut self) -> Option<T> {
        loop {
            {
                let mut st = lock(&self.0);
                if let Some(v) = st.items.pop_front() {
                    return Some(v);
                }
                if st.senders == 0 {
                    return None;
                }
            }
            self.0.ready.notified().await;
        }
    }

    /// The next item if one is waiting.
    pub fn try_recv(&mut self) -> Option<T> {
        lock(&self.0).items.pop_front()
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        lock(&self.0).items.is_empty()
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let items = {
            let mut st = lock(&self.0);
            st.receiver_gone = true;
            std::mem::take(&mut st.items)
        };
        // What was queued is dropped now, outside the lock (it may hold the connection's budget).
        drop(items);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn items_come_out_in_order_and_recv_ends_when_senders_are_gone() {
        let (tx, mut rx) = queue();
        let tx2 = tx.clone();
        let t = tokio::spawn(async move {
            for i in 0..1000u32 {
                tx2.send(i).unwrap();
                if i % 97 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        });
        let mut got = Vec::new();
        drop(tx);
        while let Some(v) = rx.recv().await {
            got.push(v);
        }
        t.await.unwrap();
        assert_eq!(got, (0..1000).collect::<Vec<_>>());
        assert!(rx.is_empty());
        assert_eq!(rx.try_recv(), None);
    }

    #[tokio::test]
    async fn recv_waits_for_a_late_sender_and_send_fails_without_a_receiver() {
        let (tx, mut rx) = queue();
        let t = tokio::spawn(async move { rx.recv().await });
        tokio::task::yield_now().await;
        tx.send(7u8).unwrap();
        assert_eq!(t.await.unwrap(), Some(7));
        assert_eq!(tx.send(8), Err(8));
    }
}
