"""MoE blocks of MoE sources mapped into the target's MoE, which is DeepSeek-V3's (`bailing_hybrid` and `deepseek_v3`).

Target routing (transformers' BailingHybridTopkRouter = DeepseekV3TopkRouter; DeepSeek-V3 report §2.1.2):

    l = W x          s = σ(l)          choice = s + b          idx = group-limited top-k of choice
    w = s[idx]       w ← w / Σw  (if renormalised)             w ← ρ·w
    y = Σ_k w_k · down_k(silu(gate_k x) ⊙ up_k x) + shared(x)           (shared expert ungated)

Sources whose router is that function (`sigmoid`: deepseek_v3, glm4_moe, dots1) are copied tensor for tensor.
`softmax` sources (mixtral, qwen3_moe, qwen2_moe, olmoe) score p = softmax(l), pick top-k of p and optionally
renormalise. σ and softmax are both monotone in l, so any W' = W + 1vᵀ (one vector v added to every expert row: a
per-token shift c(x) = v·x common to all experts) keeps every token's top-k choice. The weights follow from
σ(z) = e^z / (1 + e^z) → e^z as z → −∞: with c(x) ≈ −m − log Σ_j e^{l_j(x)},

    σ(l_i + c) ≈ e^{l_i − log Z} · e^{−m} = p_i · e^{−m}.

Renormalised sources: the renormalisation cancels e^{−m} and any error of c, so the weights converge to the source's as
m grows. Unnormalised sources: the target renormalises too (vLLM always does), so their weights p_i become
ρ·p_i / Σ_S p_j with ρ a least-squares constant: approximate, measured. v is the least-squares fit of c on
calibration inputs (`fit_router_shift`); it works where inputs share a direction, as the residual stream of trained
LLMs does, and is kept only where it measurably helps (`map_softmax_router`).
bailing's router has no logit bias, so no linear map is exact in general (research/moe.md §2a).
"""

from __future__ import annotations

import math

import torch

from ling_surgery.surgery.architectures import SIGMOID, MoEShape, MoESpec, target_routing
from ling_surgery.surgery.errors import SurgeryError

ROUTER_MARGIN = 16.0  # m above: relative weight error ~e^{-m}·p ≈ 1e-7 p, far from fp32 underflow (σ(-87))
CALIBRATION_TOKENS_PER_LAYER = 4096  # MoE inputs kept per layer to fit and measure the router map


# --- routing, as pure functions (parity with transformers' routers is tested) -------------------------------------

def softmax_route(logits: torch.Tensor, top_k: int, renormalise: bool):
    """Mixtral/Qwen-MoE/OLMoE routing: (expert indices, weights), both (N, k)."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, idx = torch.topk(probs, top_k, dim=-1)
    if renormalise:
        weights = weights / weights.sum(-1, keepdim=True)
    return idx, weights


def sigmoid_route(logits: torch.Tensor, bias: torch.Tensor, shape: MoEShape):
    """DeepSeek-V3's routing (the target's): σ scores, choice-only bias, group-limited top-k, renorm, scaling."""
    scores = logits.float().sigmoid()
    choice = scores + bias.float().to(scores.device)
    experts = choice.shape[-1]
    grouped = choice.view(-1, shape.n_group, experts // shape.n_group)
    group_idx = grouped.topk(2, dim=-1)[0].sum(-1).topk(shape.topk_group, dim=-1, sorted=False)[1]
    keep = torch.zeros(len(choice), shape.n_group, dtype=torch.bool, device=choice.device).scatter_(1, group_idx, True)
    choice = choice.masked_fill(~keep.repeat_interleave(experts // shape.n_group, dim=1), float("-inf"))
    idx = torch.topk(choice, shape.top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, idx)
    if shape.renormalise:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return idx, weights * shape.scaling


def experts_output(gate_up: torch.Tensor, down: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
                   x: torch.Tensor) -> torch.Tensor:
    """Σ_k w_k · down_k(silu(gate_k x) ⊙ up_k x) for fused experts gate_up (E, 2I, H), down (E, H, I)."""
    out = torch.zeros_like(x)
    for e in idx.unique().tolist():
        token, slot = torch.where(idx == e)
        gate, up = (x[token] @ gate_up[e].T).chunk(2, dim=-1)
        out.index_add_(0, token, (torch.nn.functional.silu(gate) * up) @ down[e].T * weights[token, slot, None])
    return out


def mlp_output(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T


# --- the maps -------------------------------------------------------------------------------------------------------

def fit_router_shift(weight: torch.Tensor, inputs: torch.Tensor, margin: float = ROUTER_MARGIN) -> torch.Tensor:
    """v of W' = W + 1vᵀ: the least-squares fit of v·x ≈ −m − log Σ_j e^{l_j(x)} on calibration inputs (N, H)."""
    x = inputs.double()
    target = -margin - torch.logsumexp(x @ weight.double().T, dim=-1)
    moment = x.T @ x / len(x)
    ridge = 1e-6 * moment.diagonal().mean().clamp_min(1e-12)
    return torch.linalg.solve(moment + ridge * torch.eye(len(moment), dtype=x.dtype), x.T @ target / len(x))


