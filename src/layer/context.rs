//! [`AuditContext`]: what a handler knows about its interaction, filled in while it runs.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::{FromRequestParts, OptionalFromRequestParts};
use axum::http::request::Parts;
use axum::http::StatusCode;
use uuid::Uuid;

use crate::model::{Interaction, Status, Thought, ToolCall};

/// The interaction being recorded for one audited request. Cheap to clone; every clone
/// fills the same record, so it can be handed to tasks the handler spawns.
///
/// Handlers get it as an axum extractor (`audit: AuditContext`, or
/// `Option<AuditContext>` where the layer may be absent) or from the request extensions.
/// What the handler leaves unset the layer fills in when the request ends.
#[derive(Clone)]
pub struct AuditContext {
    draft: Arc<Mutex<Draft>>,
}

/// The record under construction and what the handler decided about it.
pub(super) struct Draft {
    pub(super) record: Interaction,
    /// The handler gave the question: the layer does not look for one in the body.
    pub(super) question_given: bool,
    /// The handler gave the outcome: the layer does not derive it from the HTTP status.
    pub(super) status_given: bool,
}

impl std::fmt::Debug for AuditContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let draft = self.draft();
        f.debug_struct("AuditContext").field("interaction_id", &draft.record.interaction_id).finish_non_exhaustive()
    }
}

impl AuditContext {
    pub(super) fn new(record: Interaction) -> Self {
        AuditContext { draft: Arc::new(Mutex::new(Draft { record, question_given: false, status_given: false })) }
    }

    /// The record as it stands; a handler that panicked while holding the lock left it
    /// usable (every change is a plain assignment or push), so poisoning is ignored.
    pub(super) fn draft(&self) -> MutexGuard<'_, Draft> {
        self.draft.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn edit(&self, change: impl FnOnce(&mut Interaction)) {
        change(&mut self.draft().record);
    }

    /// The id the record will be stored under (and the idempotency key).
    pub fn interaction_id(&self) -> Uuid {
        self.draft().record.interaction_id
    }

    /// The conversation the request belongs to (from its `session_id` cookie).
    pub fn session_id(&self) -> Uuid {
        self.draft().record.session_id
    }

    /// What was asked. Without it the layer takes the `instructions` or `question` field
    /// of a JSON request body, else the request line.
    pub fn set_question(&self, question: impl Into<String>) {
        let mut draft = self.draft();
        draft.record.question = question.into();
        draft.question_given = true;
    }

    /// Who asked.
    pub fn set_user(&self, user_id: impl Into<String>) {
        self.edit(|r| r.user_id = Some(user_id.into()));
    }

    /// The model that answered.
    pub fn set_model(&self, model_name: impl Into<String>) {
        self.edit(|r| r.model_name = Some(model_name.into()));
    }

    /// The model's provider, e.g. `openai`.
    pub fn set_provider(&self, provider: impl Into<String>) {
        self.edit(|r| r.provider = Some(provider.into()));
    }

    /// The provider endpoint used.
    pub fn set_base_url(&self, base_url: impl Into<String>) {
        self.edit(|r| r.base_url = Some(base_url.into()));
    }

    /// The Kubernetes cluster worked on.
    pub fn set_cluster(&self, cluster: impl Into<String>) {
        self.edit(|r| r.cluster = Some(cluster.into()));
    }

    /// Adds one step of the model's reasoning; returns its sequence number, for
    /// [`ToolRun::after_thought`].
    pub fn thought(&self, content: impl Into<String>) -> i32 {
        let mut draft = self.draft();
        let thoughts = &mut draft.record.thoughts;
        thoughts.push(Thought::new(content));
        let number = thoughts.len() as i32;
        if let Some(last) = thoughts.last_mut() {
            last.sequence_number = number;
        }
        number
    }

    /// Adds a tool call the handler timed itself; its sequence number is its position.
    pub fn tool_call(&self, mut call: ToolCall) {
        let mut draft = self.draft();
        let calls = &mut draft.record.tool_calls;
        call.sequence_number = calls.len() as i32 + 1;
        calls.push(call);
    }

