//! Submission queue entries, as a host writes them: decoding never panics,
//! and what decodes encodes back to an entry that decodes the same.

use pnm_protocol::queue::{QueueCommand, SubmissionEntry};
use zerocopy::FromBytes;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Ok((entry, _)) = SubmissionEntry::read_from_prefix(data) else { return };
        if let Ok(command) = QueueCommand::decode(&entry) {
            let again = QueueCommand::decode(&command.encode(entry.command_id.get()));
            assert_eq!(again.as_ref(), Ok(&command));
        }
    });
}
