"""Reference maths for the streaming tests, written from the papers' definitions with explicit loops in float64.

A *plan* says, for the query at original position p, which keys it attends to and at which positions the query
and each key are encoded: ``plan(p) -> [(j, q_pos, k_pos), ...]``. RoPE rotates the query at q_pos and the key
at k_pos (their dot product depends on q_pos - k_pos only); ALiBi adds -slope * (q_pos - k_pos).
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple

import torch

from reference import alibi_slope_list, rope_rotate

Plan = Callable[[int], List[Tuple[int, int, int]]]


# ---------------------------------------------------------------------------- the papers' definitions
def streamingllm_plan(start: int, recent: int) -> Plan:
    """StreamingLLM: the cache holds the first ``start`` tokens and the last ``recent`` ones (the query
    included); positions are the indices inside that cache, in order."""
    def plan(p):
        cache = sorted(set(range(min(start, p + 1))) | set(range(max(0, p - recent + 1), p + 1)))
        where = {j: i for i, j in enumerate(cache)}
        return [(j, where[p], where[j]) for j in cache]
    return plan


def lminfinite_plan(n_global: int, n_local: int, ceiling: int) -> Plan:
    """LM-Infinite: Λ mask (the first n_global tokens + the last n_local) and distance min(p - j, L)."""
    def plan(p):
        keys = [j for j in range(p + 1) if j < n_global or p - j < n_local]
        return [(j, j + min(p - j, ceiling), j) for j in keys]
    return plan


def original_plan(start: int, recent: int) -> Plan:
    """Sinks + window at the tokens' original positions (the ablation; the only plan for learned positions)."""
    def plan(p):
        return [(j, p, j) for j in range(p + 1) if j < start or p - j < recent]
    return plan


def lminfinite_middle(n_global: int, n_local: int) -> Callable[[int], List[int]]:
    """The middle tokens LM-Infinite's top-k may pick from: neither global nor local (its columns
    [global_branch, col_high) with col_high = p - local_branch + 1, models/llama.py detailed_lambda_attention)."""
    return lambda p: [j for j in range(p + 1) if j >= n_global and p - j >= n_local]


# ---------------------------------------------------------------------------- attention by plan
def plan_attention(q, k, v, plan: Plan, *, n_rot: int = 0, base: float = 10000.0, slopes=None, topk: int = 0,
                   middle: Optional[Callable[[int], List[int]]] = None, insert_at: int = 0,
                   scale: Optional[float] = None, window: Optional[int] = None, sink_logits=None) -> torch.Tensor:
    """Softmax attention of q (B, T, H, d) over k, v (B, T, G, d) (pre-positional; GQA by h // (H / G)), the
    query at p attending to ``plan(p)``: RoPE on the first ``n_rot`` dims (rotate-half pairs) at the plan's
    positions, or ALiBi ``slopes``. With ``topk``, LM-Infinite's top-k: the query at position ``insert_at`` against
    the un-rotated middle keys (its ``near_query_states`` at ``top_k_insert_at`` times ``stationary_key_states``),
    i.e. every middle token at distance ``insert_at``; the ``topk`` largest of those logits join the softmax, and
    only once ``middle(p)`` holds at least ``topk`` tokens (``col_high >= global_branch + top_k_attention``).
    ``scale``: the logit scale (default 1/sqrt(d)); ``window``: a sliding-window layer sees only the plan's keys
    with q_pos - k_pos < window; ``sink_logits`` (H,): one more softmax column per head with that logit and a zero
    value (gpt-oss). Returns (B, T, H, d) float64."""
    B, T, H, d = q.shape
    G = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)

    rotated = {}                # (tensor, b, head, t, pos) -> the vector rotated at pos (each computed once)

    def enc(x, b, hd, t, pos):
        key = (x is q, b, hd, t, pos)
        if key not in rotated:
            rotated[key] = rope_rotate(x[b, t, hd], pos, n_rot, base) if n_rot else x[b, t, hd].double()
        return rotated[key]

    def logit(b, h, g, p, j, qp, kp):
        s = float(enc(q, b, h, p, qp) @ enc(k, b, g, j, kp)) * scale
        return s - (slopes[h] * (qp - kp) if slopes is not None else 0.0)

    y = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            g = h // (H // G)
            for p in range(T):
                keys = [(j, qp, kp) for j, qp, kp in plan(p) if window is None or qp - kp < window]
                scores = [logit(b, h, g, p, j, qp, kp) for j, qp, kp in keys]
                vals = [v[b, j, g] for j, _, _ in keys]
                if sink_logits is not None:
                    scores.append(float(sink_logits[h]))
                    vals.append(torch.zeros_like(v[b, 0, g]))
                if topk and len(middle(p)) >= topk:
                    mids = sorted(((logit(b, h, g, p, j, insert_at, 0), j) for j in middle(p)), reverse=True)
                    for sc, j in mids[:topk]:
                        scores.append(sc)
                        vals.append(v[b, j, g])
                s = torch.tensor(scores, dtype=torch.float64)
                w = torch.exp(s - s.max())
                w = w / w.sum()
                y[b, p, h] = sum(wi * vi.double() for wi, vi in zip(w, vals))
    return y


def rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w.double()


def layer_norm(x, mod):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + mod.eps) * mod.weight.double() + mod.bias.double()


def silu(x):
    return x / (1.0 + torch.exp(-x))


def gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def lin(x, mod):
    y = x @ mod.weight.double().T
    return y + mod.bias.double() if mod.bias is not None else y


# ---------------------------------------------------------------------------- models written out
def ref_gpt_logits(model, idx: torch.Tensor, plan: Plan, **attn_kw) -> torch.Tensor:
    """Our GPT (pre-norm RMSNorm, SwiGLU, no biases; rope / alibi / nope) with attention by plan.
    ``attn_kw`` (topk, middle, insert_at) applies to layers >= ``topk_from_layer``."""
    cfg = model.config
    assert cfg.norm_class == "rmsnorm" and cfg.norm_position == "pre" and cfg.mlp == "swiglu" and not cfg.bias
    from_layer = attn_kw.pop("topk_from_layer", 0)
    B, T = idx.shape
    H, G, d = cfg.n_head, cfg.n_query_groups, cfg.head_size
    pos_kw = dict(n_rot=cfg.rope_n_elem if cfg.pos_encoding == "rope" else 0, base=cfg.rope_base,
                  slopes=alibi_slope_list(H) if cfg.pos_encoding == "alibi" else None)
    x = model.wte.weight.double()[idx]
    for li, block in enumerate(model.blocks):
        hdn = rms(x, block.norm_1.weight, cfg.norm_eps)
        W = block.attn.qkv.weight.double()
        q = (hdn @ W[: H * d].T).view(B, T, H, d)
        k = (hdn @ W[H * d:(H + G) * d].T).view(B, T, G, d)
        v = (hdn @ W[(H + G) * d:].T).view(B, T, G, d)
        y = plan_attention(q, k, v, plan, **pos_kw, **(attn_kw if li >= from_layer else {}))
        x = x + lin(y.reshape(B, T, H * d), block.attn.proj)
        hdn = rms(x, block.norm_2.weight, cfg.norm_eps)
        gate, up = lin(hdn, block.mlp.fc).chunk(2, dim=-1)
        x = x + lin(silu(gate) * up, block.mlp.proj)
    return lin(rms(x, model.ln_f.weight, cfg.norm_eps), model.lm_head)


def ref_hf_llama_logits(model, idx: torch.Tensor, plan: Plan, **attn_kw) -> torch.Tensor:
    """transformers LlamaForCausalLM (default RoPE, no biases) written out, attention by plan (``attn_kw`` as in
    :func:`ref_gpt_logits`)."""
    from_layer = attn_kw.pop("topk_from_layer", 0)
    cfg = model.config
    B, T = idx.shape
    H = cfg.num_attention_heads
    d = cfg.hidden_size // H
    x = model.model.embed_tokens.weight.double()[idx]
    for li, layer in enumerate(model.model.layers):
        a = layer.self_attn
        hdn = rms(x, layer.input_layernorm.weight, cfg.rms_norm_eps)
        q, k, v = (lin(hdn, m).view(B, T, -1, d) for m in (a.q_proj, a.k_proj, a.v_proj))
        y = plan_attention(q, k, v, plan, n_rot=d, base=cfg.rope_parameters["rope_theta"],
                           **(attn_kw if li >= from_layer else {}))
        x = x + lin(y.reshape(B, T, H * d), a.o_proj)
        hdn = rms(x, layer.post_attention_layernorm.weight, cfg.rms_norm_eps)
        m = layer.mlp
        x = x + lin(silu(lin(hdn, m.gate_proj)) * lin(hdn, m.up_proj), m.down_proj)
    return lin(rms(x, model.model.norm.weight, cfg.rms_norm_eps), model.lm_head)


