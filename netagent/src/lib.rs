//! nestless host agent library.
pub mod planner;
