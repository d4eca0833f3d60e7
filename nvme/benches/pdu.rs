//! Building and parsing the NVMe/TCP PDUs of the I/O path with the shared PDU layer
//! (`spec::tcp::build`, `spec::tcp::parse_pdu`), as the initiator and the target use it:
//! a command capsule with 4 KiB of in-capsule write data, a response capsule, and H2CData and
//! C2HData PDUs of 4 KiB — each without digests and with header and data digests (CRC32C).
//! Criterion's time is per PDU; throughput counts the data bytes.
//!
//! Run with `cargo bench -p nvmirror-nvme --bench pdu`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use nvmirror_nvme::spec::tcp::{
    self, flags, parse_pdu, DataPdu, Digests, Pdu, PduLimits, PduType, Role,
};
use nvmirror_nvme::spec::{CompletionQueueEntry, NvmOpcode, SubmissionQueueEntry};

const DATA: usize = 4096;

fn limits(dg: Digests) -> PduLimits {
    PduLimits {
        hdgst: dg.hdgst,
        ddgst: dg.ddgst,
        max_icdata: DATA as u32,
        maxh2cdata: DATA as u32,
        max_c2hdata: DATA as u32,
    }
}

fn write_sqe() -> SubmissionQueueEntry {
    let mut sqe = SubmissionQueueEntry {
        opcode: NvmOpcode::Write as u8,
        cid: 7,
        nsid: 1,
        ..Default::default()
    };
    sqe.set_lba_range(4096, 8);
    nvmirror_nvme::spec::fabrics::sgl_in_capsule(&mut sqe, DATA as u32);
    sqe
}

fn data_pdu(ty: PduType) -> DataPdu {
    DataPdu {
        ty,
        flags: flags::LAST_PDU,
        cccid: 7,
        ttag: 1,
        datao: 0,
        datal: DATA as u32,
    }
}

/// Parses `pdu` and checks it is whole and of the expected kind.
#[inline]
fn parse(pdu: &[u8], role: Role, lim: &PduLimits) -> usize {
    match parse_pdu(black_box(pdu), role, lim) {
        Ok(Some((p, n))) => {
            let ok = match p {
                Pdu::CapsuleCmd { ddgst_ok, .. }
                | Pdu::H2CData { ddgst_ok, .. }
                | Pdu::C2HData { ddgst_ok, .. } => ddgst_ok,
                Pdu::CapsuleResp(_) => true,
                _ => false,
            };
            assert!(ok, "digest mismatch or unexpected PDU");
            n
        }
        other => panic!("{other:?}"),
    }
}

fn pdus(c: &mut Criterion) {
    let mut g = c.benchmark_group("pdu");
    g.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    let data = vec![0x5au8; DATA];
    let sqe = write_sqe();
    let cqe = CompletionQueueEntry {
        cid: 7,
        ..Default::default()
    };
    for (name, dg) in [
        ("no_digest", Digests::default()),
        (
            "hdgst_ddgst",
            Digests {
                hdgst: true,
                ddgst: true,
            },
        ),
    ] {
        let lim = limits(dg);
        let mut out = vec![0u8; tcp::capsule_cmd_len(DATA, dg) + 64];

        g.throughput(Throughput::Bytes(DATA as u64));
        g.bench_function(format!("build/capsule_cmd_4k/{name}"), |b| {
            b.iter(|| tcp::write_capsule_cmd(&mut out, black_box(&sqe), black_box(&data), dg))
        });
        let n = tcp::write_capsule_cmd(&mut out, &sqe, &data, dg);
        let pdu = out[..n].to_vec();
        g.bench_function(format!("parse/capsule_cmd_4k/{name}"), |b| {
            b.iter(|| parse(&pdu, Role::Controller, &lim))
        });

        for (ty, role, label) in [
            (PduType::H2CData, Role::Controller, "h2c_data_4k"),
            (PduType::C2HData, Role::Host, "c2h_data_4k"),
        ] {
            let d = data_pdu(ty);
            g.bench_function(format!("build/{label}/{name}"), |b| {
                b.iter(|| tcp::write_data_pdu(&mut out, black_box(&d), black_box(&data), dg))
            });
            let n = tcp::write_data_pdu(&mut out, &d, &data, dg);
            let pdu = out[..n].to_vec();
            g.bench_function(format!("parse/{label}/{name}"), |b| {
                b.iter(|| parse(&pdu, role, &lim))
            });
        }

        g.throughput(Throughput::Elements(1));
        g.bench_function(format!("build/capsule_resp/{name}"), |b| {
            b.iter(|| tcp::write_capsule_resp(&mut out, black_box(&cqe), dg))
        });
        let n = tcp::write_capsule_resp(&mut out, &cqe, dg);
        let pdu = out[..n].to_vec();
        g.bench_function(format!("parse/capsule_resp/{name}"), |b| {
            b.iter(|| parse(&pdu, Role::Host, &lim))
        });
    }
    g.finish();
}

criterion_group!(benches, pdus);
criterion_main!(benches);