def map_softmax_router(weight: torch.Tensor, shape: MoEShape, inputs: torch.Tensor | None):
    """The target router's weight for a softmax router, and ρ, the scale of the routed experts' outputs: the closest
    map that keeps every top-k choice.

    The target renormalises (vLLM does whatever config.json says): a renormalised source's weights are then matched to
    ~e^{-m}; an unnormalised one's p_i become ρ·p_i/Σ_S p_j, ρ the least-squares constant (folded into the experts'
    down_proj, since routed_scaling_factor is one number for the whole model). Candidates: W itself (v = 0) and
    W + 1vᵀ (`fit_router_shift`). The shifted router is kept only where, rounded to the checkpoint's dtype (bf16
    rounding of W + 1vᵀ is not common to all experts), it keeps every choice on the calibration inputs and lowers the
    routing-weight L1 there. Without calibration inputs: W, ρ = 1.
    """
    if inputs is None or len(inputs) == 0:
        return weight.clone(), 1.0
    x = inputs.double()
    src_idx, src_w = softmax_route(x @ weight.double().T, shape.top_k, shape.renormalise)
    target = target_routing(shape)
    best = None
    for candidate in (weight.clone(), (weight.double() + fit_router_shift(weight, inputs)).to(weight.dtype)):
        idx, w = sigmoid_route(x @ candidate.double().T, torch.zeros(shape.num_experts), target)
        if not torch.equal(idx.sort(-1).values, src_idx.sort(-1).values):
            continue
        scale = 1.0
        if not shape.renormalise:  # min Σ (ρ w' − w)² over the selected experts (both ordered by expert index)
            a, b = w.gather(1, idx.argsort(-1)).double(), src_w.gather(1, src_idx.argsort(-1)).double()
            scale = float((a * b).sum() / (a * a).sum().clamp_min(1e-300))
        l1 = (_dense(idx, w * scale, shape.num_experts) - _dense(src_idx, src_w, shape.num_experts)).abs().sum(-1).mean()
        if best is None or l1 < best[0]:
            best = (float(l1), candidate, scale)
    if best is None:  # not even W keeps the choice: σ saturates (ties at 1.0) where softmax still ranks
        return weight.clone(), 1.0
    return best[1], best[2]


def map_router(weight: torch.Tensor, bias: torch.Tensor | None, shape: MoEShape, inputs: torch.Tensor | None):
    """The target router of one source router: (weight, selection bias, ρ the scale of the routed experts' outputs).
    Sigmoid routers are copied with their bias; softmax routers go through `map_softmax_router`, with bias 0."""
    if shape.router == SIGMOID:
        return weight.clone(), bias.clone(), 1.0
    mapped, scale = map_softmax_router(weight, shape, inputs)
    return mapped, torch.zeros(shape.num_experts, dtype=torch.float32), scale


def shared_gate_scale(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, token_gate: torch.Tensor,
                      inputs: torch.Tensor | None) -> float:
    """Qwen2-MoE's shared expert is scaled per token by σ(g·x); the target's is not. The best constant γ (least
    squares: min E‖σ(g·x)·y − γ·y‖² over calibration inputs, y the shared expert's output) replaces it; 1/2 (σ(0))
    without calibration inputs."""
    if inputs is None or len(inputs) == 0:
        return 0.5
    x = inputs.double()
    energy = mlp_output(gate.double(), up.double(), down.double(), x).pow(2).sum(-1)
    sigma = torch.sigmoid(x @ token_gate.double().reshape(-1))
    return float((sigma * energy).sum() / energy.sum().clamp_min(1e-30))


