//! Checks a leg image against the verifying writer's ledger (`nvmirror-bench
//! --verify-ledger`, docs/bench.md): every write the writer saw acknowledged must be there.

use std::path::Path;

/// One acknowledged write: the block's LBA, its generation and the writer's seed.
#[derive(Clone, Copy, Debug)]
pub struct Acked {
    pub lba: u64,
    pub generation: u64,
    pub seed: u64,
}

/// Reads a ledger file (`# lba generation seed`, then one line per block).
pub fn read(path: &Path) -> Vec<Acked> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("ledger {}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let f: Vec<u64> = l
                .split_whitespace()
                .map(|x| x.parse().unwrap_or_else(|_| panic!("ledger line '{l}'")))
                .collect();
            assert_eq!(f.len(), 3, "ledger line '{l}'");
            Acked {
                lba: f[0],
                generation: f[1],
                seed: f[2],
            }
        })
        .collect()
}

fn word(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Checks every acknowledged block in the image (data from byte `data_offset`, 512-byte
/// blocks): the stamp is whole (magic, CRC32C), names its LBA and the writer's seed, and
/// holds the acknowledged generation or a later one (a write in flight when the writer's
/// target died may have landed unacknowledged). The blocks checked, or the first failures.
pub fn check_image(image: &Path, data_offset: u64, acked: &[Acked]) -> Result<usize, String> {
    let data = std::fs::read(image).unwrap();
    let mut bad = Vec::new();
    for a in acked {
        let at = (data_offset + a.lba * 512) as usize;
        let b = &data[at..at + 512];
        let why = if &b[0..4] != b"NVMB" {
            Some("no stamp".to_string())
        } else if u32::from_le_bytes(b[4..8].try_into().unwrap()) != crc32c::crc32c(&b[8..]) {
            Some("CRC32C does not match".into())
        } else if word(b, 8) != a.lba {
            Some(format!("stamp names LBA {}", word(b, 8)))
        } else if word(b, 24) != a.seed {
            Some(format!("seed {}", word(b, 24)))
        } else if word(b, 16) < a.generation {
            Some(format!(
                "generation {}, acknowledged {}",
                word(b, 16),
                a.generation
            ))
        } else {
            None
        };
        if let Some(why) = why {
            bad.push(format!("LBA {}: {why}", a.lba));
        }
    }
    if bad.is_empty() {
        Ok(acked.len())
    } else {
        Err(format!(
            "{} of {} acknowledged blocks wrong in {}; first: {}",
            bad.len(),
            acked.len(),
            image.display(),
            bad[..bad.len().min(5)].join("; ")
        ))
    }
}
