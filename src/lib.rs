//! facerec: face recognition over HTTP with InsightFace models through ONNX Runtime.
//!
//! Layers, top to bottom: `config` (flags and env) -> `eval` (the evaluation command) ->
//! `face` (decode, detect, align, embed) -> `runtime` (ONNX Runtime and its provider) ->
//! `fetch` (pinned downloads of the runtime library and model packs).

pub mod config;
pub mod eval;
pub mod face;
pub mod fetch;
pub mod runtime;
