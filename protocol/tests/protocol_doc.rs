//! Keeps docs/PROTOCOL.md in step with the code: every table marked
//! `<!-- table: NAME -->` is parsed and compared with the constants.

use pnm_protocol::commands::{self, *};
use pnm_protocol::queue::{CompletionEntry, QueueOpcode, SequenceInfo, SubmissionEntry};
use pnm_protocol::regs::{self, CAPABILITIES, MAILBOX_REGISTERS, PNM_REGISTERS};
use pnm_protocol::{Opcode, ReturnCode};

const DOC: &str = include_str!("../../docs/PROTOCOL.md");

/// The body rows of the table after `<!-- table: name -->`, cells trimmed.
fn table(name: &str) -> Vec<Vec<String>> {
    let marker = format!("<!-- table: {name} -->");
    let start = DOC.find(&marker).unwrap_or_else(|| panic!("PROTOCOL.md has no table '{name}'"));
    DOC[start + marker.len()..]
        .lines()
        .skip_while(|l| l.trim().is_empty())
        .take_while(|l| l.trim_start().starts_with('|'))
        .skip(2) // header and separator
        .map(|l| l.trim().trim_matches('|').split('|').map(|c| c.trim().replace('`', "")).collect())
        .collect()
}

/// Parses `0x1F`, `1Fh` or `31`.
fn num(cell: &str) -> u64 {
    let parsed = if let Some(hex) = cell.strip_prefix("0x") {
        u64::from_str_radix(hex, 16)
    } else if let Some(hex) = cell.strip_suffix('h') {
        u64::from_str_radix(hex, 16)
    } else {
        cell.parse()
    };
    parsed.unwrap_or_else(|_| panic!("'{cell}' is not a number"))
}

#[test]
fn capabilities_table_matches() {
    let rows = table("capabilities");
    assert_eq!(rows.len(), CAPABILITIES.len());
    for cap in CAPABILITIES {
        let row = rows
            .iter()
            .find(|r| num(&r[0]) == u64::from(cap.id))
            .unwrap_or_else(|| panic!("capability {:04X}h missing from PROTOCOL.md", cap.id));
        assert_eq!(num(&row[1]), u64::from(cap.version), "{}", cap.name);
        assert_eq!(num(&row[2]), cap.offset, "{}", cap.name);
        assert_eq!(num(&row[3]), cap.length, "{}", cap.name);
        assert_eq!(row[4], cap.name);
    }
}

fn check_registers(name: &str, defs: &[regs::RegisterDef]) {
    let rows = table(name);
    let documented: Vec<(u64, u64, &str)> =
        rows.iter().map(|r| (num(&r[0]), num(&r[1]), r[2].as_str())).collect();
    let code: Vec<(u64, u64, &str)> =
        defs.iter().map(|d| (d.offset, u64::from(d.bits), d.name)).collect();
    assert_eq!(documented, code, "table '{name}' differs from the code");
}

#[test]
fn register_tables_match() {
    check_registers("mailbox-registers", &MAILBOX_REGISTERS);
    check_registers("pnm-registers", &PNM_REGISTERS);
}

#[test]
fn opcode_table_matches() {
    let rows = table("opcodes");
    let documented: Vec<u16> = rows.iter().map(|r| num(&r[0]) as u16).collect();
    assert_eq!(documented, Opcode::ALL.map(|o| o.0), "opcodes, in CEL order");
    for (row, op) in rows.iter().zip(Opcode::ALL) {
        assert_eq!(Some(row[1].as_str()), op.name());
        assert_eq!(Some(row[2].clone()), op.input_len().map(|l| l.to_string()), "{op} input");
        if let Some(out) = commands::fixed_output_len(op) {
            assert_eq!(num(&row[3]) as usize, out, "{op} output");
        }
        assert_eq!(num(&row[4]) as u16, commands::command_effect(op), "{op} effects");
    }
}

fn check_payload(name: &str, size: usize) {
    let rows = table(name);
    let mut next = 0;
    for row in &rows {
        let (offset, len) = (num(&row[0]) as usize, num(&row[1]) as usize);
        assert_eq!(
            offset, next,
            "table '{name}': field '{}' is not where the previous one ends",
            row[2]
        );
        next = offset + len;
    }
    assert_eq!(next, size, "table '{name}' covers {next} bytes, the type has {size}");
}

