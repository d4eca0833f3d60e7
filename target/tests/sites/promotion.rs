//! The sites of the promotion drills (`docs/promotion.md`, `docs/sites.md`): a site B that
//! can be promoted, and the old primary A coming back as B's mirror.
//!
//! B exports its leg raw as [`NQN_B`] (A mirrors onto it: the leg holds A's volume,
//! superblock and bitmap included) and declares `vol0` standby over it, its leg 0 being
//! where A exports its own leg once it rejoins ([`A_MIRROR_URI`]). `volume_promote` on B
//! serves `vol0` as [`NQN_A`] on B's address, which the host reaches over its own link.

use super::{Site, Sites, A_REPL_ADDR, B_ADDR, NQN_A, NQN_B, PORT};
use crate::serve_rig::Server;

/// The subsystem a rejoining A exports its leg as, to B.
pub const NQN_A_MIRROR: &str = "nqn.2026-11.io.nvmirror:sitea";

/// Where B's promoted volume finds A's leg: A's address facing B.
pub fn a_mirror_uri() -> String {
    format!("nvme-tcp://{A_REPL_ADDR}:{PORT}/{NQN_A_MIRROR}?kato=2s&reconnect_delay=100ms")
}

/// Leg image paths of the two sites (as [`Sites::start_a`] and [`start_b_promotable`] name
/// them).
pub fn images(sites: &Sites) -> (std::path::PathBuf, std::path::PathBuf) {
    (
        sites.legs.path().join("a-local.img"),
        sites.legs.path().join("b-local.img"),
    )
}

impl Sites {
    /// Site B, promotable: a raw `siteb` export of its file leg of `size`, and `vol0` standby
    /// with `io_timeout`.
    pub fn start_b_promotable(&self, size: &str, io_timeout: &str) -> Server {
        let d = self.dir.path().join("b");
        std::fs::create_dir_all(&d).unwrap();
        let (_, img) = images(self);
        let cfg = format!(
            "[rpc]\nsocket = \"@DATA_DIR@/nvmirror.sock\"\n\n\
             [[volume]]\nname = \"siteb\"\nbitmap = false\nlegs = [\"file://{}?create={size}\"]\n\n\
             [[volume]]\nname = \"vol0\"\nstandby = true\nio_timeout = \"{io_timeout}\"\n\
             legs = [\"{}\", \"volume://siteb\"]\n\n\
             [[subsystem]]\nnqn = \"{NQN_B}\"\nnamespaces = [\"siteb\"]\n\n\
             [[subsystem]]\nnqn = \"{NQN_A}\"\nnamespaces = [\"vol0\"]\n",
            img.display(),
            a_mirror_uri(),
        );
        self.serve(Site::B, &d, &cfg, &format!("{B_ADDR}:{PORT}"))
    }

    /// The old primary back as a mirror of B: its leg exported raw as [`NQN_A_MIRROR`] on
    /// A's address facing B.
    pub fn start_a_mirror(&self) -> Server {
        let d = self.dir.path().join("a-mirror");
        std::fs::create_dir_all(&d).unwrap();
        let (img, _) = images(self);
        let cfg = format!(
            "[rpc]\nsocket = \"@DATA_DIR@/nvmirror.sock\"\n\n\
             [[volume]]\nname = \"sitea\"\nbitmap = false\nlegs = [\"file://{}\"]\n\n\
             [[subsystem]]\nnqn = \"{NQN_A_MIRROR}\"\nnamespaces = [\"sitea\"]\n",
            img.display()
        );
        self.serve(Site::A, &d, &cfg, &format!("{A_REPL_ADDR}:{PORT}"))
    }

    /// The URI of B's promoted volume for the host.
    pub fn b_volume_uri(&self) -> String {
        format!("nvme-tcp://{B_ADDR}:{PORT}/{NQN_A}")
    }
}
