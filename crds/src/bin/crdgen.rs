//! Writes the CRD YAML into the chart (`charts/dynamo-platform/crds/`), or to the directory given
//! as the first argument. Run from anywhere: `cargo run -p dynamo-crds --bin crdgen`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = match std::env::args_os().nth(1) {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(
            std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
        )
        .join("..")
        .join(dynamo_crds::CHART_CRD_DIR),
    };
    std::fs::create_dir_all(&dir)?;
    for (file, crd) in dynamo_crds::crds() {
        let path = dir.join(file);
        std::fs::write(&path, dynamo_crds::crd_yaml(&crd)?)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
