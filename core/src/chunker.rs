//! Content-defined chunking of a byte stream (FastCDC, 2020 variant, with a
//! gear table seeded from the repository key).
//!
//! Boundaries depend only on content, never on how the bytes arrive: the
//! same stream yields the same chunks whatever the read sizes, and an
//! insertion disturbs only the chunks around it. Those two properties are
//! what deduplication stands on, and the property tests below pin them.

use std::borrow::Cow;
use std::io::Read;

use fastcdc::v2020::{cut_gear, get_gear_with_seed, select_masks, Normalization};

use crate::repo::ChunkerParams;

/// Splits a reader into chunks; yields each chunk's bytes.
///
/// The cut points are exactly those of `fastcdc`'s `StreamCDC` (a test
/// pins that), but the buffer is kept instead of shifted: `StreamCDC`
/// refills its buffer to the maximum chunk size before every cut, moving the
/// unread rest (up to 7 MiB per 1 MiB chunk) to the front each time, and
/// allocates it per file. Here a cut is searched in whatever is buffered,
/// and kept when it lies before the end of the buffered bytes (where a full
/// buffer would cut too), so the unread rest moves only when no cut is found
/// in it; the buffer holds a few average chunks, grows only for a chunk
/// that does not fit, and is reused from file to file
/// ([`Chunker::with_buffer`]).
pub struct Chunker<R: Read> {
    reader: R,
    buf: Vec<u8>,
    /// Unread bytes are `buf[start..end]`.
    start: usize,
    end: usize,
    eof: bool,
    min: usize,
    avg: usize,
    max: usize,
    masks: (u64, u64),
    gear: (Cow<'static, [u64]>, Cow<'static, [u64]>),
}

impl<R: Read> Chunker<R> {
    /// A chunker over `reader` with the repository's parameters and seed.
    pub fn new(reader: R, params: ChunkerParams, seed: u64) -> Chunker<R> {
        Chunker::with_buffer(reader, params, seed, Vec::new())
    }

    /// The same, reusing `buf` (from [`Chunker::into_buffer`]) as its
    /// buffer.
    pub fn with_buffer(reader: R, params: ChunkerParams, seed: u64, mut buf: Vec<u8>) -> Self {
        let (min, avg, max) = (
            params.min as usize,
            params.avg as usize,
            params.max as usize,
        );
        // Room for a few average chunks; grown (up to the maximum size)
        // only when a chunk does not fit, which is rare: a buffer of the
        // maximum size kept per file reader cost 8 MiB of memory each.
        let initial = (4 * avg).min(max);
        buf.resize(initial, 0);
        buf.shrink_to(initial);
        Chunker {
            reader,
            buf,
            start: 0,
            end: 0,
            eof: false,
            min,
            avg,
            max,
            masks: select_masks(avg, Normalization::Level1),
            gear: get_gear_with_seed(seed),
        }
    }

    /// The buffer, for the next file's chunker.
    pub fn into_buffer(self) -> Vec<u8> {
        self.buf
    }

