//! The trace buffer: spans wait here, by trace id, until their trace is complete.
//!
//! A trace is *ready* once a root candidate (an agent invocation, or a span without a
//! parent) has arrived and no span came for `quiet_period`, or `trace_timeout` after its
//! first span whatever arrived (then it is audited as incomplete). A ready trace is
//! taken out ([`Assembler::take_ready`]) while its record is made durable; it is then
//! [`Assembler::finished`] (remembered for a while, with its span ids) or, if that
//! failed, [`Assembler::restore`]d.
//!
//! Spans of a trace being finished or finished recently are classified on arrival: one
//! already seen is a *duplicate* (an export retried; accepted, nothing to do), a new one
//! is *late*: the trace's record is already written and records are never rewritten
//! (writes are idempotent on the id), so the span is refused in the export's partial
//! success, counted and logged rather than silently creating a second record.
//!
//! Pure: the caller passes the time in; no I/O.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use super::map::is_root_candidate;
use super::{OtlpSpan, SpanId, TraceId};

/// Finished traces remembered (to tell duplicates from late spans), at most.
const REMEMBER_FINISHED: usize = 100_000;

/// A trace waiting for the rest of its spans.
#[derive(Debug)]
struct Pending {
    spans: Vec<OtlpSpan>,
    ids: HashSet<SpanId>,
    first_seen: Instant,
    last_seen: Instant,
    has_root: bool,
}

/// A trace taken out to be audited.
#[derive(Debug)]
pub struct ReadyTrace {
    /// Its id.
    pub trace_id: TraceId,
    /// Its spans, in arrival order.
    pub spans: Vec<OtlpSpan>,
    /// False when it timed out without a root.
    pub complete: bool,
}

/// What became of the spans offered for one trace.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Sorted {
    /// Spans seen before (by span id): nothing to do.
    pub duplicates: usize,
    /// New spans of a trace already audited: refused.
    pub late: usize,
}

/// Why spans cannot be taken now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{pending} spans are waiting for their traces (audit.otlp.max_pending_spans {max}); retry later")]
pub struct Full {
    /// Spans held now (and reserved by exports being journaled).
    pub pending: usize,
    /// The limit.
    pub max: usize,
}

/// The buffer.
#[derive(Debug)]
pub struct Assembler {
    pending: HashMap<TraceId, Pending>,
    /// Traces taken out and being made durable, with their span ids.
    finishing: HashMap<TraceId, HashSet<SpanId>>,
    /// Traces audited, with their span ids, oldest first for expiry.
    finished: HashMap<TraceId, HashSet<SpanId>>,
    finished_order: VecDeque<(Instant, TraceId)>,
    pending_spans: usize,
    reserved: usize,
    quiet_period: Duration,
    trace_timeout: Duration,
    max_pending_spans: usize,
}

impl Assembler {
    /// An empty buffer with the `audit.otlp` settings.
    pub fn new(quiet_period: Duration, trace_timeout: Duration, max_pending_spans: usize) -> Assembler {
        Assembler {
            pending: HashMap::new(),
            finishing: HashMap::new(),
            finished: HashMap::new(),
            finished_order: VecDeque::new(),
            pending_spans: 0,
            reserved: 0,
            quiet_period,
            trace_timeout,
            max_pending_spans,
        }
    }

    /// Spans waiting (and reserved).
    pub fn pending_spans(&self) -> usize {
        self.pending_spans + self.reserved
    }

    /// Traces waiting.
    pub fn pending_traces(&self) -> usize {
        self.pending.len()
    }

    fn known(&self, trace_id: &TraceId) -> Option<&HashSet<SpanId>> {
        self.finishing.get(trace_id).or_else(|| self.finished.get(trace_id))
    }

    /// Sorts one trace's offered spans: keeps the new ones in `spans` and says how many
    /// were duplicates or late. Changes nothing.
    pub fn sort(&self, trace_id: &TraceId, spans: &mut Vec<OtlpSpan>) -> Sorted {
        let mut sorted = Sorted::default();
        let mut seen = HashSet::new();
        let pending = self.pending.get(trace_id).map(|p| &p.ids);
        let done = self.known(trace_id);
        spans.retain(|s| {
            let id = s.span_id();
            if !seen.insert(id) || pending.is_some_and(|ids| ids.contains(&id)) {
                sorted.duplicates += 1;
                return false;
            }
            match done {
                Some(ids) if ids.contains(&id) => {
                    sorted.duplicates += 1;
                    false
                }
                Some(_) => {
                    sorted.late += 1;
                    false
                }
                None => true,
            }
        });
        sorted
    }

    /// Reserves room for `n` spans about to be journaled, or says the buffer is full.
    pub fn reserve(&mut self, n: usize) -> Result<(), Full> {
        let pending = self.pending_spans + self.reserved;
        if n > 0 && pending + n > self.max_pending_spans {
            return Err(Full { pending, max: self.max_pending_spans });
        }
        self.reserved += n;
        Ok(())
    }

    /// Gives back a reservation that will not be used (journaling failed).
    pub fn unreserve(&mut self, n: usize) {
        self.reserved = self.reserved.saturating_sub(n);
    }

