//! The bounded, preallocated completion queue shared by the synchronous
//! backends (`ram`, `null`, `file`).
//!
//! Those backends execute a request inside [`BdevQueue::submit`] and park its
//! completion here until [`BdevQueue::poll`] hands it out. The queue is sized
//! once, at `open_queue`, so the steady state never allocates; when it is full
//! `submit` answers [`SubmitError::Busy`], as a real device with a bounded
//! submission queue would. It is not a general ring: nothing here is shared
//! between threads.
//!
//! [`BdevQueue::submit`]: crate::BdevQueue::submit
//! [`BdevQueue::poll`]: crate::BdevQueue::poll
//! [`SubmitError::Busy`]: crate::SubmitError::Busy

use std::collections::VecDeque;

use crate::{IoCompletion, IoRequest, SubmitError};

/// Finished requests waiting for `poll`, at most `depth` of them.
#[derive(Debug)]
pub(crate) struct Completions {
    done: VecDeque<IoCompletion>,
    depth: usize,
}

impl Completions {
    /// A queue that holds up to `depth` completions (at least one).
    pub(crate) fn new(depth: usize) -> Self {
        let depth = depth.max(1);
        Completions {
            done: VecDeque::with_capacity(depth),
            depth,
        }
    }

    /// Hands the request back as [`SubmitError::Busy`] when the queue is full.
    pub(crate) fn admit(&self, req: IoRequest) -> Result<IoRequest, SubmitError> {
        if self.done.len() >= self.depth {
            Err(SubmitError::Busy(req))
        } else {
            Ok(req)
        }
    }

    /// Records a finished request. Only called after [`Completions::admit`],
    /// so the preallocated capacity is never exceeded.
    pub(crate) fn push(&mut self, c: IoCompletion) {
        debug_assert!(self.done.len() < self.depth, "push without admit");
        self.done.push_back(c);
    }

    /// Moves every completion into `out`; returns how many.
    pub(crate) fn drain_into(&mut self, out: &mut Vec<IoCompletion>) -> usize {
        let n = self.done.len();
        out.extend(self.done.drain(..));
        n
    }

    /// Completions not yet polled.
    pub(crate) fn len(&self) -> usize {
        self.done.len()
    }
}
