//! facerec: face recognition over HTTP with InsightFace models through ONNX Runtime.
//!
//! Arrows point down: `serve` wires everything; `api` (HTTP) -> `service` (every use case,
//! the write lock, the followers) -> `engine` (inference workers) -> `face` (decode, detect,
//! align, embed) -> `runtime` (ONNX Runtime, OpenVINO); `service` -> `gallery` (in-memory
//! templates and face records), `store` (SQLite or MongoDB; the durable truth), `audit`
//! (NDJSON log and crops); `error` is the catalogue every layer answers with. `fetch` brings the runtime library and model packs;
//! `config` holds every flag. The tools (eval, benchmarks) are the `facerec-tools` crate of tools/.

pub mod api;
pub mod audit;
pub mod civil;
pub mod cli;
pub mod config;
pub mod engine;
pub mod error;
pub mod face;
pub mod fetch;
pub mod gallery;
pub mod healthcheck;
pub mod metrics;
pub mod runtime;
pub mod serve;
pub mod service;
pub mod store;
pub mod stream;