    /// Adds the spans of one trace (after [`Assembler::sort`], reservation and
    /// journaling); `reserved` of them were reserved. Sorts again (a concurrent export
    /// may have brought the same spans, or the trace finished meanwhile).
    pub fn insert(&mut self, trace_id: TraceId, mut spans: Vec<OtlpSpan>, reserved: usize, now: Instant) -> Sorted {
        self.unreserve(reserved);
        let sorted = self.sort(&trace_id, &mut spans);
        if spans.is_empty() {
            return sorted;
        }
        let pending = self.pending.entry(trace_id).or_insert_with(|| Pending {
            spans: Vec::new(),
            ids: HashSet::new(),
            first_seen: now,
            last_seen: now,
            has_root: false,
        });
        pending.last_seen = now;
        for span in spans {
            pending.has_root |= is_root_candidate(&span);
            pending.ids.insert(span.span_id());
            pending.spans.push(span);
            self.pending_spans += 1;
        }
        sorted
    }

    /// Takes out the traces ready at `now` (see the module docs).
    pub fn take_ready(&mut self, now: Instant) -> Vec<ReadyTrace> {
        let (quiet, timeout) = (self.quiet_period, self.trace_timeout);
        let ready: Vec<(TraceId, bool)> = self
            .pending
            .iter()
            .filter_map(|(id, p)| {
                if p.has_root && now.duration_since(p.last_seen) >= quiet {
                    Some((*id, true))
                } else if now.duration_since(p.first_seen) >= timeout {
                    Some((*id, p.has_root))
                } else {
                    None
                }
            })
            .collect();
        ready
            .into_iter()
            .filter_map(|(trace_id, complete)| {
                let p = self.pending.remove(&trace_id)?;
                self.pending_spans -= p.spans.len();
                self.finishing.insert(trace_id, p.ids);
                Some(ReadyTrace { trace_id, spans: p.spans, complete })
            })
            .collect()
    }

    /// Every trace, ready or not (at shutdown nothing is taken: the journal keeps them).
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty() && self.finishing.is_empty()
    }

    /// A taken trace's record is durable: remember its span ids for a while.
    pub fn finished(&mut self, trace_id: TraceId, now: Instant) {
        let Some(ids) = self.finishing.remove(&trace_id) else { return };
        self.finished.insert(trace_id, ids);
        self.finished_order.push_back((now, trace_id));
        while let Some((at, id)) = self.finished_order.front().copied() {
            let expired = now.duration_since(at) > self.trace_timeout + self.quiet_period;
            if !expired && self.finished_order.len() <= REMEMBER_FINISHED {
                break;
            }
            self.finished_order.pop_front();
            self.finished.remove(&id);
        }
    }

    /// A taken trace's record could not be made durable: it waits again (another quiet
    /// period before the next try).
    pub fn restore(&mut self, trace: ReadyTrace, now: Instant) {
        self.finishing.remove(&trace.trace_id);
        self.insert(trace.trace_id, trace.spans, 0, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::trace::v1::Span;
    use std::sync::Arc;

    fn span(id: u8, parent: Option<u8>) -> OtlpSpan {
        OtlpSpan {
            span: Span {
                trace_id: vec![1; 16],
                span_id: vec![id; 8],
                parent_span_id: parent.map(|p| vec![p; 8]).unwrap_or_default(),
                ..Default::default()
            },
            resource: Arc::new(Vec::new()),
        }
    }

    const T: TraceId = [1; 16];

    #[test]
    fn a_trace_is_ready_after_its_root_and_a_quiet_period() {
        let mut a = Assembler::new(Duration::from_millis(100), Duration::from_secs(60), 10);
        let t0 = Instant::now();
        a.reserve(2).unwrap();
        a.insert(T, vec![span(2, Some(1)), span(3, Some(1))], 2, t0);
        assert!(a.take_ready(t0 + Duration::from_secs(1)).is_empty(), "no root yet");
        a.reserve(1).unwrap();
        a.insert(T, vec![span(1, None)], 1, t0 + Duration::from_secs(1));
        assert!(a.take_ready(t0 + Duration::from_millis(1050)).is_empty(), "still quiet period");
        let ready = a.take_ready(t0 + Duration::from_millis(1100));
        assert_eq!(ready.len(), 1);
        assert_eq!(ready[0].spans.len(), 3);
        assert!(ready[0].complete);
        a.finished(T, t0 + Duration::from_secs(2));
        // A retried export is a duplicate; a new span is late.
        let mut again = vec![span(2, Some(1)), span(9, Some(1))];
        assert_eq!(a.sort(&T, &mut again), Sorted { duplicates: 1, late: 1 });
        assert!(again.is_empty());
    }

    #[test]
    fn a_rootless_trace_times_out_incomplete_and_capacity_is_bounded() {
        let mut a = Assembler::new(Duration::from_millis(100), Duration::from_secs(10), 2);
        let t0 = Instant::now();
        a.reserve(2).unwrap();
        assert_eq!(a.reserve(1), Err(Full { pending: 2, max: 2 }));
        a.insert(T, vec![span(2, Some(1)), span(2, Some(1))], 2, t0);
        assert_eq!(a.pending_spans(), 1, "the duplicate in one export is dropped");
        let ready = a.take_ready(t0 + Duration::from_secs(10));
        assert_eq!((ready.len(), ready[0].complete), (1, false));
        assert_eq!(a.pending_spans(), 0);
    }
}
