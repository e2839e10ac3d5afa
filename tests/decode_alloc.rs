//! What reading a request allocates, measured by a counting allocator (its own test binary, so
//! nothing else runs in the process while a measurement is taken).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use tuplespace::wire::client::{Command, command_of, pair_from_raw, parse_request};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// One measurement at a time (tests run on parallel threads).
static MEASURE: Mutex<()> = Mutex::new(());

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static A: Counting = Counting;

/// Peak bytes allocated (above what was live before) while `f` runs, and its result.
fn peak_of<T>(f: impl FnOnce() -> T) -> (usize, T) {
    let _one = MEASURE.lock().unwrap_or_else(|e| e.into_inner());
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let r = f();
    (PEAK.load(Ordering::Relaxed) - base, r)
}

fn request(op: &str, args: &[u8]) -> Vec<u8> {
    let mut b = vec![0xa3, 0x62, b'i', b'd', 0x01, 0x62, b'o', b'p'];
    b.push(0x60 | op.len() as u8);
    b.extend(op.as_bytes());
    b.extend([0x64, b'a', b'r', b'g', b's']);
    b.extend(args);
    b
}

/// An array of `n` one-byte integers.
fn items(n: u32) -> Vec<u8> {
    let mut b = vec![0x9a];
    b.extend(n.to_be_bytes());
    b.extend(std::iter::repeat_n(0x01, n as usize));
    b
}

#[test]
fn a_put_of_a_million_items_allocates_about_its_size() {
    // One element nesting a million items: a CBOR value tree of it takes 32 MB.
    let body = request("PUT", &[&[0x81][..], &items(1_000_000)].concat());
    let (peak, cmd) = peak_of(|| command_of(parse_request(&body).unwrap(), 100_000).unwrap());
    println!("{} byte PUT: peak {peak} bytes allocated", body.len());
    assert!(
        peak < body.len() + 4096,
        "peak {peak} for {} bytes",
        body.len()
    );
    let Command::Put(elems) = cmd else { panic!() };
    let limits = tuplespace::space::TupleLimits::default();
    let (peak, pair) = peak_of(|| pair_from_raw(&elems[0], &limits));
    assert_eq!(pair, None);
    assert_eq!(peak, 0, "reading an ill-formed element allocates nothing");

    // A million elements: refused from the array header.
    let body = request("PUT", &items(1_000_000));
    let (peak, r) = peak_of(|| command_of(parse_request(&body).unwrap(), 100_000));
    assert!(r.is_err());
    assert!(peak < body.len() + 4096, "peak {peak}");

    // 100,000 well-formed pairs (the most one PUT may carry): the bytes plus 32 per element.
    let mut args = vec![0x9a];
    args.extend(100_000u32.to_be_bytes());
    for _ in 0..100_000 {
        args.extend([0x82, 0x81, 0x61, b'k', 0x81, 0x61, b'v']);
    }
    let body = request("PUT", &args);
    let (peak, cmd) = peak_of(|| command_of(parse_request(&body).unwrap(), 100_000).unwrap());
    println!(
        "{} byte PUT of 100,000 pairs: peak {peak} bytes",
        body.len()
    );
    assert!(peak <= body.len() + 100_000 * 32 + 4096, "peak {peak}");
    assert!(cmd.mem_bytes() >= peak - 4096);
}
