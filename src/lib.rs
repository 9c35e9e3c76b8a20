//! taper

pub mod stages;
