//! The main job with `--hot-window`: KV tiering, evict instead of drop.
//!
//! The newest `--hot-window` tokens and the first `--sinks` stay in host
//! memory (standing in for HBM); everything older is evicted into the
//! device set. Each decode step appends a token (evicting a page's worth
//! when the window overflows) and, per (layer, KV head), computes
//! attention exactly over the host tokens plus the device set's Top-K rows
//! of the evicted part, under one softmax. Against full attention over
//! every token it reports recall of the exact Top-K of the evicted part,
//! the attention output's error, and beside it the error of plain Top-K
//! attention at the same k (what a single device's Top-K over every token
//! gives); and the bytes over the link against streaming the evicted part.

use std::time::Instant;

use pnm_host::{Device, DeviceSet, TieredKv, TieredOptions};
use serde::Serialize;

use crate::{
    Args, Cache, attend, decode, exact_topk, mean_rel, next_token, progress, rel_text, step_queries,
};
use pnm_tools::accuracy::{ErrorTally, value_scale};
use pnm_tools::synthetic::Rng;

#[derive(Debug, Default, Serialize)]
struct TieredStep {
    step: u32,
    context_tokens: u64,
    evicted_tokens: u64,
    /// Recall of the exact Top-K of the evicted tokens.
    recall: f64,
    /// Tiered attention (host tokens + device Top-K rows, one softmax)
    /// against full attention: ||o - o_full|| / rms ||v||, and relative
    /// where the full output is not near zero (pnm_tools::accuracy).
    attention_error: f64,
    attention_rel_error: Option<f64>,
    /// Plain Top-K attention at the same k over every token, against full
    /// attention: what one device's Top-K alone would give.
    topk_only_error: f64,
    topk_only_rel_error: Option<f64>,
    link_bytes: u64,
    /// Streaming the evicted part to the host instead.
    stream_evicted_bytes: u64,
    step_ms: f64,
    modelled_ms: f64,
}

#[derive(Debug, Serialize)]
struct TieredReport {
    source: String,
    shape: pnm_host::KvShape,
    devices: usize,
    device: String,
    options: TieredOptions,
    group: u32,
    context_tokens: u64,
    evicted_tokens: u64,
    host_tokens: u64,
    load_seconds: f64,
    evicted_bytes_written: u64,
    steps: Vec<TieredStep>,
    mean_recall: f64,
    mean_attention_error: f64,
    mean_attention_rel_error: Option<f64>,
    mean_topk_only_error: f64,
    mean_topk_only_rel_error: Option<f64>,
    link_bytes_per_step: f64,
    stream_evicted_bytes_per_step: f64,
    link_reduction: f64,
    mean_step_ms: f64,
    mean_modelled_ms: f64,
}

