//! Packets sent and not yet acknowledged, declared lost or forgotten, by packet number
//!
//! A space sends packet numbers in increasing order, and acknowledgements remove them mostly
//! from the oldest end. So the packets live in a deque sorted by number: a send is a push at
//! the back, a lookup a binary search. A removal leaves a tombstone in place (no entries move);
//! tombstones at either end are dropped at once, and when they outnumber the live entries the
//! deque is compacted and its spare room given back, so removals cost O(log n) amortised however
//! an acknowledgement is shaped, and memory stays within about twice the packets tracked (plus
//! a few entries), as the B-tree's did, however far apart the oldest and newest numbers are.
//! A connection with one or two packets outstanding holds a deque of four entries instead of a
//! B-tree leaf of eleven (measured: ~1.1 KiB per idle connection, whose last ACK-only packets
//! are never acknowledged).

use std::{collections::VecDeque, ops::Bound, ops::RangeBounds};

use super::spaces::SentPacket;

#[derive(Debug, Default)]
pub(super) struct SentPackets {
    /// Sorted by packet number, each number at most once; `None` is a removed packet
    entries: VecDeque<(u64, Option<SentPacket>)>,
    /// Entries that are `Some`
    live: usize,
}

/// Room for this many entries is kept when the deque shrinks; tombstones up to this many past
/// the live entries are tolerated before a compaction.
const KEEP_CAPACITY: usize = 8;

impl SentPackets {
    /// Track `packet`, replacing any packet tracked under `number`
    pub(super) fn insert(&mut self, number: u64, packet: SentPacket) {
        match self.entries.back() {
            // A space's packets come in increasing order
            Some(&(last, _)) if last >= number => match self.position(number) {
                Ok(i) => {
                    if self.entries[i].1.replace(packet).is_none() {
                        self.live += 1;
                    }
                }
                Err(i) => {
                    self.entries.insert(i, (number, Some(packet)));
                    self.live += 1;
                }
            },
            _ => {
                self.entries.push_back((number, Some(packet)));
                self.live += 1;
            }
        }
    }

    /// Stop tracking packet `number`, and return it
    pub(super) fn remove(&mut self, number: u64) -> Option<SentPacket> {
        let i = self.position(number).ok()?;
        let packet = self.entries[i].1.take()?;
        self.live -= 1;
        while let Some((_, None)) = self.entries.front() {
            self.entries.pop_front();
        }
        while let Some((_, None)) = self.entries.back() {
            self.entries.pop_back();
        }
        if self.entries.len() > 2 * self.live + KEEP_CAPACITY {
            self.entries.retain(|(_, packet)| packet.is_some());
        }
        if self.entries.capacity() > 4 * self.entries.len() + KEEP_CAPACITY {
            self.entries
                .shrink_to((2 * self.entries.len()).max(KEEP_CAPACITY / 2));
        }
        Some(packet)
    }

    pub(super) fn get(&self, number: u64) -> Option<&SentPacket> {
        self.entries[self.position(number).ok()?].1.as_ref()
    }

    /// The tracked packets whose numbers are in `range`, in increasing order
    pub(super) fn range(
        &self,
        range: impl RangeBounds<u64>,
    ) -> impl DoubleEndedIterator<Item = (u64, &SentPacket)> {
        let lo = match range.start_bound() {
            Bound::Included(&n) => self.entries.partition_point(|&(pn, _)| pn < n),
            Bound::Excluded(&n) => self.entries.partition_point(|&(pn, _)| pn <= n),
            Bound::Unbounded => 0,
        };
        let hi = match range.end_bound() {
            Bound::Included(&n) => self.entries.partition_point(|&(pn, _)| pn <= n),
            Bound::Excluded(&n) => self.entries.partition_point(|&(pn, _)| pn < n),
            Bound::Unbounded => self.entries.len(),
        };
        self.entries
            .range(lo..hi.max(lo))
            .filter_map(|(pn, packet)| Some((*pn, packet.as_ref()?)))
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &SentPacket> {
        self.entries.iter().filter_map(|(_, packet)| packet.as_ref())
    }

    pub(super) fn values_mut(&mut self) -> impl Iterator<Item = &mut SentPacket> {
        self.entries.iter_mut().filter_map(|(_, packet)| packet.as_mut())
    }

    pub(super) fn into_values(self) -> impl Iterator<Item = SentPacket> {
        self.entries.into_iter().filter_map(|(_, packet)| packet)
    }

    fn position(&self, number: u64) -> Result<usize, usize> {
        self.entries.binary_search_by_key(&number, |&(pn, _)| pn)
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
        assert!(s.entries.is_empty());
        assert_eq!(s.live, 0);
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
        assert!(s.entries.capacity() <= 2 * KEEP_CAPACITY);

        // A burst, then acknowledgements of every other packet, then of the rest but one.
        for n in 1..1_000 {
            s.insert(n, packet(1));
        }
        for n in (1..1_000).step_by(2) {
            s.remove(n);
        }
        assert_eq!(s.live, 500);
        assert!(s.entries.len() <= 2 * s.live + KEEP_CAPACITY);
        for n in (2..1_000).step_by(2) {
            s.remove(n);
        }
        assert_eq!(numbers(&s, ..), [0]);
        assert!(
            s.entries.capacity() <= 2 * KEEP_CAPACITY,
            "the burst's room is given back: {}",
            s.entries.capacity()
        );
        assert_eq!(s.values().count(), 1);
    }
}
