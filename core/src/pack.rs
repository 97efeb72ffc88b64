//! Blob encoding and the pack format.
//!
//! Every blob is stored as one zstd frame: compressed when that pays, and
//! otherwise as a frame of raw blocks that we build by hand (no compression
//! work, a memcpy to decode). A pack is the concatenation of such frames
//! followed by a zstd *skippable* frame holding the pack header as JSON, and
//! the whole plaintext is one age file. The result is that
//! `age -d -i identity pack | zstd -d` prints the plaintext of every blob in
//! the pack and skips the header, with no lifeboat code involved (ARCHITECTURE.md,
//! "Emergency path").
//!
//! Plaintext layout:
//!
//! ```text
//! frame(blob 0) frame(blob 1) … | 0x184D2A50 u32le(n) | header JSON | u32le(json_len) "LBPK"
//!                                  `------------- skippable frame, n = json_len + 8 ---------'
//! ```

use serde::{Deserialize, Serialize};

use crate::id::Id;

/// zstd frame magic number.
const ZSTD_MAGIC: u32 = 0xFD2F_B528;
/// First skippable-frame magic number (zstd reserves 0x184D2A50..=0x184D2A5F).
const SKIPPABLE_MAGIC: u32 = 0x184D_2A50;
/// Marks the end of a pack's plaintext.
const TRAILER_MAGIC: &[u8; 4] = b"LBPK";
/// zstd's maximum block size.
const MAX_BLOCK: usize = 128 * 1024;
/// Upper bound on a declared pack header, so a hostile pack cannot make us
/// allocate without limit.
const MAX_HEADER: usize = 64 * 1024 * 1024;
/// Upper bound on one blob's plaintext (the chunker's maximum is 8 MiB; trees
/// of huge directories can be larger).
pub const MAX_BLOB: u32 = 256 * 1024 * 1024;

/// Whether a blob holds file data or a tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlobKind {
    /// File content.
    Data,
    /// A serialised [`Tree`](crate::tree::Tree).
    Tree,
}

/// Where one blob sits in a pack's plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackEntry {
    /// Keyed hash of the blob's plaintext.
    pub id: Id,
    /// Offset of the blob's frame in the pack plaintext.
    pub offset: u32,
    /// Length of the frame.
    pub length: u32,
    /// Length of the blob's plaintext.
    pub raw_length: u32,
}

/// The JSON in a pack's skippable trailer frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackHeader {
    /// Pack format version.
    pub version: u32,
    /// What the blobs are.
    #[serde(rename = "type")]
    pub kind: BlobKind,
    /// The blobs, in order.
    pub blobs: Vec<PackEntry>,
}

/// Reusable per-thread compression state.
pub struct BlobEncoder {
    compressor: Option<zstd::bulk::Compressor<'static>>,
    buf: Vec<u8>,
}

impl BlobEncoder {
    /// An encoder at zstd `level`; level 0 means never compress.
    pub fn new(level: i32) -> BlobEncoder {
        let compressor = (level != 0).then(|| {
            let mut c = zstd::bulk::Compressor::new(level).expect("valid zstd level");
            // Blob IDs already authenticate the plaintext; a checksum would be redundant.
            c.include_checksum(false).expect("zstd parameter");
            c.include_contentsize(true).expect("zstd parameter");
            c
        });
        BlobEncoder {
            compressor,
            buf: Vec::new(),
        }
    }

    /// Encodes `data` as one zstd frame appended to `out`: compressed if that
    /// saves at least 1/32 of the size, raw otherwise.
    pub fn encode_into(&mut self, data: &[u8], out: &mut Vec<u8>) {
        if let Some(compressor) = &mut self.compressor {
            let bound = zstd::zstd_safe::compress_bound(data.len());
            // The usual case, one frame per buffer, compresses straight into
            // `out`, so no second blob-sized buffer is kept.
            let direct = out.is_empty();
            let buf = if direct { &mut *out } else { &mut self.buf };
            buf.clear();
            buf.reserve_exact(bound);
            let worth_it = compressor
                .compress_to_buffer(data, buf)
                .is_ok_and(|n| n < data.len() - data.len() / 32);
            if worth_it {
                if !direct {
                    out.extend_from_slice(&self.buf);
                }
                return;
            }
            if direct {
                out.clear();
            }
        }
        raw_frame(data, out);
    }
}

