//! Where `nvmirror serve` keeps and may create files, as an operator sees it: a relative data
//! directory (the default is `./nvmirror-data`) is resolved once at start and shown absolute in
//! `volume_status`, and `leg_add` opens or creates `file://` legs only inside `[rpc] leg_dirs`
//! (by default the data directory and the configured legs' directories).

mod serve_rig;
use serve_rig::{file_leg, Server};

fn leg_add(server: &Server, uri: &str) -> (bool, String) {
    server.rpc("leg_add", &format!(r#"{{"volume":"vol0","uri":"{uri}"}}"#))
}

#[test]
fn leg_add_creates_file_legs_only_inside_the_default_leg_dirs() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let root = dir.path().canonicalize().unwrap();
    let (data, legs, outside) = (root.join("data"), root.join("legs"), root.join("outside"));
    for d in [&data, &legs, &outside] {
        std::fs::create_dir_all(d).unwrap();
    }
    let server = Server::with_legs(&data, &[file_leg(&legs, "leg0", "16MiB")], &[]);
    // Outside, and `..` out of an allowed directory: refused, naming the field and the
    // allowed directories, and nothing is created.
    for uri in [
        file_leg(&outside, "x", "16MiB"),
        format!("file://{}/../outside/y.img?create=16MiB", legs.display()),
    ] {
        let (ok, err) = leg_add(&server, &uri);
        assert!(!ok, "{uri} was accepted");
        assert!(err.contains("uri") && err.contains("leg_dirs"), "{err}");
        assert!(
            err.contains(&data.display().to_string()) && err.contains(&legs.display().to_string()),
            "{err}"
        );
    }
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    // Beside the configured leg, and in the data directory: accepted.
    let st = server.rpc_ok(
        "leg_add",
        &format!(
            r#"{{"volume":"vol0","uri":"{}"}}"#,
            file_leg(&legs, "leg1", "16MiB")
        ),
    );
    assert_eq!(st["legs"].as_array().unwrap().len(), 2, "{st}");
    server.wait_in_sync();
    let st = server.rpc_ok(
        "leg_add",
        &format!(
            r#"{{"volume":"vol0","uri":"{}"}}"#,
            file_leg(&data, "leg2", "16MiB")
        ),
    );
    assert_eq!(st["legs"].as_array().unwrap().len(), 3, "{st}");
    server.wait_in_sync();
    server.stop();
}

#[test]
fn a_configured_leg_dirs_list_replaces_the_default() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let root = dir.path().canonicalize().unwrap();
    let (data, extra) = (root.join("data"), root.join("extra"));
    std::fs::create_dir_all(&data).unwrap();
    std::fs::create_dir_all(&extra).unwrap();
    let config = root.join("nvmirror.toml");
    std::fs::write(
        &config,
        format!(
            r#"data_dir = "{}"
[rpc]
socket = "@DATA_DIR@/nvmirror.sock"
leg_dirs = ["{}"]
[[volume]]
name = "vol0"
legs = ["{}"]
[[subsystem]]
nqn = "{}"
namespaces = ["vol0"]
"#,
            data.display(),
            extra.display(),
            file_leg(&data, "leg0", "16MiB"),
            serve_rig::NQN,
        ),
    )
    .unwrap();
    let args = vec!["--config".to_string(), config.display().to_string()];
    let server = Server::spawn(&args, &[]).unwrap();
    let (ok, err) = leg_add(&server, &file_leg(&data, "leg1", "16MiB"));
    assert!(
        !ok && err.contains("leg_dirs") && err.contains(&extra.display().to_string()),
        "{err}"
    );
    let st = server.rpc_ok(
        "leg_add",
        &format!(
            r#"{{"volume":"vol0","uri":"{}"}}"#,
            file_leg(&extra, "leg1", "16MiB")
        ),
    );
    assert_eq!(st["legs"].as_array().unwrap().len(), 2, "{st}");
    server.wait_in_sync();
    server.stop();
}

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