def init_moe(ledger, prefix: str, spec: MoESpec, shape: MoEShape, inputs: torch.Tensor | None = None):
    """The target's MoE block (names relative to its `mlp`) from one source MoE layer `prefix` (its decoder layer).

    | target                          | from                                                                    |
    |---------------------------------|-------------------------------------------------------------------------|
    | experts.gate_up_proj / down_proj| copied (fused (E, 2I, H) with gate rows first, and (E, H, I) in both);   |
    |                                 | an unnormalised softmax router's ρ folded into down_proj                |
    | gate.weight                     | sigmoid routers: copied; softmax routers: W + 1vᵀ (`fit_router_shift`)  |
    | gate.e_score_correction_bias    | sigmoid routers: copied; softmax routers: 0                             |
    | shared_experts.*                | copied, zero-padded to a whole number of experts; a token-gated one ×γ   |
    |                                 | (`shared_gate_scale`); none in the source: gate/up = the experts' mean,  |
    |                                 | down = 0 (exact, and trainable)                                         |

    The target router's renormalisation, scaling and groups are `target_routing(shape)`.
    """
    block = f"{prefix}.{spec.block}"
    gate_up = ledger.take(f"{block}.experts.gate_up_proj")
    down = ledger.take(f"{block}.experts.down_proj")
    width = shape.expert_width
    if tuple(gate_up.shape) != (shape.num_experts, 2 * width, gate_up.shape[-1]) or down.shape[-1] != width:
        raise SurgeryError(f"{block}.experts: tensors {tuple(gate_up.shape)} / {tuple(down.shape)} do not match "
                           f"{shape.num_experts} experts of width {width} (experts of unequal size are not supported)")
    router = ledger.take(f"{block}.gate.weight")
    bias = ledger.take(f"{block}.gate.{spec.selection_bias}") if spec.router == SIGMOID else None
    weight, bias, scale = map_router(router, bias, shape, inputs)
    out = {"experts.gate_up_proj": gate_up.clone(), "gate.weight": weight, "gate.e_score_correction_bias": bias,
           "experts.down_proj": down.clone() if scale == 1.0 else (down.double() * scale).to(down.dtype)}

    total = shape.target_shared_experts * width
    hidden = gate_up.shape[-1]
    if shape.shared_width:
        names = ("gate_proj", "up_proj", "down_proj")
        sg, su, sd = (ledger.take(f"{block}.{spec.shared}.{n}.weight").double() for n in names)
        if shape.shared_gated:
            sd = sd * shared_gate_scale(sg, su, sd, ledger.take(f"{block}.{spec.shared_gate}.weight"), inputs)
        pad = total - shape.shared_width
        sg, su = (torch.cat([w, w.new_zeros(pad, hidden)]) for w in (sg, su))
        sd = torch.cat([sd, sd.new_zeros(hidden, pad)], dim=1)
    else:
        sg, su = gate_up.double().mean(0).chunk(2, dim=0)
        sd = torch.zeros(hidden, total, dtype=torch.float64)
    dtype = gate_up.dtype
    out.update({"shared_experts.gate_proj.weight": sg.to(dtype), "shared_experts.up_proj.weight": su.to(dtype),
                "shared_experts.down_proj.weight": sd.to(dtype)})
    return out


# --- how close the map is ---------------------------------------------------------------------------------------------

def _dense(idx: torch.Tensor, weights: torch.Tensor, experts: int) -> torch.Tensor:
    return torch.zeros(len(idx), experts, dtype=torch.float64).scatter_(1, idx, weights.double())


