//! `rerank`: TEI's `/rerank` over a cross-encoder (one output: the relevance of a passage to the
//! query); results best first with their original index.
//!
//! Its model is a classifier's (`classification::build` serves both).

pub mod http;
