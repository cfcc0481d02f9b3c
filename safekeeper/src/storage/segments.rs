//! Segment files: placeholder, filled by the storage task.
