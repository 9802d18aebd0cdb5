//! How a worker receives its connections (`--via`).
//!
//! * [`channel`]: the master accepts and hands each connection to the worker over its
//!   worker channel (a `SOCK_SEQPACKET` pair, descriptors in SCM_RIGHTS); this module
//!   holds the master's end. The frames are in [`crate::channel`], the descriptor
//!   passing in `fdpass`.
//!
//! Node's cluster IPC (`node`) and per-slot SO_REUSEPORT sockets (`socket`) are the
//! next two ways, and live here beside it.

pub(crate) mod channel;
