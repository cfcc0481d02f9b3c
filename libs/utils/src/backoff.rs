//! Exponential backoff between attempts to reach something that may come
//! back (a Postgres being restarted, a safekeeper's port): the first retry
//! is quick, a long outage costs one attempt per `max` and no busy loop.
//! Pure arithmetic; the caller sleeps.

use std::time::Duration;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Delays start at `min` and double up to `max` (`min` ≤ `max`).
    pub fn new(min: Duration, max: Duration) -> Backoff {
        assert!(!min.is_zero() && min <= max, "a backoff needs 0 < min ({min:?}) <= max ({max:?})");
        Backoff { min, max, next: min }
    }

    /// The delay before the next attempt; the one after is twice as long,
    /// at most `max`.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    /// An attempt succeeded: the next failure is retried quickly again.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_bound_and_reset() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let delays: Vec<u128> = (0..5).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 500, 500]);
        backoff.reset();
        assert_eq!(backoff.next_delay(), Duration::from_millis(100));
    }
}