def routing_fidelity(source: dict, target: dict, shape: MoEShape, inputs: torch.Tensor,
                     shared_gate: torch.Tensor | None = None) -> dict:
    """How well the target MoE block reproduces the source's on inputs (N, H), in float64.

    `source`/`target`: the blocks' tensors under the target's names (`init_moe`'s keys; the source's token gate
    apart). Returns top-k agreement (share of tokens choosing the same experts), routing-weight L1 (mean over tokens
    of Σ_e |w'_e − w_e|) and the block output's relative error ‖y' − y‖ / ‖y‖.
    """
    x = inputs.double()
    experts = shape.num_experts
    src_logits = x @ source["gate.weight"].double().T
    if shape.router == SIGMOID:
        src_idx, src_w = sigmoid_route(src_logits, source["gate.e_score_correction_bias"], shape)
    else:
        src_idx, src_w = softmax_route(src_logits, shape.top_k, shape.renormalise)
    dst_idx, dst_w = sigmoid_route(x @ target["gate.weight"].double().T, target["gate.e_score_correction_bias"],
                                   target_routing(shape))
    same = (src_idx.sort(-1).values == dst_idx.sort(-1).values).all(-1)
    l1 = (_dense(src_idx, src_w, experts) - _dense(dst_idx, dst_w, experts)).abs().sum(-1)

    def output(tensors, idx, w, gate=None):
        f64 = {k: v.double() for k, v in tensors.items()}
        y = experts_output(f64["experts.gate_up_proj"], f64["experts.down_proj"], idx, w.double(), x)
        if "shared_experts.down_proj.weight" not in f64:  # a source without shared experts
            return y
        shared = mlp_output(f64["shared_experts.gate_proj.weight"], f64["shared_experts.up_proj.weight"],
                            f64["shared_experts.down_proj.weight"], x)
        if gate is not None:
            shared = shared * torch.sigmoid(x @ gate.double().reshape(-1, 1))
        return y + shared

    y_src = output(source, src_idx, src_w, shared_gate)
    y_dst = output(target, dst_idx, dst_w)
    return {"topk_agreement": float(same.double().mean()), "weight_l1": float(l1.mean()),
            "block_relative_error": float((y_dst - y_src).norm() / y_src.norm().clamp_min(1e-30))}


def source_block(state: dict, prefix: str, spec: MoESpec) -> tuple[dict, torch.Tensor | None]:
    """One source MoE layer's tensors under the target's names (for `routing_fidelity`), and its shared expert's token
    gate (None when it has none). Read-only: the init maps' ledger is not involved."""
    block = f"{prefix}.{spec.block}"
    out = {"experts.gate_up_proj": state[f"{block}.experts.gate_up_proj"],
           "experts.down_proj": state[f"{block}.experts.down_proj"], "gate.weight": state[f"{block}.gate.weight"]}
    bias = state.get(f"{block}.gate.{spec.selection_bias}") if spec.selection_bias else None
    out["gate.e_score_correction_bias"] = torch.zeros(len(out["gate.weight"])) if bias is None else bias
    if spec.shared and f"{block}.{spec.shared}.down_proj.weight" in state:
        for name in ("gate_proj", "up_proj", "down_proj"):
            out[f"shared_experts.{name}.weight"] = state[f"{block}.{spec.shared}.{name}.weight"]
    gate = state.get(f"{block}.{spec.shared_gate}.weight") if spec.shared_gate else None
    return out, gate


def fidelity_by_layer(teacher_state: dict, student_state: dict | None, arch, shape: MoEShape, stats) -> dict[int, dict]:
    """`routing_fidelity` of every MoE layer on its calibration inputs (`LayerStats.moe_inputs`); empty without them.
    `student_state` None: each block is mapped here (`init_moe`), as the init stage would."""
    from ling_surgery.surgery.init_maps import Ledger

    out = {}
    for i, sparse in enumerate(shape.sparse):
        inputs = None if stats is None else stats[i].moe_inputs
        if not sparse or inputs is None:
            continue
        layer = f"{arch.layers}.{i}"
        source, gate = source_block(teacher_state, layer, arch.moe)
        if student_state is None:
            block = f"{layer}.{arch.moe.block}."
            target = init_moe(Ledger({k: v for k, v in teacher_state.items() if k.startswith(block)}), layer, arch.moe,
                              shape, inputs)
        else:
            prefix = f"model.layers.{i}.mlp."
            target = {k[len(prefix):]: v for k, v in student_state.items() if k.startswith(prefix)}
        out[i] = routing_fidelity(source, target, shape, inputs, gate)
    return out


