//! Rootless instances keep their images where a node's podman keeps them: on overlay, configured
//! by the user's `storage.conf` as on an NS8 node; vfs when a test asks for it.

#![allow(clippy::unwrap_used)]

mod common;

use module_updater_tests::{ImageSpec, RootlessStorage, Sandbox};

fn driver_of(sandbox: &Sandbox, instance: &module_updater_tests::Instance) -> String {
    let output = sandbox
        .podman_as(
            instance,
            &["info", "--format", "{{.Store.GraphDriverName}}"],
        )
        .unwrap();
    assert!(output.status.success(), "{}", common::text(&output.stderr));
    common::text(&output.stdout).trim().to_owned()
}

#[test]
fn rootless_instances_store_images_on_overlay_and_on_vfs_on_request() {
    let mut sandbox = Sandbox::new().unwrap();
    sandbox
        .set_rootless_storage(RootlessStorage::Overlay)
        .unwrap();
    let url = sandbox
        .build_image(&ImageSpec::module("demo", "1.0").file("README", "demo 1.0\n", 0o644))
        .unwrap();
    let overlay = sandbox.add_rootless_instance("demo").unwrap();
    let conf = overlay.install_dir.join("containers/storage.conf");
    let text = std::fs::read_to_string(&conf).unwrap();
    assert!(text.contains("driver = \"overlay\""), "{text}");
    assert_eq!(driver_of(&sandbox, &overlay), "overlay");
    sandbox.install(&overlay, &url).unwrap();
    // Where NS8's overlay clean-up looks for the layers of a rootless module.
    let layers = overlay.home.join(".local/share/containers/storage/overlay");
    let count = std::fs::read_dir(&layers).unwrap().count();
    assert!(count > 1, "{} holds {count} entries", layers.display());
    assert_eq!(
        std::fs::read_to_string(overlay.install_dir.join("README")).unwrap(),
        "demo 1.0\n"
    );

    sandbox.set_rootless_storage(RootlessStorage::Vfs).unwrap();
    let vfs = sandbox.add_rootless_instance("demo").unwrap();
    assert_eq!(driver_of(&sandbox, &vfs), "vfs");
    // The first instance keeps its driver.
    assert_eq!(driver_of(&sandbox, &overlay), "overlay");
}
