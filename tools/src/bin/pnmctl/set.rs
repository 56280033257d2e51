//! `pnmctl set`: a KV store sharded across several devices. A sharded
//! sequence is named by its shard ids, one per device in `--devices`
//! order (`kv load` prints them, e.g. `3,1`).

use std::path::PathBuf;

use pnm_host::{DeviceSet, SetTopkRequest, ShardedSequence};

use crate::{
    AggregationArg, Cli, CliError, KvSource, device_options, emit, kv_shape_of, print_topk,
    read_kv, read_query, usage, write_rows,
};

#[derive(Debug, clap::Args)]
pub struct SetArgs {
    /// The devices' region files, comma separated, in shard order.
    #[arg(long, value_delimiter = ',', required = true)]
    devices: Vec<PathBuf>,
    #[command(subcommand)]
    action: SetAction,
}

#[derive(Debug, clap::Subcommand)]
enum SetAction {
    /// Load K and V arrays shaped [layers, kv_heads, tokens, head_dim]
    /// into a new sharded sequence; prints its shard ids.
    Load {
        #[command(flatten)]
        source: KvSource,
    },
    /// The sharded sequence: each shard, and the tokens every shard holds.
    Show {
        #[arg(long, value_delimiter = ',', required = true)]
        seq: Vec<u32>,
    },
    /// The exact Top-K over every shard.
    Topk {
        #[command(flatten)]
        stream: SetStream,
        /// Query .npy: [head_dim] or [G, head_dim].
        #[arg(long)]
        query: PathBuf,
        #[arg(short, long)]
        k: u32,
        #[arg(long, value_enum, default_value = "max")]
        aggregation: AggregationArg,
        /// Leave out (and count) tokens on bad media instead of failing.
        #[arg(long)]
        skip_bad_rows: bool,
    },
    /// K and V rows of chosen tokens (global indices), as .npy [n, head_dim].
    Gather {
        #[command(flatten)]
        stream: SetStream,
        #[arg(long, value_delimiter = ',', required = true)]
        indices: Vec<u32>,
        #[arg(long)]
        out_keys: PathBuf,
        #[arg(long)]
        out_values: PathBuf,
    },
    /// Free every shard.
    Free {
        #[arg(long, value_delimiter = ',', required = true)]
        seq: Vec<u32>,
    },
}

#[derive(Debug, clap::Args)]
struct SetStream {
    /// The shard ids, comma separated, in --devices order.
    #[arg(long, value_delimiter = ',', required = true)]
    seq: Vec<u32>,
    #[arg(long)]
    layer: u16,
    #[arg(long)]
    head: u16,
}

fn ids(seq: &ShardedSequence) -> String {
    seq.shards.iter().map(|s| s.id.to_string()).collect::<Vec<_>>().join(",")
}

/// The sharded sequence, checked to be whole and to have (layer, head).
fn stream(set: &DeviceSet, s: &SetStream) -> Result<ShardedSequence, CliError> {
    let seq = set.kv_sequence(&s.seq)?;
    if !seq.is_consistent() {
        return Err(usage(format!(
            "the shards disagree (a torn load): they hold {:?} tokens",
            seq.shards.iter().map(|s| s.tokens).collect::<Vec<_>>()
        )));
    }
    if s.layer >= seq.shape.layers || s.head >= seq.shape.heads {
        return Err(usage(format!(
            "layer {} / head {} out of range: the sequence has {} layers x {} KV heads",
            s.layer, s.head, seq.shape.layers, seq.shape.heads
        )));
    }
    Ok(seq)
}

pub fn run(cli: &Cli, args: &SetArgs) -> Result<(), CliError> {
    let set = DeviceSet::open(&args.devices, &device_options(cli))?;
    match &args.action {
        SetAction::Load { source } => {
            let (k, v) = read_kv(source)?;
            let (shape, tokens) = kv_shape_of(&k, &v)?;
            let seq = set.kv_create(shape)?;
            match set.kv_append(&seq, &k.data, &v.data, tokens) {
                Ok(loaded) => {
                    emit(cli.json, &loaded, |s| format!("{}\n", ids(s)));
                    Ok(())
                }
                Err(e) => {
                    // Leave nothing half loaded behind.
                    if let Err(free) = set.kv_free(&seq) {
                        tracing::warn!(error = %free, "could not free the shards");
                    }
                    Err(e.into())
                }
            }
        }
        SetAction::Show { seq } => {
            let seq = set.kv_sequence(seq)?;
            emit(cli.json, &seq, |s| {
                let mut out = format!(
                    "{} tokens of {}, pages of {} tokens round robin over {} devices{}\n",
                    s.tokens,
                    s.shape,
                    s.striping.stripe,
                    s.striping.devices,
                    if s.is_consistent() { "" } else { " (TORN: shards disagree)" }
                );
                for (d, shard) in s.shards.iter().enumerate() {
                    out += &format!(
                        "device {d}: sequence {} holds {} tokens\n",
                        shard.id, shard.tokens
                    );
                }
                out
            });
            Ok(())
        }
        SetAction::Topk { stream: st, query, k, aggregation, skip_bad_rows } => {
            let seq = stream(&set, st)?;
            if *k == 0 {
                return Err(usage("k must be at least 1"));
            }
            let query = read_query(query, seq.shape.head_dim)?;
            let mut request = SetTopkRequest::new(&seq, st.layer, st.head, &query, *k)
                .with_aggregation((*aggregation).into());
            if *skip_bad_rows {
                request = request.skipping_bad_rows();
            }
            let answer = set.topk(&request)?;
            let extra = serde_json::json!({
                "merge_ns": answer.merge_ns,
                "devices": answer.devices,
            });
            print_topk(cli.json, &answer.top, extra);
            Ok(())
        }
        SetAction::Gather { stream: st, indices, out_keys, out_values } => {
            let seq = stream(&set, st)?;
            if let Some(bad) = indices.iter().find(|&&i| u64::from(i) >= seq.tokens) {
                return Err(usage(format!(
                    "token {bad} out of range: the sequence has {} tokens",
                    seq.tokens
                )));
            }
            let rows = set.gather(&seq, st.layer, st.head, indices)?;
            write_rows(cli.json, rows, seq.shape, out_keys, out_values)
        }
        SetAction::Free { seq } => {
            let seq = set.kv_sequence(seq)?;
            set.kv_free(&seq)?;
            emit(cli.json, &serde_json::json!({ "freed": ids(&seq) }), |_| {
                format!("freed sequence {}\n", ids(&seq))
            });
            Ok(())
        }
    }
}
