//! Persistent state of a workspace: the Parquet run ledger, the workspace lock and the
//! file-hash cache, all under `.taper/`.

pub mod hash;
pub mod layout;
pub mod ledger;
pub mod lock;
pub mod schema;
pub mod time;

pub use hash::{ContentHash, HashCache};
pub use layout::Layout;
pub use ledger::{Ledger, LedgerError};
pub use lock::{Holder, LockError, WorkspaceLock};
pub use schema::{EventRow, FileHash, MetricRow, RunRow, StageRunRow, Table};
