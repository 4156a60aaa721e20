//! The bounded FIFO behind every outbound queue of a node: a client connection's pushes
//! (`meshchat_messaging::registry::Outbox`) and a mesh peer's envelopes
//! (`mesh::peer::Peer`). Bounded in items and in bytes, each item's size given when it is
//! queued; an empty queue takes one item whatever its size, so the bound in bytes is
//! `max_bytes` or one item, and a single large item is never refused for its size alone (its
//! owner bounds the size of one item). Not synchronised: its owner keeps it under its own lock, does its own waking and
//! decides what a refusal means (a slow client is cut off, an envelope for a peer that is down
//! is dropped and its recipients told).

use std::collections::VecDeque;

/// Why [`Bounded::try_push`] refused an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// The queue holds its most items.
    Items,
    /// The item's bytes would take the queue past its most bytes.
    Bytes,
}

/// A FIFO of at most `max_items` items and `max_bytes` bytes (see the module docs).
#[derive(Debug)]
pub struct Bounded<T> {
    /// Each item with its size in bytes.
    items: VecDeque<(usize, T)>,
    bytes: usize,
    max_items: usize,
    max_bytes: usize,
}

/// Past this many slots, an emptied queue gives its memory back (a burst is over).
const KEEP_SLOTS: usize = 64;

impl<T> Bounded<T> {
    /// An empty queue (it allocates nothing until an item comes) of at most `max_items` items
    /// (at least 1) and `max_bytes` bytes.
    pub fn new(max_items: usize, max_bytes: usize) -> Self {
        Self {
            items: VecDeque::new(),
            bytes: 0,
            max_items: max_items.max(1),
            max_bytes,
        }
    }

    /// Queues `item` of `len` bytes at the back, or gives it back with the bound it would
    /// break (an empty queue takes it whatever its size).
    pub fn try_push(&mut self, len: usize, item: T) -> Result<(), (Full, T)> {
        if self.items.len() >= self.max_items {
            return Err((Full::Items, item));
        }
        if !self.items.is_empty() && self.bytes.saturating_add(len) > self.max_bytes {
            return Err((Full::Bytes, item));
        }
        self.bytes += len;
        self.items.push_back((len, item));
        Ok(())
    }

    /// Puts an item back at the front (a write that did not complete), bounds or not: the
    /// queue may then hold more than its bounds by what was put back.
    pub fn push_front(&mut self, len: usize, item: T) {
        self.bytes += len;
        self.items.push_front((len, item));
    }

    /// The oldest item and its size.
    pub fn pop_front(&mut self) -> Option<(usize, T)> {
        let (len, item) = self.items.pop_front()?;
        self.bytes -= len;
        self.give_back_if_empty();
        Some((len, item))
    }

    /// Moves up to `max` of the oldest items to `out`.
    pub fn drain_into(&mut self, max: usize, out: &mut Vec<T>) {
        let n = self.items.len().min(max);
        out.extend(self.items.drain(..n).map(|(len, item)| {
            self.bytes -= len;
            item
        }));
        self.give_back_if_empty();
    }

    /// Takes every item.
    pub fn take_all(&mut self) -> Vec<T> {
        self.bytes = 0;
        std::mem::take(&mut self.items)
            .into_iter()
            .map(|(_, item)| item)
            .collect()
    }

    /// Items queued.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Bytes queued.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn give_back_if_empty(&mut self) {
        if self.items.is_empty() && self.items.capacity() > KEEP_SLOTS {
            self.items = VecDeque::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_past_either_bound_and_counts_bytes_both_ways() {
        let mut q = Bounded::new(3, 100);
        assert_eq!(q.try_push(40, "a"), Ok(()));
        assert_eq!(q.try_push(60, "b"), Ok(()));
        assert_eq!(q.try_push(1, "c"), Err((Full::Bytes, "c")));
        assert_eq!(q.try_push(0, "d"), Ok(()));
        assert_eq!(q.try_push(0, "e"), Err((Full::Items, "e")));
        assert_eq!((q.len(), q.bytes()), (3, 100));

        assert_eq!(q.pop_front(), Some((40, "a")));
        assert_eq!(q.bytes(), 60);
        q.push_front(40, "a");
        assert_eq!((q.len(), q.bytes()), (3, 100));

        let mut out = Vec::new();
        q.drain_into(2, &mut out);
        assert_eq!(out, ["a", "b"]);
        assert_eq!((q.len(), q.bytes()), (1, 0));
        assert_eq!(q.take_all(), ["d"]);
        assert!(q.is_empty());
        assert_eq!(q.bytes(), 0);
    }

    #[test]
    fn an_empty_queue_takes_one_item_whatever_its_size() {
        let mut q = Bounded::new(10, 10);
        assert_eq!(q.try_push(11, 1), Ok(()));
        assert_eq!(q.try_push(1, 2), Err((Full::Bytes, 2)));
        assert_eq!(q.pop_front(), Some((11, 1)));
        assert_eq!(q.try_push(usize::MAX, 3), Ok(()));
        assert_eq!(q.try_push(0, 4), Err((Full::Bytes, 4)));
    }

    #[test]
    fn an_emptied_queue_gives_a_burst_back() {
        let mut q = Bounded::new(1000, usize::MAX);
        for i in 0..500 {
            q.try_push(1, i).expect("room");
        }
        let mut out = Vec::new();
        q.drain_into(usize::MAX, &mut out);
        assert_eq!(out.len(), 500);
        assert_eq!(q.items.capacity(), 0);
        assert_eq!(Bounded::<u8>::new(0, 0).max_items, 1, "at least one item");
    }
}
