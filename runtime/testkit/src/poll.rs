//! Waiting for a condition.

use std::time::{Duration, Instant};

/// The first pause between two attempts.
const FIRST_PAUSE: Duration = Duration::from_millis(10);
/// The longest pause between two attempts.
const MAX_PAUSE: Duration = Duration::from_millis(200);

/// Calls `f` until it returns `Some`, and returns that value.
///
/// The pause between attempts starts at 10 ms and doubles up to 200 ms; the last attempt is
/// made when `limit` has passed. Panics, naming `what` and `limit`, if `f` never returned
/// `Some` by then.
pub fn eventually<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    let mut pause = FIRST_PAUSE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        let now = Instant::now();
        assert!(
            now < deadline,
            "timed out after {limit:?} waiting for: {what}"
        );
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

/// Calls `f` repeatedly for `period`, panicking, naming `what`, the first time it returns
/// `false`: the way to check that something does *not* happen (a message that must not
/// arrive, a state that must not change), not a pause before an assertion.
pub fn throughout(period: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    loop {
        assert!(f(), "after {:?}, no longer true: {what}", start.elapsed());
        if start.elapsed() >= period {
            return;
        }
        std::thread::sleep(MAX_PAUSE.min(period.saturating_sub(start.elapsed())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throughout_checks_until_the_period_ends() {
        let start = Instant::now();
        let mut calls = 0;
        throughout(Duration::from_millis(300), "always", || {
            calls += 1;
            true
        });
        assert!(start.elapsed() >= Duration::from_millis(300));
        assert!(calls >= 2, "{calls}");
    }

    #[test]
    #[should_panic(expected = "no longer true: the third call")]
    fn throughout_fails_when_it_stops_holding() {
        let mut calls = 0;
        throughout(Duration::from_secs(5), "the third call", || {
            calls += 1;
            calls < 3
        });
    }

    #[test]
    fn returns_the_first_value() {
        let mut calls = 0;
        let v = eventually(Duration::from_secs(5), "the third call", || {
            calls += 1;
            (calls == 3).then_some(calls * 10)
        });
        assert_eq!((v, calls), (30, 3));
    }

    #[test]
    fn backs_off_and_tries_once_more_at_the_limit() {
        let start = Instant::now();
        let mut calls = Vec::new();
        let got = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            eventually(Duration::from_millis(500), "never", || {
                calls.push(start.elapsed());
                None::<()>
            })
        }));
        assert!(got.is_err());
        // Pauses of 10, 20, 40, 80, 160 and 190 ms: seven attempts, the last at the limit
        // (fewer when the machine is slow, never more).
        assert!((2..=7).contains(&calls.len()), "{calls:?}");
        assert!(
            *calls.last().unwrap() >= Duration::from_millis(500),
            "{calls:?}"
        );
    }

    #[test]
    #[should_panic(expected = "timed out after 50ms waiting for: the moon")]
    fn names_what_it_waited_for() {
        eventually(Duration::from_millis(50), "the moon", || None::<()>);
    }
}
