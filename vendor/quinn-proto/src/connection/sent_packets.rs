//! Packets sent and not yet acknowledged, declared lost or forgotten, by packet number
//!
//! A space sends packet numbers in increasing order, and acknowledgements remove them mostly
//! from the oldest end. So the packets live in a deque sorted by number, holding only the
//! packets tracked: a send is a push at the back, an in-order acknowledgement a pop at the
//! front, a lookup a binary search, and a removal from the middle (a loss, an out-of-order
//! acknowledgement) moves the shorter side. Its memory is bounded by the packets tracked, as the
//! B-tree's was, however far apart the oldest and newest numbers are. A connection with one or
//! two packets outstanding holds a deque of four entries instead of a B-tree leaf of eleven
//! (measured: ~1.1 KiB per idle connection, whose last ACK-only packets are never
//! acknowledged). A deque of `KEEP_CAPACITY` entries or more is given back to the allocator when
//! it empties.

use std::{collections::VecDeque, ops::Bound, ops::RangeBounds};

use super::spaces::SentPacket;

#[derive(Debug, Default)]
pub(super) struct SentPackets {
    /// Sorted by packet number, each number at most once
    packets: VecDeque<(u64, SentPacket)>,
}

/// A deque this long or longer is given back to the allocator when it empties; shorter ones
/// are kept for the next packet.
const KEEP_CAPACITY: usize = 8;

impl SentPackets {
    /// Track `packet`, replacing any packet tracked under `number`
    pub(super) fn insert(&mut self, number: u64, packet: SentPacket) {
        match self.packets.back() {
            // A space's packets come in increasing order
            None => self.packets.push_back((number, packet)),
            Some(&(last, _)) if last < number => self.packets.push_back((number, packet)),
            _ => match self.position(number) {
                Ok(i) => self.packets[i].1 = packet,
                Err(i) => self.packets.insert(i, (number, packet)),
            },
        }
    }

    /// Stop tracking packet `number`, and return it
    pub(super) fn remove(&mut self, number: u64) -> Option<SentPacket> {
        let packet = match self.packets.front() {
            Some(&(first, _)) if first == number => self.packets.pop_front(),
            _ => {
                let i = self.position(number).ok()?;
                self.packets.remove(i)
            }
        }
        .map(|(_, packet)| packet);
        if self.packets.is_empty() && self.packets.capacity() >= KEEP_CAPACITY {
            self.packets = VecDeque::new();
        }
        packet
    }

    pub(super) fn get(&self, number: u64) -> Option<&SentPacket> {
        Some(&self.packets[self.position(number).ok()?].1)
    }

    /// The tracked packets whose numbers are in `range`, in increasing order
    pub(super) fn range(
        &self,
        range: impl RangeBounds<u64>,
    ) -> impl DoubleEndedIterator<Item = (u64, &SentPacket)> {
        let lo = match range.start_bound() {
            Bound::Included(&n) => self.packets.partition_point(|&(pn, _)| pn < n),
            Bound::Excluded(&n) => self.packets.partition_point(|&(pn, _)| pn <= n),
            Bound::Unbounded => 0,
        };
        let hi = match range.end_bound() {
            Bound::Included(&n) => self.packets.partition_point(|&(pn, _)| pn <= n),
            Bound::Excluded(&n) => self.packets.partition_point(|&(pn, _)| pn < n),
            Bound::Unbounded => self.packets.len(),
        };
        self.packets
            .range(lo..hi.max(lo))
            .map(|(pn, packet)| (*pn, packet))
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &SentPacket> {
        self.packets.iter().map(|(_, packet)| packet)
    }

    pub(super) fn values_mut(&mut self) -> impl Iterator<Item = &mut SentPacket> {
        self.packets.iter_mut().map(|(_, packet)| packet)
    }

    pub(super) fn into_values(self) -> impl Iterator<Item = SentPacket> {
        self.packets.into_iter().map(|(_, packet)| packet)
    }

    fn position(&self, number: u64) -> Result<usize, usize> {
        self.packets.binary_search_by_key(&number, |&(pn, _)| pn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Instant, connection::spaces::ThinRetransmits, frame::StreamMetaVec};

    fn packet(size: u16) -> SentPacket {
        SentPacket {
            path_generation: 0,
            time_sent: Instant::now(),
            size,
            ack_eliciting: true,
            largest_acked: None,
            retransmits: ThinRetransmits::default(),
            stream_frames: StreamMetaVec::new(),
        }
    }

    fn numbers(s: &SentPackets, r: impl RangeBounds<u64>) -> Vec<u64> {
        s.range(r).map(|(n, _)| n).collect()
    }

    #[test]
    fn behaves_as_an_ordered_map() {
        let mut s = SentPackets::default();
        for n in [3, 4, 6, 7, 8] {
            s.insert(n, packet(n as u16));
        }
        assert_eq!(numbers(&s, ..), [3, 4, 6, 7, 8]);
        assert_eq!(numbers(&s, 4..7), [4, 6]);
        assert_eq!(numbers(&s, 0..=4), [3, 4]);
        assert_eq!(numbers(&s, (Bound::Excluded(4), Bound::Unbounded)), [6, 7, 8]);
        assert_eq!(numbers(&s, 9..20), Vec::<u64>::new());
        assert_eq!(numbers(&s, 7..5), Vec::<u64>::new());
        assert!(s.get(5).is_none());
        assert_eq!(s.get(6).map(|p| p.size), Some(6));

        assert_eq!(s.remove(7).map(|p| p.size), Some(7));
        assert!(s.remove(7).is_none());
        assert!(s.remove(1).is_none());
        assert_eq!(s.remove(3).map(|p| p.size), Some(3));
        assert_eq!(numbers(&s, ..), [4, 6, 8]);
        assert_eq!(s.values().map(|p| p.size).collect::<Vec<_>>(), [4, 6, 8]);

        // Out of order, below the first, and a replacement: still a map.
        s.insert(5, packet(5));
        s.insert(1, packet(1));
        s.insert(6, packet(60));
        assert_eq!(numbers(&s, ..), [1, 4, 5, 6, 8]);
        assert_eq!(s.get(6).map(|p| p.size), Some(60));
        for n in [1, 4, 5, 6, 8] {
            assert!(s.remove(n).is_some());
        }
        assert!(s.packets.is_empty());
        s.insert(100, packet(1));
        assert_eq!(s.into_values().count(), 1);
    }

    #[test]
    fn memory_follows_the_packets_tracked_not_their_numbers() {
        let mut s = SentPackets::default();
        // The oldest packet is never acknowledged; the ones after it are, one by one.
        s.insert(0, packet(1));
        for n in 1..10_000 {
            s.insert(n, packet(1));
            s.remove(n);
        }
        assert_eq!(numbers(&s, ..), [0]);
        assert!(s.packets.capacity() < KEEP_CAPACITY);

        for n in 1..100 {
            s.insert(n, packet(1));
        }
        for n in 0..100 {
            s.remove(n);
        }
        assert_eq!(s.packets.capacity(), 0, "a large deque is given back when it empties");
    }
}
