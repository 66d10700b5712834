//! Intake: puts the changes that arrive from peers back into per-origin
//! order before the Router applies them.
//!
//! PUB/SUB drops messages (a slow joiner, a full queue, a paused peer), so
//! for every origin the intake tracks the epoch and the last seq it handed
//! on. A change that is next is applied at once; one further ahead is held
//! and the missing range is asked for (repair); later changes wait until the
//! gap is filled, so sessions still see each origin in order with no gaps.
//! Heartbeats carry each origin's last seq, so a loss at the tail (with
//! nothing after it to reveal the gap) is noticed too.
//!
//! Where no node holds the missing changes any more, the intake skips past
//! them ([`Action::SkipTo`]): history then refuses to prove complete any
//! resume whose cursor lies before the skip, so nothing is lost silently.
//!
//! A new epoch of an origin (it restarted) does not start at once: the old
//! epoch may have a tail that this node missed and that only another peer
//! holds (the origin forgot it). The intake first asks every peer how far
//! it holds the old epoch ([`Action::Settle`]), repairs up to there, and only
//! then opens the new epoch, whose changes meanwhile are dropped and fetched
//! again by repair afterwards. So sessions see the old epoch's tail before
//! the new epoch, never after. A tail that no reachable peer holds is
//! skipped visibly, as above.
//!
//! Bounds: at most `max_held` changes are held per origin; beyond that they
//! are dropped and fetched again by the repair that follows. One repair is in
//! flight per origin at a time.
//!
//! This is pure bookkeeping: it returns [`Action`]s and performs none.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::change::Positioned;

#[derive(Debug)]
pub enum Action {
    /// Hand this change to the Router: it is next for its origin.
    Apply(Arc<Positioned>),
    /// Record that the origin has this epoch, holding nothing of it yet,
    /// starting after `base`.
    Open {
        origin: Arc<str>,
        epoch: u64,
        base: u64,
    },
    /// Changes up to `base` cannot be had: continue after it.
    SkipTo {
        origin: Arc<str>,
        epoch: u64,
        base: u64,
    },
    /// Ask the origin (or any peer) for `from..=to` of this epoch.
    Repair {
        origin: Arc<str>,
        epoch: u64,
        from: u64,
        to: u64,
    },
    /// The origin has moved past this epoch: ask every peer but the origin
    /// how far they hold it, and answer with [`Intake::on_settled`].
    Settle { origin: Arc<str>, epoch: u64 },
}

/// What a peer answered to a repair request.
#[derive(Debug)]
pub struct Repaired {
    /// The peer holds every change of the epoch after `base`.
    pub base: u64,
    /// The last seq of the epoch the peer holds.
    pub last: u64,
    /// The changes asked for (or the part the peer holds), in seq order.
    pub changes: Vec<Arc<Positioned>>,
}

#[derive(Debug, Default)]
struct Track {
    epoch: u64,
    last: u64,
    /// The highest seq known to exist (from changes and heartbeats).
    known: u64,
    held: BTreeMap<u64, Arc<Positioned>>,
    repairing: bool,
    /// A newer epoch of the origin, waiting until this one is settled.
    next: Option<NextEpoch>,
    /// A [`Action::Settle`] is out.
    settling: bool,
}

/// What is known of an origin's newer epoch while the current one is being
/// settled.
#[derive(Debug)]
struct NextEpoch {
    epoch: u64,
    /// The highest seq seen of it.
    known: u64,
}

/// How an epoch named by a change or a heartbeat stands to the tracked one.
enum Placed {
    /// Older: the origin has left it.
    Ended,
    Current,
    /// Newer: the origin restarted.
    Newer,
    /// The origin was not tracked; now it is, at this epoch.
    First,
}

pub struct Intake {
    origins: HashMap<Arc<str>, Track>,
    max_held: usize,
    /// Changes dropped as repeats (already applied).
    pub repeats: u64,
    /// Changes that could no longer be had from any node.
    pub lost: u64,
}

impl Intake {
    pub fn new(max_held: usize) -> Intake {
        Intake {
            origins: HashMap::new(),
            max_held,
            repeats: 0,
            lost: 0,
        }
    }

    /// The last seq handed on for `origin`, with its epoch.
    pub fn applied(&self, origin: &str) -> Option<(u64, u64)> {
        self.origins.get(origin).map(|t| (t.epoch, t.last))
    }

