//! Time for the scheduler, injected: the system clock sleeps, a fake clock jumps.

use jiff::{SignedDuration, Timestamp};
use std::sync::Mutex;
use std::time::Duration;

/// What the scheduler loop knows of time.
pub trait Clock {
    /// Now.
    fn now(&self) -> Timestamp;
    /// Waits until `until`, returning early once `stop()` says so.
    fn sleep_until(&self, until: Timestamp, stop: &dyn Fn() -> bool);
    /// Waits a little while a run is going (its end is polled), never past `until`.
    fn tick(&self, until: Timestamp);
}

/// The real clock. Sleeps in short slices so that a signal is noticed quickly.
#[derive(Clone, Debug)]
pub struct SystemClock {
    /// How often a running child is polled.
    pub poll: Duration,
}

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock {
            poll: Duration::from_millis(200),
        }
    }
}

fn until_from(now: Timestamp, until: Timestamp) -> Duration {
    until
        .duration_since(now)
        .try_into()
        .unwrap_or(Duration::ZERO)
}

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }

    fn sleep_until(&self, until: Timestamp, stop: &dyn Fn() -> bool) {
        loop {
            let left = until_from(Timestamp::now(), until);
            if left.is_zero() || stop() {
                return;
            }
            std::thread::sleep(left.min(self.poll));
        }
    }

    fn tick(&self, until: Timestamp) {
        let left = until_from(Timestamp::now(), until);
        std::thread::sleep(left.min(self.poll).max(Duration::from_millis(1)));
    }
}

/// A clock that jumps: `sleep_until` returns at once with the time set to `until`;
/// `tick` advances by `step` (zero freezes it, so that a real child process can finish
/// while no fake time passes) after sleeping `real_pause` of real time.
#[derive(Debug)]
pub struct FakeClock {
    now: Mutex<Timestamp>,
    step: SignedDuration,
    real_pause: Duration,
}

impl FakeClock {
    /// A fake clock at `start` that advances `step` per tick and never really sleeps.
    pub fn new(start: Timestamp, step: Duration) -> FakeClock {
        FakeClock {
            now: Mutex::new(start),
            step: SignedDuration::try_from(step).unwrap_or(SignedDuration::ZERO),
            real_pause: Duration::ZERO,
        }
    }

    /// Sleeps `pause` of real time on each tick (for real child processes).
    pub fn with_real_pause(mut self, pause: Duration) -> FakeClock {
        self.real_pause = pause;
        self
    }

    /// Sets the time.
    pub fn set(&self, t: Timestamp) {
        *self.now.lock().unwrap_or_else(|e| e.into_inner()) = t;
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Timestamp {
        *self.now.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sleep_until(&self, until: Timestamp, stop: &dyn Fn() -> bool) {
        if stop() {
            return;
        }
        let mut now = self.now.lock().unwrap_or_else(|e| e.into_inner());
        if until > *now {
            *now = until;
        }
    }

    fn tick(&self, until: Timestamp) {
        if !self.real_pause.is_zero() {
            std::thread::sleep(self.real_pause);
        }
        let mut now = self.now.lock().unwrap_or_else(|e| e.into_inner());
        let next = now.checked_add(self.step).unwrap_or(*now);
        *now = if next > until && until > *now {
            until
        } else {
            next
        };
    }
}