    /// Starts timing a tool call; [`ToolRun::finish`] or [`ToolRun::fail`] records it. The
    /// call takes its place in the order when it finishes.
    pub fn start_tool(&self, tool_name: impl Into<String>, tool_input: impl Into<String>) -> ToolRun {
        ToolRun { audit: self.clone(), call: Some(ToolCall::new(tool_name, tool_input)), started: Instant::now() }
    }

    /// What the agent answered.
    pub fn answer(&self, final_answer: impl Into<String>) {
        self.edit(|r| r.final_answer = Some(final_answer.into()));
    }

    /// The interaction failed (or timed out, or was cancelled) with `error`, whatever
    /// HTTP status the handler answers with.
    pub fn fail(&self, status: Status, error: impl Into<String>) {
        let mut draft = self.draft();
        draft.record.status = status;
        draft.record.error = Some(error.into());
        draft.status_given = true;
    }

    /// Time spent in the model/agent loop.
    pub fn set_assistant_duration(&self, duration: Duration) {
        self.edit(|r| r.assistant_duration_ms = Some(millis(duration)));
    }

    /// Time spent parsing the model's answer.
    pub fn set_parse_duration(&self, duration: Duration) {
        self.edit(|r| r.parse_duration_ms = Some(millis(duration)));
    }

    /// Another named timing (a `performance_metrics` row), e.g. `llm_first_token`.
    pub fn timing(&self, name: impl Into<String>, duration: Duration) {
        self.edit(|r| {
            r.metrics.insert(name.into(), millis(duration));
        });
    }

    /// Tokens used, added to what was recorded before (a ReAct loop calls the model
    /// several times).
    pub fn add_tokens(&self, input: i64, output: i64) {
        self.edit(|r| {
            r.input_tokens = Some(r.input_tokens.unwrap_or(0) + input);
            r.output_tokens = Some(r.output_tokens.unwrap_or(0) + output);
        });
    }

    /// Anything else worth keeping, under `attributes.{key}`.
    pub fn attribute(&self, key: impl Into<String>, value: impl Into<serde_json::Value>) {
        self.edit(|r| {
            r.attributes.insert(key.into(), value.into());
        });
    }
}

/// A tool call being timed: see [`AuditContext::start_tool`]. Dropped without
/// [`finish`](ToolRun::finish) or [`fail`](ToolRun::fail) (the handler returned early or
/// panicked while the tool ran), it is recorded as failed, never lost.
#[must_use = "a tool run is recorded when it finishes or fails"]
pub struct ToolRun {
    audit: AuditContext,
    call: Option<ToolCall>,
    started: Instant,
}

impl std::fmt::Debug for ToolRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ToolRun").field("call", &self.call).finish_non_exhaustive()
    }
}

impl ToolRun {
    /// Links the call to the thought that led to it (a number from
    /// [`AuditContext::thought`]).
    pub fn after_thought(mut self, thought_sequence_number: i32) -> Self {
        if let Some(call) = &mut self.call {
            call.thought_sequence_number = Some(thought_sequence_number);
        }
        self
    }

    /// The tool finished and printed `observation`.
    pub fn finish(mut self, observation: impl Into<String>) {
        self.record(Some(observation.into()), None);
    }

    /// The tool failed with `error`.
    pub fn fail(mut self, error: impl Into<String>) {
        self.record(None, Some(error.into()));
    }

    fn record(&mut self, observation: Option<String>, error: Option<String>) {
        if let Some(mut call) = self.call.take() {
            call.tool_observation = observation;
            call.error = error;
            call.duration_ms = Some(millis(self.started.elapsed()));
            self.audit.tool_call(call);
        }
    }
}

impl Drop for ToolRun {
    fn drop(&mut self) {
        if self.call.is_some() {
            self.record(None, Some("the tool run was not finished (the handler returned or failed first)".into()));
        }
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// The answer to a handler asking for an [`AuditContext`] on a path the layer does not
/// audit (or without the layer): a programming error, so `500`.
const NOT_AUDITED: (StatusCode, &str) =
    (StatusCode::INTERNAL_SERVER_ERROR, "AuditContext requested on a path AuditLayer does not audit");

impl<S: Send + Sync> FromRequestParts<S> for AuditContext {
    type Rejection = (StatusCode, &'static str);

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<AuditContext>().cloned().ok_or(NOT_AUDITED)
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for AuditContext {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<AuditContext>().cloned())
    }
}