def measure_map(teacher, teacher_state: dict, student_state: dict | None, arch, shape: MoEShape, stats,
                windows: torch.Tensor) -> dict:
    """What the init stage records and `plan --measure` prints for an MoE source: `moe_routing` (per layer,
    `fidelity_by_layer`) and `moe_router_swap` (`router_swap` on `windows`); empty without calibration inputs."""
    routing = fidelity_by_layer(teacher_state, student_state, arch, shape, stats)
    if not routing:
        return {}
    metrics = {"moe_routing": {str(i): f for i, f in routing.items()}}
    swap = router_swap(teacher, arch, shape, stats, windows)
    if swap is not None:
        metrics["moe_router_swap"] = swap
    return metrics


def print_map(console, metrics: dict, shape: MoEShape) -> None:
    """`measure_map`'s metrics as the per-layer table and one line for the router-only swap."""
    if not metrics:
        return
    console.print(fidelity_table({int(i): f for i, f in metrics["moe_routing"].items()}, shape))
    swap = metrics.get("moe_router_swap")
    if swap is not None:
        console.print(f"source with only its routers swapped: KL {swap['kl']:.3g} nats/token, perplexity "
                      f"{swap['perplexity_source']:.4g} → {swap['perplexity_swapped']:.4g} ({swap['tokens']} "
                      "calibration tokens)")


def fidelity_table(fidelity: dict[int, dict], shape: MoEShape):
    """Per MoE layer, how closely the target's router and experts reproduce the source's on calibration text."""
    from rich.table import Table

    router = "copied (DeepSeek-V3's)" if shape.router == SIGMOID else "softmax → sigmoid, choice kept"
    caption = ("the source's shared expert is scaled per token by σ(g·x), which the target cannot represent: it is "
               "replaced by its least-squares constant (in the block error)" if shape.shared_gated else None)
    table = Table(title=f"MoE blocks after init ({router}; on calibration text)", caption=caption)
    for col in ("layer", "top-k agreement", "routing-weight L1", "block rel. error"):
        table.add_column(col, justify="right")
    for i, f in fidelity.items():
        table.add_row(str(i), f"{f['topk_agreement']:.2%}", f"{f['weight_l1']:.3g}", f"{f['block_relative_error']:.3g}")
    return table


def router_swap(teacher, arch, shape: MoEShape, stats, windows: torch.Tensor, batch_size: int = 2) -> dict | None:
    """The end-to-end cost of the router map alone: KL(source ‖ source whose routers are the mapped sigmoid routers) per
    token on `windows`, and both perplexities. The experts, shared experts and attention stay the source's, so this
    separates router error from everything the conversion replaces. Exact routers (sigmoid sources) give 0.

    The swap is a forward hook on each source router returning the mapped routing (logits, weights, expert indices:
    what every source router returns); the mapped router is `init_moe`'s (`map_router`, on the same inputs).
    None without calibration inputs."""
    from ling_surgery.surgery.architectures import get_module

    layers = get_module(teacher, arch.layers)
    target = target_routing(shape)
    mapped = {}
    for i, sparse in enumerate(shape.sparse):
        inputs = None if stats is None else stats[i].moe_inputs
        if not sparse or inputs is None:
            continue
        router = get_module(layers[i], f"{arch.moe.block}.gate")
        bias = getattr(router, arch.moe.selection_bias) if shape.router == SIGMOID else None
        mapped[i] = (router, *map_router(router.weight.detach(), bias, shape, inputs))
    if not mapped:
        return None

    def nll(logits, ids):
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")

    from ling_surgery.surgery.distill import kl_divergence

    total = {"kl": 0.0, "source": 0.0, "swapped": 0.0}
    batches = list(windows.split(batch_size))
    with torch.no_grad():
        for ids in batches:
            ids = ids.to(teacher.device)
            reference = teacher(input_ids=ids).logits
            handles = []
            for router, weight, bias, scale in mapped.values():
                def swap(module, args, output, weight=weight, bias=bias, scale=scale):
                    x = args[0].reshape(-1, args[0].shape[-1])
                    logits = x.float() @ weight.float().T
                    idx, w = sigmoid_route(logits, bias.to(logits.device), target)
                    return logits, (w * scale).to(output[1].dtype), idx

                handles.append(router.register_forward_hook(swap))
            try:
                swapped = teacher(input_ids=ids).logits
            finally:
                for handle in handles:
                    handle.remove()
            total["kl"] += kl_divergence(reference, swapped).item() / len(batches)
            total["source"] += nll(reference, ids).item()
            total["swapped"] += nll(swapped, ids).item()
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    return {"kl": total["kl"], "perplexity_source": math.exp(total["source"] / tokens),
            "perplexity_swapped": math.exp(total["swapped"] / tokens), "tokens": int(windows.numel())}


