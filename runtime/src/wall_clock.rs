//! A wall-clock bound on a call that only costs a timer when the call does
//! not finish on its first poll. Most calls do (running wasm is bounded by
//! the epoch deadline); one that waits (in a host call such as a WASI
//! sleep, on the long-call threads, or yielding at an epoch tick) needs the
//! clock, so the timer is armed then, for what is left of the limit.
//! Arming a tokio timer for every call cost about 0.12 us per message.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

/// The call ran past its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Elapsed;

/// `call`, bounded by `limit` of wall-clock time since it started.
pub(crate) struct Bounded<F, E> {
    /// The call.
    call: F,
    /// How long ago the call started: read only at its first wait.
    elapsed: E,
    /// Its wall-clock limit.
    limit: Duration,
    /// Armed at the call's first wait.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// Bound `call` by `limit` of wall-clock time; `elapsed` says how long ago
/// the call started (it is asked only if the call has to wait).
pub(crate) fn bounded<F, E>(call: F, limit: Duration, elapsed: E) -> Bounded<F, E>
where
    F: Future + Unpin,
    E: Fn() -> Duration + Unpin,
{
    Bounded {
        call,
        elapsed,
        limit,
        timer: None,
    }
}

impl<F, E> Future for Bounded<F, E>
where
    F: Future + Unpin,
    E: Fn() -> Duration + Unpin,
{
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        // As tokio's own timeout does: a call that used up the task's
        // cooperative budget must not keep the timer from being seen.
        let had_budget = tokio::task::coop::has_budget_remaining();
        if let Poll::Ready(output) = Pin::new(&mut this.call).poll(cx) {
            return Poll::Ready(Ok(output));
        }
        let spent_budget = had_budget && !tokio::task::coop::has_budget_remaining();
        let timer = match &mut this.timer {
            Some(timer) => timer,
            none => {
                // Durations, not instants: tokio's clock may be paused in
                // tests while the start was read from the system's.
                let left = this.limit.saturating_sub((this.elapsed)());
                none.insert(Box::pin(tokio::time::sleep(left)))
            }
        };
        let fired = if spent_budget {
            Pin::new(&mut tokio::task::coop::unconstrained(timer.as_mut())).poll(cx)
        } else {
            timer.as_mut().poll(cx)
        };
        match fired {
            Poll::Ready(()) => Poll::Ready(Err(Elapsed)),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_call_that_finishes_at_once_arms_no_timer() {
        let mut call = bounded(std::future::ready(7), Duration::from_secs(1), || {
            panic!("no clock read for a call that finishes at once")
        });
        assert_eq!((&mut call).await, Ok(7));
        assert!(call.timer.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_waits_is_stopped_at_its_limit() {
        let started = tokio::time::Instant::now();
        let never = std::future::pending::<()>();
        tokio::pin!(never);
        let outcome = bounded(never, Duration::from_millis(250), || Duration::ZERO).await;
        assert_eq!(outcome, Err(Elapsed));
        assert_eq!(started.elapsed(), Duration::from_millis(250));
    }

    #[tokio::test(start_paused = true)]
    async fn the_time_already_spent_counts_against_the_limit() {
        let started = tokio::time::Instant::now();
        let never = std::future::pending::<()>();
        tokio::pin!(never);
        let outcome = bounded(never, Duration::from_millis(250), || {
            Duration::from_millis(200)
        })
        .await;
        assert_eq!(outcome, Err(Elapsed));
        assert_eq!(started.elapsed(), Duration::from_millis(50));
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_waits_and_finishes_in_time_is_left_alone() {
        let call = Box::pin(async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            "done"
        });
        assert_eq!(
            bounded(call, Duration::from_secs(1), || Duration::ZERO).await,
            Ok("done")
        );
    }

    #[tokio::test]
    async fn a_call_that_spends_the_task_budget_at_every_poll_is_still_stopped() {
        // Real time: this call never lets the runtime go idle.
        let spender = Box::pin(async {
            loop {
                tokio::task::consume_budget().await;
            }
        });
        let bounded = bounded(spender, Duration::from_millis(50), || Duration::ZERO);
        let outcome = tokio::time::timeout(Duration::from_secs(10), bounded).await;
        assert_eq!(outcome, Ok(Err(Elapsed)), "stopped at its own limit");
    }
}