/// Appends a zstd frame of raw (uncompressed) blocks holding `data`.
pub fn raw_frame(data: &[u8], out: &mut Vec<u8>) {
    out.reserve(data.len() + 16 + 3 * (data.len() / MAX_BLOCK + 1));
    out.extend_from_slice(&ZSTD_MAGIC.to_le_bytes());
    // Frame header descriptor: 8-byte content size, single segment (so no
    // window descriptor), no checksum, no dictionary.
    out.push(0b1110_0000);
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    let mut blocks = data.chunks(MAX_BLOCK).peekable();
    if blocks.peek().is_none() {
        // An empty frame still needs one (last, empty) block.
        out.extend_from_slice(&1u32.to_le_bytes()[..3]);
        return;
    }
    while let Some(block) = blocks.next() {
        let last = blocks.peek().is_none() as u32;
        // Block header: bit 0 last-block, bits 1-2 type (0 = raw), bits 3.. size.
        let header = last | ((block.len() as u32) << 3);
        out.extend_from_slice(&header.to_le_bytes()[..3]);
        out.extend_from_slice(block);
    }
}

thread_local! {
    /// One zstd decompression context per thread: creating one per blob
    /// showed up in restore profiles.
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Decodes one blob frame whose plaintext is `raw_length` bytes.
pub fn decode_blob(frame: &[u8], raw_length: u32) -> Result<Vec<u8>, String> {
    if raw_length > MAX_BLOB {
        return Err(format!("declared blob length {raw_length} is implausible"));
    }
    let mut out = Vec::with_capacity(raw_length as usize);
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new().map_err(|e| format!("zstd: {e}"))?);
        }
        let d = slot.as_mut().expect("just set");
        // A frame may not be larger than its declared content: the buffer
        // has exactly `raw_length` bytes, so a lying frame fails here.
        d.decompress_to_buffer(frame, &mut out)
            .map_err(|e| format!("zstd: {e}"))
    })?;
    if out.len() != raw_length as usize {
        return Err(format!(
            "decoded {} bytes, expected {raw_length}",
            out.len()
        ));
    }
    Ok(out)
}

/// Why [`FrameDecoder::decode`] failed.
#[derive(Debug)]
pub enum FrameError {
    /// Reading the frame failed (for a pack stream: a segment failed
    /// authentication); the frame may be fine in a salvaged copy.
    Read(std::io::Error),
    /// The frame is not a valid encoding of a blob of its declared length.
    Invalid(String),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Read(e) => write!(f, "{e}"),
            FrameError::Invalid(e) => f.write_str(e),
        }
    }
}

/// Decodes blob frames piece by piece: a restore then holds a few hundred
/// KiB per blob instead of the whole blob (up to the 8 MiB chunk maximum,
/// per thread), and hashes and writes each piece while it is still in the
/// CPU cache. One per thread; it reuses its zstd context and buffers.
pub struct FrameDecoder {
    zstd: zstd::stream::raw::Decoder<'static>,
    input: Vec<u8>,
    output: Vec<u8>,
}

impl std::fmt::Debug for FrameDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameDecoder").finish_non_exhaustive()
    }
}

impl FrameDecoder {
    /// A decoder with 64 KiB of input and 256 KiB of output buffer.
    pub fn new() -> std::io::Result<FrameDecoder> {
        Ok(FrameDecoder {
            zstd: zstd::stream::raw::Decoder::new()?,
            input: vec![0; 64 * 1024],
            output: vec![0; 256 * 1024],
        })
    }

