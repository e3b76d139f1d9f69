//! [`Stage`]: work done to every record on its way in, before it is queued, spooled,
//! dead-lettered or logged.

use crate::model::Interaction;

/// A step every record passes through in [`AuditLogger`](super::AuditLogger) before it
/// goes anywhere: masking secrets (and, later, classifying risk).
///
/// The pipeline cannot depend on the modules that do this work (they sit above it), so
/// whoever builds the logger from a configuration hands the stages in; the pipeline's
/// single intake point then applies them on every path: `log`, `log_committed` and
/// `log_durable`, from HTTP or from a library caller.
pub trait Stage: Send + Sync + 'static {
    /// Changes the record in place; returns how many fields it changed.
    fn process(&self, record: &mut Interaction) -> usize;
}
