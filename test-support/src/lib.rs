//! Shared support for the workspace's tests and benchmarks (unpublished): what the test
//! files, the load generator and the agent benchmark used to carry each in a copy of
//! their own.
//!
//! - [`fs`]: a small tmpfs that a test can fill up (a full disk).
//! - [`net`]: a free loopback port; waiting until something listens.
//! - [`process`]: signals to a child, waiting for an exit with a deadline, a child that
//!   is killed when dropped.
//! - [`procfs`]: CPU time and resident memory of a process, busy time of the machine, the
//!   CPU model, and a meter that splits a phase's CPU between server, load and the rest.
//! - [`stats`]: percentiles of latencies, milliseconds for printing.
//!
//! It depends on no crate of this workspace, so the server's own benchmark binaries can
//! use it as well as the tests of every crate.

pub mod fs;
pub mod net;
pub mod process;
pub mod procfs;
pub mod stats;
