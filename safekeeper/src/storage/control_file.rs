//! Control file: placeholder, filled by the storage task.
