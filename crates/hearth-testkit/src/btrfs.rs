//! Btrfs filesystems on loop devices for tests (root only): made, mounted and cleaned up by the harness.
