//! Pipeline stages: one module per stage kind.

pub mod tokenize;
