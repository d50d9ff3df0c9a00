//! Rate limits for log lines a peer can trigger at will (a refused Connect,
//! an expired keep-alive): at most one line per interval per call site, the
//! next one saying how many were held back. A host that repeats a refused
//! Connect in a loop then costs a line a second, not a line per attempt.
//!
//! It is a counter and a timestamp in atomics, so it costs nothing on the
//! I/O path, which logs nothing at `info` or above anyway.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The interval between two lines of one call site.
pub(crate) const LOG_INTERVAL: Duration = Duration::from_secs(1);

/// One call site's rate limit (a `static`).
pub(crate) struct RateLimit {
    /// Nanoseconds since [`epoch`] before which lines are held back.
    next: AtomicU64,
    /// Lines held back since the last one let through.
    held: AtomicU64,
}

/// The process's time origin for [`RateLimit`].
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl RateLimit {
    /// A limit that lets the first line through.
    pub const fn new() -> Self {
        RateLimit {
            next: AtomicU64::new(0),
            held: AtomicU64::new(0),
        }
    }

    /// Whether a line may be logged now: `Some(n)` with the number of
    /// lines held back before it, or `None` to hold this one back.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(epoch().elapsed().as_nanos() as u64)
    }

    fn allow_at(&self, now: u64) -> Option<u64> {
        let next = self.next.load(Ordering::Relaxed);
        if now >= next
            && self
                .next
                .compare_exchange(
                    next,
                    now + LOG_INTERVAL.as_nanos() as u64,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.held.swap(0, Ordering::Relaxed));
        }
        self.held.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// Logs with `tracing` at `$level` through the `static` [`RateLimit`] of
/// this call site, adding `suppressed = N` for the lines held back.
macro_rules! log_limited {
    ($level:ident, $($arg:tt)+) => {{
        static LIMIT: $crate::ctrlr::ratelimit::RateLimit =
            $crate::ctrlr::ratelimit::RateLimit::new();
        if let Some(suppressed) = LIMIT.allow() {
            tracing::$level!(suppressed, $($arg)+);
        }
    }};
}
pub(crate) use log_limited;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_and_the_next_counts_the_held_back() {
        let l = RateLimit::new();
        let s = LOG_INTERVAL.as_nanos() as u64;
        assert_eq!(l.allow_at(10), Some(0));
        assert_eq!(l.allow_at(11), None);
        assert_eq!(l.allow_at(10 + s - 1), None);
        assert_eq!(l.allow_at(10 + s), Some(2), "two held back");
        assert_eq!(l.allow_at(10 + s + 1), None);
        assert_eq!(l.allow_at(10 + 5 * s), Some(1));
    }
}
