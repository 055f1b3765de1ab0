"""Speculative decoding with a text-only draft (Gagrani et al., arXiv 2404.08856).

A small causal LM that shares the target's tokenizer drafts ``k`` tokens from the *text* of the
conversation (the prompt with its visual placeholder tokens and every visual input removed); the
multimodal target verifies them in one forward (transformers' assisted generation), so the output
is the target's own: greedy output equals greedy decoding token for token, sampling follows the
target's distribution (transformers' speculative sampling).

Use it through the patched ``generate``::

    apply_aim(model)                       # or apply_aim(model, enabled=False): the draft alone
    out = model.generate(**inputs, aim_draft=draft, aim_draft_tokens=5, max_new_tokens=64)
    print(aim.speculative.last_draft_stats(model))

transformers 5.21-5.24 forward the multimodal kwargs (pixel values, grids, token types) and the
placeholder ids to an assistant, and offer no public argument for a custom candidate generator;
aim replaces the model's ``_get_candidate_generator`` (an instance attribute, restored by
`remove_aim`) so that, for the calls that passed ``aim_draft``, the draft sees text only.
With AIM, verification passes carry several new text tokens and no visual features: the engine
neither merges nor prunes them, and rejected tokens are cropped from every layer's cache
(`aim.tokens.AIMCache.crop`) in original positions, so positions stay those of the full prompt.
"""

from __future__ import annotations

import contextvars
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers.generation.candidate_generator import AssistedCandidateGenerator

from . import compat
from .context import owned, scoped

DEFAULT_DRAFT_TOKENS = 5


