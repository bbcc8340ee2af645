//! Matches the publishes handed to rumqttc with their packet ids, so a PUBACK reports exactly
//! the tag (for the agent: the outbox records of a batch) of the publish it acknowledges.
//!
//! rumqttc assigns a packet id when it takes a publish off its request queue and reports it
//! as `Outgoing::Publish(pkid)`, in queue order. When the next id is still unacknowledged (the
//! broker acknowledged out of order and the ids wrapped), it holds that publish back and reports
//! `Outgoing::AwaitAck(pkid)` instead; once the colliding PUBACK arrives it sends the held
//! publish and reports `Outgoing::Publish(pkid)` for it. The held publish therefore keeps its
//! place at the head of the queue: dropping it there would shift every later batch onto its
//! neighbour's packet id, and one batch's PUBACK would delete another batch's records.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Publishes awaiting a packet id, and tagged publishes awaiting their PUBACK.
#[derive(Debug)]
pub(crate) struct Tracker<T> {
    /// Handed to rumqttc, packet id not known yet, in order (`None`: nothing to report).
    queued: VecDeque<Option<T>>,
    /// Sent tagged publishes by packet id.
    inflight: HashMap<u16, (T, Instant)>,
    /// Publishes rumqttc replays from the previous session before any queued one.
    replays: usize,
}

impl<T> Default for Tracker<T> {
    fn default() -> Self {
        Self {
            queued: VecDeque::new(),
            inflight: HashMap::new(),
            replays: 0,
        }
    }
}

impl<T> Tracker<T> {
    /// A publish was handed to rumqttc.
    pub(crate) fn queued(&mut self, tag: Option<T>) {
        self.queued.push_back(tag);
    }

    /// A resumed session: rumqttc sends `n` publishes of the previous one first.
    pub(crate) fn replaying(&mut self, n: usize) {
        self.replays = n;
    }

    /// rumqttc sent the publish at the head of the queue with `pkid`.
    pub(crate) fn sent(&mut self, pkid: u16) {
        if self.replays > 0 {
            self.replays -= 1;
            return;
        }
        match self.queued.pop_front() {
            Some(Some(tag)) if pkid != 0 => {
                self.inflight.insert(pkid, (tag, Instant::now()));
            }
            Some(_) => {}
            None => tracing::debug!(pkid, "publish not tracked"),
        }
    }

    /// rumqttc holds the publish at the head of the queue until `pkid` is acknowledged. It
    /// stays at the head: its `sent` comes after that PUBACK.
    pub(crate) fn held(&mut self, pkid: u16) {
        tracing::debug!(pkid, "publish waits on a packet-id collision");
    }

    /// The broker acknowledged `pkid`: the tag of the publish it carried, if any.
    pub(crate) fn acked(&mut self, pkid: u16) -> Option<T> {
        self.inflight.remove(&pkid).map(|(tag, _)| tag)
    }

    /// Tagged publishes handed to rumqttc and not acknowledged.
    pub(crate) fn tagged_in_flight(&self) -> usize {
        self.inflight.len() + self.queued.iter().filter(|t| t.is_some()).count()
    }

    /// Whether a sent tagged publish has waited longer than `timeout` for its PUBACK.
    pub(crate) fn any_expired(&self, timeout: Duration) -> bool {
        self.inflight
            .values()
            .any(|(_, sent)| sent.elapsed() > timeout)
    }

    /// Gives up on every sent tagged publish and returns the tags. Publishes still queued keep
    /// their place: their packet ids must still be matched in order.
    pub(crate) fn forget_sent(&mut self) -> Vec<T> {
        self.inflight.drain().map(|(_, (tag, _))| tag).collect()
    }

