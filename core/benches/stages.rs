//! Micro-benchmarks of each stage of the backup and restore pipeline on its
//! own, so that a regression in the end-to-end benchmark
//! (`tests/bench/compare.py`) can be traced to the stage it comes from.
//! Run with `cargo bench -p lifeboat-core`; throughput is reported per core.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use lifeboat_core::internals::{decode_blob, BlobEncoder, Chunker, MasterKey, Recipients};
use lifeboat_core::ChunkerParams;

const MIB: usize = 1024 * 1024;

/// Deterministic incompressible bytes.
fn random(len: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Text-like bytes that compress roughly as source code does.
fn text(len: usize) -> Vec<u8> {
    let words = [
        "fn ", "let ", "mut ", "self", ".iter()", "{\n", "}\n", "    ", "backup", "restore", "// ",
        "Result<", ">", "(", ")", ";\n",
    ];
    let mut out = Vec::with_capacity(len);
    let mut x = 12345u64;
    while out.len() < len {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        out.extend_from_slice(words[(x >> 59) as usize % words.len()].as_bytes());
    }
    out.truncate(len);
    out
}

fn stages(c: &mut Criterion) {
    let data = random(64 * MIB);
    let txt = text(16 * MIB);
    let key = MasterKey::generate();
    let recipients = Recipients::parse(&[key.recipient()]).unwrap();

    let mut g = c.benchmark_group("stages");
    g.sample_size(10);

    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("chunking (FastCDC 512K/1M/8M)", |b| {
        b.iter(|| {
            Chunker::new(data.as_slice(), ChunkerParams::default(), 7)
                .map(|c| c.unwrap().len())
                .sum::<usize>()
        })
    });
    g.bench_function("hashing (keyed BLAKE3)", |b| {
        b.iter(|| key.chunk().blob_id(&data))
    });

    g.throughput(Throughput::Bytes(txt.len() as u64));
    let mut enc = BlobEncoder::new(3);
    g.bench_function("compression (zstd-3, text)", |b| {
        b.iter(|| {
            let mut out = Vec::new();
            for chunk in txt.chunks(MIB) {
                enc.encode_into(chunk, &mut out);
            }
            out.len()
        })
    });
    let mut frames = Vec::new();
    for chunk in txt.chunks(MIB) {
        let mut f = Vec::new();
        enc.encode_into(chunk, &mut f);
        frames.push((f, chunk.len() as u32));
    }
    g.bench_function("decompression (zstd, text)", |b| {
        b.iter(|| {
            frames
                .iter()
                .map(|(f, n)| decode_blob(f, *n).unwrap().len())
                .sum::<usize>()
        })
    });
    g.throughput(Throughput::Bytes((16 * MIB) as u64));
    let rnd16 = &data[..16 * MIB];
    g.bench_function("compression (incompressible, stored raw)", |b| {
        b.iter(|| {
            let mut out = Vec::new();
            for chunk in rnd16.chunks(MIB) {
                enc.encode_into(chunk, &mut out);
            }
            out.len()
        })
    });
    g.bench_function("encryption (age, 16 MiB pack)", |b| {
        b.iter(|| recipients.encrypt(rnd16).len())
    });
    let ct = recipients.encrypt(rnd16);
    g.bench_function("decryption (age, 16 MiB pack)", |b| {
        b.iter(|| key.decrypt(&ct, &|| "pack".into()).unwrap().len())
    });
    g.finish();
}

criterion_group!(benches, stages);
criterion_main!(benches);
