//! Text generation: the continuous-batching scheduler (`engine`) and its admission
//! (`admission`), token choice (`sampling`),
//! streamed text and stop strings (`text`) and chat templates (`template`). The HTTP routes are
//! in `tasks::generation`.

pub mod admission;
pub mod engine;
pub mod sampling;
pub mod sandbox;
pub mod template;
pub mod text;