# --- training: DeepSeek-V3's auxiliary-loss-free load balancing ----------------------------------------------------

class ExpertLoad:
    """Counts the tokens each expert of the student's MoE layers receives, and balances them the way DeepSeek-V3 does
    (report §2.1.2, "auxiliary-loss-free load balancing"): after every optimizer step each router's selection bias
    moves by γ towards equal load, b_i ← b_i + γ·sign(mean load − load_i), outside the gradient. The bias only picks
    experts (the weights are σ(l) without it), so this steers load without an auxiliary loss pulling on the router.

    Counts come from forward hooks on the routers (every training forward of the student); over several processes
    they are summed before the update so every process moves its biases alike.
    """

    def __init__(self, model, rate: float):
        from ling_surgery.surgery.plan import moe_layers

        layers = model.model.layers
        self.routers = {i: layers[i].mlp.gate for i, sparse in enumerate(moe_layers(model.config)) if sparse}
        self.rate = rate
        experts = {i: r.e_score_correction_bias.numel() for i, r in self.routers.items()}
        self.step_counts = {i: torch.zeros(n, dtype=torch.float64) for i, n in experts.items()}
        self.total_counts = {i: torch.zeros(n, dtype=torch.float64) for i, n in experts.items()}
        self.handles = []

    def __bool__(self) -> bool:
        return bool(self.routers)

    def __enter__(self):
        for i, router in self.routers.items():
            def hook(module, args, output, i=i):
                # Training forwards only: not evaluation inside a stage (no grad), nor activation checkpointing's
                # recomputation, which runs inside the backward pass (a graph task is running).
                if torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1:
                    idx = output[2].detach().reshape(-1)
                    count = torch.bincount(idx, minlength=len(self.step_counts[i]))
                    self.step_counts[i] += count.cpu().double()

            self.handles.append(router.register_forward_hook(hook))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []

    @torch.no_grad()
    def after_step(self, balance: bool) -> None:
        """End of an optimizer step: sum the step's counts over processes, move the biases (when `balance`), reset."""
        if not self.routers:
            return
        counts = torch.stack(list(self.step_counts.values()))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            device = next(iter(self.routers.values())).e_score_correction_bias.device  # NCCL reduces GPU tensors only
            counts = counts.to(device)
            torch.distributed.all_reduce(counts)
            counts = counts.cpu()
        for (i, router), count in zip(self.routers.items(), counts):
            self.total_counts[i] += count
            if balance and self.rate and count.sum() > 0:
                bias = router.e_score_correction_bias
                bias += (self.rate * torch.sign(count.mean() - count)).to(bias.device, bias.dtype)
            self.step_counts[i].zero_()

    def state(self) -> dict:
        """What a resumed stage needs: the biases and the counts so far."""
        return {"biases": {i: r.e_score_correction_bias.detach().cpu().clone() for i, r in self.routers.items()},
                "counts": {i: c.clone() for i, c in self.total_counts.items()}}

    @torch.no_grad()
    def load_state(self, state: dict) -> None:
        for i, router in self.routers.items():
            router.e_score_correction_bias.copy_(state["biases"][i])
            self.total_counts[i].copy_(state["counts"][i])

    def summary(self) -> dict:
        """Per MoE layer: tokens routed (token × top-k slots), the busiest and idlest expert's load over the mean (1.0
        is perfectly balanced), and every expert's count."""
        out = {}
        for i, count in self.total_counts.items():
            mean = count.mean()
            if mean <= 0:
                continue
            out[str(i)] = {"routed": int(count.sum()), "max_over_mean": round(float(count.max() / mean), 3),
                           "min_over_mean": round(float(count.min() / mean), 3), "counts": [int(c) for c in count]}
        return out


def load_table(summary: dict):
    from rich.table import Table

    table = Table(title="expert load per MoE layer (1.00 = balanced)")
    for col in ("layer", "routed", "busiest / mean", "idlest / mean"):
        table.add_column(col, justify="right")
    for layer, load in summary.items():
        table.add_row(layer, str(load["routed"]), f"{load['max_over_mean']:.2f}", f"{load['min_over_mean']:.2f}")
    return table
