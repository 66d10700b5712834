//! Interests and the subscription index.
//!
//! An interest names a workspace, and optionally one list or one record of
//! it. The index maps each interest to the sessions holding it, so that for a
//! change the Router visits only the sessions that want it: the cost of a
//! change is the number of its matches, never the number of sessions.
//!
//! The index reports a session once per matching interest; the caller (the
//! Router) collapses repeats, since one change may match a session's
//! workspace, list and record interests at once.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::change::{Change, MAX_ID_BYTES};

/// What a session wants to receive.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Interest {
    pub workspace: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub list: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum InterestError {
    #[error("interest {0}: `{1}` must be a non-empty string of at most 256 bytes")]
    BadIdentifier(String, &'static str),
    #[error("interest {0}: name a list or a record, not both")]
    ListAndRecord(String),
}

impl Interest {
    pub fn workspace(workspace: &str) -> Interest {
        Interest {
            workspace: workspace.into(),
            list: None,
            record: None,
        }
    }

    pub fn list(workspace: &str, list: &str) -> Interest {
        Interest {
            workspace: workspace.into(),
            list: Some(list.into()),
            record: None,
        }
    }

    pub fn record(workspace: &str, record: &str) -> Interest {
        Interest {
            workspace: workspace.into(),
            list: None,
            record: Some(record.into()),
        }
    }

    pub fn validate(&self) -> Result<(), InterestError> {
        let ok = |s: &str| !s.is_empty() && s.len() <= MAX_ID_BYTES;
        if !ok(&self.workspace) {
            return Err(InterestError::BadIdentifier(self.to_string(), "workspace"));
        }
        if self.list.as_deref().is_some_and(|l| !ok(l)) {
            return Err(InterestError::BadIdentifier(self.to_string(), "list"));
        }
        if self.record.as_deref().is_some_and(|r| !ok(r)) {
            return Err(InterestError::BadIdentifier(self.to_string(), "record"));
        }
        if self.list.is_some() && self.record.is_some() {
            return Err(InterestError::ListAndRecord(self.to_string()));
        }
        Ok(())
    }

    pub fn matches(&self, change: &Change) -> bool {
        if self.workspace != change.workspace {
            return false;
        }
        match (&self.list, &self.record) {
            (Some(list), _) => change.lists.iter().any(|l| l == list),
            (_, Some(record)) => change.record.as_ref() == Some(record),
            (None, None) => true,
        }
    }
}

impl std::fmt::Display for Interest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.workspace)?;
        if let Some(list) = &self.list {
            write!(f, "/list:{list}")?;
        }
        if let Some(record) = &self.record {
            write!(f, "/record:{record}")?;
        }
        Ok(())
    }
}

/// Sessions are known to the index by a small number the Router hands out.
pub type SessionKey = u32;

#[derive(Default)]
struct WorkspaceEntry {
    whole: HashSet<SessionKey>,
    lists: HashMap<String, HashSet<SessionKey>>,
    records: HashMap<String, HashSet<SessionKey>>,
}

impl WorkspaceEntry {
    fn is_empty(&self) -> bool {
        self.whole.is_empty() && self.lists.is_empty() && self.records.is_empty()
    }
}

/// interest -> sessions, nested by workspace so that a lookup borrows the
/// change's strings instead of building keys.
#[derive(Default)]
pub struct InterestIndex {
    workspaces: HashMap<String, WorkspaceEntry>,
    entries: usize,
}

impl InterestIndex {
    /// Adds `session` under `interest`; false when it was already there.
    pub fn insert(&mut self, interest: &Interest, session: SessionKey) -> bool {
        let entry = self
            .workspaces
            .entry(interest.workspace.clone())
            .or_default();
        let set = match (&interest.list, &interest.record) {
            (Some(list), _) => entry.lists.entry(list.clone()).or_default(),
            (_, Some(record)) => entry.records.entry(record.clone()).or_default(),
            (None, None) => &mut entry.whole,
        };
        let added = set.insert(session);
        self.entries += added as usize;
        added
    }

