//! `pnmctl poison ...`, `pnmctl scan-media` and `pnmctl inject
//! poison|corrupt`: the poison list, the scrub, and media faults aimed at a
//! DPA range or at chosen rows of a sequence.

use std::time::Duration;

use pnm_host::{Device, MediaFault};
use serde::Serialize;

use crate::{CliError, emit, parse_number, usage};

/// Where a media fault lands: a DPA range, or rows of a sequence.
#[derive(Debug, clap::Args)]
pub struct FaultTarget {
    /// First byte (DPA, 64-byte aligned; decimal or 0x hex).
    #[arg(long, value_parser = parse_number, conflicts_with = "seq")]
    dpa: Option<u64>,
    /// With --dpa: how many 64-byte lines.
    #[arg(long, default_value_t = 1, requires = "dpa")]
    lines: u64,
    /// The sequence whose rows to hit (with --layer, --head, --tokens).
    #[arg(long, requires_all = ["layer", "head", "tokens"])]
    seq: Option<u32>,
    #[arg(long)]
    layer: Option<u16>,
    #[arg(long)]
    head: Option<u16>,
    /// Token range, `FIRST..END` (END excluded) or one token.
    #[arg(long, value_parser = parse_tokens)]
    tokens: Option<std::ops::Range<u64>>,
    /// Hit the V rows (default: the K rows).
    #[arg(long, requires = "seq")]
    value: bool,
}

fn parse_tokens(text: &str) -> Result<std::ops::Range<u64>, String> {
    let number = |t: &str| t.trim().parse::<u64>().map_err(|e| format!("'{t}': {e}"));
    match text.split_once("..") {
        Some((a, b)) => Ok(number(a)?..number(b)?),
        None => number(text).map(|t| t..t + 1),
    }
}

impl FaultTarget {
    /// The DPA ranges (start, lines) the target names.
    fn ranges(&self, device: &Device) -> Result<Vec<(u64, u64)>, CliError> {
        if let Some(dpa) = self.dpa {
            return Ok(vec![(dpa, self.lines)]);
        }
        let (Some(seq), Some(layer), Some(head), Some(tokens)) =
            (self.seq, self.layer, self.head, self.tokens.clone())
        else {
            return Err(usage("name a target: --dpa, or --seq with --layer, --head and --tokens"));
        };
        let sequence = device.kv_sequence(seq)?;
        Ok(device.row_ranges(&sequence, layer, head, tokens, self.value)?)
    }
}

#[derive(Debug, Serialize)]
struct Injected {
    fault: &'static str,
    /// (DPA, lines) of each range hit.
    ranges: Vec<(u64, u64)>,
}

/// `pnmctl inject poison|corrupt`.
pub fn inject_media(
    json: bool,
    device: &Device,
    target: &FaultTarget,
    fault: MediaFault,
) -> Result<(), CliError> {
    let ranges = target.ranges(device)?;
    for &(dpa, lines) in &ranges {
        device.inject_media_fault(dpa, lines, fault).map_err(crate::injection_error)?;
    }
    let name = match fault {
        MediaFault::Poison => "poison",
        MediaFault::Corrupt { .. } => "corrupt",
    };
    emit(json, &Injected { fault: name, ranges }, |i| {
        i.ranges
            .iter()
            .map(|(dpa, lines)| format!("{}: DPA {dpa:#x} + {lines} lines\n", i.fault))
            .collect()
    });
    Ok(())
}

#[derive(Debug, clap::Subcommand)]
pub enum PoisonAction {
    /// Get Poison List (4300h): every poisoned range; with --seq, which of
    /// that sequence's rows they hold.
    List {
        #[arg(long)]
        seq: Option<u32>,
    },
    /// Clear Poison (4302h): the line at --dpa reads again, holding the
    /// bytes it holds now (--keep) or 64 zero bytes (--zero).
    Clear {
        #[arg(long, value_parser = parse_number)]
        dpa: u64,
        #[arg(long, conflicts_with = "zero", required_unless_present = "zero")]
        keep: bool,
        #[arg(long)]
        zero: bool,
    },
}