@dataclass
class DraftStats:
    """One generation with a draft: what was drafted and accepted, and where the time went.

    Attributes:
        rounds: target verification forwards (each emits the accepted tokens plus one of its own).
        drafted / accepted: draft tokens proposed / accepted by the target, over all rounds.
        prefill_seconds: the target's first forward (the prompt, vision tower included).
        decode_seconds: the rest of the generation.
    """

    draft_tokens: int
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    new_tokens: int = 0
    _last_drafted: int = field(default=0, repr=False)

    @property
    def block_efficiency(self) -> float:
        """Mean tokens emitted per target forward after the prefill (1.0 without speculation)."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def as_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        out.update(block_efficiency=self.block_efficiency, acceptance_rate=self.acceptance_rate)
        return out


@dataclass
class DraftRun:
    """The per-call state of one ``generate(..., aim_draft=...)`` (a value in a context variable)."""

    owner: Any
    draft: torch.nn.Module
    visual_ids: tuple[int, ...]
    stats: DraftStats
    confidence_threshold: float = 0.0
    schedule: str = "constant"
    prompt_length: int | None = None
    started: float = 0.0
    prefill_done: bool = False


_RUN: contextvars.ContextVar[DraftRun | None] = contextvars.ContextVar("aim_draft_run", default=None)


def current_run(owner: Any) -> DraftRun | None:
    return owned(_RUN, owner)


def drafting(run: DraftRun):
    return scoped(_RUN, run)


def note_target_forward(owner: Any, started: float) -> None:
    """Called after each target forward of a drafted generation: the first one is the prefill."""
    run = current_run(owner)
    if run is not None and not run.prefill_done:
        run.prefill_done = True
        run.stats.prefill_seconds = time.perf_counter() - started


#: forward arguments laid along the sequence (last dimension), sliced when the first verify is split
_SEQUENCE_ARGUMENTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids", "mm_token_type_ids",
                       "cache_position")


def prompt_split(owner: Any, kwargs: dict) -> int | None:
    """The prompt length where a drafted generation's first target forward must be cut in two.

    transformers' assisted decoding runs the prompt and the first drafted tokens in one forward.
    Under AIM that forward is the prefill, and the drafted tokens would take part in it: PageRank
    would rank the visual tokens by the attention of text the target never wrote, and AIM alone
    would prune differently. So the prompt runs alone (merging, pruning) and the drafted tokens
    are verified on its cache, as every later round is. None: no split needed."""
    run = current_run(owner)
    ids = kwargs.get("input_ids")
    if run is None or run.prefill_done or run.prompt_length is None or not isinstance(ids, torch.Tensor):
        return None
    return run.prompt_length if ids.shape[-1] > run.prompt_length else None


def forward_prompt_then_drafted(forward, split: int, kwargs: dict):
    """`forward` (the patched multimodal forward) over the prompt ``[:split]`` with every visual
    input, then over the drafted tokens on its cache (text only), with the logits joined as one
    forward over both would return them (``logits_to_keep`` honoured)."""
    length = kwargs["input_ids"].shape[-1]
    head, tail = {}, {}
    for name, value in kwargs.items():
        if name in _SEQUENCE_ARGUMENTS and isinstance(value, torch.Tensor):
            head[name] = value[..., :split]
            # a 2-D padding mask covers the cache too: the tail's is the whole mask
            tail[name] = value if name == "attention_mask" and value.ndim == 2 else value[..., split:]
        elif name in compat.CACHE_NAMES or name == "logits_to_keep":
            head[name] = value
        elif name.startswith("aim_"):
            head[name] = tail[name] = value  # this call's AIM options
        elif name == "mm_encoder_outputs" or isinstance(value, (torch.Tensor, list, tuple, dict)):
            head[name] = value  # visual inputs (pixels, grids, encoded features): the prompt's
        else:
            head[name] = tail[name] = value  # flags (use_cache, return_dict, ...)
    keep = kwargs.get("logits_to_keep")
    if isinstance(keep, int) and keep > 0:
        head["logits_to_keep"], tail["logits_to_keep"] = 1, min(keep - 1, length - split)
    first = forward(**head)
    cache = compat.output_cache(first)
    given = [name for name in compat.CACHE_NAMES if name in kwargs]
    tail[given[0] if given else compat.OUTPUT_CACHE_FIELD] = cache
    second = forward(**tail)
    # the patched forward is the multimodal base model's (hidden states) or, where there is no
    # base, the generating model's (logits)
    field = "logits" if getattr(second, "logits", None) is not None else "last_hidden_state"
    before = getattr(first, field)[:, -1:] if isinstance(keep, int) and keep > 0 else getattr(first, field)
    setattr(second, field, torch.cat([before, getattr(second, field)], dim=1))
    return second


class TextOnlyCandidateGenerator(AssistedCandidateGenerator):
    """transformers' assisted candidate generator whose draft sees the text of the conversation
    only: visual placeholder positions are dropped from the ids it is given and from its mask, and
    no visual keyword argument reaches it. Candidates are returned in the target's id space."""

    def __init__(self, input_ids, assistant_model, generation_config, model_kwargs, inputs_tensor=None,
                 logits_processor=None, visual_ids: tuple[int, ...] = (), stats: DraftStats | None = None,
                 draft_tokens: int | None = None, confidence_threshold: float = 0.0, schedule: str = "constant"):
        if input_ids.shape[0] != 1:
            raise ValueError("speculative decoding with a draft runs one prompt at a time (batch size 1)")
        self.visual_ids = torch.tensor(visual_ids, dtype=torch.long, device=input_ids.device)
        self.stats = stats
        keep = self._text_positions(input_ids)
        mask = model_kwargs.get("attention_mask")
        text_kwargs = {"attention_mask": mask[:, keep]} if isinstance(mask, torch.Tensor) and mask.ndim == 2 else {}
        super().__init__(input_ids[:, keep], assistant_model, generation_config, text_kwargs, None, logits_processor)
        # transformers reads these from the draft's own generation_config (a module shared by every
        # call); this call's settings go on the generator's private copy instead
        if draft_tokens is not None:
            self.num_assistant_tokens = draft_tokens
        self.assistant_confidence_threshold = confidence_threshold
        self.assistant_generation_config.assistant_confidence_threshold = confidence_threshold
        self.generation_config.assistant_confidence_threshold = confidence_threshold  # what the draft runs with
        self.assistant_generation_config.num_assistant_tokens_schedule = schedule

    def _text_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        return ~torch.isin(input_ids[0], self.visual_ids.to(input_ids.device))

    def get_candidates(self, input_ids: torch.LongTensor, **kwargs):
        keep = self._text_positions(input_ids)
        self._removed = int((~keep).sum())
        text_ids = input_ids[:, keep]
        candidates, logits = super().get_candidates(text_ids)
        new = candidates[:, text_ids.shape[1]:]
        if self.stats is not None:
            self.stats._last_drafted = int(new.shape[1])
        return torch.cat([input_ids, new.to(input_ids.device)], dim=1), logits

    def _calculate_new_tokens(self, input_ids: torch.LongTensor) -> tuple[int, int]:
        # the target's length limits count the visual tokens the draft does not see
        new_cur_len = input_ids.shape[-1] + getattr(self, "_removed", 0)
        max_new_tokens = min(int(self.num_assistant_tokens), self.main_model_max_length - new_cur_len - 1)
        min_new_tokens = max(min(max_new_tokens, self.main_model_min_length - new_cur_len), 0)
        return min_new_tokens, max(max_new_tokens, 0)

    def update_candidate_strategy(self, input_ids, scores, num_matches: int):
        if self.stats is not None:
            self.stats.rounds += 1
            self.stats.drafted += self.stats._last_drafted
            self.stats.accepted += int(num_matches)
            self.stats._last_drafted = 0
        super().update_candidate_strategy(input_ids, scores, num_matches)