#[test]
fn payload_tables_match_type_layouts() {
    check_payload("payload-supported-logs", size_of::<SupportedLogsHeader>());
    check_payload("payload-supported-log-entry", size_of::<SupportedLogEntry>());
    check_payload("payload-get-log-input", size_of::<GetLogInput>());
    check_payload("payload-identify", size_of::<IdentifyOutput>());
    check_payload("payload-health", size_of::<HealthInfoOutput>());
    check_payload("payload-identify-pnm", size_of::<IdentifyPnmOutput>());
    check_payload("payload-create-queue-pair", size_of::<CreateQueuePairInput>());
    check_payload("payload-allocate-dma", size_of::<AllocateDmaInput>());
    check_payload(
        "payload-get-event-records",
        size_of::<pnm_protocol::events::GetEventRecordsHeader>(),
    );
    check_payload("payload-event-record-header", size_of::<pnm_protocol::events::RecordHeader>());
    check_payload(
        "payload-clear-event-records",
        size_of::<pnm_protocol::events::ClearEventRecordsHeader>(),
    );
    check_payload("sqe", size_of::<SubmissionEntry>());
    check_payload("cqe", size_of::<CompletionEntry>());
    check_payload("sequence-info", size_of::<SequenceInfo>());
}

#[test]
fn queue_opcode_table_matches() {
    let rows = table("queue-opcodes");
    let documented: Vec<(u8, &str)> =
        rows.iter().map(|r| (num(&r[0]) as u8, r[1].as_str())).collect();
    let code: Vec<(u8, &str)> =
        QueueOpcode::ALL.iter().map(|op| (op.0, op.name().expect("named"))).collect();
    assert_eq!(documented, code);
}

#[test]
fn return_code_table_matches() {
    let rows = table("return-codes");
    let documented: Vec<(u16, &str)> =
        rows.iter().map(|r| (num(&r[0]) as u16, r[1].as_str())).collect();
    let code: Vec<(u16, &str)> = ReturnCode::ALL.iter().map(|(c, n)| (c.0, *n)).collect();
    assert_eq!(documented, code);
}

#[test]
fn pci_capabilities_table_matches_the_configuration_space() {
    use pnm_protocol::pci::{self, FunctionIdentity};
    let config = pci::function_config(&FunctionIdentity {
        vendor_id: pci::CXL_VENDOR_ID,
        device_id: 1,
        serial: 0,
        region_size: 1 << 30,
        memory_size: 1 << 29,
        vectors: 8,
    });
    let rows = table("pci-capabilities");
    let offsets: Vec<usize> = rows.iter().map(|r| num(&r[0]) as usize).collect();
    assert_eq!(
        offsets,
        [
            pci::PCIE_CAP_OFFSET,
            pci::MSIX_CAP_OFFSET,
            pci::DSN_OFFSET,
            pci::CXL_DVSEC_OFFSET,
            pci::REGLOC_OFFSET
        ]
    );
    for row in &rows {
        let at = num(&row[0]) as usize;
        // The id in parentheses: "(10h)", "(0023h)".
        let id = row[1].split('(').nth(1).and_then(|r| r.split(')').next()).expect("an id");
        let found = if at < 0x100 { u64::from(config.bytes[at]) } else { config.read(at, 2) };
        assert_eq!(found, num(id), "capability at {at:#x}");
        if id == "0023h" {
            let dvsec_id =
                row[1].split(" id ").nth(1).and_then(|r| r.split(':').next()).expect("a DVSEC id");
            assert_eq!(config.read(at + 8, 2), num(dvsec_id), "DVSEC id at {at:#x}");
            assert_eq!(config.read(at + 4, 2), u64::from(pci::CXL_VENDOR_ID));
        }
    }
}

#[test]
fn pci_bars_table_matches() {
    use pnm_protocol::pci;
    let rows = table("pci-bars");
    let documented: Vec<(u32, String)> =
        rows.iter().map(|r| (num(&r[0]) as u32, r[1].clone())).collect();
    let code = vec![
        (pci::IVSHMEM_BAR, pci::IVSHMEM_BAR_SIZE.to_string()),
        (pci::MSIX_BAR, pci::MSIX_BAR_SIZE.to_string()),
        (pci::REGION_BAR, "region size".to_string()),
        (pci::FUNCTION_BAR, pci::FUNCTION_BAR_SIZE.to_string()),
    ];
    assert_eq!(documented, code);
}

#[test]
fn vfio_user_commands_table_lists_what_the_decoder_serves() {
    use pnm_protocol::vfio_user::{Header, Request, WireError};
    let rows = table("vfio-user-commands");
    let documented: Vec<u16> = rows.iter().map(|r| num(&r[0]) as u16).collect();
    let served: Vec<u16> = (0..=32u16)
        .filter(|&c| {
            let header =
                Header { command: c.into(), message_size: 16.into(), ..Default::default() };
            !matches!(Request::decode(&header, &[]), Err(WireError::Unsupported(_)))
        })
        .collect();
    assert_eq!(documented, served);
}
