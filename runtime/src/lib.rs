//! infergate's model server on libtorch: one task per process, behind the HTTP contract of
//! docs/architecture.md (TEI- and OpenAI-shaped routes). Three layers, as in TEI: HTTP
//! (`server`, `error`, each task's `http`), core (`executor`, `admission`, `encoder`,
//! `tokenize`, `decode`, `generate`) and the models (`models`), run by each task's `backend`
//! on the executor's model thread. `tasks::<task>::build` assembles a task; `app` dispatches.

pub mod admission;
pub mod app;
pub mod audio;
pub mod decode;
pub mod device;
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
pub mod usage;
