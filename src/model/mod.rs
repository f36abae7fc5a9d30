//! Models: configs, decoders, weight I/O, tokenizers.

pub mod gguf;