pub fn poison(json: bool, device: &Device, action: &PoisonAction) -> Result<(), CliError> {
    match action {
        PoisonAction::List { seq: None } => {
            let list = device.poison_list()?;
            emit(json, &list, |l| {
                let mut text = format!("{} poisoned ranges", l.records.len());
                if let Some(t) = l.overflow_timestamp {
                    text += &format!(" (the list overflowed at {t}: some errors are not listed)");
                }
                if l.scan_media_running {
                    text += " (a scan is running)";
                }
                text.push('\n');
                for r in &l.records {
                    text +=
                        &format!("  DPA {:#x} + {} lines  {}\n", r.dpa, r.lines, r.source.name());
                }
                text
            });
        }
        PoisonAction::List { seq: Some(seq) } => {
            let sequence = device.kv_sequence(*seq)?;
            let affected = device.media_errors(&sequence)?;
            emit(json, &affected, |a| {
                let mut text =
                    format!("sequence {seq}: {} ranges of rows on poisoned lines\n", a.len());
                for r in a {
                    text += &format!(
                        "  layer {} head {} {} tokens {}..{}  (DPA {:#x}, {})\n",
                        r.layer,
                        r.head,
                        if r.value { "V" } else { "K" },
                        r.tokens.start,
                        r.tokens.end,
                        r.dpa,
                        r.source.name()
                    );
                }
                text
            });
        }
        PoisonAction::Clear { dpa, keep, .. } => {
            if !dpa.is_multiple_of(64) {
                return Err(usage(format!("--dpa {dpa:#x} is not 64-byte aligned")));
            }
            let mut data = [0u8; 64];
            if *keep {
                device.read_dram(*dpa, &mut data)?;
            }
            device.clear_poison(*dpa, &data)?;
            #[derive(Serialize)]
            struct Cleared {
                dpa: u64,
                kept_bytes: bool,
            }
            emit(json, &Cleared { dpa: *dpa, kept_bytes: *keep }, |c| {
                format!("cleared DPA {:#x}\n", c.dpa)
            });
        }
    }
    Ok(())
}

/// `pnmctl scan-media`.
#[derive(Debug, clap::Args)]
pub struct ScanArgs {
    /// First byte (DPA, 64-byte aligned); default: all of device DRAM.
    #[arg(long, value_parser = parse_number, default_value = "0")]
    dpa: u64,
    /// 64-byte lines to scan (default: to the end of device DRAM).
    #[arg(long)]
    lines: Option<u64>,
    /// Add no General Media records for what the scan finds.
    #[arg(long)]
    no_event_log: bool,
    /// How long to wait for the scan, in seconds.
    #[arg(long, default_value_t = 600.0)]
    wait_s: f64,
}

pub fn scan_media(json: bool, device: &Device, args: &ScanArgs) -> Result<(), CliError> {
    let dram = device.layout().dram_size;
    let lines = args.lines.unwrap_or(dram.saturating_sub(args.dpa) / 64);
    let estimate_ms = device.scan_media_estimate(args.dpa, lines)?;
    let start = std::time::Instant::now();
    let bound = Duration::from_secs_f64(args.wait_s);
    let results = device.scan_media(args.dpa, lines, !args.no_event_log, bound)?;
    #[derive(Serialize)]
    struct Scanned {
        dpa: u64,
        lines: u64,
        estimate_ms: u32,
        took_ms: f64,
        found: Vec<pnm_host::MediaError>,
        overflow: bool,
    }
    let out = Scanned {
        dpa: args.dpa,
        lines,
        estimate_ms,
        took_ms: start.elapsed().as_secs_f64() * 1e3,
        found: results.records,
        overflow: results.overflow,
    };
    emit(json, &out, |s| {
        let mut text = format!(
            "scanned {} lines from DPA {:#x} in {:.1} ms (estimate {} ms): {} bad\n",
            s.lines,
            s.dpa,
            s.took_ms,
            s.estimate_ms,
            s.found.len()
        );
        for r in &s.found {
            text += &format!("  DPA {:#x}  {}\n", r.dpa, r.source.name());
        }
        text
    });
    Ok(())
}
