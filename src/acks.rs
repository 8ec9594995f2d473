//! Settling deliveries in the fewest frames: messages finish out of order, but the broker
//! hears about them in delivery-tag order, as one `basic.ack multiple` per run of finished
//! messages, and a single `basic.nack requeue` for each one handed back.
//!
//! The tracker never acks a tag that is still in flight, not yet seen, or to be nacked, so
//! the cumulative ack is always exactly "these messages are done". Several consumers share
//! one channel (the shards of a sharded inbound), each with its own buffer, so deliveries
//! may be taken out of tag order: a tag skipped over is kept as not yet seen until its
//! delivery arrives. A *held* message (its check
//! waits for Redis) would block every cumulative ack behind it: while one is held, the
//! messages finished after it are settled one by one instead.

use std::collections::VecDeque;

/// Most tags skipped over at once: every consumer's prefetch window together (at most
/// 1,025 queues × 65,535) is far below it.
const MAX_UNSEEN: usize = 1 << 27;

/// What to tell the broker, in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// Ack every unsettled delivery up to and including this tag.
    AckUpTo(u64),
    /// Ack this delivery alone.
    Ack(u64),
    /// Hand this delivery back to the queue.
    Requeue(u64),
}

/// Delivery tags on a channel go up by one per delivery, each delivered once: a tag seen
/// twice, or one older than every tag still tracked, is a delivery the tracker cannot place,
/// and a cumulative ack could then cover something unprocessed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("delivery tag {got} arrived where {expected} was expected")]
pub struct TagGap {
    pub expected: u64,
    pub got: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// A tag skipped over: its delivery waits in another consumer's buffer.
    Unseen,
    InFlight,
    /// In flight and waiting for Redis, for an unknown time.
    Held,
    Done,
    HandBack,
    /// Already told to the broker on its own (behind a held message).
    Settled,
}

/// Deliveries of one channel, oldest first, found by subtracting the first tag.
#[derive(Debug)]
pub struct AckTracker {
    first_tag: u64,
    slots: VecDeque<Slot>,
    /// The tag after the highest one seen.
    next_tag: u64,
    held: usize,
    /// Slots already told to the broker on their own, not yet popped.
    settled_alone: usize,
    /// Slots whose delivery has not arrived yet.
    unseen: usize,
}

/// A new channel's: its first delivery carries tag 1.
impl Default for AckTracker {
    fn default() -> Self {
        Self::starting_at(1)
    }
}

impl AckTracker {
    /// A tracker whose first delivery carries `tag`.
    pub fn starting_at(tag: u64) -> Self {
        Self {
            first_tag: tag,
            slots: VecDeque::new(),
            next_tag: tag,
            held: 0,
            settled_alone: 0,
            unseen: 0,
        }
    }

    /// Records a new delivery. A tag past the next one leaves the tags between as not yet
    /// seen; a tag seen before, or older than every tracked one, is refused.
    pub fn received(&mut self, tag: u64) -> Result<(), TagGap> {
        let expected = self.next_tag;
        if tag >= expected {
            if self.slots.is_empty() {
                self.first_tag = expected;
            }
            // No more can be in other consumers' buffers than their prefetch windows hold.
            let skipped = usize::try_from(tag - expected)
                .ok()
                .filter(|&n| n <= MAX_UNSEEN)
                .ok_or(TagGap { expected, got: tag })?;
            self.slots
                .extend(std::iter::repeat_n(Slot::Unseen, skipped));
            self.unseen += skipped;
            self.slots.push_back(Slot::InFlight);
            self.next_tag = tag + 1;
            return Ok(());
        }
        match self.index(tag) {
            Some(index) if self.slots[index] == Slot::Unseen => {
                self.slots[index] = Slot::InFlight;
                self.unseen -= 1;
                Ok(())
            }
            _ => Err(TagGap { expected, got: tag }),
        }
    }

    fn index(&self, tag: u64) -> Option<usize> {
        let index = usize::try_from(tag.checked_sub(self.first_tag)?).ok()?;
        (index < self.slots.len()).then_some(index)
    }

    /// Marks `tag` as waiting for Redis; what finished behind it is settled now, one by
    /// one, so the held message never stops the others.
    pub fn hold(&mut self, tag: u64, out: &mut Vec<Settlement>) {
        let Some(index) = self.index(tag) else { return };
        if self.slots[index] != Slot::InFlight {
            return;
        }
        self.slots[index] = Slot::Held;
        self.held += 1;
        for i in index + 1..self.slots.len() {
            self.settle_alone(i, out);
        }
    }

    /// Settles the finished slot at `index` on its own, if it is finished.
    fn settle_alone(&mut self, index: usize, out: &mut Vec<Settlement>) {
        let tag = self.first_tag + index as u64;
        match self.slots[index] {
            Slot::Done => out.push(Settlement::Ack(tag)),
            Slot::HandBack => out.push(Settlement::Requeue(tag)),
            _ => return,
        }
        self.slots[index] = Slot::Settled;
        self.settled_alone += 1;
    }

