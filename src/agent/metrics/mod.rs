//! Daemon metrics: finding the processes, sampling them, detecting stalls.

pub mod process;
