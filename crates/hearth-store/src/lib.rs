//! Object storage for hearth: one interface over local directories (`file://`) and S3-compatible stores (`s3://`).

mod location;

pub use location::{Location, S3Location};