    /// Marks `tag` finished (`ok`: its output was confirmed) and appends whatever can now
    /// be told to the broker.
    pub fn settle(&mut self, tag: u64, ok: bool, out: &mut Vec<Settlement>) {
        let Some(index) = self.index(tag) else { return };
        match self.slots[index] {
            Slot::Held => self.held -= 1,
            Slot::InFlight => {}
            // Settled twice: the first settlement stands.
            _ => return,
        }
        self.slots[index] = if ok { Slot::Done } else { Slot::HandBack };
        let mut ack_up_to = None;
        while let Some(front) = self.slots.front() {
            let tag = self.first_tag;
            match front {
                Slot::Unseen | Slot::InFlight | Slot::Held => break,
                Slot::Done => ack_up_to = Some(tag),
                // Already acked alone; a later cumulative ack passes over it.
                Slot::Settled => self.settled_alone -= 1,
                Slot::HandBack => {
                    if let Some(t) = ack_up_to.take() {
                        out.push(Settlement::AckUpTo(t));
                    }
                    out.push(Settlement::Requeue(tag));
                }
            }
            self.slots.pop_front();
            self.first_tag += 1;
        }
        if let Some(t) = ack_up_to {
            out.push(Settlement::AckUpTo(t));
        }
        if self.held > 0
            && let Some(index) = self.index(tag)
        {
            self.settle_alone(index, out);
        }
    }

    /// Settles on its own every delivery that is finished but not yet told, whatever is
    /// before it (a session that ends with tags never seen, in other consumers' buffers,
    /// still acks what it finished, so closing the channel hands back only the rest).
    pub fn flush(&mut self, out: &mut Vec<Settlement>) {
        for i in 0..self.slots.len() {
            self.settle_alone(i, out);
        }
    }

    /// Deliveries received and not yet settled with the broker.
    pub fn unsettled(&self) -> usize {
        self.slots.len() - self.settled_alone - self.unseen
    }

