//! opsagent-audit: the audit log for LLM operations agents.
//!
//! Records flow one way: capture ([`ingest`], the [`layer`] around a Rust agent's
//! handlers, or [`pipeline::AuditLogger::log`] from a Rust program) → sanitise →
//! [`pipeline`] (queue, batching writers, spool) → [`store`] (PostgreSQL or SQLite).
//! Reads go [`api`] → [`query`] → [`store`]; exports are encoded by [`export`].
//!
//! The auditing reverse proxy ([`proxy`]) captures an unmodified OpsAgent's exchanges
//! into the same pipeline.
//!
//! Dependencies point down only: [`cli`] and [`bench`](mod@bench) → [`api`], [`proxy`]
//! and [`layer`] → [`ingest`], [`query`], [`retention`] and [`export`] → [`pipeline`] →
//! [`store`] → [`model`] and [`config`] ([`retention`] uses [`export`]'s Parquet encoder
//! beside it). [`doctor`] sits above [`pipeline`] (it reads the spool's files) and
//! [`store`]. [`distributed`] (RabbitMQ: the producer's sink and `worker`) sits below
//! [`api`] and [`cli`] and above [`pipeline`] and [`store`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod api;
pub mod bench;
pub mod cli;
pub mod config;
pub mod distributed;
pub mod doctor;
pub mod export;
pub mod ingest;
pub mod layer;
pub mod mask;
pub mod model;
pub mod pipeline;
pub mod proxy;
pub mod query;
pub mod retention;
pub mod risk;
pub mod server;
pub mod store;
