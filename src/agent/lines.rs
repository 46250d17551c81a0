//! Splitting bytes into lines.