    /// Deliveries waiting for Redis.
    pub fn held(&self) -> usize {
        self.held
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn in_order_completions_ack_one_by_one() {
        let mut t = AckTracker::default();
        let mut out = Vec::new();
        t.received(1).unwrap();
        t.received(2).unwrap();
        t.settle(1, true, &mut out);
        t.settle(2, true, &mut out);
        assert_eq!(out, vec![Settlement::AckUpTo(1), Settlement::AckUpTo(2)]);
        assert_eq!(t.unsettled(), 0);
    }

    #[test]
    fn out_of_order_completions_wait_for_the_oldest_then_ack_together() {
        let mut t = AckTracker::default();
        let mut out = Vec::new();
        for tag in 1..=4 {
            t.received(tag).unwrap();
        }
        t.settle(3, true, &mut out);
        t.settle(2, true, &mut out);
        assert!(out.is_empty(), "1 is still in flight");
        t.settle(1, true, &mut out);
        assert_eq!(out, vec![Settlement::AckUpTo(3)]);
        assert_eq!(t.unsettled(), 1);
    }

    #[test]
    fn a_hand_back_splits_the_run_and_is_never_covered_by_an_ack() {
        let mut t = AckTracker::starting_at(10);
        let mut out = Vec::new();
        for tag in 10..=14 {
            t.received(tag).unwrap();
        }
        t.settle(11, false, &mut out);
        t.settle(12, true, &mut out);
        t.settle(14, true, &mut out);
        t.settle(10, true, &mut out);
        assert_eq!(
            out,
            vec![
                Settlement::AckUpTo(10),
                Settlement::Requeue(11),
                Settlement::AckUpTo(12)
            ]
        );
        out.clear();
        t.settle(13, true, &mut out);
        assert_eq!(out, vec![Settlement::AckUpTo(14)]);
    }

    #[test]
    fn a_tag_taken_out_of_order_is_never_covered_before_it_arrives() {
        // Two consumers on one channel: 5 and 7 from one, 6 still in the other's buffer.
        let mut t = AckTracker::starting_at(5);
        let mut out = Vec::new();
        t.received(5).unwrap();
        t.received(7).unwrap();
        assert_eq!(t.unsettled(), 2);
        t.settle(7, true, &mut out);
        t.settle(5, true, &mut out);
        assert_eq!(out, vec![Settlement::AckUpTo(5)], "6 is not seen yet");
        out.clear();
        t.received(6).unwrap();
        t.settle(6, true, &mut out);
        assert_eq!(out, vec![Settlement::AckUpTo(7)]);
        // A tag seen twice, or older than every tracked one, cannot be placed.
        t.received(8).unwrap();
        assert_eq!(
            t.received(8),
            Err(TagGap {
                expected: 9,
                got: 8
            })
        );
        assert!(t.received(3).is_err());
    }

    #[test]
    fn a_session_that_ends_acks_what_it_finished_behind_a_tag_never_seen() {
        let mut t = AckTracker::default();
        let mut out = Vec::new();
        t.received(2).unwrap();
        t.received(3).unwrap();
        t.settle(2, true, &mut out);
        t.settle(3, false, &mut out);
        assert!(out.is_empty(), "tag 1 was never seen");
        t.flush(&mut out);
        assert_eq!(out, vec![Settlement::Ack(2), Settlement::Requeue(3)]);
        assert_eq!(t.unsettled(), 0);
    }

    #[test]
    fn a_held_message_does_not_stop_the_ones_behind_it() {
        let mut t = AckTracker::default();
        let mut out = Vec::new();
        for tag in 1..=5 {
            t.received(tag).unwrap();
        }
        t.settle(3, true, &mut out);
        assert!(out.is_empty());
        t.hold(1, &mut out);
        assert_eq!(
            out,
            vec![Settlement::Ack(3)],
            "what finished behind it goes now"
        );
        out.clear();
        t.settle(2, true, &mut out);
        t.settle(4, false, &mut out);
        assert_eq!(out, vec![Settlement::Ack(2), Settlement::Requeue(4)]);
        assert_eq!((t.held(), t.unsettled()), (1, 2));
        out.clear();
        t.settle(1, true, &mut out);
        assert_eq!(
            out,
            vec![Settlement::AckUpTo(1)],
            "never an ack of a settled tag"
        );
        out.clear();
        t.settle(5, true, &mut out);
        assert_eq!(out, vec![Settlement::AckUpTo(5)]);
        assert_eq!((t.held(), t.unsettled()), (0, 0));
    }

    proptest! {
        /// Whatever the completion order and whichever messages are held for a while, the
        /// broker (modelled as its set of unacked tags) hears of every delivery exactly
        /// once, as what it became, and no cumulative ack covers an unfinished or
        /// handed-back tag or names a tag that is no longer unacked.
        #[test]
        fn every_tag_is_settled_once_and_as_what_it_became(
            outcomes in prop::collection::vec(any::<bool>(), 1..60),
            holds in prop::collection::vec(any::<bool>(), 60),
            order in any::<u64>(),
        ) {
            let n = outcomes.len() as u64;
            let mut t = AckTracker::default();
            // Taken from two consumers' buffers in turns: odd tags from one, even from the
            // other, each in order, interleaved as the seed says; taken only as the events
            // below need them, so tags not yet seen stand between finished ones.
            let (mut odd, mut even) = ((1..=n).step_by(2).peekable(), (2..=n).step_by(2).peekable());
            let mut turn = order;
            let mut arrivals = Vec::new();
            while odd.peek().is_some() || even.peek().is_some() {
                turn = turn.rotate_left(1);
                let tag = match (turn & 1 == 0, odd.peek(), even.peek()) {
                    (true, Some(_), _) | (false, Some(_), None) => odd.next(),
                    _ => even.next(),
                };
                arrivals.push(tag.unwrap());
            }
            let mut arrivals = arrivals.into_iter();
            let mut received = std::collections::HashSet::new();
            let mut sequence: Vec<u64> = (1..=n).collect();
            // A deterministic shuffle from the generated seed.
            let mut seed = order | 1;
            for i in (1..sequence.len()).rev() {
                seed ^= seed << 13; seed ^= seed >> 7; seed ^= seed << 17;
                sequence.swap(i, (seed % (i as u64 + 1)) as usize);
            }
            // A held message is held at its turn and finishes after all the others.
            let mut events: Vec<(u64, bool)> = Vec::new();
            let mut late = Vec::new();
            for tag in sequence {
                if holds[(tag - 1) as usize] {
                    events.push((tag, true));
                    late.push((tag, false));
                } else {
                    events.push((tag, false));
                }
            }
            events.extend(late);
            let mut unacked: std::collections::BTreeSet<u64> = (1..=n).collect();
            let mut done = std::collections::HashSet::new();
            let mut out = Vec::new();
            for (tag, hold) in events {
                out.clear();
                while !received.contains(&tag) {
                    let next = arrivals.next().unwrap();
                    t.received(next).unwrap();
                    received.insert(next);
                }
                if hold {
                    t.hold(tag, &mut out);
                } else {
                    t.settle(tag, outcomes[(tag - 1) as usize], &mut out);
                    done.insert(tag);
                }
                for s in &out {
                    match *s {
                        Settlement::AckUpTo(up_to) => {
                            prop_assert!(unacked.contains(&up_to), "ack of unknown tag {}", up_to);
                            let covered: Vec<u64> = unacked.range(..=up_to).copied().collect();
                            for c in covered {
                                prop_assert!(done.contains(&c), "acked {} unfinished", c);
                                prop_assert!(outcomes[(c - 1) as usize], "acked hand-back {}", c);
                                unacked.remove(&c);
                            }
                        }
                        Settlement::Ack(tag) => {
                            prop_assert!(unacked.remove(&tag) && done.contains(&tag));
                            prop_assert!(outcomes[(tag - 1) as usize]);
                        }
                        Settlement::Requeue(tag) => {
                            prop_assert!(unacked.remove(&tag) && done.contains(&tag));
                            prop_assert!(!outcomes[(tag - 1) as usize]);
                        }
                    }
                }
            }
            prop_assert!(unacked.is_empty(), "never settled: {:?}", unacked);
            prop_assert_eq!((t.unsettled(), t.held()), (0, 0));
        }
    }
}
