"""What the last prefill did: tokens merged, tokens per layer, KV-cache entries per layer."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class AIMStats:
    """Counts from the last forward that carried a prompt (prefill), per sample of the batch.

    Attributes:
        input_tokens: tokens of each prompt (padding excluded) as given to the model.
        visual_tokens_before_merge / visual_tokens_after_merge: visual tokens of each prompt
            before merging (its visual placeholders, what the unchanged model runs on) and as
            they entered the LLM.
        visual_tokens_encoded: of ``visual_tokens_before_merge``, those the vision tower produced:
            fewer with ``frame_keep`` (frames not encoded), else the same (None: not counted).
        tokens_per_layer: ``[layer][sample]`` tokens each decoder layer processed for each prompt.
        visual_tokens_per_layer: ``[layer][sample]`` of those, how many were visual.
        sequence_length_per_layer: ``[layer]`` length of the hidden-state tensor each layer ran on
            (the batch's longest prompt after removal; with ``prune_mode="mask"`` it never shrinks).
        kv_cache_entries_per_layer: ``[layer]`` key/value positions held by each layer's cache
            after the prefill (read from the cache itself), or None without a cache.
        mode: ``"remove"``, ``"mask"`` or ``"off"``.
        kept_visual_positions: only when recording (`aim.visualize.record_kept_tokens`):
            ``[(stage, [positions per sample])]``, stage ``"merge"`` (what entered the LLM) then
            each pruning layer's index; positions are indices into the prompt as given.
        visual_groups: only when recording: ``[sample][group]`` the prompt positions of each
            frame / crop before merging (row-major), to map positions back to frames.
        budget: only for a budgeted call (`aim.budget`): the budget, the point that ran (its name
            and `AIMConfig`; a keep fraction between calibrated ones is named by it, e.g.
            ``"merge 0.791"``), its predicted FLOPs fraction and typical seconds (load-corrected), the
            load factor, the margin a latency budget's quantile added, and the measured seconds.
    """

    input_tokens: list[int]
    visual_tokens_before_merge: list[int]
    visual_tokens_after_merge: list[int]
    tokens_per_layer: list[list[int]]
    visual_tokens_per_layer: list[list[int]]
    sequence_length_per_layer: list[int]
    kv_cache_entries_per_layer: list[int] | None
    mode: str
    kept_visual_positions: list[tuple[object, list[list[int]]]] | None = None
    visual_groups: list[list[list[int]]] | None = None
    budget: dict | None = None
    visual_tokens_encoded: list[int] | None = None

    def tokens_per_layer_of(self, sample: int) -> list[int]:
        """``[layer]`` tokens each decoder layer processed for prompt ``sample`` of the batch."""
        return [row[sample] for row in self.tokens_per_layer]

    def as_dict(self) -> dict:
        """Plain-dict form (JSON-ready)."""
        return asdict(self)

    def kv_cache_entries_of(self, sample: int) -> list[int] | None:
        """``[layer]`` KV-cache entries prompt ``sample`` added in this prefill, padding excluded
        (None without a cache). Removal caches exactly the tokens each layer processed; masking
        removes nothing, so it caches every prompt token, merged-away ones too."""
        if self.kv_cache_entries_per_layer is None:
            return None
        if self.mode == "mask":
            return [self.input_tokens[sample]] * len(self.tokens_per_layer)
        return self.tokens_per_layer_of(sample)

    def summary(self) -> str:
        """A few readable lines for logs: per prompt of the batch, the figures of what ran."""
        batch = len(self.input_tokens)
        lines = [f"AIM prefill ({self.mode}), {batch} prompt{'s' if batch > 1 else ''}:"]
        for sample in range(batch):
            lines.append(
                f"  prompt {sample}: {self.input_tokens[sample]} tokens in, visual tokens "
                f"{self.visual_tokens_before_merge[sample]} -> {self.visual_tokens_after_merge[sample]} entering the LLM; "
                "tokens per layer " + " ".join(map(str, self.tokens_per_layer_of(sample)))
            )
            entries = self.kv_cache_entries_of(sample)
            if entries is not None:
                lines.append(f"    KV-cache entries per layer {' '.join(map(str, entries))} (sum {sum(entries)})")
        if self.kv_cache_entries_per_layer is not None and batch > 1:
            lines.append(
                "  the batch's KV-cache tensors, padded to the longest prompt, hold per layer "
                + " ".join(map(str, self.kv_cache_entries_per_layer)) + " positions per prompt"
            )
        return "\n".join(lines)
