"""Minitron-style structured pruning of Hugging Face decoder models (Llama, Mistral, Qwen2/3).

Three steps, each a small function:

1. **Importance** (``collect_importance``): forward passes over calibration prompts with hooks
   that read activations. Aggregation as in the Minitron paper: the absolute activation is
   averaged over the sequence (padding masked), then the L2 norm is taken over the batch.
   - MLP neurons: the input of ``down_proj`` (one score per intermediate channel, per layer);
   - attention heads: the L2 norm of each head's output (the input of ``o_proj``, split per
     head); with grouped-query attention whole KV groups are ranked (the sum of their query
     heads), because a query head cannot outlive its key/value head;
   - hidden channels: the outputs of every RMSNorm (both per layer, and the final one) summed,
     so embeddings, norms, every projection and the LM head lose the same channels;
   - depth: 1 - cosine(input, output) of each block (a block that barely changes its input is
     cheap to drop), or the loss increase when the block is skipped.
2. **Target** (``Shape``): explicit sizes, or the shape found for a parameter budget
   (``fit_budget``); parameter counts come from the same per-tensor rules that cut the
   weights (``RULES``), so a promised count is the count of the saved model.
3. **Cut** (``prune_state``): keep the top-scoring channels of every tensor (in their original
   order) and load them into a fresh model built from the pruned config.

Importance scores are plain tensors (``Importance``), saved beside the pruned model, so pruning
the same teacher to another target needs no new forward passes.

torch and transformers are imported inside the functions that use them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)

Axis = Literal["h", "q", "kv", "i", "-"]
"""How a tensor dimension is pruned: hidden channels, query-head rows (heads x head_dim),
key/value-head rows, MLP neurons, or kept whole."""

# Per-tensor rules, by parameter name (layer parameters without the ``model.layers.N.`` prefix).
# Every parameter of a supported model must match one rule: an unknown parameter (a new variant
# of an architecture) stops the prune instead of producing a silently broken checkpoint.
RULES: dict[str, tuple[Axis, ...]] = {
    "model.embed_tokens.weight": ("-", "h"),
    "lm_head.weight": ("-", "h"),
    "model.norm.weight": ("h",),
    "input_layernorm.weight": ("h",),
    "post_attention_layernorm.weight": ("h",),
    "self_attn.q_proj.weight": ("q", "h"),
    "self_attn.q_proj.bias": ("q",),
    "self_attn.k_proj.weight": ("kv", "h"),
    "self_attn.k_proj.bias": ("kv",),
    "self_attn.v_proj.weight": ("kv", "h"),
    "self_attn.v_proj.bias": ("kv",),
    "self_attn.o_proj.weight": ("h", "q"),
    "self_attn.o_proj.bias": ("h",),
    "self_attn.q_norm.weight": ("-",),
    "self_attn.k_norm.weight": ("-",),
    "mlp.gate_proj.weight": ("i", "h"),
    "mlp.gate_proj.bias": ("i",),
    "mlp.up_proj.weight": ("i", "h"),
    "mlp.up_proj.bias": ("i",),
    "mlp.down_proj.weight": ("h", "i"),
    "mlp.down_proj.bias": ("h",),
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class PruneError(ValueError):
    """A prune request that cannot be met; the message names the field, value and what is
    allowed."""


# --------------------------------------------------------------------------------------------
# Shapes and parameter counts (pure)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """The prunable sizes of a decoder. ``head_dim`` never changes: heads are kept or dropped
    whole."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int
    head_dim: int

    @property
    def heads_per_group(self) -> int:
        return self.heads // self.kv_heads

    def axis_size(self, axis: Axis, original: int) -> int:
        sizes = {
            "h": self.hidden,
            "q": self.heads * self.head_dim,
            "kv": self.kv_heads * self.head_dim,
            "i": self.intermediate,
        }
        return sizes.get(axis, original)


def shape_of(config: Any) -> Shape:
    """The prunable sizes of a transformers config."""
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Shape(
        hidden=int(config.hidden_size),
        intermediate=int(config.intermediate_size),
        heads=heads,
        kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        layers=int(config.num_hidden_layers),
        head_dim=int(head_dim),
    )


