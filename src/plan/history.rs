//! What the ledger remembers about each stage, indexed for planning.

use crate::state::{Ledger, LedgerError, StageRunRow};
use std::collections::{BTreeSet, HashMap};

/// The latest recorded outcomes per stage name.
#[derive(Debug, Default)]
pub struct History {
    /// The newest successful (or up-to-date skipped) row of each stage.
    pub last_success: HashMap<String, StageRunRow>,
    /// The newest row of each stage, whatever its status.
    pub last: HashMap<String, StageRunRow>,
}

impl History {
    /// Reads the `stage_runs` table.
    pub fn load(ledger: &Ledger) -> Result<History, LedgerError> {
        Ok(History::from_rows(ledger.read::<StageRunRow>()?))
    }

    /// Indexes rows (in append order).
    pub fn from_rows(rows: Vec<StageRunRow>) -> History {
        let mut h = History::default();
        for row in rows {
            if row.status == "success" {
                h.last_success.insert(row.stage.clone(), row.clone());
            }
            if row.status != "skipped" {
                h.last.insert(row.stage.clone(), row);
            }
        }
        h
    }

    /// The runs whose rows this history indexes. Removing the rows of other runs from the
    /// ledger leaves the history, and so every plan, as it is.
    pub fn run_ids(&self) -> BTreeSet<&str> {
        self.last_success
            .values()
            .chain(self.last.values())
            .map(|r| r.run_id.as_str())
            .collect()
    }
}
