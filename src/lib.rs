//! taper
pub mod formats;
pub mod model;