class CandidateGeneratorHook:
    """The model's ``_get_candidate_generator`` while patched: the text-only generator for calls
    that passed ``aim_draft`` (and this draft), transformers' own otherwise."""

    def __init__(self, controller, original) -> None:
        self.controller = controller
        self.original = original
        self.__wrapped__ = original

    def __call__(self, *args, **kwargs):
        run = current_run(self.controller)
        if run is None or kwargs.get("assistant_model") is not run.draft:
            return self.original(*args, **kwargs)
        return TextOnlyCandidateGenerator(
            input_ids=kwargs["input_ids"], assistant_model=run.draft, generation_config=kwargs["generation_config"],
            model_kwargs=kwargs["model_kwargs"], logits_processor=kwargs.get("logits_processor"),
            visual_ids=run.visual_ids, stats=run.stats, draft_tokens=run.stats.draft_tokens,
            confidence_threshold=run.confidence_threshold, schedule=run.schedule,
        )


def visual_token_ids(config) -> tuple[int, ...]:
    """The placeholder ids a multimodal config names (image / video tokens)."""
    names = ("image_token_id", "video_token_id", "image_token_index", "video_token_index")
    return tuple(sorted({int(v) for v in (getattr(config, n, None) for n in names) if v is not None}))


def check_draft(model: torch.nn.Module, draft: torch.nn.Module) -> None:
    """A clear error when `draft` cannot draft for `model` (another vocabulary, not a causal LM)."""
    target_vocab = model.config.get_text_config().vocab_size
    draft_vocab = getattr(draft.config, "vocab_size", None)
    if draft_vocab != target_vocab:
        raise ValueError(
            f"the draft's vocabulary ({draft_vocab} ids) differs from the target's ({target_vocab}): a text-only "
            "draft must share the target's tokenizer"
        )
    if not callable(getattr(draft, "generate", None)):
        raise ValueError(f"the draft must be a causal LM with generate(), got {type(draft).__name__}")


def generate_with_draft(controller, original, args, kwargs, draft, draft_tokens: int | None):
    """``generate`` with `draft`, recording `DraftStats` for this thread (`last_draft_stats`)."""
    model = controller.owner
    check_draft(model, draft)
    k = DEFAULT_DRAFT_TOKENS if draft_tokens is None else int(draft_tokens)
    if k < 1:
        raise ValueError(f"aim_draft_tokens must be >= 1 (tokens drafted per round), got {draft_tokens!r}")
    for name in ("assistant_model", "prompt_lookup_num_tokens"):
        if kwargs.get(name) is not None:
            raise ValueError(f"give either aim_draft or {name}, not both")
    # exactly k drafted tokens per round (no early stop on the draft's confidence), so that block
    # efficiency measures the draft at that k; a caller's own settings win
    run = DraftRun(owner=controller, draft=draft, visual_ids=visual_token_ids(model.config), stats=DraftStats(k),
                   confidence_threshold=float(kwargs.pop("assistant_confidence_threshold", 0.0)),
                   schedule=str(kwargs.pop("num_assistant_tokens_schedule", "constant")),
                   prompt_length=_prompt_length(args, kwargs))
    if run.schedule != "constant":
        raise ValueError(f"num_assistant_tokens_schedule={run.schedule!r}: with aim_draft only 'constant' is supported "
                         "(transformers' heuristic schedules write into the draft's shared generation_config)")
    prompt_len = _prompt_length(args, kwargs)
    start = time.perf_counter()
    with drafting(run):
        out = original(*args, assistant_model=draft, **kwargs)
    total = time.perf_counter() - start
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    run.stats.new_tokens = int(sequences.shape[1] - prompt_len) if prompt_len is not None else 0
    run.stats.decode_seconds = max(0.0, total - run.stats.prefill_seconds)
    controller.remember_draft(run.stats)
    return out


def _prompt_length(args, kwargs) -> int | None:
    ids = kwargs.get("input_ids", args[0] if args else None)
    return int(ids.shape[1]) if isinstance(ids, torch.Tensor) else None


def last_draft_stats(model: torch.nn.Module) -> DraftStats | None:
    """`DraftStats` of the last ``generate(..., aim_draft=...)`` this thread ran on `model`."""
    from .patch import _controller_of

    return _controller_of(model).last_draft_stats()
