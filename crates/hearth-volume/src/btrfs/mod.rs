//! The `btrfs` backend of `hearth volume`: read-only snapshots, incremental `btrfs send` from the
//! newest parent both sides hold (matched by received UUID), and `btrfs receive` into a staging place.
//!
//! These are the backend's local parts; the protocol carries a send stream from [`send`] on the primary
//! to [`receive`] on the standby. On the primary: [`check_no_nested`], [`take_snapshot`],
//! [`list_snapshots`], [`choose_parent`] with the UUIDs the standby reports, [`send`], and retention with
//! [`select_for_prune`] and [`delete_subvolume`]. On the standby: [`clean_partial_receives`],
//! [`received_uuids`], [`receive`], [`switch_live`]. Everything but [`send`] and [`receive`] blocks (it runs
//! the btrfs tool and fsyncs), so async callers run it in `spawn_blocking`.
//!
//! How the pieces fit, and the policies (parent choice, nested subvolumes, divergence, retention), are in
//! docs/volume-btrfs.md.

mod diff;
mod error;
mod live;
mod plan;
mod stream;
mod tool;

pub use error::BtrfsError;
pub use live::{LiveNames, Replaced, SwitchReport, switch_live, switch_live_keeping_replaced};
pub use plan::{
    FullReason, KeepReason, LiveRecord, ParentChoice, ReplacedAction, choose_parent,
    decide_replaced, select_for_prune,
};
pub use stream::{SendStream, clean_partial_receives, receive, received_uuids, send};
pub use tool::{
    SpaceUse, SubvolInfo, check_no_nested, create_subvolume, delete_subvolume, exclusive_bytes,
    is_subvolume, list_snapshots, nested_subvolumes, set_readonly, set_received, subvolume_info,
    subvolume_show, sync_filesystem, take_snapshot,
};
pub(crate) use tool::{check_name, is_uuid};
