//! Decoding algorithms the tasks' backends run on the model thread: beam search for
//! encoder-decoder translation, and Whisper's window-by-window decoding. Text generation's
//! continuous batching lives beside them, in `generate`.

pub mod beam;
pub mod whisper;
