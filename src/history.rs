//! History: every change a node has applied, kept in memory so that a
//! client that comes back can be sent exactly what it missed.
//!
//! Bounded by count and by age (both from the config). Changes are indexed
//! three ways: in arrival order (for trimming), by workspace (so a catch-up
//! costs in proportion to the changes of the client's workspaces, not to the
//! whole history) and by origin and epoch (so a peer's gap can be repaired by
//! seq in constant time per change).
//!
//! Completeness is tracked per origin and epoch as a `base`: the history
//! holds every change of that epoch with `base < seq <= last`. A resume can
//! be proven complete for an origin only when the client's cursor is at or
//! after `base`; otherwise it answers `recovered: false`.
//!
//! Appends must be contiguous per origin and epoch (`seq == last + 1`), or
//! open a new epoch log; the caller (the Router, fed by the peer links that
//! hold back later changes until a gap is repaired) guarantees it. A new
//! epoch that starts above seq 1 (a node that joined late) starts with a
//! `base` below which nothing is claimed.
//!
//! Not yet done: history is not kept on disk, so a restarted node starts a
//! new epoch and forgets the old ones (its peers still hold them).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use crate::change::Positioned;
use crate::codec::WireCursor;
use crate::interest::Interest;

/// Epoch logs kept per origin after their changes are trimmed: enough for
/// clients that were away across a few restarts, bounded against a node that
/// restarts in a loop.
const MAX_EPOCHS_PER_ORIGIN: usize = 16;

#[derive(Clone)]
struct Entry {
    serial: u64,
    change: Arc<Positioned>,
}

/// What the history knows of one epoch of one origin.
#[derive(Debug, Default)]
pub struct EpochLog {
    /// Every change with `base < seq <= last` is held (or was trimmed, in
    /// which case `base` moved up past it).
    pub base: u64,
    pub last: u64,
    changes: VecDeque<Arc<Positioned>>,
}

impl EpochLog {
    fn get(&self, seq: u64) -> Option<&Arc<Positioned>> {
        if seq <= self.base {
            return None;
        }
        self.changes.get((seq - self.base - 1) as usize)
    }
}

/// Why an append was refused: it would leave a hole the history could not
/// account for.
#[derive(Debug, PartialEq, Eq)]
pub enum AppendError {
    /// Already held (or older than what is held): a repeat, dropped.
    Duplicate,
    /// A gap: the change is further ahead than `last + 1`.
    Gap { expected: u64 },
}

/// The result of planning a catch-up.
#[derive(Debug, Default)]
pub struct CatchUp {
    /// False when the history cannot prove the changes complete.
    pub recovered: bool,
    /// The missed changes, in arrival order (so in order per origin).
    pub changes: Vec<Arc<Positioned>>,
    /// Positions the client has seen beyond what this node holds (it was on
    /// a node further ahead): live changes up to these must be skipped.
    pub ahead: Vec<(Arc<str>, u64, u64)>,
}

pub struct History {
    max_changes: usize,
    max_age_ms: u64,
    next_serial: u64,
    all: VecDeque<Entry>,
    workspaces: HashMap<String, VecDeque<Entry>>,
    origins: HashMap<Arc<str>, BTreeMap<u64, EpochLog>>,
    trimmed: u64,
}

impl History {
    pub fn new(max_changes: usize, max_age_ms: u64) -> History {
        History {
            max_changes,
            max_age_ms,
            next_serial: 0,
            all: VecDeque::new(),
            workspaces: HashMap::new(),
            origins: HashMap::new(),
            trimmed: 0,
        }
    }

