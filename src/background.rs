//! Work that runs beside serving on the same cores (the traffic writer, training jobs) steps
//! aside for it: lower OS priority, and a wait while the engines are busy.

use std::time::{Duration, Instant};

/// Lowers the calling thread's CPU priority (nice 10); threads it spawns inherit it.
pub fn lower_thread_priority() {
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 10) {
        tracing::debug!(error = %e, "could not lower a background thread's priority");
    }
}

/// Waits while `busy()` holds, polling every few milliseconds, for at most `max`: background work
/// yields to load but still advances under constant load. Returns how long it waited.
pub fn yield_while(busy: &dyn Fn() -> bool, max: Duration) -> Duration {
    let started = Instant::now();
    while busy() && started.elapsed() < max {
        std::thread::sleep(Duration::from_millis(5));
    }
    started.elapsed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn yielding_stops_when_idle_or_at_the_cap() {
        let calls = AtomicUsize::new(0);
        let busy_thrice = || calls.fetch_add(1, Ordering::Relaxed) < 3;
        let waited = yield_while(&busy_thrice, Duration::from_secs(5));
        assert!(waited < Duration::from_secs(1));
        assert_eq!(calls.load(Ordering::Relaxed), 4);
        let waited = yield_while(&|| true, Duration::from_millis(30));
        assert!(waited >= Duration::from_millis(30));
    }
}
