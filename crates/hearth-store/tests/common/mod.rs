//! Helpers shared by the store's integration tests.

use hearth_store::{Location, S3Location};
use hearth_testkit::Garage;

/// The test Garage's bucket `bucket` under `prefix`, with its key.
pub fn garage_location(garage: &Garage, bucket: &str, prefix: &str) -> Location {
    Location::S3(S3Location {
        bucket: bucket.to_string(),
        prefix: prefix.to_string(),
        endpoint: Some(garage.endpoint.clone()),
        region: Some(garage.region.clone()),
        force_path_style: true,
        access_key_id: Some(garage.key_id.clone()),
        secret_access_key: Some(garage.secret.clone()),
        ..Default::default()
    })
}