def ref_hf_neox_logits(model, idx: torch.Tensor, plan: Plan) -> torch.Tensor:
    """transformers GPTNeoXForCausalLM (partial rotary, parallel residual or not) written out."""
    cfg = model.config
    B, T = idx.shape
    H = cfg.num_attention_heads
    d = cfg.hidden_size // H
    n_rot = int(d * cfg.rope_parameters.get("partial_rotary_factor", 1.0))
    x = model.gpt_neox.embed_in.weight.double()[idx]
    for layer in model.gpt_neox.layers:
        a = layer.attention
        qkv = lin(layer_norm(x, layer.input_layernorm), a.query_key_value).view(B, T, H, 3 * d)
        q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
        y = plan_attention(q, k, v, plan, n_rot=n_rot, base=cfg.rope_parameters["rope_theta"])
        attn_out = lin(y.reshape(B, T, H * d), a.dense)
        mlp = lambda t, layer=layer: lin(gelu(lin(t, layer.mlp.dense_h_to_4h)), layer.mlp.dense_4h_to_h)
        if cfg.use_parallel_residual:
            x = x + attn_out + mlp(layer_norm(x, layer.post_attention_layernorm))
        else:
            x = x + attn_out
            x = x + mlp(layer_norm(x, layer.post_attention_layernorm))
    return lin(layer_norm(x, model.gpt_neox.final_layer_norm), model.get_output_embeddings())


# ---------------------------------------------------------------------------- any HF model, attention by plan
REF_IMPL = "sinklab_plan_reference"
_REF: dict = {}


def _plan_reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    layer_rope, plan = _REF["layer_rope"], _REF["plan"]
    rope = layer_rope[module.layer_idx]
    q, k, v = (t.transpose(1, 2).double() for t in (query, key, value))          # (B, T, heads, d)
    n_rot, base = (0, 0.0) if rope is None else rope[:2]
    if rope is not None and rope[2] == "interleaved":    # pairs (2i, 2i+1) -> (i, i + n/2): q.k is unchanged
        perm = torch.cat([torch.arange(0, n_rot, 2), torch.arange(1, n_rot, 2), torch.arange(n_rot, q.shape[-1])])
        q, k = q[..., perm], k[..., perm]
    s_aux = kwargs.get("s_aux")
    y = plan_attention(q, k, v, plan, n_rot=n_rot, base=base, scale=scaling, window=kwargs.get("sliding_window"),
                       sink_logits=None if s_aux is None else s_aux.detach().double())
    return y.to(query.dtype), None


@torch.no_grad()
def ref_hf_plan_logits(model, idx: torch.Tensor, plan: Plan, layer_rope: list, learned: bool = False) -> torch.Tensor:
    """A Hugging Face model that dispatches through transformers' AttentionInterface, its own modules for
    everything but attention (embeddings, norms, projections, q/k norms, MLPs), attention by ``plan`` in the loop
    above. ``layer_rope[i]``: (n_rot, base, layout) of layer i from its config, or None (NoPE). With RoPE the
    model gets position 0 for every token, so q and k arrive un-rotated and the loop rotates them at the plan's
    positions; with ``learned`` absolute positions the model gets the original positions and the plan only picks
    the keys. The layer's own ``sliding_window`` applies to the plan's distances; gpt-oss's ``s_aux`` sink logits
    join the softmax."""
    from transformers import AttentionInterface

    AttentionInterface.register(REF_IMPL, _plan_reference_attention)
    prev = model.config._attn_implementation
    _REF.update(layer_rope=layer_rope, plan=plan)
    model.config._attn_implementation = REF_IMPL
    try:
        B, T = idx.shape
        pos = torch.arange(T).expand(B, T) if learned else torch.zeros(B, T, dtype=torch.long)
        return model(input_ids=idx, position_ids=pos, use_cache=False).logits.double()
    finally:
        model.config._attn_implementation = prev