    /// Changes held now.
    pub fn len(&self) -> usize {
        self.all.len()
    }

    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }

    /// Changes trimmed since start (by count or age).
    pub fn trimmed(&self) -> u64 {
        self.trimmed
    }

    /// Acceptance time of the oldest change held, in ms since the Unix epoch.
    pub fn oldest_ts(&self) -> Option<u64> {
        self.all.front().map(|e| e.change.ts)
    }

    /// The last seq applied for `origin` in `epoch`, if that epoch is known.
    pub fn last_seq(&self, origin: &str, epoch: u64) -> Option<u64> {
        self.origins.get(origin)?.get(&epoch).map(|log| log.last)
    }

    /// The newest epoch known of `origin` and its last seq.
    pub fn latest(&self, origin: &str) -> Option<(u64, u64)> {
        let (epoch, log) = self.origins.get(origin)?.last_key_value()?;
        Some((*epoch, log.last))
    }

    /// Every origin's newest `[epoch, seq]`: the node's current cursor.
    pub fn position(&self) -> WireCursor {
        self.origins
            .iter()
            .filter_map(|(origin, epochs)| {
                let (epoch, log) = epochs.last_key_value()?;
                Some((origin.to_string(), (*epoch, log.last)))
            })
            .collect()
    }

    /// Records that `origin` has an epoch starting after `base` without
    /// holding any change of it yet (a node that starts mid-stream, or an
    /// origin that just started with nothing published).
    pub fn open_epoch(&mut self, origin: &Arc<str>, epoch: u64, base: u64) {
        let epochs = self.origins.entry(origin.clone()).or_default();
        epochs.entry(epoch).or_insert_with(|| EpochLog {
            base,
            last: base,
            ..Default::default()
        });
        while epochs.len() > MAX_EPOCHS_PER_ORIGIN {
            epochs.pop_first();
        }
    }

    /// Records that the changes of `origin`'s `epoch` up to `base` cannot be
    /// had (no node holds them any more): the log continues after `base`,
    /// and no resume from a cursor before it is proven complete. False when
    /// the log was already past `base` (nothing skipped).
    pub fn skip_to(&mut self, origin: &Arc<str>, epoch: u64, base: u64) -> bool {
        let epochs = self.origins.entry(origin.clone()).or_default();
        let log = epochs.entry(epoch).or_default();
        if base <= log.last {
            return false;
        }
        log.changes.clear();
        log.base = base;
        log.last = base;
        true
    }

    /// Appends a change that is next in its origin's epoch.
    pub fn append(&mut self, change: Arc<Positioned>, now_ms: u64) -> Result<(), AppendError> {
        let pos = &change.pos;
        let epochs = self.origins.entry(pos.origin.clone()).or_default();
        let log = epochs.entry(pos.epoch).or_insert_with(|| EpochLog {
            // The first change seen of an epoch: nothing before it is claimed.
            base: pos.seq - 1,
            last: pos.seq - 1,
            ..Default::default()
        });
        if pos.seq <= log.last {
            return Err(AppendError::Duplicate);
        }
        if pos.seq != log.last + 1 {
            return Err(AppendError::Gap {
                expected: log.last + 1,
            });
        }
        log.last = pos.seq;
        log.changes.push_back(change.clone());
        while epochs.len() > MAX_EPOCHS_PER_ORIGIN {
            epochs.pop_first();
        }

        let entry = Entry {
            serial: self.next_serial,
            change,
        };
        self.next_serial += 1;
        self.workspaces
            .entry(entry.change.change.workspace.clone())
            .or_default()
            .push_back(entry.clone());
        self.all.push_back(entry);
        self.trim(now_ms);
        Ok(())
    }

    /// Drops changes beyond the count bound and those older than the age
    /// bound. Called on every append and periodically by the Router.
    pub fn trim(&mut self, now_ms: u64) {
        let too_old = now_ms.saturating_sub(self.max_age_ms);
        while let Some(front) = self.all.front() {
            if self.all.len() <= self.max_changes && front.change.ts >= too_old {
                break;
            }
            let entry = self.all.pop_front().expect("front exists");
            self.trimmed += 1;
            let change = &entry.change;
            let workspace = &change.change.workspace;
            if let Some(list) = self.workspaces.get_mut(workspace) {
                list.pop_front();
                if list.is_empty() {
                    self.workspaces.remove(workspace);
                }
            }
            let log = self
                .origins
                .get_mut(&change.pos.origin)
                .and_then(|epochs| epochs.get_mut(&change.pos.epoch));
            if let Some(log) = log {
                if log.changes.front().is_some_and(|c| Arc::ptr_eq(c, change)) {
                    log.changes.pop_front();
                    log.base = change.pos.seq;
                }
            }
        }
    }

    /// Changes of `origin` in `epoch` with `from <= seq <= to`, if all are
    /// held; used to repair a peer's gap.
    pub fn range(
        &self,
        origin: &str,
        epoch: u64,
        from: u64,
        to: u64,
    ) -> Option<Vec<Arc<Positioned>>> {
        let log = self.origins.get(origin)?.get(&epoch)?;
        if from <= log.base || to > log.last || from > to {
            return None;
        }
        (from..=to).map(|seq| log.get(seq).cloned()).collect()
    }

    /// The base and last seq of `origin`'s `epoch`.
    pub fn bounds(&self, origin: &str, epoch: u64) -> Option<(u64, u64)> {
        let log = self.origins.get(origin)?.get(&epoch)?;
        Some((log.base, log.last))
    }

    /// Every (epoch, base, last) known of `origin`, oldest first.
    pub fn epochs(&self, origin: &str) -> Vec<(u64, u64, u64)> {
        self.origins
            .get(origin)
            .map(|e| {
                e.iter()
                    .map(|(epoch, log)| (*epoch, log.base, log.last))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every origin the history knows.
    pub fn origins(&self) -> impl Iterator<Item = &Arc<str>> {
        self.origins.keys()
    }

    /// Plans the catch-up of a client that has seen `cursor` and holds
    /// `interests`: every held change after the cursor that matches one of
    /// the interests, or `recovered: false` when completeness can't be
    /// proven.
    ///
    /// An origin missing from the cursor was unknown when the client first
    /// connected, so all of it counts as missed. A cursor epoch the node
    /// does not know is unprovable, unless it is newer than all the node
    /// knows (the client was on a node further ahead), in which case the
    /// node skips that origin's changes up to the cursor.
    pub fn catch_up(&self, cursor: &WireCursor, interests: &[Interest]) -> CatchUp {
        let mut plan = CatchUp {
            recovered: true,
            ..Default::default()
        };
        // After-this per origin and epoch: (epoch, seq) -> send seq > it.
        let mut after: HashMap<&str, (u64, u64)> = HashMap::new();

        for (origin, epochs) in &self.origins {
            let Some(&(epoch, seq)) = cursor.get(&**origin) else {
                // Never seen: complete only if held from the very start.
                let oldest = epochs.first_key_value().map(|(_, log)| log.base);
                if oldest != Some(0) {
                    plan.recovered = false;
                }
                after.insert(origin, (0, 0));
                continue;
            };
            match epochs.get(&epoch) {
                Some(log) => {
                    if seq < log.base {
                        plan.recovered = false;
                    }
                    if seq > log.last {
                        plan.ahead.push((origin.clone(), epoch, seq));
                    }
                    // Later epochs must be held from their start.
                    if epochs.range(epoch + 1..).any(|(_, later)| later.base != 0) {
                        plan.recovered = false;
                    }
                }
                None if epochs
                    .last_key_value()
                    .is_some_and(|(newest, _)| epoch > *newest) =>
                {
                    plan.ahead.push((origin.clone(), epoch, seq));
                }
                None => plan.recovered = false,
            }
            after.insert(origin, (epoch, seq));
        }
        for (origin, &(epoch, seq)) in cursor {
            if !self.origins.contains_key(origin.as_str()) {
                plan.ahead.push((origin.as_str().into(), epoch, seq));
            }
        }
        if !plan.recovered {
            return plan;
        }

        let mut workspaces: Vec<&str> = interests.iter().map(|i| i.workspace.as_str()).collect();
        workspaces.sort_unstable();
        workspaces.dedup();
        let mut picked: Vec<&Entry> = Vec::new();
        for workspace in workspaces {
            let Some(entries) = self.workspaces.get(workspace) else {
                continue;
            };
            for entry in entries {
                let change = &entry.change;
                let is_after = match after.get(&*change.pos.origin) {
                    Some(&(epoch, seq)) => {
                        change.pos.epoch > epoch
                            || (change.pos.epoch == epoch && change.pos.seq > seq)
                    }
                    None => true,
                };
                if is_after && interests.iter().any(|i| i.matches(&change.change)) {
                    picked.push(entry);
                }
            }
        }
        picked.sort_unstable_by_key(|e| e.serial);
        plan.changes = picked.into_iter().map(|e| e.change.clone()).collect();
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{Change, Position};

    fn change(origin: &str, epoch: u64, seq: u64, workspace: &str, ts: u64) -> Arc<Positioned> {
        let change = Change {
            workspace: workspace.into(),
            record: Some(format!("r{seq}")),
            lists: vec![],
            kind: None,
            data: None,
        };
        Arc::new(Positioned::new(
            Position {
                origin: origin.into(),
                epoch,
                seq,
            },
            ts,
            change,
        ))
    }

    fn cursor(entries: &[(&str, u64, u64)]) -> WireCursor {
        entries
            .iter()
            .map(|(o, e, s)| (o.to_string(), (*e, *s)))
            .collect()
    }

    fn seqs(plan: &CatchUp) -> Vec<(String, u64)> {
        plan.changes
            .iter()
            .map(|c| (c.pos.origin.to_string(), c.pos.seq))
            .collect()
    }

    #[test]
    fn catch_up_sends_matching_changes_after_the_cursor() {
        let mut h = History::new(100, 60_000);
        for seq in 1..=5 {
            h.append(
                change("n1", 1, seq, if seq % 2 == 0 { "a" } else { "b" }, 0),
                0,
            )
            .unwrap();
        }
        let plan = h.catch_up(&cursor(&[("n1", 1, 1)]), &[Interest::workspace("a")]);
        assert!(plan.recovered);
        assert_eq!(seqs(&plan), vec![("n1".into(), 2), ("n1".into(), 4)]);
    }

    #[test]
    fn trimmed_past_the_cursor_is_not_recovered() {
        let mut h = History::new(3, 60_000);
        for seq in 1..=5 {
            h.append(change("n1", 1, seq, "a", 0), 0).unwrap();
        }
        assert_eq!(h.bounds("n1", 1), Some((2, 5)));
        let interests = [Interest::workspace("a")];
        assert!(!h.catch_up(&cursor(&[("n1", 1, 1)]), &interests).recovered);
        let plan = h.catch_up(&cursor(&[("n1", 1, 2)]), &interests);
        assert!(plan.recovered);
        assert_eq!(plan.changes.len(), 3);
    }

    #[test]
    fn age_trims_and_unknown_epochs_are_not_recovered() {
        let mut h = History::new(100, 1_000);
        h.append(change("n1", 1, 1, "a", 0), 0).unwrap();
        h.append(change("n1", 1, 2, "a", 5_000), 5_000).unwrap();
        assert_eq!(h.len(), 1, "the change older than a second went");
        let interests = [Interest::workspace("a")];
        assert!(!h.catch_up(&cursor(&[("n1", 0, 9)]), &interests).recovered);
        let ahead = h.catch_up(&cursor(&[("n1", 7, 9)]), &interests);
        assert!(ahead.recovered && ahead.changes.is_empty());
        assert_eq!(ahead.ahead.len(), 1);
    }

    #[test]
    fn new_epoch_is_sent_from_its_start() {
        let mut h = History::new(100, 60_000);
        h.append(change("n1", 1, 1, "a", 0), 0).unwrap();
        h.append(change("n1", 1, 2, "a", 0), 0).unwrap();
        h.append(change("n1", 2, 1, "a", 0), 0).unwrap();
        let plan = h.catch_up(&cursor(&[("n1", 1, 1)]), &[Interest::workspace("a")]);
        assert!(plan.recovered);
        let got: Vec<(u64, u64)> = plan
            .changes
            .iter()
            .map(|c| (c.pos.epoch, c.pos.seq))
            .collect();
        assert_eq!(got, vec![(1, 2), (2, 1)]);
    }

    #[test]
    fn gaps_and_repeats_are_refused() {
        let mut h = History::new(100, 60_000);
        h.append(change("n1", 1, 1, "a", 0), 0).unwrap();
        assert_eq!(
            h.append(change("n1", 1, 1, "a", 0), 0),
            Err(AppendError::Duplicate)
        );
        assert_eq!(
            h.append(change("n1", 1, 3, "a", 0), 0),
            Err(AppendError::Gap { expected: 2 })
        );
        assert_eq!(h.range("n1", 1, 1, 1).unwrap().len(), 1);
        assert!(h.range("n1", 1, 1, 2).is_none());
    }

    #[test]
    fn a_skip_leaves_no_claim_before_it() {
        let mut h = History::new(100, 60_000);
        h.append(change("n2", 1, 1, "a", 0), 0).unwrap();
        let origin: Arc<str> = "n2".into();
        assert!(h.skip_to(&origin, 1, 5));
        assert!(!h.skip_to(&origin, 1, 4), "already past it");
        h.append(change("n2", 1, 6, "a", 0), 0).unwrap();
        let interests = [Interest::workspace("a")];
        assert!(!h.catch_up(&cursor(&[("n2", 1, 1)]), &interests).recovered);
        let plan = h.catch_up(&cursor(&[("n2", 1, 5)]), &interests);
        assert_eq!(seqs(&plan), vec![("n2".into(), 6)]);
    }

    #[test]
    fn an_origin_missing_from_the_cursor_counts_from_its_start() {
        let mut h = History::new(100, 60_000);
        h.append(change("n2", 4, 1, "a", 0), 0).unwrap();
        let plan = h.catch_up(&cursor(&[]), &[Interest::workspace("a")]);
        assert!(plan.recovered);
        assert_eq!(plan.changes.len(), 1);
    }
}
