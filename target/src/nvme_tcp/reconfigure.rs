//! Run-time changes of what a target serves: listeners (ports), subsystems and namespaces.
//! Each runs on the control path under the table locks of [`TargetShared`]; a subsystem
//! that changes gets a new generation in its slot (see `subsystem`), and every change moves
//! the discovery log's generation counter.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use nvmirror_nvme::spec::ana::AnaState;
use nvmirror_nvme::BlockDevice;

use super::subsystem::{
    padded, read, write, Namespace, Subsystem, SubsystemRef, TargetShared, MAX_PORTS,
};
use super::SubsystemConfig;

impl TargetShared {
    /// Records a new bound listener whose groups start in `state`; its port index, or an
    /// error when the target has had [`MAX_PORTS`] listeners.
    pub fn add_port(&self, addr: SocketAddr, state: AnaState) -> Result<usize, String> {
        let mut ports = write(&self.ports);
        if ports.len() >= MAX_PORTS {
            return Err(format!(
                "a target has at most {MAX_PORTS} listeners over its life"
            ));
        }
        let port = ports.len();
        for s in self.subsystems().iter() {
            for g in 1..=s.ana.groups() {
                s.ana.set(port, g, state);
            }
        }
        ports.push(Some(addr));
        write(&self.port_states).push(state);
        drop(ports);
        self.bump_generation();
        Ok(port)
    }

    /// Forgets the listener of port `port` and tears down the controllers connected
    /// through it (their hosts reconnect through another port).
    pub fn remove_port(&self, port: usize) {
        if let Some(p) = write(&self.ports).get_mut(port) {
            *p = None;
        }
        let t = self.controllers.lock().unwrap_or_else(|e| e.into_inner());
        for ctrl in t.live.values().filter(|c| c.port == port) {
            ctrl.tear_down();
        }
        drop(t);
        self.bump_generation();
    }

    /// Starts serving a new subsystem.
    pub fn add_subsystem(&self, cfg: &SubsystemConfig) -> Result<(), String> {
        let defaults = padded(&read(&self.port_states));
        let mut subs = write(&self.subsystems);
        if subs.iter().flatten().any(|s| s.nqn == cfg.nqn) {
            return Err(format!("subsystem '{}' exists", cfg.nqn));
        }
        subs.push(Some(Arc::new(Subsystem::new(cfg, &defaults)?)));
        drop(subs);
        self.bump_generation();
        Ok(())
    }

    /// Controllers of `r` alive now.
    pub fn controllers_of(&self, r: SubsystemRef) -> usize {
        let t = self.controllers.lock().unwrap_or_else(|e| e.into_inner());
        t.live.values().filter(|c| c.subsys == r).count()
    }

    /// Stops serving subsystem `nqn`; its controllers are torn down.
    pub fn remove_subsystem(&self, nqn: &str) -> Result<(), String> {
        let r = self
            .find_subsystem(nqn)
            .filter(|r| *r != SubsystemRef::Discovery)
            .ok_or_else(|| format!("no subsystem '{nqn}'"))?;
        if let SubsystemRef::Nvm(i) = r {
            write(&self.subsystems)[i] = None;
        }
        let t = self.controllers.lock().unwrap_or_else(|e| e.into_inner());
        for ctrl in t.live.values().filter(|c| c.subsys == r) {
            ctrl.tear_down();
        }
        drop(t);
        self.bump_generation();
        Ok(())
    }

    /// Adds `dev` to subsystem `nqn` as its next NSID (returned). Controllers connected now
    /// are told (Namespace Attribute notice) and see it once they reconnect.
    pub fn add_namespace(&self, nqn: &str, dev: Arc<dyn BlockDevice>) -> Result<u32, String> {
        let defaults = padded(&read(&self.port_states));
        let mut subs = write(&self.subsystems);
        let (i, cur) = subs
            .iter()
            .enumerate()
            .find_map(|(i, s)| {
                s.as_ref()
                    .filter(|s| s.nqn == nqn)
                    .map(|s| (i, Arc::clone(s)))
            })
            .ok_or_else(|| format!("no subsystem '{nqn}'"))?;
        let nsid = cur.namespaces.len() as u32 + 1;
        if dev.geometry().lba_size > self.cfg.max_transfer() {
            return Err(format!("{}: block larger than MDTS", dev.name()));
        }
        let ns = Namespace::open(&dev, nqn, nsid, cur.reservation_dir.as_deref())?;
        let mut namespaces = cur.namespaces.clone();
        namespaces.push(Some(Arc::new(ns)));
        subs[i] = Some(Arc::new(cur.with_namespaces(namespaces, &defaults)));
        drop(subs);
        self.bump_generation();
        self.namespace_changed(SubsystemRef::Nvm(i), nsid);
        Ok(nsid)
    }

    /// Removes namespace `nsid` of subsystem `nqn`: from now on its commands fail with
    /// Invalid Namespace on every controller, which are told (Namespace Attribute notice).
    /// Returns the device it exported.
    pub fn remove_namespace(&self, nqn: &str, nsid: u32) -> Result<Arc<dyn BlockDevice>, String> {
        let defaults = padded(&read(&self.port_states));
        let mut subs = write(&self.subsystems);
        let (i, cur) = subs
            .iter()
            .enumerate()
            .find_map(|(i, s)| {
                s.as_ref()
                    .filter(|s| s.nqn == nqn)
                    .map(|s| (i, Arc::clone(s)))
            })
            .ok_or_else(|| format!("no subsystem '{nqn}'"))?;
        let k = (nsid as usize)
            .checked_sub(1)
            .filter(|&k| cur.namespace_at(k).is_some())
            .ok_or_else(|| format!("{nqn} has no namespace {nsid}"))?;
        let mut namespaces = cur.namespaces.clone();
        let ns = namespaces[k].take().expect("checked above");
        ns.removed.store(true, Ordering::Release);
        subs[i] = Some(Arc::new(cur.with_namespaces(namespaces, &defaults)));
        drop(subs);
        self.bump_generation();
        self.namespace_changed(SubsystemRef::Nvm(i), nsid);
        Ok(Arc::clone(&ns.dev))
    }
}