    /// Where news of `origin`'s `epoch` belongs; starts tracking an origin
    /// heard of for the first time.
    fn place(&mut self, origin: &Arc<str>, epoch: u64) -> Placed {
        match self.origins.get(origin).map(|t| t.epoch) {
            Some(current) if epoch < current => Placed::Ended,
            Some(current) if epoch > current => Placed::Newer,
            Some(_) => Placed::Current,
            None => {
                let track = Track {
                    epoch,
                    ..Track::default()
                };
                self.origins.insert(origin.clone(), track);
                Placed::First
            }
        }
    }

    /// Notes that `origin` has a newer epoch than the one tracked; the first
    /// time, asks for the tracked one to be settled. The newer epoch's
    /// changes are not kept: repair fetches them once it is opened.
    fn defer(&mut self, origin: &Arc<str>, epoch: u64, seq: u64, out: &mut Vec<Action>) {
        let track = self.origins.get_mut(origin).expect("tracked");
        match &mut track.next {
            Some(next) if next.epoch == epoch => next.known = next.known.max(seq),
            // One newer still (the origin restarted twice): its heartbeats
            // name it again once the next epoch is the tracked one, and it
            // is settled in turn.
            Some(_) => {}
            None => {
                track.next = Some(NextEpoch { epoch, known: seq });
                track.settling = true;
                out.push(Action::Settle {
                    origin: origin.clone(),
                    epoch: track.epoch,
                });
            }
        }
    }

    /// Leaves a settled epoch for the next one: a tail still missing is
    /// skipped visibly, and the next epoch is opened or repaired from seq 1.
    fn advance(&mut self, origin: &Arc<str>, out: &mut Vec<Action>) {
        let track = self.origins.get_mut(origin).expect("tracked");
        let Some(next) = track.next.take() else {
            return;
        };
        if track.known > track.last {
            self.lost += track.known - track.last;
            out.push(Action::SkipTo {
                origin: origin.clone(),
                epoch: track.epoch,
                base: track.known,
            });
        }
        *track = Track {
            epoch: next.epoch,
            known: next.known,
            ..Track::default()
        };
        if next.known == 0 {
            out.push(Action::Open {
                origin: origin.clone(),
                epoch: next.epoch,
                base: 0,
            });
        }
        request_repair(origin, track, out);
    }

    /// Advances past a settled epoch once everything known of it is in.
    fn advance_if_settled(&mut self, origin: &Arc<str>, out: &mut Vec<Action>) {
        let track = self.origins.get_mut(origin).expect("tracked");
        if track.next.is_some() && !track.settling && track.last >= track.known {
            self.advance(origin, out);
        }
    }

    pub fn on_change(&mut self, change: Arc<Positioned>) -> Vec<Action> {
        let mut out = Vec::new();
        let origin = change.pos.origin.clone();
        let (epoch, seq) = (change.pos.epoch, change.pos.seq);
        match self.place(&origin, epoch) {
            Placed::Ended => {
                self.repeats += 1;
                return out;
            }
            Placed::Newer => {
                self.defer(&origin, epoch, seq, &mut out);
                return out;
            }
            Placed::Current | Placed::First => {}
        }
        let max_held = self.max_held;
        let track = self.origins.get_mut(&origin).expect("tracked above");
        track.known = track.known.max(seq);
        if seq <= track.last {
            self.repeats += 1;
        } else if seq == track.last + 1 {
            track.last = seq;
            out.push(Action::Apply(change));
            drain(track, &mut out);
        } else {
            if track.held.len() < max_held {
                track.held.insert(seq, change);
            }
            request_repair(&origin, track, &mut out);
        }
        out
    }

    /// An origin said it has published up to `seq` in `epoch`.
    pub fn on_heartbeat(&mut self, origin: &Arc<str>, epoch: u64, seq: u64) -> Vec<Action> {
        let mut out = Vec::new();
        match self.place(origin, epoch) {
            Placed::Ended => return out,
            Placed::Newer => {
                self.defer(origin, epoch, seq, &mut out);
                return out;
            }
            // An epoch with nothing published yet: known complete.
            Placed::First if seq == 0 => out.push(Action::Open {
                origin: origin.clone(),
                epoch,
                base: 0,
            }),
            Placed::Current | Placed::First => {}
        }
        let track = self.origins.get_mut(origin).expect("tracked above");
        track.known = track.known.max(seq);
        request_repair(origin, track, &mut out);
        out
    }

