//! Where `nvmirror serve` keeps its files, as an operator sees it: a relative data directory
//! (the default is `./nvmirror-data`) is resolved once at start and shown absolute in
//! `volume_status`, so a later `cd` or a status reader never guesses what it was relative to.

mod serve_rig;
use serve_rig::Server;

#[test]
fn a_relative_data_dir_is_resolved_at_start_and_shown_absolute_in_status() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let cwd = dir.path().canonicalize().unwrap();
    let args: Vec<String> = [
        "--data-dir",
        "./rel-data",
        "--leg",
        "file://@DATA_DIR@/primary.img?create=16MiB",
        "--leg",
        "file://@DATA_DIR@/mirror.img?create=16MiB",
    ]
    .map(String::from)
    .to_vec();
    let server = Server::spawn_in(&cwd, &args, &[]).unwrap();
    let st = server.status();
    let expected = cwd.join("rel-data");
    assert_eq!(
        st["data_dir"].as_str(),
        Some(expected.to_str().unwrap()),
        "{st}"
    );
    assert!(expected.join("primary.img").is_file());
    assert!(expected.join("mirror.img").is_file());
    server.stop();
}
