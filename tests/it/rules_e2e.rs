//! Rules end to end.