    /// The answer to [`Action::Settle`]: the furthest seq of `epoch` that a
    /// peer holds, `None` when no peer holds any of it.
    pub fn on_settled(&mut self, origin: &Arc<str>, epoch: u64, end: Option<u64>) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(track) = self.origins.get_mut(origin) else {
            return out;
        };
        if track.epoch != epoch || !track.settling {
            return out;
        }
        track.settling = false;
        track.known = track.known.max(end.unwrap_or(0));
        request_repair(origin, track, &mut out);
        self.advance_if_settled(origin, &mut out);
        out
    }

    /// The answer to a repair of `origin`'s `epoch`; `None` when no peer
    /// could answer (it is asked again at the next heartbeat).
    pub fn on_repaired(
        &mut self,
        origin: &Arc<str>,
        epoch: u64,
        repaired: Option<Repaired>,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(track) = self.origins.get_mut(origin) else {
            return out;
        };
        if track.epoch != epoch {
            return out;
        }
        track.repairing = false;
        let Some(repaired) = repaired else {
            if track.next.is_some() && !track.settling {
                // Nobody holds the rest of an epoch its origin has left.
                self.advance(origin, &mut out);
            }
            return out;
        };

        track.known = track.known.max(repaired.last);
        if repaired.base > track.last {
            // Nobody holds (last, base]: move past it, visibly.
            self.lost += repaired.base - track.last;
            track.last = repaired.base;
            track.known = track.known.max(repaired.base);
            out.push(Action::SkipTo {
                origin: origin.clone(),
                epoch,
                base: repaired.base,
            });
        }
        for change in repaired.changes {
            let seq = change.pos.seq;
            if change.pos.epoch != epoch || seq <= track.last {
                continue;
            }
            if seq != track.last + 1 {
                break;
            }
            track.last = seq;
            track.known = track.known.max(seq);
            out.push(Action::Apply(change));
        }
        drain(track, &mut out);
        request_repair(origin, track, &mut out);
        self.advance_if_settled(origin, &mut out);
        out
    }
}

/// Applies held changes that are now next.
fn drain(track: &mut Track, out: &mut Vec<Action>) {
    while let Some(entry) = track.held.first_entry() {
        let seq = *entry.key();
        if seq <= track.last {
            entry.remove();
        } else if seq == track.last + 1 {
            track.last = seq;
            out.push(Action::Apply(entry.remove()));
        } else {
            break;
        }
    }
}

