"""Parameter counts and the speedup ceiling of a pruned model.

Per-token weight work is the number of parameters every token is multiplied with: all parameters except
embedding *lookups* (input token and position embeddings gather one row per token and cost nothing per
parameter), with the LM head counted even when it is tied to the input embeddings, and with routed
mixture-of-experts weights counted at the fraction of experts a token is sent to (top-k of E). The
ceiling of a pruned model's speedup is dense work / pruned work: the speedup if time were proportional
to the weights each token touches.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from simdiff.model.layers import find_decoder_layers


@dataclass
class WeightCounts:
    """Parameter counts of one model (unique parameters; tied ones counted once in ``total``)."""

    total: int
    decoder_layers: int
    num_layers: int
    embedding_lookup: int
    lm_head: int
    per_token: float

    def to_dict(self) -> dict:
        return asdict(self)


def _expert_fraction(config) -> float | None:
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    if isinstance(experts, int) and isinstance(top_k, int) and experts > 0:
        return top_k / experts
    return None


def weight_counts(model: nn.Module) -> WeightCounts:
    """Count ``model``'s parameters and its per-token weight work (see the module docstring)."""
    fraction = _expert_fraction(model.config)
    head = model.get_output_embeddings()
    head_params = {id(p) for p in head.parameters()} if head is not None else set()
    lookup: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            lookup.update(id(p) for p in module.parameters() if id(p) not in head_params)
    seen: set[int] = set()
    total = lookup_count = 0
    per_token = 0.0
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if id(p) in lookup:
            lookup_count += p.numel()
            continue
        routed = fraction is not None and ".experts." in f".{name}" and "shared_expert" not in name
        per_token += p.numel() * (fraction if routed else 1.0)
    head_count = sum(p.numel() for p in head.parameters()) if head is not None else 0
    decoder = find_decoder_layers(model)
    layer_params = sum(p.numel() for p in decoder.modules.parameters())
    return WeightCounts(total=total, decoder_layers=layer_params, num_layers=len(decoder),
                        embedding_lookup=lookup_count, lm_head=head_count, per_token=per_token)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's distinct parameters and buffers."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def ceiling(dense: WeightCounts, pruned: WeightCounts) -> float:
    """The speedup a pruned model can reach if time is proportional to per-token weight work."""
    return dense.per_token / pruned.per_token
