//! The netlink reply parser used by `qnbd -c`/`-d`: any datagram is parsed or refused, never trusted.
#![no_main]
use libfuzzer_sys::fuzz_target;
use nbd_server::kernel::netlink;

fuzz_target!(|data: &[u8]| {
    if let Some(replies) = netlink::parse(data) {
        assert!(replies.len() <= data.len() / 16 + 1);
        for r in replies {
            if let netlink::Reply::Genl { attrs, .. } = r {
                let _ = netlink::family_id(&attrs);
                for k in 0..10 {
                    let _ = netlink::find_attr(&attrs, k).map(|a| netlink::find_attr(a, 1));
                }
            }
        }
    }
    let _ = netlink::find_attr(data, 1);
});
