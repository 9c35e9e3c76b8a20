//! The pipeline loader must never panic: any text is either a pipeline or errors.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = Path::new("fuzz.yaml");
    if let Ok(p) = taper::spec::load_str(file, text, &[]) {
        for s in &p.stages {
            let _ = taper::stages::configure(file, s);
        }
        if let Ok(dag) = taper::plan::Dag::build(&p) {
            assert_eq!(dag.order.len(), p.stages.len());
        }
    }
});
