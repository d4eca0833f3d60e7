//! The volumes fio's threads share: one per distinct set of legs, opened by the first thread
//! that names it and closed when the last one lets go (`numjobs=N` runs N queue pairs on one
//! volume, as SPDK's fio plugin runs N channels on one bdev).

use std::sync::{Arc, Mutex, Weak};

use nvmirror_bench::Target;

/// A mirrored volume (or a single leg) opened for fio.
#[derive(Debug)]
pub struct Device {
    pub(crate) target: Target,
    /// The legs it was opened from, one URI a line, and whether they were formatted.
    key: (String, bool),
}

/// Open volumes, by their legs. Only open and close take the lock (never the I/O path).
static OPEN: Mutex<Vec<Weak<Device>>> = Mutex::new(Vec::new());

impl Device {
    /// The volume of `legs` (URIs, one a line; blank lines ignored): the one already open on
    /// the same legs, or a new one. With `bitmap` the legs are formatted as a persistent
    /// volume with a write-intent bitmap. Errors say which leg or flag was refused.
    pub fn open(legs: &str, bitmap: bool) -> Result<Arc<Self>, String> {
        let uris: Vec<String> = legs
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        if uris.is_empty() {
            return Err(
                "no legs: give --leg=URI once per leg (mem://1GiB, file:///path, …)".into(),
            );
        }
        let key = (uris.join("\n"), bitmap);
        let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
        open.retain(|w| w.strong_count() > 0);
        if let Some(d) = open.iter().filter_map(Weak::upgrade).find(|d| d.key == key) {
            return Ok(d);
        }
        let target = nvmirror_bench::open_target(&uris, bitmap).map_err(|e| e.to_string())?;
        let d = Arc::new(Self { target, key });
        open.push(Arc::downgrade(&d));
        Ok(d)
    }

    /// Exported bytes.
    pub fn size(&self) -> u64 {
        let g = self.target.device.geometry();
        g.num_blocks * u64::from(g.lba_size)
    }

    /// Logical block size in bytes.
    pub fn lba_size(&self) -> u32 {
        self.target.device.geometry().lba_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_naming_the_same_legs_share_one_volume() {
        let legs = "mem://8MiB\nmem://8MiB\n";
        let a = Device::open(legs, false).unwrap();
        let b = Device::open(" mem://8MiB\n\nmem://8MiB", false).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert!(a.target.volume.is_some(), "two legs make a mirrored volume");
        assert_eq!(a.size(), 8 << 20);
        let c = Device::open("mem://4MiB", false).unwrap();
        assert!(!Arc::ptr_eq(&a, &c));
        assert!(c.target.volume.is_none(), "one leg is driven as itself");
        drop((a, b));
        let again = Device::open(legs, false).unwrap();
        assert_eq!(
            Arc::strong_count(&again),
            1,
            "the last close dropped the old one"
        );
    }

    #[test]
    fn bad_legs_say_what_is_wrong() {
        let e = Device::open("\n \n", false).unwrap_err();
        assert!(e.contains("--leg="), "{e}");
        let e = Device::open("mem://8MiB\nbogus://x", false).unwrap_err();
        assert!(e.contains("bogus://x"), "{e}");
    }
}
