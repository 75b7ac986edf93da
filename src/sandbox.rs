//! `tether sandbox`: everything on one machine (issue 9).
