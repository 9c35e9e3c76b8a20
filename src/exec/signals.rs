//! Ctrl-C and SIGTERM, counted: the first asks running stages to stop, the second kills.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A counter of SIGINT/SIGTERM received since [`Signals::install`].
#[derive(Clone, Debug, Default)]
pub struct Signals(Arc<AtomicUsize>);

impl Signals {
    /// Starts counting SIGINT and SIGTERM (instead of dying on them).
    pub fn install() -> std::io::Result<Signals> {
        let s = Signals::default();
        let counter = s.0.clone();
        let mut it = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
        ])?;
        std::thread::Builder::new()
            .name("taper-signals".into())
            .spawn(move || {
                for _ in it.forever() {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
            })?;
        Ok(s)
    }

    /// A counter that never fires (tests, dry runs).
    pub fn none() -> Signals {
        Signals::default()
    }

    /// Signals received so far.
    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    /// Adds one, as if a signal came (tests, scheduler shutdown).
    pub fn raise(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}