    /// Decodes the frame `frame` yields (all of it, to its end) into a blob
    /// that must be exactly `raw_length` bytes, handing each decoded piece
    /// and its offset in the blob to `sink`, in order. Pieces are handed
    /// over before the blob is complete, so the caller must verify the
    /// whole (its ID) before trusting what it did with them.
    pub fn decode(
        &mut self,
        frame: &mut dyn std::io::Read,
        raw_length: u32,
        sink: &mut dyn FnMut(u64, &[u8]),
    ) -> Result<(), FrameError> {
        use zstd::stream::raw::Operation;
        let invalid = |e: String| FrameError::Invalid(format!("zstd: {e}"));
        if raw_length > MAX_BLOB {
            return Err(FrameError::Invalid(format!(
                "declared blob length {raw_length} is implausible"
            )));
        }
        self.zstd.reinit().map_err(|e| invalid(e.to_string()))?;
        let mut produced = 0u64;
        let mut finished = false;
        let mut emit = |out: &[u8], produced: &mut u64| -> Result<(), FrameError> {
            if *produced + out.len() as u64 > raw_length as u64 {
                return Err(FrameError::Invalid(format!(
                    "decodes to more than the declared {raw_length} bytes"
                )));
            }
            sink(*produced, out);
            *produced += out.len() as u64;
            Ok(())
        };
        loop {
            let n = match frame.read(&mut self.input) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(FrameError::Read(e)),
            };
            let mut used = 0;
            while used < n {
                let status = self
                    .zstd
                    .run_on_buffers(&self.input[used..n], &mut self.output)
                    .map_err(|e| invalid(e.to_string()))?;
                if status.bytes_read == 0 && status.bytes_written == 0 {
                    return Err(invalid("no progress decoding the frame".into()));
                }
                used += status.bytes_read;
                emit(&self.output[..status.bytes_written], &mut produced)?;
                finished = status.remaining == 0;
            }
        }
        // Flush what the decoder still holds after the last input.
        while !finished {
            let status = self
                .zstd
                .run_on_buffers(&[], &mut self.output)
                .map_err(|e| invalid(e.to_string()))?;
            emit(&self.output[..status.bytes_written], &mut produced)?;
            finished = status.remaining == 0;
            if status.bytes_written == 0 && !finished {
                return Err(invalid("the frame is truncated".into()));
            }
        }
        if produced != raw_length as u64 {
            return Err(FrameError::Invalid(format!(
                "decoded {produced} bytes, expected {raw_length}"
            )));
        }
        Ok(())
    }
}

/// Accumulates blob frames into one pack: its plaintext, or (made with
/// [`PackBuilder::sealed`]) its ciphertext, encrypted as the frames arrive.
pub struct PackBuilder {
    kind: BlobKind,
    out: Sink,
    /// Plaintext bytes so far.
    len: usize,
    entries: Vec<PackEntry>,
}

/// Where a pack's bytes go.
enum Sink {
    Plain(Vec<u8>),
    /// The age stream writer: a backup never holds a sealed pack's
    /// plaintext and ciphertext at once (they were 8 MiB each).
    Sealing(age::stream::StreamWriter<Vec<u8>>),
}

impl std::fmt::Debug for PackBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackBuilder")
            .field("kind", &self.kind)
            .field("len", &self.len)
            .field("blobs", &self.entries.len())
            .field("sealed", &matches!(self.out, Sink::Sealing(_)))
            .finish()
    }
}

impl PackBuilder {
    /// An empty pack of blobs of `kind`, kept as plaintext.
    pub fn new(kind: BlobKind, capacity: usize) -> PackBuilder {
        PackBuilder {
            kind,
            out: Sink::Plain(Vec::with_capacity(capacity)),
            len: 0,
            entries: Vec::new(),
        }
    }

    /// An empty pack of blobs of `kind`, encrypted to `recipients` as it is
    /// built: [`PackBuilder::finish`] then returns the stored bytes.
    pub fn sealed(
        kind: BlobKind,
        recipients: &crate::crypto::Recipients,
        capacity: usize,
    ) -> PackBuilder {
        Self::sealed_into(kind, recipients, Vec::new(), capacity)
    }

