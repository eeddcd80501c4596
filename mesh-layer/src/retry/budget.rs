//! The retry budget: tower's `TpsBudget` (the Finagle/linkerd design), ported so that it can
//! say how many retries it would allow now — tower's keeps its balance private, and
//! "retry budget left" is what an operator watches during an outage. The arithmetic is
//! tower 0.5.3's (`tower/src/retry/budget/tps_budget.rs`, MIT): every original request
//! deposits, every retry withdraws, deposits expire after `ttl` in ten slots, and a reserve
//! of `min_per_second × ttl` retries is always there.

use std::{
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicIsize, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

/// Slots the window is split into; a deposit expires one slot at a time.
const SLOTS: u32 = 10;

#[derive(Debug)]
pub struct RetryBudget {
    generation: Mutex<Generation>,
    /// Always available, in deposit units.
    reserve: isize,
    slots: Box<[AtomicIsize]>,
    window: Duration,
    /// The current slot's running total.
    writer: AtomicIsize,
    deposit_amount: isize,
    withdraw_amount: isize,
}

#[derive(Debug)]
struct Generation {
    index: usize,
    time: Instant,
}

impl RetryBudget {
    /// Retries may add `retry_ratio` of the original requests of the last `ttl` (1 to 60 s),
    /// plus `min_per_second` whatever the traffic. The policy validates the ranges.
    pub fn new(ttl: Duration, min_per_second: u32, retry_ratio: f32) -> Self {
        let ttl = ttl.clamp(Duration::from_secs(1), Duration::from_secs(60));
        let retry_ratio = retry_ratio.clamp(0.0, 1000.0);
        // Integer units: a deposit of 1 and a withdrawal of 1/ratio (ratio ≤ 1), or 1000 and
        // 1000/ratio (ratio > 1).
        let (deposit_amount, withdraw_amount) = if retry_ratio == 0.0 {
            (0, 1)
        } else if retry_ratio <= 1.0 {
            (1, (1.0 / retry_ratio) as isize)
        } else {
            (1000, (1000.0 / retry_ratio) as isize)
        };
        let reserve = isize::try_from(min_per_second)
            .unwrap_or(isize::MAX)
            .saturating_mul(isize::try_from(ttl.as_secs()).unwrap_or(60))
            .saturating_mul(withdraw_amount);
        Self {
            generation: Mutex::new(Generation {
                index: 0,
                time: Instant::now(),
            }),
            reserve,
            slots: (0..SLOTS).map(|_| AtomicIsize::new(0)).collect(),
            window: ttl / SLOTS,
            writer: AtomicIsize::new(0),
            deposit_amount,
            withdraw_amount,
        }
    }

    /// An original request was sent.
    pub fn deposit(&self) {
        self.expire();
        self.writer.fetch_add(self.deposit_amount, Ordering::SeqCst);
    }

    /// Takes one retry's worth; `false` when the budget is spent.
    pub fn withdraw(&self) -> bool {
        self.expire();
        if self.sum() >= self.withdraw_amount {
            self.writer
                .fetch_add(-self.withdraw_amount, Ordering::SeqCst);
            true
        } else {
            false
        }
    }

    /// Retries the budget would allow now.
    pub fn available(&self) -> u64 {
        self.expire();
        u64::try_from(self.sum() / self.withdraw_amount.max(1)).unwrap_or(0)
    }

    fn sum(&self) -> isize {
        self.slots
            .iter()
            .map(|slot| slot.load(Ordering::SeqCst))
            .fold(self.writer.load(Ordering::SeqCst), isize::saturating_add)
            .saturating_add(self.reserve)
    }

    /// Moves to the slot the clock is in, committing the current one and clearing those
    /// skipped over.
    fn expire(&self) {
        let mut generation = self
            .generation
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let mut elapsed = now.saturating_duration_since(generation.time);
        if elapsed < self.window {
            return;
        }
        let committed = self.writer.swap(0, Ordering::SeqCst);
        self.slots[generation.index].store(committed, Ordering::SeqCst);
        let mut index = (generation.index + 1) % self.slots.len();
        while elapsed > self.window {
            self.slots[index].store(0, Ordering::SeqCst);
            elapsed -= self.window;
            index = (index + 1) % self.slots.len();
        }
        generation.index = index;
        generation.time = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_reserve_then_a_share_of_recent_requests() {
        // 20 % of requests, plus 1 per second over a 10 s window: a reserve of 10.
        let budget = RetryBudget::new(Duration::from_secs(10), 1, 0.2);
        assert_eq!(budget.available(), 10);
        for _ in 0..10 {
            assert!(budget.withdraw());
        }
        assert_eq!(budget.available(), 0);
        assert!(!budget.withdraw());
        // 50 requests earn 10 retries.
        for _ in 0..50 {
            budget.deposit();
        }
        assert_eq!(budget.available(), 10);
        assert!(budget.withdraw());
        assert_eq!(budget.available(), 9);
    }

    #[tokio::test(start_paused = true)]
    async fn deposits_expire_after_the_window() {
        let budget = RetryBudget::new(Duration::from_secs(10), 0, 0.5);
        for _ in 0..10 {
            budget.deposit();
        }
        assert_eq!(budget.available(), 5);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(budget.available(), 5, "still inside the window");
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(budget.available(), 0, "expired");
    }
}
