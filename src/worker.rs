//! The worker side: what a Rust worker uses to receive its connections.
//!
//! (Filled in by the master-accept balancing work; empty until then.)
