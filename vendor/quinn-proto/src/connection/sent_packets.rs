//! Packets sent and not yet acknowledged, declared lost or forgotten, by packet number
//!
//! A space sends packet numbers in increasing order, with at most a skipped number now and
//! then (see `PacketNumberFilter`), and acknowledgements remove them mostly from the oldest end.
//! So the packets live in a ring indexed by `number - base`: insertion at the back and lookup
//! are O(1), and a connection with one or two packets outstanding holds a ring of four slots
//! instead of a B-tree leaf of eleven (measured: ~1.1 KiB per idle connection, whose last
//! ACK-only packets are never acknowledged). Numbers that were skipped, acknowledged or lost
//! in the middle of the ring are empty slots; empty slots at either end are dropped at once,
//! and the ring's memory is released when it empties.

use std::{collections::VecDeque, ops::Bound, ops::RangeBounds};

use super::spaces::SentPacket;

#[derive(Debug, Default)]
pub(super) struct SentPackets {
    /// Packet number of `slots[0]`
    base: u64,
    /// `slots[i]` is packet `base + i`; the first and last slots are always full
    slots: VecDeque<Option<SentPacket>>,
    /// Number of full slots
    len: usize,
}

/// A ring this long or longer is given back to the allocator when it empties; shorter ones
/// are kept for the next packet.
const KEEP_CAPACITY: usize = 8;

impl SentPackets {
    /// Track `packet`, whose number is larger than every number tracked
    pub(super) fn insert(&mut self, number: u64, packet: SentPacket) {
        if self.slots.is_empty() {
            self.base = number;
        }
        let end = self.base + self.slots.len() as u64;
        debug_assert!(number >= end, "packet numbers must increase");
        if number < end {
            // Not expected from a packet space; keep the map's meaning rather than panic.
            let slot = &mut self.slots[(number - self.base) as usize];
            if slot.is_none() {
                self.len += 1;
            }
            *slot = Some(packet);
            return;
        }
        for _ in end..number {
            self.slots.push_back(None);
        }
        self.slots.push_back(Some(packet));
        self.len += 1;
    }

    /// Stop tracking packet `number`, and return it
    pub(super) fn remove(&mut self, number: u64) -> Option<SentPacket> {
        let index = self.index(number)?;
        let packet = self.slots[index].take()?;
        self.len -= 1;
        if self.len == 0 {
            if self.slots.capacity() >= KEEP_CAPACITY {
                self.slots = VecDeque::new();
            } else {
                self.slots.clear();
            }
            return Some(packet);
        }
        while let Some(None) = self.slots.front() {
            self.slots.pop_front();
            self.base += 1;
        }
        while let Some(None) = self.slots.back() {
            self.slots.pop_back();
        }
        Some(packet)
    }

    pub(super) fn get(&self, number: u64) -> Option<&SentPacket> {
        self.slots.get(self.index(number)?)?.as_ref()
    }

    /// The tracked packets whose numbers are in `range`, in increasing order
    pub(super) fn range(
        &self,
        range: impl RangeBounds<u64>,
    ) -> impl DoubleEndedIterator<Item = (u64, &SentPacket)> {
        let end = self.base + self.slots.len() as u64;
        let lo = match range.start_bound() {
            Bound::Included(&n) => n,
            Bound::Excluded(&n) => n.saturating_add(1),
            Bound::Unbounded => 0,
        }
        .clamp(self.base, end);
        let hi = match range.end_bound() {
            Bound::Included(&n) => n.saturating_add(1),
            Bound::Excluded(&n) => n,
            Bound::Unbounded => end,
        }
        .clamp(lo, end);
        let base = self.base;
        self.slots
            .range((lo - base) as usize..(hi - base) as usize)
            .enumerate()
            .filter_map(move |(i, slot)| Some((lo + i as u64, slot.as_ref()?)))
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &SentPacket> {
        self.slots.iter().flatten()
    }

    pub(super) fn values_mut(&mut self) -> impl Iterator<Item = &mut SentPacket> {
        self.slots.iter_mut().flatten()
    }

    pub(super) fn into_values(self) -> impl Iterator<Item = SentPacket> {
        self.slots.into_iter().flatten()
    }

    fn index(&self, number: u64) -> Option<usize> {
        let i = number.checked_sub(self.base)?;
        (i < self.slots.len() as u64).then_some(i as usize)
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
        assert!(s.get(5).is_none());
        assert_eq!(s.get(6).map(|p| p.size), Some(6));

        assert_eq!(s.remove(7).map(|p| p.size), Some(7));
        assert!(s.remove(7).is_none());
        assert_eq!(s.remove(3).map(|p| p.size), Some(3));
        assert_eq!(numbers(&s, ..), [4, 6, 8]);
        assert_eq!(s.base, 4);
        assert_eq!(s.remove(8).map(|p| p.size), Some(8));
        assert_eq!(s.slots.len(), 3);
        assert_eq!(s.values().map(|p| p.size).collect::<Vec<_>>(), [4, 6]);
        s.remove(4);
        s.remove(6);
        assert_eq!(s.len, 0);
        assert!(s.slots.is_empty());

        // After emptying, numbering starts again where the next packet is.
        s.insert(100, packet(1));
        assert_eq!(numbers(&s, ..), [100]);
        assert_eq!(s.into_values().count(), 1);
    }

    #[test]
    fn gives_a_large_ring_back_when_empty() {
        let mut s = SentPackets::default();
        for n in 0..100 {
            s.insert(n, packet(1));
        }
        for n in 0..100 {
            s.remove(n);
        }
        assert_eq!(s.slots.capacity(), 0);
    }
}
