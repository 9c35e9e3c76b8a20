//! Stage kinds: one file (or folder) per kind behind one interface
//! ([`StageConfig::run`]).

pub mod command;
pub mod context;
pub mod eval;
pub mod kinds;
pub mod merge;
pub mod migrate;
pub mod tokenize;
pub mod train;

pub use context::{CancelToken, StageContext, StageError, StageEvent, StopReason};
pub use kinds::{configure, kind_info, KindInfo, StageConfig, KINDS};
