//! The `btrfs` backend of `hearth volume`: read-only snapshots, incremental `btrfs send` from the
//! newest parent both sides hold (matched by received UUID), and `btrfs receive` into a staging place.
