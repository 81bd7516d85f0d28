//! How a file is cut into the parts of a multipart upload: a pure decision, tested with data.

/// The default part size: 8 MiB, above S3's 5 MiB minimum for every part but the last. Memory for one
/// upload is at most [`PARTS_IN_FLIGHT`] parts being sent plus the one being read.
pub const DEFAULT_PART_SIZE: usize = 8 * 1024 * 1024;

/// How many parts of one upload are sent at once. A few, so that one slow request does not idle the
/// connection, and few enough that memory stays at a few parts.
pub const PARTS_IN_FLIGHT: usize = 3;

/// S3's limit on the number of parts of one object.
pub const MAX_PARTS: u64 = 10_000;

/// The part size to upload a file of `size` bytes with, given the configured `part_size`, or `None` when
/// the file goes in a single PUT (it fits in one part). The part size grows beyond the configured one
/// when the file would otherwise need more than [`MAX_PARTS`] parts (a file above 78 GiB at 8 MiB parts).
pub fn part_size_for(size: u64, part_size: usize) -> Option<u64> {
    let configured = (part_size as u64).max(1);
    if size <= configured {
        return None;
    }
    Some(configured.max(size.div_ceil(MAX_PARTS)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_cut_into_parts_only_when_they_exceed_one() {
        const MIB: u64 = 1024 * 1024;
        let cases: [(u64, usize, Option<u64>); 9] = [
            (0, DEFAULT_PART_SIZE, None),
            (1, DEFAULT_PART_SIZE, None),
            (8 * MIB, DEFAULT_PART_SIZE, None),
            (8 * MIB + 1, DEFAULT_PART_SIZE, Some(8 * MIB)),
            (40 * MIB, 5 * MIB as usize, Some(5 * MIB)),
            // 80,000 MiB at 8 MiB would be 10,000 parts: still fine.
            (80_000 * MIB, DEFAULT_PART_SIZE, Some(8 * MIB)),
            // One byte more needs bigger parts to stay within 10,000.
            (80_000 * MIB + 1, DEFAULT_PART_SIZE, Some(8 * MIB + 1)),
            (10, 0, Some(1)),
            (1, 0, None),
        ];
        for (size, part, want) in cases {
            let got = part_size_for(size, part);
            assert_eq!(got, want, "size {size}, part size {part}");
            if let Some(p) = got {
                assert!(size.div_ceil(p) <= MAX_PARTS, "size {size}: too many parts");
                assert!(
                    size.div_ceil(p) >= 2,
                    "size {size}: multipart with one part"
                );
            }
        }
    }
}