def hidden_must_divide_heads(config: Any) -> bool:
    """Whether transformers refuses this architecture's config when the hidden size is not a
    multiple of the attention heads (Llama's does; Qwen2/3's and Mistral's, with an explicit
    head_dim, do not). Asked of transformers itself, so a new release's rules are followed."""
    probe = config.__class__.from_dict(config.to_dict())
    probe.hidden_size = int(config.num_attention_heads) * 8 + 1
    validate = getattr(probe, "validate", None)
    if validate is None:
        return False
    try:
        validate()
    except Exception:  # transformers' own validation error types vary by release
        return True
    return False


def check_architecture(config: Any, field: str = "teacher.model") -> str:
    """The config's architecture, or a ``PruneError`` naming the supported ones."""
    names = list(getattr(config, "architectures", None) or [])
    architecture = names[0] if names else type(config).__name__
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise PruneError(
            f"{field}: architecture {architecture} cannot be pruned; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return architecture


def rule_of(name: str) -> tuple[Axis, ...]:
    """The pruning rule of one parameter name."""
    match = _LAYER_RE.match(name)
    key = match.group(2) if match else name
    if key not in RULES:
        raise PruneError(
            f"teacher.model: parameter {name} is not one the pruner knows how to cut "
            "(a model variant outside the supported Llama/Mistral/Qwen2/Qwen3 layout)"
        )
    return RULES[key]


def pruned_shape(name: str, shape: Sequence[int], target: Shape) -> tuple[int, ...]:
    """The shape of parameter ``name`` after pruning to ``target``."""
    return tuple(
        target.axis_size(axis, size) for axis, size in zip(rule_of(name), shape, strict=True)
    )


def count_parameters(parameters: Mapping[str, Sequence[int]], target: Shape) -> int:
    """Parameters of the model ``parameters`` (name -> shape, tied weights listed once) pruned to
    ``target``: per-layer tensors counted for ``target.layers`` layers."""
    total = 0
    for name, shape in parameters.items():
        match = _LAYER_RE.match(name)
        if match and int(match.group(1)) != 0:
            continue  # every layer has layer 0's shapes; count it once per kept layer
        size = math.prod(pruned_shape(name, shape, target))
        total += size * (target.layers if match else 1)
    return total


# --------------------------------------------------------------------------------------------
# Targets: explicit sizes or a parameter budget (pure)
# --------------------------------------------------------------------------------------------


def _check_size(field: str, value: int, original: int, what: str) -> None:
    if not 1 <= value <= original:
        raise PruneError(
            f"student.prune.{field} is {value} but the teacher's {what} is {original}: a pruned "
            f"size must be from 1 to {original}"
        )


def explicit_target(
    teacher: Shape,
    *,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    num_attention_heads: int | None = None,
    num_layers: int | None = None,
    hidden_per_head: bool = False,
) -> Shape:
    """The teacher's shape with the given sizes replaced, checked against the teacher
    (``hidden_per_head``: the architecture needs the hidden size to be a multiple of the heads,
    ``hidden_must_divide_heads``)."""
    target = teacher
    if hidden_size is not None:
        _check_size("hiddenSize", hidden_size, teacher.hidden, "hidden_size")
        target = replace(target, hidden=hidden_size)
    if intermediate_size is not None:
        _check_size(
            "intermediateSize", intermediate_size, teacher.intermediate, "intermediate_size"
        )
        target = replace(target, intermediate=intermediate_size)
    if num_layers is not None:
        _check_size("numLayers", num_layers, teacher.layers, "num_hidden_layers")
        target = replace(target, layers=num_layers)
    if num_attention_heads is not None:
        _check_size("numAttentionHeads", num_attention_heads, teacher.heads, "num_attention_heads")
        per_group = teacher.heads_per_group
        if num_attention_heads % per_group:
            allowed = ", ".join(str(per_group * g) for g in range(1, teacher.kv_heads + 1))
            raise PruneError(
                f"student.prune.numAttentionHeads is {num_attention_heads} but the teacher has "
                f"{teacher.heads} query heads in {teacher.kv_heads} KV groups ({per_group} per "
                f"group) and whole groups are pruned: allowed values are {allowed}"
            )
        target = replace(
            target, heads=num_attention_heads, kv_heads=num_attention_heads // per_group
        )
    if hidden_per_head and target.hidden % target.heads:
        nearest = _round_down(target.hidden, target.heads)
        raise PruneError(
            f"student.prune: hidden size {target.hidden} is not a multiple of the "
            f"{target.heads} attention heads, which transformers requires: set "
            f"hiddenSize to a multiple of {target.heads} (e.g. {nearest}) or change "
            "numAttentionHeads"
        )
    return target


BudgetAxes = Literal["width", "depth", "both"]


def _align(size: int) -> int:
    """Channel multiple kept by budget search: 128 on real models (GPU kernels like it, and
    W4A16 quantises weights in groups of 128 columns, which must divide the width); tiny models
    use 8 so a budget can still be met closely."""
    return 128 if size >= 1024 else 8


def _round_down(value: float, step: int) -> int:
    return max(step, int(value) // step * step)


def _widest(
    parameters: Mapping[str, Sequence[int]],
    teacher: Shape,
    layers: int,
    budget: int,
    hidden_per_head: bool = False,
) -> Shape | None:
    """The widest shape with ``layers`` layers under ``budget``: hidden and MLP shrink by one
    factor (heads kept, as Minitron found head pruning hurts most), then the MLP grows back in
    aligned steps to use what is left of the budget."""
    h_step, i_step = _align(teacher.hidden), _align(teacher.intermediate)
    if hidden_per_head:  # e.g. Llama's config refuses a hidden size the heads do not divide
        h_step = math.lcm(h_step, teacher.heads)
    best: Shape | None = None
    for step in range(1000, 0, -1):
        factor = step / 1000
        candidate = replace(
            teacher,
            layers=layers,
            hidden=min(teacher.hidden, _round_down(teacher.hidden * factor, h_step)),
            intermediate=min(
                teacher.intermediate, _round_down(teacher.intermediate * factor, i_step)
            ),
        )
        if count_parameters(parameters, candidate) <= budget:
            best = candidate
            break
    if best is None:
        return None
    while best.intermediate + i_step <= teacher.intermediate:
        grown = replace(best, intermediate=best.intermediate + i_step)
        if count_parameters(parameters, grown) > budget:
            break
        best = grown
    return best


def fit_budget(
    parameters: Mapping[str, Sequence[int]],
    teacher: Shape,
    budget: int,
    axes: BudgetAxes = "width",
    hidden_per_head: bool = False,
) -> Shape:
    """The largest shape whose parameter count is at most ``budget``.

    - ``width``: all layers kept; hidden and MLP widths shrink (``_widest``);
    - ``depth``: widths kept; as many layers as fit;
    - ``both``: the reduction is shared: layers shrink by the square root of the budget ratio,
      then the widths fill the rest.
    """
    full = count_parameters(parameters, teacher)
    if budget >= full:
        raise PruneError(
            f"student.prune.parameterBudget is {budget:,} but the teacher has only {full:,} "
            f"parameters: the budget must be below {full:,}"
        )
    if axes == "depth":
        for layers in range(teacher.layers - 1, 0, -1):
            candidate = replace(teacher, layers=layers)
            if count_parameters(parameters, candidate) <= budget:
                return candidate
        found = None
    else:
        layers = teacher.layers
        if axes == "both":
            layers = max(1, min(teacher.layers, round(teacher.layers * math.sqrt(budget / full))))
        found = _widest(parameters, teacher, layers, budget, hidden_per_head)
    if found is None:
        smallest = narrowest(teacher, 1 if axes == "depth" else layers, hidden_per_head)
        floor = count_parameters(parameters, smallest)
        raise PruneError(
            f"student.prune.parameterBudget is {budget:,}: no {axes} pruning of this teacher "
            f"fits it; the smallest it can reach (hidden {smallest.hidden}, intermediate "
            f"{smallest.intermediate}, {smallest.layers} layers; the embeddings keep the "
            f"vocabulary) has {floor:,} parameters: give a budget of at least {floor:,}"
            + ("" if axes == "both" else ', or budgetAxes "both"')
        )
    return found


def narrowest(teacher: Shape, layers: int, hidden_per_head: bool = False) -> Shape:
    """The smallest shape the budget search tries with ``layers`` layers: one aligned step of
    hidden and MLP width (``_widest``'s steps), the heads kept."""
    h_step, i_step = _align(teacher.hidden), _align(teacher.intermediate)
    if hidden_per_head:
        h_step = math.lcm(h_step, teacher.heads)
    return replace(
        teacher,
        layers=layers,
        hidden=min(teacher.hidden, h_step),
        intermediate=min(teacher.intermediate, i_step),
    )


# --------------------------------------------------------------------------------------------
# Importance
# --------------------------------------------------------------------------------------------


@dataclass
class Importance:
    """Importance scores of one teacher on one calibration set (higher = keep).

    ``hidden`` [hidden]; ``neurons`` [layers, intermediate]; ``heads`` [layers, heads];
    ``layers`` [layers]; ``depth_method`` says how ``layers`` was scored.
    """

    hidden: torch.Tensor
    neurons: torch.Tensor
    heads: torch.Tensor
    layers: torch.Tensor
    depth_method: str
    samples: int

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "hidden": self.hidden,
            "neurons": self.neurons,
            "heads": self.heads,
            "layers": self.layers,
        }

    def groups(self, kv_heads: int) -> torch.Tensor:
        """[layers, kv_heads]: the score of a KV group is the sum of its query heads'."""
        layers, heads = self.heads.shape
        return self.heads.reshape(layers, kv_heads, heads // kv_heads).sum(-1)


def _masked_seq_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[batch, seq, ...] -> [batch, ...]: mean over the real (unpadded) tokens."""
    weights = mask.to(values.dtype).reshape(*mask.shape, *([1] * (values.dim() - 2)))
    return (values * weights).sum(1) / weights.sum(1).clamp_min(1)


def _batches(
    tokenizer: Any, prompts: Sequence[str], batch_size: int, max_length: int, device: Any
) -> Iterable[dict[str, torch.Tensor]]:
    for start in range(0, len(prompts), batch_size):
        encoded = tokenizer(
            list(prompts[start : start + batch_size]),
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
        )
        yield {k: v.to(device) for k, v in encoded.items() if k in ("input_ids", "attention_mask")}


def _lm_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over the real tokens, and nothing else."""
    import torch

    logits = model(**batch).logits[:, :-1].float()
    targets = batch["input_ids"][:, 1:]
    mask = batch["attention_mask"][:, 1:].bool() & batch["attention_mask"][:, :-1].bool()
    losses = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    )
    return losses[mask.reshape(-1)].sum()


def collect_importance(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    depth_method: str = "cosine",
    batch_size: int = 8,
    max_length: int = 256,
    progress: Any = None,
) -> Importance:
    """Score every prunable unit of ``model`` on ``prompts`` (see the module docstring)."""
    import torch

    if not prompts:
        raise PruneError("student.prune.calibrationSamples: no calibration prompts to score with")
    shape = shape_of(model.config)
    layers = model.model.layers
    device = next(model.parameters()).device
    hidden = torch.zeros(shape.hidden, dtype=torch.float64)
    neurons = torch.zeros(shape.layers, shape.intermediate, dtype=torch.float64)
    heads = torch.zeros(shape.layers, shape.heads, dtype=torch.float64)
    depth = torch.zeros(shape.layers, dtype=torch.float64)
    mask_box: dict[str, torch.Tensor] = {}

    def squares(values: torch.Tensor) -> torch.Tensor:
        """|activation| averaged over the sequence, squared per sample and summed over the batch
        (the square root at the end gives Minitron's L2-over-batch)."""
        per_sample = _masked_seq_mean(values.float().abs(), mask_box["mask"])
        return per_sample.double().pow(2).sum(0).cpu()

    def on_norm(_module: Any, _args: Any, output: torch.Tensor) -> None:
        hidden.add_(squares(output))

    def on_down(index: int) -> Any:
        def hook(_module: Any, args: tuple[torch.Tensor, ...]) -> None:
            neurons[index].add_(squares(args[0]))

        return hook

    def on_o_proj(index: int) -> Any:
        def hook(_module: Any, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]
            per_head = x.float().reshape(*x.shape[:-1], shape.heads, shape.head_dim).norm(dim=-1)
            heads[index].add_(squares(per_head))

        return hook

    def on_block(index: int) -> Any:
        def hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if depth_method != "cosine":
                return
            inputs = args[0] if args else kwargs["hidden_states"]
            outputs = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(inputs.float(), outputs.float(), dim=-1)
            depth[index] += float(_masked_seq_mean(1 - cos, mask_box["mask"]).sum())

        return hook

    handles = [model.model.norm.register_forward_hook(on_norm)]
    for index, layer in enumerate(layers):
        handles += [
            layer.input_layernorm.register_forward_hook(on_norm),
            layer.post_attention_layernorm.register_forward_hook(on_norm),
            layer.mlp.down_proj.register_forward_pre_hook(on_down(index)),
            layer.self_attn.o_proj.register_forward_pre_hook(on_o_proj(index)),
            layer.register_forward_hook(on_block(index), with_kwargs=True),
        ]
    model.eval()
    base_loss = 0.0
    try:
        with torch.no_grad():
            for batch in _batches(tokenizer, prompts, batch_size, max_length, device):
                mask_box["mask"] = batch["attention_mask"]
                base_loss += float(_lm_loss(model, batch))
                if progress is not None:
                    progress(len(batch["input_ids"]))
    finally:
        for handle in handles:
            handle.remove()
    if depth_method == "cosine":
        depth /= len(prompts)
    else:
        depth = _loss_increase(model, tokenizer, prompts, batch_size, max_length, base_loss)
    return Importance(
        hidden=hidden.sqrt().float(),
        neurons=neurons.sqrt().float(),
        heads=heads.sqrt().float(),
        layers=depth.float(),
        depth_method=depth_method,
        samples=len(prompts),
    )


def _loss_increase(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    batch_size: int,
    max_length: int,
    base_loss: float,
) -> torch.Tensor:
    """Per layer: calibration loss with that block skipped (its output = its input) minus the
    full model's loss. One pass over the prompts per layer."""
    import torch

    def skip(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        inputs = args[0] if args else kwargs["hidden_states"]
        return (inputs, *output[1:]) if isinstance(output, tuple) else inputs

    device = next(model.parameters()).device
    increase = torch.zeros(len(model.model.layers), dtype=torch.float64)
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            handle = layer.register_forward_hook(skip, with_kwargs=True)
            try:
                loss = sum(
                    float(_lm_loss(model, batch))
                    for batch in _batches(tokenizer, prompts, batch_size, max_length, device)
                )
            finally:
                handle.remove()
            increase[index] = loss - base_loss
    return increase


def random_importance(shape: Shape, seed: int) -> Importance:
    """Random scores of the right shapes: the baseline that real importance must beat."""
    import torch

    generator = torch.Generator().manual_seed(seed)

    def rand(*size: int) -> torch.Tensor:
        return torch.rand(*size, generator=generator)

    return Importance(
        hidden=rand(shape.hidden),
        neurons=rand(shape.layers, shape.intermediate),
        heads=rand(shape.layers, shape.heads),
        layers=rand(shape.layers),
        depth_method="random",
        samples=0,
    )


def save_importance(importance: Importance, path: str) -> None:
    from safetensors.torch import save_file

    metadata = {"depth_method": importance.depth_method, "samples": str(importance.samples)}
    save_file({k: v.contiguous() for k, v in importance.tensors().items()}, path, metadata)


def load_importance(path: str) -> Importance:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    return Importance(
        **tensors,
        depth_method=metadata.get("depth_method", "cosine"),
        samples=int(metadata.get("samples", "0")),
    )


# --------------------------------------------------------------------------------------------
# Cutting the weights
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Keep:
    """Indices kept, in their original order. Per-layer lists are indexed by *teacher* layer."""

    hidden: list[int]
    layers: list[int]
    neurons: dict[int, list[int]]
    kv_groups: dict[int, list[int]]


def _top(scores: torch.Tensor, count: int) -> list[int]:
    """Indices of the ``count`` highest scores, ascending (original channel order)."""
    return sorted(int(i) for i in scores.topk(count).indices)


def choose(importance: Importance, teacher: Shape, target: Shape) -> Keep:
    """What survives: the top channels/groups of each kept layer and the top layers."""
    kept_layers = _top(importance.layers, target.layers)
    groups = importance.groups(teacher.kv_heads)
    return Keep(
        hidden=_top(importance.hidden, target.hidden),
        layers=kept_layers,
        neurons={i: _top(importance.neurons[i], target.intermediate) for i in kept_layers},
        kv_groups={i: _top(groups[i], target.kv_heads) for i in kept_layers},
    )


def _rows(groups: list[int], per_group: int, head_dim: int) -> list[int]:
    """Weight rows of the heads in ``groups`` (``per_group`` heads each, ``head_dim`` rows each)."""
    return [
        row
        for g in groups
        for head in range(g * per_group, (g + 1) * per_group)
        for row in range(head * head_dim, (head + 1) * head_dim)
    ]


def prune_state(
    state: Mapping[str, torch.Tensor], keep: Keep, teacher: Shape
) -> dict[str, torch.Tensor]:
    """The teacher's weights cut to ``keep``, with layers renumbered 0..n-1."""
    out: dict[str, torch.Tensor] = {}
    renumber = {old: new for new, old in enumerate(keep.layers)}
    for name, tensor in state.items():
        match = _LAYER_RE.match(name)
        layer = int(match.group(1)) if match else None
        if layer is not None and layer not in renumber:
            continue
        index: dict[Axis, list[int]] = {"h": keep.hidden}
        if layer is not None:
            index["i"] = keep.neurons[layer]
            index["q"] = _rows(keep.kv_groups[layer], teacher.heads_per_group, teacher.head_dim)
            index["kv"] = _rows(keep.kv_groups[layer], 1, teacher.head_dim)
        cut = tensor
        for dim, axis in enumerate(rule_of(name)):
            if axis != "-":
                positions = index[axis]
                cut = cut.index_select(dim, _as_index(positions, tensor))
        if match is not None and layer is not None:
            name = f"model.layers.{renumber[layer]}.{match.group(2)}"
        out[name] = cut.contiguous()
    return out


def _as_index(positions: list[int], like: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.tensor(positions, dtype=torch.long, device=like.device)


def pruned_config(config: Any, target: Shape, kept_layers: list[int]) -> Any:
    """A copy of ``config`` with the target sizes (head_dim written out, since the default
    hidden/heads would change with the hidden size)."""
    new = config.__class__.from_dict(config.to_dict())
    new.hidden_size = target.hidden
    new.intermediate_size = target.intermediate
    new.num_attention_heads = target.heads
    new.num_key_value_heads = target.kv_heads
    new.num_hidden_layers = target.layers
    new.head_dim = target.head_dim
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        new.layer_types = [layer_types[i] for i in kept_layers]
    return new


def build_pruned(model: Any, keep: Keep, target: Shape) -> Any:
    """A new model of the teacher's class holding the cut weights (strictly loaded, so every
    tensor has exactly the shape the pruned config promises)."""
    import torch

    teacher = shape_of(model.config)
    config = pruned_config(model.config, target, keep.layers)
    with torch.device("meta"):
        pruned = type(model)(config)
    state = prune_state(model.state_dict(), keep, teacher)
    pruned.load_state_dict(state, strict=True, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        pruned.tie_weights()
    pruned.generation_config = model.generation_config
    # Buffers outside the state dict (the rotary embedding's frequencies) are still on meta:
    # build those modules again, on the CPU, from the pruned config.
    on_meta = [
        name
        for name, module in pruned.named_modules()
        if any(b.is_meta for b in module.buffers(recurse=False))
    ]
    for name in on_meta:
        _rebuild(pruned, name, config)
    return pruned.to(next(model.parameters()).device)


def _rebuild(root: Any, name: str, config: Any) -> None:
    """Replace submodule ``name`` (a rotary embedding) by a fresh CPU copy built from
    ``config``."""
    import torch

    module = root.get_submodule(name)
    if "rotary" not in type(module).__name__.lower():
        raise PruneError(f"cannot rebuild {name} ({type(module).__name__}) after pruning")
    parent, _, attribute = name.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    with torch.device("cpu"):
        setattr(owner, attribute, type(module)(config))


def parameter_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    """name -> shape of every parameter (tied weights once), the input of ``count_parameters``."""
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def describe(shape: Shape) -> dict[str, int]:
    return asdict(shape)
