//! What each JSON-RPC method takes, for `rpc_get_methods {"detail": true}` (SPDK's
//! `rpc_get_methods` lists names only; that stays the default).

use serde_json::{json, Value};

/// `(method, parameters, what it does)`; parameters as `name: type` (`?` optional).
pub const METHOD_DOCS: &[(&str, &str, &str)] = &[
    ("bdev_get_bdevs", "name?: string, timeout?: ms (ignored)", "SPDK shape: every volume as a bdev"),
    ("leg_add", "volume: string, uri: string", "Add a leg and resync it (file:// legs only inside [rpc] leg_dirs)"),
    ("leg_attach", "volume: string, leg: int", "Resync a faulted or detached leg back in"),
    ("cluster_resign", "force?: bool", "The active node of a [cluster] pair hands the volume to its peer: it stops serving (ANA inaccessible, no more acknowledgements) and releases the key, which the standby takes; refused while a leg is not in sync unless force"),
    ("leg_set_mode", "volume: string, leg: int, mode: sync|async-journal|async-cycle, timeout_s?: number", "Switch a leg with a journal between sync and its asynchronous mode (to sync: drains the journal first, 30 s by default)"),
    ("cycle_now", "volume: string, leg?: int, timeout_s?: number", "End the open cycle of the volume's async-cycle legs now and wait until each far image holds every write acknowledged before the call (30 s by default)"),
    ("leg_detach", "volume: string, leg: int", "Take a leg out (never the last in sync)"),
    ("leg_fault_clear", "volume: string, leg: int, id?: int", "Clear one injected fault, or all"),
    ("leg_fault_inject", "volume: string, leg: int, fault: gone|hang|fail_reads|fail_writes|fail_after, slba?: int, nlb?: int, n?: int, status?: int", "Arm a fault on a leg"),
    ("leg_remove", "volume: string, leg: int", "Remove a leg for good"),
    ("listener_add", "listen: addr, ana_state?: string", "Bind one more NVMe/TCP listener (live configuration)"),
    ("listener_list", "", "Listeners and their ANA states"),
    ("listener_remove", "listen: addr", "Close a listener added after the first"),
    ("listener_set_ana_state", "listener: addr, group: int, state: string, nqn?: string", "Set a group's ANA state through a listener"),
    ("namespace_add", "nqn: string, volume: string", "Export a volume as the next NSID"),
    ("namespace_remove", "nqn: string, nsid?: int, volume?: string", "Stop exporting a namespace (its I/O fails with Invalid Namespace)"),
    ("nvmf_get_subsystems", "nqn?: string, tgt_name?: string (ignored)", "SPDK shape: discovery and NVM subsystems"),
    ("resync_cancel", "volume: string", "Cancel the running resync"),
    ("resync_pause", "volume: string", "Pause the running resync"),
    ("resync_resume", "volume: string", "Resume a paused resync"),
    ("resync_set_rate", "volume: string, max_rate?: bytes/s or \"200MiB\", adaptive?: bool", "Limit the resync rate"),
    ("rpc_get_methods", "detail?: bool, current?: bool (ignored)", "List the methods"),
    ("save_config", "path?: string", "Write the live configuration as TOML, or return it"),
    ("spdk_get_version", "", "SPDK shape: version and git commit"),
    ("stats", "", "Every volume's status and the reactors' load"),
    ("subsystem_add_host", "nqn: string, host: string", "Allow a host NQN"),
    ("subsystem_create", "nqn: string, serial?: string, model?: string, allowed_hosts?: [string], namespaces?: [string], host?: [{nqn, dhchap_secret?, dhchap_ctrl_secret?}]", "Serve a new NVM subsystem"),
    ("subsystem_delete", "nqn: string, force?: bool", "Stop serving a subsystem (force disconnects its hosts)"),
    ("subsystem_remove_host", "nqn: string, host: string", "Disallow a host NQN"),
    ("test_reactor_panic", "reactor?: int", "Test hook (NVMIRROR_TEST_HOOKS=1)"),
    ("test_reactor_stall", "reactor?: int", "Test hook (NVMIRROR_TEST_HOOKS=1)"),
    ("verify_start", "volume: string, repair?: bool", "Scrub the in-sync legs"),
    ("verify_status", "volume: string", "Progress of the latest verify"),
    ("volume_create", "name: string, legs: [uri], region_size?, read_policy?, io_timeout?, bitmap?: bool, auto_resync?: bool", "Open or format legs and serve a volume"),
    ("volume_delete", "name: string", "Close a volume no namespace exports"),
    ("volume_list", "", "Volumes, capacity and legs in sync"),
    ("volume_promote", "name: string", "Opens a standby volume from this site's legs, raises its epoch, preempts the old primary and serves it"),
    ("volume_status", "volume: string", "One volume's legs, bitmap and resync"),
];

/// The detailed entry of `name` (an undocumented method says so).
pub fn describe(name: &str) -> Value {
    match METHOD_DOCS.iter().find(|d| d.0 == name) {
        Some((_, params, summary)) => json!({"name": name, "params": params, "summary": summary}),
        None => json!({"name": name, "params": null, "summary": null}),
    }
}
