//! facerec: face recognition over HTTP with InsightFace models through ONNX Runtime.
//!
//! Arrows point down: `serve` wires everything; `api` (HTTP) -> `service` (every use case,
//! the write lock, the followers) -> `engine` (inference workers) -> `face` (decode, detect,
//! align, embed) -> `runtime` (ONNX Runtime, OpenVINO); `service` -> `gallery` (in-memory
//! templates and face records), `store` (SQLite or MongoDB; the durable truth), `audit`
//! (NDJSON log and crops); `error` is the catalogue every layer answers with. `fetch` brings the runtime library and model packs;
//! `eval` measures the pipeline against insightface; `config` holds every flag.

pub mod api;
pub mod audit;
pub mod bench;
pub mod bench_recognize;
pub mod civil;
pub mod config;
pub mod engine;
pub mod error;
pub mod eval;
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
