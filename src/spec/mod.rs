//! Pipeline files: YAML text -> typed [`Pipeline`]. Pure: no I/O beyond reading the file.

pub mod de;
pub mod error;
pub mod load;
pub mod model;
pub mod node;
pub mod params;

pub use error::{SpecError, SpecErrors};
pub use load::{
    load, load_str, load_str_with, load_with, normalize_path, parse_duration, FORMAT_VERSION,
};
pub use model::{Named, PathDecl, Pipeline, ReportSpec, Stage};
pub use node::{Node, Pos, Value};
