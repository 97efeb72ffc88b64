//! Content-defined chunking of a byte stream (FastCDC, 2020 variant, with a
//! gear table seeded from the repository key).
//!
//! Boundaries depend only on content, never on how the bytes arrive: the
//! same stream yields the same chunks whatever the read sizes, and an
//! insertion disturbs only the chunks around it. Those two properties are
//! what deduplication stands on, and the property tests below pin them.

use std::io::Read;

use crate::repo::ChunkerParams;

/// Splits a reader into chunks; yields each chunk's bytes.
pub struct Chunker<R: Read> {
    inner: fastcdc::v2020::StreamCDC<R>,
}

impl<R: Read> Chunker<R> {
    /// A chunker over `reader` with the repository's parameters and seed.
    pub fn new(reader: R, params: ChunkerParams, seed: u64) -> Chunker<R> {
        Chunker {
            inner: fastcdc::v2020::StreamCDC::with_level_and_seed(
                reader,
                params.min as usize,
                params.avg as usize,
                params.max as usize,
                fastcdc::v2020::Normalization::Level1,
                seed,
            ),
        }
    }
}

impl<R: Read> Iterator for Chunker<R> {
    type Item = std::io::Result<Vec<u8>>;

    fn next(&mut self) -> Option<Self::Item> {
        self.inner.next().map(|r| {
            r.map(|c| c.data).map_err(|e| match e {
                fastcdc::v2020::Error::IoError(io) => io,
                other => std::io::Error::other(other.to_string()),
            })
        })
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

    #[test]
    fn the_seed_changes_the_boundaries() {
        let d = crate::testutil::pseudo_random(200_000, 3);
        assert_ne!(chunks(d.as_slice(), 1), chunks(d.as_slice(), 2));
    }
}
