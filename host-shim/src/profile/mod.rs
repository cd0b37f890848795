//! Sandbox profiles: what a job's VM looks like and how its inner sandbox is set up.
//!
//! Every `*.yaml` file in the profiles directory is read, and every YAML document in
//! it is a profile (the Go predecessor silently loaded only the first document of a
//! multi-document file). Validation is strict: an unknown key, a wrong type or a value
//! out of range is an error naming the file, the document, the field path and, for a
//! misspelled key, the key that was probably meant. One bad profile fails the whole
//! load: nothing is half-loaded.

mod load;
mod model;

pub use load::{FieldProblem, ProfileError, ProfileSet, load_dir, load_file};
pub use model::*;
