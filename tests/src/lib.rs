//! Helpers shared by the integration tests.
pub mod datapath_fixture;
pub mod netns;
