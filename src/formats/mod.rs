//! Adapter formats: PEFT, mlx-lm and taper's native readers into one in-memory
//! [`Adapter`], and the native writer.

pub mod adapter;
pub mod error;
pub mod mlx;
pub mod native;
pub mod peft;

pub use adapter::{detect_format, read_adapter, Adapter, AdapterFormat, AdapterModule};
pub use error::FormatError;
