//! Support code shared by nestless's integration and end-to-end tests.