pub fn run(
    args: &Args,
    cache: Cache,
    devices: Vec<Device>,
    mut rng: Rng,
    device_name: String,
    hot_window: u64,
) -> anyhow::Result<()> {
    let shape = cache.shape;
    let (d, row) = (usize::from(shape.head_dim), shape.row_bytes());
    let count = devices.len();
    let set = DeviceSet::new(devices)?;
    let options = TieredOptions { hot_window, sinks: args.sinks, evict_batch: 0, k: args.k };
    let mut tiered = TieredKv::new(&set, shape, options)?;
    let (mut keys, mut values) = (Vec::new(), Vec::new());
    for s in &cache.streams {
        keys.extend_from_slice(&s.keys);
        values.extend_from_slice(&s.values);
    }
    let bar = progress(1, "loading KV", args.json);
    let start = Instant::now();
    let loaded = tiered.append(&keys, &values, cache.tokens);
    let load_seconds = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    drop((keys, values));
    if let Err(e) = loaded {
        let _ = tiered.free();
        return Err(e.into());
    }
    let sinks = tiered.options().sinks as usize;
    let mut streams = cache.streams;
    let mut steps = Vec::new();
    let mut out = vec![0f32; d * args.group as usize];
    for step in 0..args.steps {
        let (new_k, new_v) = next_token(&mut streams, &mut rng, shape, tiered.tokens() as usize);
        tiered.append(&new_k, &new_v, 1)?;
        let evicted = tiered.evicted() as usize;
        let mut report = TieredStep {
            step,
            context_tokens: tiered.tokens(),
            evicted_tokens: evicted as u64,
            ..Default::default()
        };
        let mut recall_sum = 0.0;
        let (mut tiered_err, mut topk_err) = (ErrorTally::default(), ErrorTally::default());
        for (i, s) in streams.iter().enumerate() {
            let (layer, head) =
                ((i / usize::from(shape.heads)) as u16, (i % usize::from(shape.heads)) as u16);
            let queries = step_queries(s, &mut rng, shape, args.group);
            let start = Instant::now();
            let stats = tiered.attend(layer, head, &queries, &mut out)?;
            report.step_ms += start.elapsed().as_secs_f64() * 1e3;
            report.link_bytes += stats.link_bytes;
            report.stream_evicted_bytes += 2 * evicted as u64 * row;
            if let Some(top) = &stats.topk {
                report.modelled_ms += top.top.model_ns as f64 / 1e6;
            }

            // Host side: the truth from every row.
            let all_keys = decode(shape.dtype, &s.keys);
            let all_values = decode(shape.dtype, &s.values);
            if evicted > 0 {
                let part = &all_keys[sinks * d..(sinks + evicted) * d];
                let exact = exact_topk(&queries, part, d, args.k as usize);
                let got: std::collections::HashSet<u32> = stats.selected.iter().copied().collect();
                recall_sum += exact.iter().filter(|&&t| got.contains(&(t + sinks as u32))).count()
                    as f64
                    / exact.len() as f64;
            } else {
                recall_sum += 1.0;
            }
            let plain = exact_topk(&queries, &all_keys, d, args.k as usize);
            let pick = |rows: &[f32]| -> Vec<f32> {
                plain.iter().flat_map(|&t| rows[t as usize * d..][..d].iter().copied()).collect()
            };
            let (plain_k, plain_v) = (pick(&all_keys), pick(&all_values));
            let scale = value_scale(&all_values, d);
            for (q, o) in queries.chunks_exact(d).zip(out.chunks_exact(d)) {
                let full = attend(q, &all_keys, &all_values, d);
                let tiered: Vec<f64> = o.iter().map(|&x| f64::from(x)).collect();
                tiered_err.add(&full, &tiered, scale);
                topk_err.add(&full, &attend(q, &plain_k, &plain_v, d), scale);
            }
        }
        report.recall = recall_sum / streams.len() as f64;
        report.attention_error = tiered_err.output_error();
        report.attention_rel_error = tiered_err.rel_error();
        report.topk_only_error = topk_err.output_error();
        report.topk_only_rel_error = topk_err.rel_error();
        if !args.json {
            println!(
                "step {:>3}  ctx {:>7}  evicted {:>7}  recall {:.4}  attn err {:.4} rel {} (Top-K alone {:.4} rel {})  link {:>7.2} MiB vs {:>8.1} MiB streaming the evicted part  {:>7.1} ms (modelled {:.2} ms)",
                step,
                report.context_tokens,
                report.evicted_tokens,
                report.recall,
                report.attention_error,
                rel_text(report.attention_rel_error),
                report.topk_only_error,
                rel_text(report.topk_only_rel_error),
                report.link_bytes as f64 / (1 << 20) as f64,
                report.stream_evicted_bytes as f64 / (1 << 20) as f64,
                report.step_ms,
                report.modelled_ms,
            );
        }
        steps.push(report);
    }
    let n = steps.len().max(1) as f64;
    let mean = |f: &dyn Fn(&TieredStep) -> f64| steps.iter().map(f).sum::<f64>() / n;
    let report = TieredReport {
        source: cache.source,
        shape,
        devices: count,
        device: device_name,
        options: tiered.options(),
        group: args.group,
        context_tokens: tiered.tokens(),
        evicted_tokens: tiered.evicted(),
        host_tokens: tiered.host_tokens(),
        load_seconds,
        evicted_bytes_written: tiered.evicted_bytes(),
        mean_recall: mean(&|s| s.recall),
        mean_attention_error: mean(&|s| s.attention_error),
        mean_attention_rel_error: mean_rel(&steps, |s| s.attention_rel_error),
        mean_topk_only_error: mean(&|s| s.topk_only_error),
        mean_topk_only_rel_error: mean_rel(&steps, |s| s.topk_only_rel_error),
        link_bytes_per_step: mean(&|s| s.link_bytes as f64),
        stream_evicted_bytes_per_step: mean(&|s| s.stream_evicted_bytes as f64),
        link_reduction: mean(&|s| s.stream_evicted_bytes as f64)
            / mean(&|s| s.link_bytes as f64).max(1.0),
        mean_step_ms: mean(&|s| s.step_ms),
        mean_modelled_ms: mean(&|s| s.modelled_ms),
        steps,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let mib = |b: f64| b / (1 << 20) as f64;
        println!();
        println!(
            "{} KV: {}, {} tokens; GQA group {}, k = {}; tiered: {} sinks + a {}-token hot window \
             in host memory, {} tokens evicted to {}",
            report.source,
            shape,
            report.context_tokens,
            report.group,
            args.k,
            report.options.sinks,
            report.options.hot_window,
            report.evicted_tokens,
            report.device,
        );
        println!("recall vs exact Top-K of the evicted part  {:.4}", report.mean_recall);
        println!(
            "attention output error                    {:.4} tiered, {:.4} with Top-K alone at the same k \
             (of a value row's norm; relative {} and {}; vs full attention)",
            report.mean_attention_error,
            report.mean_topk_only_error,
            rel_text(report.mean_attention_rel_error),
            rel_text(report.mean_topk_only_rel_error)
        );
        println!(
            "bytes over the link / step                {:.2} MiB vs {:.1} MiB to stream the evicted part ({:.1}x less); evictions wrote {:.1} MiB once",
            mib(report.link_bytes_per_step),
            mib(report.stream_evicted_bytes_per_step),
            report.link_reduction,
            mib(report.evicted_bytes_written as f64),
        );
        println!(
            "time per decode step                      {:.1} ms (the device Top-Ks and host attention over the hot tokens; modelled device time {:.3} ms)",
            report.mean_step_ms, report.mean_modelled_ms
        );
    }
    if !args.device.is_empty() && args.keep {
        tracing::info!("--keep: the evicted part stays on the devices");
    } else {
        tiered.free()?;
    }
    Ok(())
}
