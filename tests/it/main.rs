//! The integration suite, one test binary (so the helpers in `common` compile once):
//! real PostgreSQL (a fresh database per test) and SQLite files, the real HTTP server on
//! loopback, the real binary as a child process, private PostgreSQL clusters for faults.

#[macro_use]
mod common;

mod chain;
mod cli;
mod dashboard;
mod distributed;
mod doctor;
mod export;
mod fault;
mod ingest_http;
mod layer;
mod limits;
mod metrics;
mod otlp;
mod pg_cluster;
mod pipeline;
mod proxy;
mod query;
mod retention;
mod risk;
mod security;
mod spool;
mod spool_props;
mod store;
