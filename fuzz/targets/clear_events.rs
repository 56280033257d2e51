//! Clear Event Records' input: decoding never panics, and what decodes
//! encodes back to the same request.

use pnm_protocol::events::ClearRequest;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Ok(request) = ClearRequest::decode(data) {
            assert_eq!(ClearRequest::decode(&request.encode()), Ok(request));
        }
    });
}