    /// Moves the unread bytes to the front (or, when they fill the whole
    /// buffer, grows it towards the maximum chunk size) and reads until the
    /// buffer is full or the reader is done.
    fn fill(&mut self) -> std::io::Result<()> {
        if self.start == 0 && self.end == self.buf.len() {
            let grown = (self.buf.len() * 2).clamp(self.min, self.max);
            self.buf.resize(grown, 0);
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        while self.end < self.buf.len() {
            match self.reader.read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(n) => self.end += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn next_chunk(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        loop {
            let buffered = self.end - self.start;
            if buffered == 0 && self.eof {
                return Ok(None);
            }
            if buffered > 0 {
                let (mask_s, mask_l) = self.masks;
                let (_, len) = cut_gear(
                    &self.buf[self.start..self.end],
                    self.min,
                    self.avg,
                    self.max,
                    mask_s,
                    mask_l,
                    mask_s << 1,
                    mask_l << 1,
                    &self.gear.0,
                    &self.gear.1,
                );
                // A cut before the end of the buffered bytes is where the
                // scan of a full buffer would cut too (it tests the same
                // positions in the same order); a cut at the end may only be
                // the end of the buffer.
                if len < buffered || buffered >= self.max || self.eof {
                    let chunk = self.buf[self.start..self.start + len].to_vec();
                    self.start += len;
                    return Ok(Some(chunk));
                }
            }
            self.fill()?;
        }
    }
}

impl<R: Read> Iterator for Chunker<R> {
    type Item = std::io::Result<Vec<u8>>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_chunk().transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Small sizes so property tests exercise many boundaries quickly.
    const SMALL: ChunkerParams = ChunkerParams {
        min: 256,
        avg: 1024,
        max: 4096,
    };

    /// A reader that returns at most the next of `sizes` bytes per call.
    struct Choppy<'a> {
        data: &'a [u8],
        sizes: Vec<usize>,
        i: usize,
    }

    impl Read for Choppy<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let want = self.sizes[self.i % self.sizes.len()].max(1);
            self.i += 1;
            let n = want.min(buf.len()).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    fn chunks(r: impl Read, seed: u64) -> Vec<Vec<u8>> {
        Chunker::new(r, SMALL, seed).map(|c| c.unwrap()).collect()
    }

    proptest! {
        #[test]
        fn same_bytes_give_same_chunks_whatever_the_read_sizes(
            len in 0usize..40_000,
            seed in any::<u64>(),
            sizes in proptest::collection::vec(1usize..5000, 1..8),
        ) {
            let d = crate::testutil::pseudo_random(len, seed);
            let whole = chunks(d.as_slice(), 7);
            let choppy = chunks(Choppy { data: &d, sizes, i: 0 }, 7);
            prop_assert_eq!(&whole, &choppy);
            prop_assert_eq!(whole.concat(), d);
            for c in &whole[..whole.len().saturating_sub(1)] {
                prop_assert!(c.len() >= SMALL.min as usize && c.len() <= SMALL.max as usize);
            }
        }

        #[test]
        fn boundaries_resynchronise_after_an_insertion(
            seed in any::<u64>(),
            at in 0usize..30_000,
            insert in proptest::collection::vec(any::<u8>(), 1..300),
        ) {
            let d = crate::testutil::pseudo_random(60_000, seed);
            let mut changed = d.clone();
            changed.splice(at..at, insert.iter().copied());
            let a = chunks(d.as_slice(), 7);
            let b = chunks(changed.as_slice(), 7);
            // FastCDC's normalised masks depend on the distance from the
            // chunk start, so the chunk sequence can take a few chunks to
            // fall back into step; after that every chunk is shared. Check
            // that almost all chunks starting past the insertion are shared,
            // and the last ones always.
            let mut off = 0;
            let mut tail = Vec::new();
            for c in &a {
                if off > at + 2 * SMALL.max as usize {
                    tail.push(c.clone());
                }
                off += c.len();
            }
            let in_b: std::collections::HashSet<&Vec<u8>> = b.iter().collect();
            let shared = tail.iter().filter(|c| in_b.contains(c)).count();
            prop_assert!(shared + 8 >= tail.len(), "only {} of {} later chunks shared", shared, tail.len());
            for c in tail.iter().rev().take(3) {
                prop_assert!(in_b.contains(c), "a final chunk is not shared");
            }
        }
    }

    proptest! {
        #[test]
        fn cut_points_are_those_of_fastcdc_stream_chunker(
            len in 0usize..60_000,
            seed in any::<u64>(),
            zeros in 0usize..12_000,
            sizes in proptest::collection::vec(1usize..9000, 1..6),
            // Maximum 4 (buffer starts full size) or 16 average chunks
            // (the buffer grows when a chunk does not fit).
            params in prop_oneof![
                Just(SMALL),
                Just(ChunkerParams { min: 256, avg: 512, max: 8192 }),
            ],
        ) {
            // Random data with a run of zeros (cut at the maximum size)
            // in the middle, read in uneven pieces, through a reused buffer.
            let mut d = crate::testutil::pseudo_random(len, seed);
            d.splice(len / 2..len / 2, std::iter::repeat_n(0u8, zeros));
            let theirs: Vec<Vec<u8>> = fastcdc::v2020::StreamCDC::with_level_and_seed(
                d.as_slice(),
                params.min as usize,
                params.avg as usize,
                params.max as usize,
                Normalization::Level1,
                seed,
            )
            .map(|c| c.unwrap().data)
            .collect();
            // A used buffer, larger than the chunker starts with.
            let used = vec![7u8; 10_000];
            let mut ours = Chunker::with_buffer(Choppy { data: &d, sizes, i: 0 }, params, seed, used);
            let ours: Vec<Vec<u8>> = ours.by_ref().map(|c| c.unwrap()).collect();
            prop_assert_eq!(ours, theirs);
        }
    }

    #[test]
    fn the_seed_changes_the_boundaries() {
        let d = crate::testutil::pseudo_random(200_000, 3);
        assert_ne!(chunks(d.as_slice(), 1), chunks(d.as_slice(), 2));
    }
}