    /// [`PackBuilder::sealed`], writing into `buf` (emptied first), which
    /// [`PackBuilder::finish`] returns holding the stored bytes: a caller
    /// can hand an uploaded pack's buffer to the next pack.
    pub fn sealed_into(
        kind: BlobKind,
        recipients: &crate::crypto::Recipients,
        buf: Vec<u8>,
        capacity: usize,
    ) -> PackBuilder {
        PackBuilder {
            kind,
            out: Sink::Sealing(recipients.encrypting_into(buf, capacity)),
            len: 0,
            entries: Vec::new(),
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        match &mut self.out {
            Sink::Plain(buf) => buf.extend_from_slice(bytes),
            Sink::Sealing(w) => {
                use std::io::Write;
                w.write_all(bytes).expect("writing to a Vec cannot fail")
            }
        }
        self.len += bytes.len();
    }

    /// Appends an encoded frame for blob `id` of `raw_length` plaintext bytes.
    pub fn add(&mut self, id: Id, raw_length: u32, frame: &[u8]) {
        self.entries.push(PackEntry {
            id,
            offset: self.len as u32,
            length: frame.len() as u32,
            raw_length,
        });
        self.write(frame);
    }

    /// Plaintext bytes so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no blob was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The blob kind.
    pub fn kind(&self) -> BlobKind {
        self.kind
    }

    /// Appends the header trailer and returns the pack's bytes (its
    /// plaintext, or for a [`PackBuilder::sealed`] one its ciphertext) and
    /// the entries.
    pub fn finish(mut self) -> (Vec<u8>, PackHeader) {
        let header = PackHeader {
            version: 1,
            kind: self.kind,
            blobs: std::mem::take(&mut self.entries),
        };
        let json = serde_json::to_vec(&header).expect("pack header serialises");
        let mut trailer = Vec::with_capacity(json.len() + 16);
        trailer.extend_from_slice(&SKIPPABLE_MAGIC.to_le_bytes());
        trailer.extend_from_slice(&((json.len() + 8) as u32).to_le_bytes());
        trailer.extend_from_slice(&json);
        trailer.extend_from_slice(&(json.len() as u32).to_le_bytes());
        trailer.extend_from_slice(TRAILER_MAGIC);
        self.write(&trailer);
        let bytes = match self.out {
            Sink::Plain(buf) => buf,
            Sink::Sealing(w) => w.finish().expect("writing to a Vec cannot fail"),
        };
        (bytes, header)
    }
}

/// Parses the header of a pack's plaintext and checks that every entry lies
/// inside the data area, in order and without overlap.
pub fn parse_pack(plain: &[u8]) -> Result<PackHeader, String> {
    let n = plain.len();
    if n < 16 || &plain[n - 4..] != TRAILER_MAGIC {
        return Err("pack trailer missing".to_string());
    }
    let json_len = u32::from_le_bytes(plain[n - 8..n - 4].try_into().expect("4 bytes")) as usize;
    if json_len > MAX_HEADER || json_len + 16 > n {
        return Err(format!("pack header length {json_len} is out of range"));
    }
    let frame_start = n - 8 - json_len - 8;
    let magic = u32::from_le_bytes(
        plain[frame_start..frame_start + 4]
            .try_into()
            .expect("4 bytes"),
    );
    let size = u32::from_le_bytes(
        plain[frame_start + 4..frame_start + 8]
            .try_into()
            .expect("4 bytes"),
    );
    if magic != SKIPPABLE_MAGIC || size as usize != json_len + 8 {
        return Err("pack header frame is malformed".to_string());
    }
    let header: PackHeader = serde_json::from_slice(&plain[frame_start + 8..n - 8])
        .map_err(|e| format!("pack header is not valid JSON: {e}"))?;
    if header.version != 1 {
        return Err(format!("unknown pack version {}", header.version));
    }
    let mut end = 0u64;
    for e in &header.blobs {
        if (e.offset as u64) < end || e.offset as u64 + e.length as u64 > frame_start as u64 {
            return Err(format!("blob {} lies outside the pack data", e.id.short()));
        }
        end = e.offset as u64 + e.length as u64;
    }
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_sealed_pack_decrypts_to_the_pack_a_plain_builder_makes_even_in_a_used_buffer() {
        let key = crate::crypto::MasterKey::generate();
        let recipients = crate::crypto::Recipients::parse(&[key.recipient()]).unwrap();
        let mut plain = PackBuilder::new(BlobKind::Data, 0);
        let mut sealed = PackBuilder::sealed(BlobKind::Data, &recipients, 1000);
        // A previous pack's buffer, longer than this pack and full of bytes.
        let used = vec![0xAB; 600_000];
        let mut reused = PackBuilder::sealed_into(BlobKind::Data, &recipients, used, 1000);
        let mut enc = BlobEncoder::new(3);
        // Frames straddling age's 64 KiB segments, and a tiny one.
        for (i, len) in [70_000usize, 3, 200_000, 65_536].into_iter().enumerate() {
            let data = crate::testutil::pseudo_random(len, i as u64);
            let mut frame = Vec::new();
            enc.encode_into(&data, &mut frame);
            let id = Id::of_bytes(&data);
            plain.add(id, len as u32, &frame);
            sealed.add(id, len as u32, &frame);
            reused.add(id, len as u32, &frame);
        }
        assert_eq!(plain.len(), sealed.len());
        let (plaintext, plain_header) = plain.finish();
        for pack in [sealed, reused] {
            let (ciphertext, sealed_header) = pack.finish();
            assert_eq!(plain_header.blobs, sealed_header.blobs);
            assert_ne!(ciphertext, plaintext);
            let opened = key.decrypt(&ciphertext, &|| "pack".into()).unwrap();
            assert!(opened == plaintext, "same bytes once decrypted");
            assert_eq!(parse_pack(&opened).unwrap().blobs, plain_header.blobs);
        }
    }

    #[test]
    fn raw_frames_decode_with_the_zstd_library() {
        for len in [
            0,
            1,
            MAX_BLOCK - 1,
            MAX_BLOCK,
            MAX_BLOCK + 1,
            3 * MAX_BLOCK + 77,
        ] {
            let data = crate::testutil::pseudo_random(len, len as u64);
            let mut frame = Vec::new();
            raw_frame(&data, &mut frame);
            assert_eq!(decode_blob(&frame, len as u32).unwrap(), data, "len {len}");
        }
    }

    #[test]
    fn incompressible_data_is_stored_raw_and_text_is_compressed() {
        let mut enc = BlobEncoder::new(3);
        let random = crate::testutil::pseudo_random(100_000, 7);
        let mut out = Vec::new();
        enc.encode_into(&random, &mut out);
        assert!(out.len() <= random.len() + 64, "random data stored raw");
        let text = b"lifeboat ".repeat(10_000);
        let mut out2 = Vec::new();
        enc.encode_into(&text, &mut out2);
        assert!(out2.len() < text.len() / 10, "text compressed");
        assert_eq!(decode_blob(&out2, text.len() as u32).unwrap(), text);
    }

    #[test]
    fn decode_rejects_a_wrong_declared_length() {
        let mut frame = Vec::new();
        raw_frame(b"hello", &mut frame);
        assert!(decode_blob(&frame, 6).is_err());
        assert!(decode_blob(&frame, MAX_BLOB + 1).is_err());
    }

    proptest! {
        #[test]
        fn packs_round_trip(blobs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..5000), 0..20)) {
            let mut enc = BlobEncoder::new(3);
            let mut pb = PackBuilder::new(BlobKind::Data, 0);
            for b in &blobs {
                let mut frame = Vec::new();
                enc.encode_into(b, &mut frame);
                pb.add(Id::of_bytes(b), b.len() as u32, &frame);
            }
            let (plain, header) = pb.finish();
            let parsed = parse_pack(&plain).unwrap();
            prop_assert_eq!(&parsed, &header);
            for (e, b) in parsed.blobs.iter().zip(&blobs) {
                let frame = &plain[e.offset as usize..(e.offset + e.length) as usize];
                prop_assert_eq!(&decode_blob(frame, e.raw_length).unwrap(), b);
            }
        }

        #[test]
        fn parse_pack_never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_pack(&bytes);
        }
    }
}
