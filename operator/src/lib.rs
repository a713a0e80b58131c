//! The dynamo-rs operator (being built).