/// Asks for the first missing range, unless a repair is already out.
fn request_repair(origin: &Arc<str>, track: &mut Track, out: &mut Vec<Action>) {
    if track.repairing || track.known <= track.last {
        return;
    }
    let to = match track.held.first_key_value() {
        Some((&first_held, _)) => first_held - 1,
        None => track.known,
    };
    if to <= track.last {
        return;
    }
    track.repairing = true;
    out.push(Action::Repair {
        origin: origin.clone(),
        epoch: track.epoch,
        from: track.last + 1,
        to,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{Change, Position};

    fn change(epoch: u64, seq: u64) -> Arc<Positioned> {
        let change = Change {
            workspace: "w".into(),
            record: None,
            lists: vec![],
            kind: None,
            data: None,
        };
        Arc::new(Positioned::new(
            Position {
                origin: "n2".into(),
                epoch,
                seq,
            },
            0,
            change,
        ))
    }

    fn applied(actions: &[Action]) -> Vec<u64> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Apply(c) => Some(c.pos.seq),
                _ => None,
            })
            .collect()
    }

    fn repairs(actions: &[Action]) -> Vec<(u64, u64)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Repair { from, to, .. } => Some((*from, *to)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn in_order_changes_pass_straight_through() {
        let mut intake = Intake::new(100);
        assert_eq!(applied(&intake.on_change(change(1, 1))), vec![1]);
        assert_eq!(applied(&intake.on_change(change(1, 2))), vec![2]);
        assert!(
            applied(&intake.on_change(change(1, 2))).is_empty(),
            "repeat dropped"
        );
        assert_eq!(intake.repeats, 1);
    }

    #[test]
    fn a_gap_holds_later_changes_until_repaired() {
        let mut intake = Intake::new(100);
        intake.on_change(change(1, 1));
        let actions = intake.on_change(change(1, 4));
        assert!(applied(&actions).is_empty());
        assert_eq!(repairs(&actions), vec![(2, 3)]);
        let actions = intake.on_change(change(1, 5));
        assert!(repairs(&actions).is_empty(), "one repair at a time");

        let origin: Arc<str> = "n2".into();
        let repaired = Repaired {
            base: 0,
            last: 3,
            changes: vec![change(1, 2), change(1, 3)],
        };
        let actions = intake.on_repaired(&origin, 1, Some(repaired));
        assert_eq!(applied(&actions), vec![2, 3, 4, 5]);
        assert_eq!(intake.applied("n2"), Some((1, 5)));
    }

    #[test]
    fn heartbeats_reveal_a_lost_tail() {
        let mut intake = Intake::new(100);
        intake.on_change(change(1, 1));
        let origin: Arc<str> = "n2".into();
        assert_eq!(repairs(&intake.on_heartbeat(&origin, 1, 3)), vec![(2, 3)]);
        // A failed repair is asked again at the next heartbeat.
        intake.on_repaired(&origin, 1, None);
        assert_eq!(repairs(&intake.on_heartbeat(&origin, 1, 3)), vec![(2, 3)]);
    }

    #[test]
    fn a_late_joiner_fetches_from_the_start_and_skips_what_is_gone() {
        let mut intake = Intake::new(100);
        let actions = intake.on_change(change(7, 10));
        assert_eq!(repairs(&actions), vec![(1, 9)]);
        let origin: Arc<str> = "n2".into();
        let repaired = Repaired {
            base: 5,
            last: 9,
            changes: (6..=9).map(|s| change(7, s)).collect(),
        };
        let actions = intake.on_repaired(&origin, 7, Some(repaired));
        assert!(matches!(actions[0], Action::SkipTo { base: 5, .. }));
        assert_eq!(applied(&actions), vec![6, 7, 8, 9, 10]);
        assert_eq!(intake.lost, 5);
    }

    #[test]
    fn a_new_epoch_waits_until_the_old_one_is_settled() {
        let mut intake = Intake::new(100);
        let origin: Arc<str> = "n2".into();
        intake.on_change(change(1, 1));
        let actions = intake.on_change(change(2, 1));
        assert!(applied(&actions).is_empty(), "the new epoch waits");
        assert!(matches!(actions[..], [Action::Settle { epoch: 1, .. }]));
        assert!(intake.on_heartbeat(&origin, 2, 2).is_empty(), "one settle");

        // A peer holds the old epoch up to 3: that tail comes first.
        let actions = intake.on_settled(&origin, 1, Some(3));
        assert_eq!(repairs(&actions), vec![(2, 3)]);
        let repaired = Repaired {
            base: 0,
            last: 3,
            changes: vec![change(1, 2), change(1, 3)],
        };
        let actions = intake.on_repaired(&origin, 1, Some(repaired));
        assert_eq!(applied(&actions), vec![2, 3]);
        assert_eq!(repairs(&actions), vec![(1, 2)], "then the new epoch");
        assert_eq!(intake.applied("n2"), Some((2, 0)));
        assert!(
            applied(&intake.on_change(change(1, 4))).is_empty(),
            "old epoch is over"
        );
    }

    #[test]
    fn a_new_epoch_with_nothing_held_of_the_old_tail_opens_at_once() {
        let mut intake = Intake::new(100);
        let origin: Arc<str> = "n2".into();
        intake.on_change(change(1, 1));
        intake.on_heartbeat(&origin, 2, 0);
        let actions = intake.on_settled(&origin, 1, None);
        assert!(matches!(
            actions[..],
            [Action::Open {
                epoch: 2,
                base: 0,
                ..
            }]
        ));
        assert_eq!(applied(&intake.on_change(change(2, 1))), vec![1]);
    }

    #[test]
    fn an_old_tail_nobody_can_send_is_skipped_visibly() {
        let mut intake = Intake::new(100);
        let origin: Arc<str> = "n2".into();
        intake.on_change(change(1, 1));
        intake.on_heartbeat(&origin, 2, 0);
        assert_eq!(
            repairs(&intake.on_settled(&origin, 1, Some(5))),
            vec![(2, 5)]
        );
        let actions = intake.on_repaired(&origin, 1, None);
        assert!(matches!(
            actions[0],
            Action::SkipTo {
                epoch: 1,
                base: 5,
                ..
            }
        ));
        assert!(matches!(actions[1], Action::Open { epoch: 2, .. }));
        assert_eq!(intake.lost, 4);
    }
}
