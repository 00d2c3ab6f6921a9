//! infergate's model server on libtorch: one task per process, behind the HTTP contract of
//! docs/architecture.md (TEI- and OpenAI-shaped routes). Three layers, as in TEI: HTTP
//! (`server`, `tasks`), core (`admission`, `batching`, `tokenize`) and the models on their own
//! thread (`models`).

pub mod admission;
pub mod app;
pub mod audio;
pub mod decode;
pub mod device;
pub mod download;
pub mod encoder;
pub mod error;
pub mod executor;
pub mod generate;
pub mod metrics;
pub mod models;
pub mod server;
pub mod settings;
pub mod tasks;
pub mod tokenize;