    /// The connection is gone: every tag not acknowledged (rumqttc drops what a new clean
    /// session would not resume).
    pub(crate) fn reset(&mut self) -> Vec<T> {
        let mut tags = self.forget_sent();
        tags.extend(self.queued.drain(..).flatten());
        self.replays = 0;
        tags
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::{Event, MqttState, Outgoing, Packet, PubAck, Publish, QoS, Request};

    /// Drives rumqttc's own state machine (as its event loop does: no new request while a
    /// publish is held) and feeds its events to a tracker, as the session does.
    struct Rig {
        state: MqttState,
        tracker: Tracker<Vec<u64>>,
        /// Requests handed over and not yet taken by rumqttc.
        requests: VecDeque<Publish>,
    }

    impl Rig {
        fn new(max_inflight: u16) -> Self {
            Self {
                state: MqttState::new(max_inflight, false),
                tracker: Tracker::default(),
                requests: VecDeque::new(),
            }
        }

        fn publish(&mut self, tag: Option<Vec<u64>>) {
            self.tracker.queued(tag);
            self.requests
                .push_back(Publish::new("t", QoS::AtLeastOnce, vec![]));
        }

        /// Lets rumqttc take requests until it holds one back or has none; returns the
        /// packet ids it put on the wire.
        fn run(&mut self) -> Vec<u16> {
            let mut wire = Vec::new();
            while self.state.collision.is_none() {
                let Some(p) = self.requests.pop_front() else {
                    break;
                };
                if let Some(Packet::Publish(p)) = self
                    .state
                    .handle_outgoing_packet(Request::Publish(p))
                    .unwrap()
                {
                    wire.push(p.pkid);
                }
                self.drain();
            }
            wire
        }

        /// The broker acknowledges `pkid`; returns the tag the session would report.
        fn ack(&mut self, pkid: u16) -> Option<Vec<u64>> {
            self.state
                .handle_incoming_packet(Packet::PubAck(PubAck::new(pkid)))
                .unwrap();
            let mut deleted = None;
            while let Some(event) = self.state.events.pop_front() {
                match event {
                    Event::Incoming(Packet::PubAck(a)) => deleted = self.tracker.acked(a.pkid),
                    other => self.feed(other),
                }
            }
            deleted
        }

        fn drain(&mut self) {
            while let Some(event) = self.state.events.pop_front() {
                self.feed(event);
            }
        }

        fn feed(&mut self, event: Event) {
            match event {
                Event::Outgoing(Outgoing::Publish(pkid)) => self.tracker.sent(pkid),
                Event::Outgoing(Outgoing::AwaitAck(pkid)) => self.tracker.held(pkid),
                _ => {}
            }
        }
    }

    fn batch(seq: u64) -> Option<Vec<u64>> {
        Some(vec![seq])
    }

    #[test]
    fn in_order_acks_delete_each_batch_once() {
        let mut rig = Rig::new(10);
        for seq in 1..=3 {
            rig.publish(batch(seq));
        }
        assert_eq!(rig.run(), vec![1, 2, 3]);
        assert_eq!(rig.ack(1), Some(vec![1]));
        assert_eq!(rig.ack(2), Some(vec![2]));
        assert_eq!(rig.ack(3), Some(vec![3]));
        assert_eq!(rig.tracker.tagged_in_flight(), 0);
    }

    /// Regression: the broker holds one PUBACK back while the packet ids wrap. rumqttc
    /// holds the colliding publish, then sends it under the freed id; every PUBACK must
    /// delete the records of the batch it acknowledges, and no other.
    #[test]
    fn a_packet_id_collision_keeps_every_batch_on_its_own_ack() {
        // Packet ids run 1, 2, 3, 1, … with at most 3 in flight.
        let mut rig = Rig::new(3);
        rig.publish(batch(1)); // pkid 1: its PUBACK is held back by the broker
        rig.publish(None); // pkid 2: reported state
        rig.publish(batch(3)); // pkid 3
        assert_eq!(rig.run(), vec![1, 2, 3]);
        assert_eq!(rig.ack(2), None);
        assert_eq!(rig.ack(3), Some(vec![3]));
        // The ids wrap to 1, still unacknowledged: batch 4 is held, later ones wait.
        rig.publish(batch(4));
        rig.publish(batch(5));
        rig.publish(None);
        assert_eq!(rig.run(), Vec::<u16>::new());
        assert!(rig.state.collision.is_some());
        assert_eq!(rig.tracker.tagged_in_flight(), 3);
        // The held-back PUBACK arrives: it is batch 1's, and batch 4 goes out as pkid 1.
        assert_eq!(rig.ack(1), Some(vec![1]));
        assert_eq!(rig.run(), vec![2, 3]);
        assert_eq!(rig.ack(2), Some(vec![5]));
        assert_eq!(rig.ack(1), Some(vec![4]));
        assert_eq!(rig.ack(3), None);
        assert_eq!(rig.tracker.tagged_in_flight(), 0);
    }

    /// A resumed session replays the previous session's publishes before any new one: their
    /// packet ids belong to nobody queued now.
    #[test]
    fn replayed_publishes_are_not_matched_to_new_ones() {
        let mut tracker = Tracker::default();
        tracker.replaying(2);
        tracker.queued(batch(7));
        tracker.sent(4);
        tracker.sent(5);
        tracker.sent(1);
        assert_eq!(tracker.acked(4), None);
        assert_eq!(tracker.acked(1), Some(vec![7]));
    }

    #[test]
    fn a_lost_connection_returns_every_unacknowledged_tag() {
        let mut rig = Rig::new(10);
        rig.publish(batch(1));
        rig.publish(None);
        assert_eq!(rig.run(), vec![1, 2]);
        rig.publish(batch(3));
        let mut tags = rig.tracker.reset();
        tags.sort();
        assert_eq!(tags, vec![vec![1], vec![3]]);
        assert_eq!(rig.tracker.tagged_in_flight(), 0);
    }
}
