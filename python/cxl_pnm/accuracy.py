"""The accuracy report: what Top-K attention costs on a KV cache.

For a sweep of k, exact and with page selection at each budget, the device
answers every (layer, KV head)'s Top-K and the host compares with full
attention computed in float64 from the same stored rows:

- ``recall``: share of the exact Top-K returned;
- ``attention_mass``: share of full attention's softmax weight on the
  returned tokens;
- ``output_error``: ``||o_topk - o_full|| / rms ||v||``, the output's error in
  units of a typical value row. It stays meaningful where the full output is
  near zero (random values under diffuse attention), where the relative error
  explodes;
- ``output_rel_error``: ``||o_topk - o_full|| / ||o_full||`` over the queries
  whose full output is at least 0.1 of the value rows' RMS norm (None if
  none); ``ill_conditioned`` is the share left out;
- ``keys_read``: tokens scored over tokens stored.

Each is reported per head (``configs[i]["heads"]``) and overall
(``configs[i]["overall"]``); ``text`` is the table ``pnmctl accuracy``
prints, and ``plot_dir`` writes the charts (SVG, and PNG where a TrueType font
is found)::

    r = cxl_pnm.accuracy.report(keys, values, ks=[64, 256], budgets=[4096])
    print(r["text"])
    r = cxl_pnm.accuracy.synthetic_report("random", plot_dir="charts")
"""

from ._native import accuracy_report as report
from ._native import synthetic_accuracy_report as synthetic_report

__all__ = ["report", "synthetic_report"]
