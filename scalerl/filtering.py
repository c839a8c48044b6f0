"""Row annotations of the filter stage: which completions carry no learning signal or cannot be used.

    table, counts = filter_reasons(scored_table)   # adds a string column `filter_reason`

`filter_reason` is null for a usable row, else one of:
- "no_tokens": the completion has no tokens (e.g. its prompt was longer than the budget);
- "nonfinite_logprobs": a generator log-probability is NaN or infinite;
- "zero_variance": every completion of its group got the same reward, so its advantage is 0
  (paper sec. 3.2 / SCALERL.md sec. 5). Works for 0/1 and -1/+1 rewards alike.

Rows are annotated, never removed: the trainer still counts zero-variance groups in its
batch of P prompts (no replacement sampling, unlike DAPO's dynamic sampling), and the dataset
keeps every completion for analysis. Unusable rows make the whole group unusable for advantage
centering, so they are checked first and zero variance is computed over the remaining rows.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

FILTER_REASONS = ("no_tokens", "nonfinite_logprobs", "zero_variance")


def filter_reasons(
    table: pa.Table, *, zero_variance: bool = True
) -> tuple[pa.Table, dict[str, int]]:
    n = table.num_rows
    reasons = np.full(n, None, dtype=object)
    lengths = pc.list_value_length(table.column("completion_token_ids")).to_numpy(
        zero_copy_only=False
    )
    reasons[lengths == 0] = "no_tokens"
    flat = pc.list_flatten(table.column("logprobs")).to_numpy(zero_copy_only=False)
    if flat.size:
        row_of = np.repeat(
            np.arange(n),
            pc.list_value_length(table.column("logprobs")).to_numpy(zero_copy_only=False),
        )
        bad_rows = np.unique(row_of[~np.isfinite(flat)])
        reasons[bad_rows[reasons[bad_rows] == None]] = "nonfinite_logprobs"  # noqa: E711
    if zero_variance and n:
        groups = table.column("group_id").to_numpy(zero_copy_only=False)
        rewards = table.column("reward").to_numpy(zero_copy_only=False).astype(np.float64)
        usable = reasons == None  # noqa: E711
        for gid in np.unique(groups):
            rows = np.flatnonzero((groups == gid) & usable)
            if len(rows) and np.nanmax(rewards[rows]) == np.nanmin(rewards[rows]):
                reasons[rows] = "zero_variance"
    column = pa.array(reasons.tolist(), pa.string())
    out = table.drop_columns(["filter_reason"]) if "filter_reason" in table.column_names else table
    out = out.append_column("filter_reason", column)
    counts = {"rows": n, "kept": int(sum(r is None for r in reasons))}
    counts.update({reason: int(sum(r == reason for r in reasons)) for reason in FILTER_REASONS})
    return out, counts
