//! Exponential back-off with "equal jitter": the one rule every retry loop in
//! Keel follows (reconnecting to Redis, re-asking the jobs service, waiting
//! for Postgres at start-up, retrying a failed job).

use std::time::Duration;

use rand::Rng;

/// Doubles from `first` after each failure, capped at `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    first: Duration,
    max: Duration,
}

impl Backoff {
    pub const fn new(first: Duration, max: Duration) -> Self {
        Self { first, max }
    }

    /// The delay without jitter after `failures` failures in a row (0: before
    /// the first retry): `first * 2^failures`, capped at `max`.
    pub fn ceiling(&self, failures: u32) -> Duration {
        self.first
            .saturating_mul(1u32 << failures.min(30))
            .min(self.max.max(self.first))
    }

    /// The delay after `failures` failures in a row: a random point in the
    /// upper half of [`Backoff::ceiling`], so many clients that failed
    /// together spread out, yet none comes back sooner than half of it.
    pub fn delay(&self, failures: u32) -> Duration {
        let full = self.ceiling(failures);
        let half = full / 2;
        let spread = half.as_nanos().min(u64::MAX as u128) as u64;
        half + Duration::from_nanos(rand::thread_rng().gen_range(0..=spread))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_with_jitter_and_is_capped() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        for _ in 0..200 {
            let d0 = b.delay(0);
            assert!((Duration::from_millis(50)..=Duration::from_millis(100)).contains(&d0));
            let d2 = b.delay(2);
            assert!((Duration::from_millis(200)..=Duration::from_millis(400)).contains(&d2));
            assert!(b.delay(u32::MAX) <= Duration::from_secs(5));
            assert!(b.delay(u32::MAX) >= Duration::from_millis(2500));
        }
        assert_eq!(b.ceiling(3), Duration::from_millis(800));
        assert_eq!(b.ceiling(40), Duration::from_secs(5));
    }

    #[test]
    fn a_max_below_the_first_delay_keeps_the_first() {
        let b = Backoff::new(Duration::from_secs(1), Duration::from_millis(10));
        assert_eq!(b.ceiling(5), Duration::from_secs(1));
    }
}
