//! The scheduler's clock: the system clock in production, a manual one in
//! tests (so schedules, missed runs, retries and timeouts are tested without
//! waiting real hours).

use chrono::{DateTime, Utc};
use std::future::Future;
use std::pin::Pin;

pub type Sleep = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Wall-clock time and sleeping until a wall-clock time.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;
    /// Completes at (or soon after) `at`.
    fn sleep_until(&self, at: DateTime<Utc>) -> Sleep;
}

/// The system clock. Sleeps re-read the wall clock at least every 30 s, so
/// a clock step (NTP, suspend) does not delay a job by the size of the step.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
    fn sleep_until(&self, at: DateTime<Utc>) -> Sleep {
        Box::pin(async move {
            loop {
                let left = at - Utc::now();
                let Ok(left) = left.to_std() else { return };
                if left.is_zero() {
                    return;
                }
                tokio::time::sleep(left.min(std::time::Duration::from_secs(30))).await;
            }
        })
    }
}

/// A clock that moves only when told to.
#[derive(Debug, Clone)]
pub struct ManualClock {
    tx: std::sync::Arc<tokio::sync::watch::Sender<DateTime<Utc>>>,
}

impl ManualClock {
    pub fn new(start: DateTime<Utc>) -> Self {
        ManualClock {
            tx: std::sync::Arc::new(tokio::sync::watch::channel(start).0),
        }
    }
    /// Moves the clock forward.
    pub fn advance(&self, by: std::time::Duration) {
        self.tx.send_modify(|t| {
            *t += chrono::Duration::from_std(by).expect("a small duration");
        });
    }
    /// Sets the clock (forward only; earlier times are ignored).
    pub fn set(&self, to: DateTime<Utc>) {
        self.tx.send_modify(|t| {
            if to > *t {
                *t = to;
            }
        });
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.tx.borrow()
    }
    fn sleep_until(&self, at: DateTime<Utc>) -> Sleep {
        let mut rx = self.tx.subscribe();
        Box::pin(async move {
            let _ = rx.wait_for(|now| *now >= at).await;
        })
    }
}
