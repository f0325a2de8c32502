//! The test-suite assertion catching the incident before it ships: a unit test of the demo's
//! indexing code with `assert_no_large_allocs`. Growing the map resizes into ever larger tables
//! and trips the limit, naming the inserting function; the fix (reserving up front) allocates
//! once, before the code under test, and passes.

#[path = "../examples/freeze_demo.rs"]
#[allow(dead_code)]
mod demo;

use std::collections::HashMap;

/// 3.7M documents: the growing map's last resize builds a 136 MiB table.
const DOCS: u64 = 3_700_000;
const LIMIT: usize = 128 << 20;

#[test]
#[should_panic(expected = "inside assert_no_large_allocs:")]
fn indexing_into_a_growing_map_trips_the_limit() {
    let hb = freezetrap::Heartbeat::new("test-indexer");
    let mut index = HashMap::new();
    freezetrap::assert_no_large_allocs(LIMIT, || demo::index_documents(&mut index, 0, DOCS, &hb));
}

#[test]
fn the_panic_names_the_resize_and_the_inserting_function() {
    let hb = freezetrap::Heartbeat::new("test-indexer");
    let err = std::panic::catch_unwind(|| {
        let mut index = HashMap::new();
        freezetrap::assert_no_large_allocs(LIMIT, || {
            demo::index_documents(&mut index, 0, DOCS, &hb)
        });
    })
    .expect_err("the resize must be caught");
    let msg = err.downcast_ref::<String>().unwrap();
    assert!(
        msg.contains("142606352 bytes (136.00 MiB) at catch_the_resize::demo::index_documents ("),
        "{msg}"
    );
}

#[test]
fn the_fix_reserves_outside_the_hot_path_and_passes() {
    let hb = freezetrap::Heartbeat::new("test-indexer");
    let mut index = HashMap::with_capacity(DOCS as usize); // reserved at start-up, on purpose
    freezetrap::assert_no_large_allocs(LIMIT, || demo::index_documents(&mut index, 0, DOCS, &hb));
    assert_eq!(index.len(), DOCS as usize);
}
