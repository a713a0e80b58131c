//! The committed CRD YAML in the chart must be what the types generate.

use std::path::PathBuf;

#[test]
fn committed_crd_yaml_matches_the_types() {
    let dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
            .join("..")
            .join(dynamo_crds::CHART_CRD_DIR);
    for (file, crd) in dynamo_crds::crds() {
        let path = dir.join(file);
        let want = dynamo_crds::crd_yaml(&crd).expect("CRD serializes");
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "{} is stale or missing: run `cargo run -p dynamo-crds --bin crdgen` and commit the result",
            path.display()
        );
    }
}
