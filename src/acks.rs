//! Settling deliveries in the fewest frames: messages finish out of order, but the broker
//! hears about them in delivery-tag order, as one `basic.ack multiple` per run of finished
//! messages, and a single `basic.nack requeue` for each one handed back.
//!
//! The tracker never acks a tag that is still in flight or that is to be nacked, so the
//! cumulative ack is always exactly "these messages are done".

use std::collections::VecDeque;

/// What to tell the broker, in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// Ack every unsettled delivery up to and including this tag.
    AckUpTo(u64),
    /// Hand this delivery back to the queue.
    Requeue(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    InFlight,
    Done,
    HandBack,
}

/// Deliveries of one channel, oldest first. Delivery tags on a channel increase by one per
/// delivery, so a tag's slot is found by subtraction.
#[derive(Debug, Default)]
pub struct AckTracker {
    first_tag: u64,
    slots: VecDeque<Slot>,
}

impl AckTracker {
    /// Records a new delivery; tags must arrive in increasing order.
    pub fn received(&mut self, tag: u64) {
        if self.slots.is_empty() {
            self.first_tag = tag;
        }
        // A gap would only come from deliveries this tracker never saw; keep the
        // arithmetic exact by treating them as done elsewhere.
        let expected = self.first_tag + self.slots.len() as u64;
        for _ in expected..tag {
            self.slots.push_back(Slot::Done);
        }
        self.slots.push_back(Slot::InFlight);
    }

    /// Marks `tag` finished (`ok`: its output was confirmed) and appends whatever can now
    /// be told to the broker.
    pub fn settle(&mut self, tag: u64, ok: bool, out: &mut Vec<Settlement>) {
        let Some(index) = tag.checked_sub(self.first_tag) else {
            return;
        };
        let Some(slot) = self.slots.get_mut(index as usize) else {
            return;
        };
        *slot = if ok { Slot::Done } else { Slot::HandBack };
        let mut ack_up_to = None;
        while let Some(front) = self.slots.front() {
            let tag = self.first_tag;
            match front {
                Slot::InFlight => break,
                Slot::Done => ack_up_to = Some(tag),
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
    }

    /// Deliveries received and not yet settled with the broker.
    pub fn unsettled(&self) -> usize {
        self.slots.len()
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
        t.received(1);
        t.received(2);
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
            t.received(tag);
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
        let mut t = AckTracker::default();
        let mut out = Vec::new();
        for tag in 10..=14 {
            t.received(tag);
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

    proptest! {
        /// Whatever the completion order, every delivery is settled exactly once, acks and
        /// requeues come in tag order, and no ack covers an unfinished or requeued tag.
        #[test]
        fn every_tag_is_settled_once_and_in_order(
            outcomes in prop::collection::vec(any::<bool>(), 1..60),
            order in any::<u64>(),
        ) {
            let n = outcomes.len() as u64;
            let mut t = AckTracker::default();
            for tag in 1..=n {
                t.received(tag);
            }
            let mut sequence: Vec<u64> = (1..=n).collect();
            // A deterministic shuffle from the generated seed.
            let mut seed = order | 1;
            for i in (1..sequence.len()).rev() {
                seed ^= seed << 13; seed ^= seed >> 7; seed ^= seed << 17;
                sequence.swap(i, (seed % (i as u64 + 1)) as usize);
            }
            let mut out = Vec::new();
            let mut done = std::collections::HashSet::new();
            let mut acked_through = 0;
            for tag in sequence {
                let before = out.len();
                t.settle(tag, outcomes[(tag - 1) as usize], &mut out);
                done.insert(tag);
                for s in &out[before..] {
                    match *s {
                        Settlement::AckUpTo(up_to) => {
                            prop_assert!(up_to > acked_through);
                            for covered in acked_through + 1..=up_to {
                                prop_assert!(done.contains(&covered));
                                prop_assert!(outcomes[(covered - 1) as usize], "acked a hand-back");
                            }
                            prop_assert!(outcomes[(up_to - 1) as usize]);
                            acked_through = up_to;
                        }
                        Settlement::Requeue(tag) => {
                            prop_assert_eq!(tag, acked_through + 1);
                            prop_assert!(!outcomes[(tag - 1) as usize]);
                            acked_through = tag;
                        }
                    }
                }
            }
            prop_assert_eq!(acked_through, n);
            prop_assert_eq!(t.unsettled(), 0);
        }
    }
}