    /// Removes `session` from under `interest`; false when it was not there.
    pub fn remove(&mut self, interest: &Interest, session: SessionKey) -> bool {
        let Some(entry) = self.workspaces.get_mut(&interest.workspace) else {
            return false;
        };
        let removed = match (&interest.list, &interest.record) {
            (Some(list), _) => remove_from(&mut entry.lists, list, session),
            (_, Some(record)) => remove_from(&mut entry.records, record, session),
            (None, None) => entry.whole.remove(&session),
        };
        if entry.is_empty() {
            self.workspaces.remove(&interest.workspace);
        }
        self.entries -= removed as usize;
        removed
    }

    /// Calls `visit` for every (session, interest) pair the change matches;
    /// a session holding several matching interests is visited once each.
    pub fn for_each_match(&self, change: &Change, mut visit: impl FnMut(SessionKey)) {
        let Some(entry) = self.workspaces.get(&change.workspace) else {
            return;
        };
        entry.whole.iter().copied().for_each(&mut visit);
        for list in &change.lists {
            if let Some(set) = entry.lists.get(list) {
                set.iter().copied().for_each(&mut visit);
            }
        }
        if let Some(set) = change.record.as_ref().and_then(|r| entry.records.get(r)) {
            set.iter().copied().for_each(&mut visit);
        }
    }

    /// Number of (interest, session) pairs held.
    pub fn len(&self) -> usize {
        self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }
}

fn remove_from(
    map: &mut HashMap<String, HashSet<SessionKey>>,
    key: &str,
    session: SessionKey,
) -> bool {
    let Some(set) = map.get_mut(key) else {
        return false;
    };
    let removed = set.remove(&session);
    if set.is_empty() {
        map.remove(key);
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(workspace: &str, record: Option<&str>, lists: &[&str]) -> Change {
        Change {
            workspace: workspace.into(),
            record: record.map(Into::into),
            lists: lists.iter().map(|l| l.to_string()).collect(),
            kind: None,
            data: None,
        }
    }

    fn matches(index: &InterestIndex, c: &Change) -> Vec<SessionKey> {
        let mut keys = Vec::new();
        index.for_each_match(c, |k| keys.push(k));
        keys.sort();
        keys
    }

    #[test]
    fn three_levels_without_cross_talk() {
        let mut index = InterestIndex::default();
        index.insert(&Interest::workspace("a"), 1);
        index.insert(&Interest::list("a", "deals"), 2);
        index.insert(&Interest::record("a", "r1"), 3);
        index.insert(&Interest::workspace("b"), 4);

        assert_eq!(
            matches(&index, &change("a", Some("r1"), &["deals"])),
            vec![1, 2, 3]
        );
        assert_eq!(
            matches(&index, &change("a", Some("r2"), &["other"])),
            vec![1]
        );
        assert_eq!(
            matches(&index, &change("b", Some("r1"), &["deals"])),
            vec![4]
        );
        assert_eq!(
            matches(&index, &change("c", None, &[])),
            Vec::<SessionKey>::new()
        );
    }

    #[test]
    fn removal_empties_the_index() {
        let mut index = InterestIndex::default();
        let i = Interest::list("a", "l");
        assert!(index.insert(&i, 1));
        assert!(!index.insert(&i, 1), "second insert is a no-op");
        assert_eq!(index.len(), 1);
        assert!(index.remove(&i, 1));
        assert!(!index.remove(&i, 1));
        assert!(index.is_empty());
        assert!(index.workspaces.is_empty(), "empty workspaces are dropped");
    }

    #[test]
    fn validation() {
        assert!(Interest::workspace("").validate().is_err());
        let both = Interest {
            list: Some("l".into()),
            ..Interest::record("w", "r")
        };
        assert!(matches!(
            both.validate(),
            Err(InterestError::ListAndRecord(_))
        ));
        assert!(Interest::list("w", "l").validate().is_ok());
    }
}
