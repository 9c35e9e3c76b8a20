//! Adapter formats: PEFT and mlx-lm readers into one in-memory [`Adapter`].

pub mod adapter;
pub mod error;
pub mod mlx;
pub mod peft;

pub use adapter::{detect_format, read_adapter, Adapter, AdapterFormat, AdapterModule};
pub use error::FormatError;
