"""Peak memory per GPU of a run, from the model's config alone (built on the meta device; no weights read).

`memory_estimate(cfg, config, n_processes)` -> MemoryEstimate: the components one process holds
(weights, optimizer state, activations, logits and their gradients, KV cache, accounting copies)
and, per phase of engine.train_step (stats pass, updates, generation, accounting), what is alive
together; peak = what stays resident + the largest phase. Figures on one process, on n_processes
data parallel, and on n_processes sharded (FSDP / ZeRO-3, for comparison). `render_memory` gives
the plain lines `entclip train --dry-run` prints. The counts follow the engine's own choices and
were measured against it (tests/test_plan.py); the comments in _plan say where each comes from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from entclip.contracts.errors import BAD_CONFIG, EntclipError, first_line
from entclip.training.plan import resolve_precision

GIB = 2 ** 30
PRECISIONS = {"fp32": (4, 4), "bf16-mixed": (4, 2), "bf16": (2, 2)}  # -> bytes per weight, per activation


@dataclass
class MemoryEstimate:
    """Peak GiB per GPU. rows: what the run on one process holds (GiB each; a phase holds some of them at
    once, see _Plan); sharded_rows: the same on n_processes, each with its share of the batch and weights,
    gradients and optimizer state sharded (FSDP / ZeRO-3). total = resident rows + the largest phase."""

    params: int
    rows: list[tuple[str, float]]
    total_gib: float
    sharded_total_gib: float
    notes: list[str] = field(default_factory=list)
    n_processes: int = 1
    precision: str = "fp32"
    sharded_rows: list[tuple[str, float]] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)          # GiB of each phase, 1 process
    sharded_phases: dict[str, float] = field(default_factory=dict)  # ... on n_processes
    dp_rows: list[tuple[str, float]] = field(default_factory=list)  # n_processes, data parallel (unsharded)
    dp_total_gib: float = 0.0


@dataclass(frozen=True)
class _Shape:
    params: int     # all parameters, shared (tied) ones once
    linear: int     # parameters of nn.Linear modules (what autocast casts; a tied lm_head counts)
    layer: int      # parameters of one decoder layer
    h: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int
    vocab: int
    tied: bool      # lm_head shares the embedding's weight
    adapter: int = 0  # LoRA (lora_r > 0): adapter parameters, r x (in + out) per targeted nn.Linear


def _shape(cfg, config) -> _Shape:
    """Sizes from the config; parameter counts from the model built on the meta device (no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    except ValueError as exc:
        raise EntclipError(f"model {cfg.model!r} is not a causal language model transformers can build "
                           f"({first_line(exc)})", BAD_CONFIG) from None
    blocks = max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=len, default=None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    return _Shape(
        params=sum(p.numel() for p in model.parameters()),
        linear=sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)
                   for p in m.parameters(recurse=False)),
        layer=sum(p.numel() for p in blocks[0].parameters()) if blocks else 0,
        h=text.hidden_size, layers=text.num_hidden_layers, heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        inter=getattr(text, "intermediate_size", None) or 4 * text.hidden_size, vocab=text.vocab_size,
        tied=bool(getattr(text, "tie_word_embeddings", False)), adapter=lora_params(cfg, model))


def lora_params(cfg, model) -> int:
    """Parameters peft's LoRA adds to `model` (meta or real): lora_A (r, in) and lora_B (out, r) per targeted
    nn.Linear. all-linear is peft's: every nn.Linear but the output head; names match a module's full name
    or its last components, as peft's target_modules do."""
    import torch

    from entclip.data.models import lora_targets

    if cfg.lora_r == 0:
        return 0
    targets, head = lora_targets(cfg), model.get_output_embeddings()
    hit = ((lambda name, mod: mod is not head) if targets == "all-linear" else
           (lambda name, mod: any(name == t or name.endswith("." + t) for t in targets)))
    return sum(cfg.lora_r * (mod.in_features + mod.out_features) for name, mod in model.named_modules()
               if isinstance(mod, torch.nn.Linear) and hit(name, mod))


def _chunk_bytes(rows: int, vocab: int, device: str) -> int:
    """theory's work buffers for `rows` positions: two (chunk, V) float32 buffers, chunk = the device's
    budget (theory.default_chunk_rows) or all the rows, whichever is fewer."""
    from entclip.core.theory import default_chunk_rows

    return 2 * 4 * vocab * min(rows, default_chunk_rows(vocab, device))


@dataclass
class _Plan:
    """Components (key -> (label, bytes per GPU)), those resident all step, and each phase's moments:
    what is alive together, {key: count}. A phase's bytes are its largest moment's."""

    parts: dict[str, tuple[str, float]]
    resident: list[str]
    moments: dict[str, dict[str, dict[str, int]]]
    shapes: str

    def size(self, moment: dict[str, int]) -> float:
        return sum(self.parts[key][1] * count for key, count in moment.items())

    def phases(self) -> dict[str, tuple[float, str]]:
        """phase -> (bytes, the name of its largest moment)."""
        out = {}
        for phase, moments in self.moments.items():
            name = max(moments, key=lambda m: self.size(moments[m]))
            out[phase] = (self.size(moments[name]), name)
        return out

    def peak(self) -> float:
        return sum(self.parts[k][1] for k in self.resident) + max(b for b, _ in self.phases().values())


def _plan(cfg, m: _Shape, precision: str, n: int, shard: bool = True) -> _Plan:
    """What one process holds in each phase of engine.train_step on n processes: the stats pass
    (passes.statistics), the updates, generation (the rollout) and the accounting's end-of-step pass
    (entropy_after, StepAccount.finish). Labels do not depend on n (the table sets columns side by side)."""
    from entclip.training.accounting import ACCOUNT_LOGITS_MAX

    wb, e = PRECISIONS[precision]
    h, L, V, T = m.h, m.layers, m.vocab, cfg.max_new_tokens
    S = cfg.max_prompt_tokens + T  # tokens per sequence
    ns = n if shard else 1  # weights, gradients and optimizer state are split n ways only when sharded
    B = cfg.batch_size // n  # this process's rollout rows
    mini = B // cfg.minibatches
    b = max(min(cfg.micro_batch_size or mini, mini), 1)
    per_update = -(-mini // b)  # micro-batches per optimizer update
    k = cfg.minibatches * per_update  # micro-batches of the stats pass (the first epoch's minibatches)
    gen_b = max(min(cfg.generation_batch_size or B, B), 1)
    device = "cpu" if cfg.device == "cpu" else "cuda"
    mixed, ckpt, account = precision == "bf16-mixed", cfg.gradient_checkpointing, cfg.entropy_accounting

    # Activations kept for backward, bytes per token per decoder layer of a Llama/Qwen2 block (RMSNorm,
    # sdpa attention, SwiGLU MLP), counted with saved-tensor hooks on CPU and matched exactly:
    #   fp32 / bf16: 8h + e(6h + 2w + 4i): each RMSNorm keeps its input in fp32 (4h), its normalized
    #     input and its output (2eh); attention keeps q, k, v and its output (e(2h + 2w)); the MLP keeps
    #     gate, SiLU, up and their product (4ei).
    #   bf16-mixed: 30h + 4w + 8i: the residual stream is fp32, norms keep input and normalized input
    #     (16h), each projection its own bf16 cast of its input (q, k, v, gate, up: 10h), attention
    #     4h + 4w, the MLP 8i.
    # w = heads * head_dim: with a padding mask (left-padded rollouts) sdpa gets K/V repeated to all heads.
    # Cf. Korthikanti et al. 2022, 34sbh per layer for a GPT block (4h MLP, bf16); the wider SwiGLU MLP,
    # fp32 norms and the fp32 residual stream of autocast make it about 2x that here.
    # Gradient checkpointing keeps each layer's input (the residual stream), L*h*resid, and rebuilds one
    # layer at a time in the backward pass, once the logits' gradients are gone.
    w = m.heads * m.head_dim
    if mixed:
        per_layer, final_norm, resid = 30 * h + 4 * w + 8 * m.inter, 8 * h, 4
    else:
        per_layer, final_norm, resid = 8 * h + e * (6 * h + 2 * w + 4 * m.inter), 4 * h + 2 * e * h, e
    activations = b * S * ((L * h * resid if ckpt else L * per_layer) + final_norm)
    # bf16-mixed: autocast casts each matmul weight once per forward (its cache lives until the engine's
    # autocast context around that forward closes), and a graph keeps the casts its backward needs: all,
    # or under checkpointing only the lm_head's (a rebuilt layer casts its weights again).
    casts_all = 2 * m.linear / ns if mixed else 0
    casts_kept = (2 * V * h / ns if ckpt else casts_all) if mixed else 0

    # Logits: the (b, T+1, V) forward output in the compute dtype (bf16 under bf16-mixed: the engine's own
    # autocast leaves them so); completion_logits' [:, :-1] is a view of it. token_logp and token_entropy
    # (chunked autograd functions) keep only the logits and a value per row; their backward writes a
    # (b, T, V) gradient in the logits' dtype, recomputing softmax in two float32 (chunk, V) buffers, and
    # the slice's backward then allocates the (b, T+1, V) gradient while that one is alive. With the entropy
    # bonus (the only case where the update differentiates token_entropy; steer uses H detached) both
    # functions' (b, T, V) gradients are alive at once, and summed in place. So an update's backward holds
    #   Lf + G + max(Lf, chunk + G [bonus]),   Lf = b(T+1)Ve, G = bTVe,
    # on top of activations, kept casts and parameter gradients; the accounting's grad H, G + max(chunk, Lf).
    # Every phase below was measured with profiler memory events over Trainer.step on CPU (Qwen2 from a
    # config, tests/test_plan.py): within 0.5% where the logits dominate, for fp32, bf16 and bf16-mixed, with
    # and without the bonus, accounting, checkpointing, 1 to 8 micro-batches; within ~3% where weights do (a
    # layer's own backward temporaries are not counted). On CPU a frozen bf16 reference model's lm_head also
    # copies its weight per sequence in bmm (b V h bytes), not counted: CUDA's strided batched GEMM should
    # take the stride-0 batch as it is (not measured: no GPU here).
    Lf, G = b * (T + 1) * V * e, b * T * V * e
    chunk = _chunk_bytes(b * T, V, device)
    bonus = cfg.entropy_coef > 0 or cfg.entropy_target is not None
    ref_bytes = 4 if precision == "fp32" else 2  # engine: the reference model is bf16 unless fp32

    wname = "fp32" if wb == 4 else "bf16"
    # LoRA: only the adapters train, in fp32 (peft upcasts adapters on a bf16 base), so gradients, AdamW
    # moments and the accounting's copies are the adapters'; the frozen embedding gets no gradient, and the
    # KL reference is the base with the adapters disabled (no second model).
    lora = cfg.lora_r > 0
    tp, tb, tname = (m.adapter, 4, "adapters, fp32") if lora else (m.params, wb, wname)
    parts = {
        "weights": (f"weights ({wname})", m.params * wb / ns),
        "adapters": ("LoRA adapter weights (fp32)", m.adapter * 4 / ns if lora else 0),
        "adam": (f"AdamW moments (2 x {tname})", 2 * tp * tb / ns),  # torch AdamW: in the param dtype
        "ref": (f"reference model ({'fp32' if precision == 'fp32' else 'bf16'})",
                m.params * ref_bytes if cfg.kl_coef > 0 and not lora else 0),  # not prepared (sharded) by the engine
        # FSDP holds the root unit (embeddings, lm_head) and about two layers gathered at once
        "gathered": ("gathered parameters (root + 2 layers)",
                     (m.params - max(L - 2, 0) * m.layer) * e if shard and n > 1 else 0),
        # from an update's first backward to its zero_grad(set_to_none=True); in the stats pass with accounting
        "grads": (f"gradients ({tname})", tp * tb / ns),
        # torch AdamW's step: on CUDA (foreach) _foreach_sqrt of all second moments; on CPU per tensor,
        # sqrt and its quotient, of the largest tensor (the embedding)
        # engine: fused AdamW on CUDA (no parameter-sized temporaries); torch's foreach AdamW on CPU
        "adam_step": ("AdamW step temporaries", (2 * cfg.lora_r * max(m.inter, h) * 4 if lora else 2 * V * h * wb)
                      if device == "cpu" else 0),
        "act": (f"activations kept, one micro-batch ({'checkpointed' if ckpt else 'not checkpointed'})",
                activations),
        "rebuilt": ("one layer rebuilt in the backward (checkpointing)", b * S * per_layer if ckpt else 0),
        "layer_casts": ("bf16 weight casts of one layer (autocast)", 2 * m.layer / ns if mixed and ckpt else 0),
        # The backward's last step: the embedding's dense (V, h) gradient, and with tied weights the lm_head's
        # contribution (buffered since the lm_head's backward) and their sum (in place under bf16-mixed).
        "emb_grad": ("embedding gradient buffers (end of the backward)",
                     0 if lora else V * h * wb * ((2 if mixed else 3) if m.tied else 1)),
        "lm_grad": ("lm_head gradient, buffered until the embedding's (tied)", V * h * wb if m.tied and not lora else 0),
        "casts_kept": ("bf16 weight casts kept for backward (autocast)", casts_kept),
        "casts_all": ("bf16 weight casts during a forward (autocast cache)", casts_all),
        "logits": ("logits, one micro-batch", Lf),
        "dlogits": ("their gradients in the update (logp [+ entropy], slice)", G + max(Lf, chunk + G * bonus)),
        "dlogits_h": ("their gradients for grad H (accounting)", G + max(chunk, Lf) if account else 0),
        "chunk": ("token statistics' chunk buffers (float32)", chunk),
        "ref_logits": ("reference logits, one micro-batch",
                       b * (T + 1) * V * ref_bytes if cfg.kl_coef > 0 else 0),
        # keys and values per token, layer and KV head; under autocast (fp32 weights) keys leave RoPE in fp32
        # and values stay bf16 (measured): 6 bytes per pair. Decoding packs the query heads (transformers'
        # pack_gqa): no K/V repeated to all heads.
        "kv": ("KV cache, one generate call",
               gen_b * S * L * m.kv_heads * m.head_dim * {"fp32": 8, "bf16-mixed": 6, "bf16": 4}[precision]),
        "acct_params": (f"entropy accounting: parameter + gradient copies ({tname})",
                        2 * tp * tb / ns if account else 0),
    }
    keep_old = account and B * T * V <= ACCOUNT_LOGITS_MAX  # engine: old logits for pred_dz only when small
    size = min(cfg.micro_batch_size or cfg.minibatch_size, B)  # entropy_after's micro-batch
    parts["acct_old"] = ("entropy accounting: old logits of the batch", B * T * V * e if keep_old else 0)
    # entropy_after's logits: its micro-batches' (b, T+1, V) parts, kept and concatenated when the old
    # logits are; else a micro-batch's logits at a time (the previous one bound while the next is computed)
    parts["acct_new"] = ("entropy accounting: logits after the step",
                         (B if keep_old else size) * (T + 1) * V * e if account else 0)
    parts["acct_cat"] = ("entropy accounting: their concatenation", B * T * V * e if keep_old else 0)
    by_update = account and cfg.accounting_unit == "update"
    # Per update (accounting_unit=update): g_u, a third parameter-sized copy from the first record on, and
    # the logits (B, T, V) of the latest record (kept for pred_dz when the old ones are), alive between
    # the updates; the pass after each update (engine.entropy_grad) writes the next ones into a new buffer.
    parts["acct_gu"] = (f"entropy accounting: g_u copy, per update ({tname})", tp * tb / ns if by_update else 0)
    parts["acct_kept"] = ("entropy accounting: logits at the latest update", B * T * V * e if by_update and keep_old
                          else 0)
    acct = {"acct_params": 1, "acct_old": 1}
    if by_update and cfg.epochs * cfg.minibatches > 1:  # a later update runs with the earlier ones' copies
        acct.update({"acct_gu": 1, "acct_kept": 1})

    # The updates. Each forward starts while the previous micro-batch's logits are still bound (engine's
    # loop variable): two logits and a forward's autocast cache. The backward holds the logits' gradients
    # first, then (checkpointing) one rebuilt layer at a time, last the embedding's gradient buffers.
    # Parameter gradients are alive from an update's first backward, so earlier in its later micro-batches.
    bound = 1 + (cfg.epochs * k > 1)  # logits alive at the end of a forward
    early = int(per_update > 1)  # parameter gradients already there when the logits are
    update = {"backward": {"act": 1, "casts_kept": 1, "logits": 1, "dlogits": 1, "grads": early, **acct},
              "forward": {"act": 1, "casts_all": 1, "logits": bound, "grads": early, **acct},
              "embedding backward": {"logits": 1, "grads": 1, "emb_grad": 1, **acct},
              "optimizer step": {"logits": 1, "grads": 1, "adam_step": 1, **acct}}
    if ckpt:
        update["rebuild"] = {"act": 1, "logits": 1, "rebuilt": 1, "layer_casts": 1, "lm_grad": 1, "grads": 1,
                             **acct}

    # The stats pass (passes.statistics) keeps micro-batch 0's forward, graph included, for the first update;
    # later micro-batches run without grad, each starting while the previous one's logits (and reference
    # logits) are bound. With accounting each micro-batch is differentiated too (grad H); on 1 process
    # micro-batch 0's graph stays (retain_graph) while the next one's is built, on N it is not reused.
    ref = 1 if cfg.kl_coef > 0 else 0
    first = {"act": 1, "casts_kept": 1, "logits": 1}
    if not account:
        if k == 1:
            stats = {"statistics": {**first, "ref_logits": ref, "chunk": 1}}
        else:
            stats = {"next forward": {**first, "casts_all": 1, "logits": 2 + (k >= 3), "ref_logits": ref},
                     "statistics": {**first, "logits": 2, "ref_logits": ref, "chunk": 1},
                     "reference": {**first, "logits": 2, "ref_logits": 2 * ref}}
    else:
        after0 = {"grads": 1, "acct_old": 1}  # from micro-batch 0's backward on
        # the stats pass's end: gradients and their copy, then (after zero_grad) the parameters' copy
        snapshots = {**(first if n == 1 else {}), "acct_old": 1, "acct_params": 1}
        if k == 1:
            stats = {"forward": {"act": 1, "casts_all": 1, "logits": 1},
                     "grad H": {**first, "dlogits_h": 1},
                     "embedding backward": {"logits": 1, **after0, "emb_grad": 1},
                     "reference": {**first, **after0, "ref_logits": ref, "chunk": 1},
                     "snapshots": snapshots}
        else:
            kept = first if n == 1 else {}
            previous = k >= 3 or n > 1  # at micro-batch 1 on 1 process the previous logits are the kept ones
            stats = {"next forward": {**kept, **after0, "act": 1 + (n == 1), "casts_all": 1, "ref_logits": ref,
                                      "logits": (n == 1) + 1 + previous},
                     "grad H": {**after0, "act": 1 + (n == 1), "casts_kept": 1 + (n == 1),
                                "logits": 1 + (n == 1), "dlogits_h": 1, "ref_logits": ref},
                     "embedding backward": {**kept, **after0, "logits": 1 + (n == 1), "emb_grad": 1,
                                            "ref_logits": ref},
                     "snapshots": snapshots}

    moments = {"stats pass": stats, "update": update,
               "generation": {"generate": {"casts_all": 1, "kv": 1}}}
    if by_update:
        # engine.entropy_grad after each update: a forward and grad-H backward per stats-pass micro-batch;
        # parameter gradients accumulate from the first backward on; then record copies g_u+1.
        base = {"acct_params": 1, "acct_old": 1, "acct_gu": int(cfg.epochs * cfg.minibatches > 1)}
        later = {"grads": int(k > 1), "acct_kept": int(k > 1)}
        moments["accounting"] = {
            "forward": {**base, **later, "act": 1, "casts_all": 1, "logits": 1 + (k > 1)},
            "statistics": {**base, **later, "act": 1, "casts_kept": 1, "logits": 1, "chunk": 1},
            "grad H": {**base, **later, "act": 1, "casts_kept": 1, "logits": 1, "dlogits_h": 1},
            "embedding backward": {**base, "acct_kept": 1, "grads": 1, "logits": 1, "emb_grad": 1},
            "record": {**base, "acct_kept": 1, "grads": 1, "logits": 1, "acct_gu": 1}}
        moments["update"] = {**moments["update"], **{f"accounting: {k_}": v for k_, v in
                                                     moments["accounting"].items()}}
    elif account:
        after = {"acct_params": 1, "acct_old": 1}
        moments["accounting"] = {
            "forward": {**after, "acct_new": 1 + (not keep_old and B > size), "casts_all": 1},
            "concatenation": {**after, "acct_new": 1, "acct_cat": 1},
            "statistics": {**after, "acct_new": 1, "chunk": 1}}
    shapes = (f"{B} rollout rows, micro-batch {b} x {S} tokens (logits {b} x {T + 1} x {V}), {k} micro-batches "
              f"in the stats pass, generate {gen_b}")
    return _Plan(parts, ["weights", "adapters", "adam", "ref", "gathered"], moments, shapes)


def memory_estimate(cfg, config, n_processes: int = 1) -> MemoryEstimate:
    """Peak per-GPU memory of a run of `cfg` on the model of `config`: on one process, and on n_processes
    each with its share of the batch and FSDP/ZeRO-3-sharded weights, gradients and optimizer state.

    Peak = resident (weights, AdamW moments, reference model, gathered FSDP units) + the largest phase of a
    step: the stats pass (micro-batch 0's graph kept while later micro-batches run), an update micro-batch
    (activations, logits and their gradients, parameter gradients), generation (KV cache) or the
    accounting's end-of-step pass; a phase is its largest moment (what is alive together). Left out:
    generate's prefill transients, a layer's own forward/backward temporaries, the CUDA context and
    communication buffers, the caching allocator's fragmentation.
    """
    precision = resolve_precision(cfg)
    m = _shape(cfg, config)
    one, many = _plan(cfg, m, precision, 1), _plan(cfg, m, precision, n_processes)
    dp = _plan(cfg, m, precision, n_processes, shard=False)
    notes = []
    for plan, where in [(one, "1 process")] + ([(dp, f"{n_processes} processes")] if n_processes > 1 else []):
        phases = plan.phases()
        largest = max(phases, key=lambda p: phases[p][0])
        moment = plan.moments[largest][phases[largest][1]]
        held = " + ".join((f"{c} x " if c > 1 else "") + plan.parts[key][0]
                          for key, c in moment.items() if c and plan.parts[key][1])
        notes += [f"per GPU on {where}: {plan.shapes}",
                  f"peak = resident + the largest phase ({where}: " + ", ".join(
                      f"{p} {v / GIB:.1f}" for p, (v, _) in phases.items() if v) + f" GiB); "
                  f"{largest} ({phases[largest][1]}) = {held}"]
    if cfg.precision == "auto" and precision == "fp32":
        notes.append("precision auto is fp32 on this machine (no bf16 GPU); add --set precision=bf16-mixed "
                     "to estimate a GPU run")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit, S = getattr(text, "max_position_embeddings", None), cfg.max_prompt_tokens + cfg.max_new_tokens
    if limit and S > limit:
        notes.append(f"max_prompt_tokens + max_new_tokens = {S} exceeds the model's max_position_embeddings "
                     f"{limit}")
    if any(getattr(text, k, None) for k in ("num_experts", "num_local_experts", "n_routed_experts")):
        notes.append("mixture-of-experts model: the activation formula assumes a dense MLP; a rough figure")
    rows = lambda p: [(label, nbytes / GIB) for label, nbytes in p.parts.values() if nbytes]  # noqa: E731
    per_phase = lambda p: {name: v / GIB for name, (v, _) in p.phases().items()}  # noqa: E731
    if n_processes > 1:
        notes.append("data parallel is what entclip runs (every GPU holds the whole model); the sharded "
                     "column (FSDP / ZeRO-3) is for comparison: entclip does not support sharding yet")
    return MemoryEstimate(m.params, rows(one), one.peak() / GIB, many.peak() / GIB, notes, n_processes, precision,
                          rows(many), per_phase(one), per_phase(many), rows(dp), dp.peak() / GIB)


def render_memory(est: MemoryEstimate) -> list[str]:
    """Plain lines for the console: GiB per GPU on one process and, for several, on n_processes sharded."""
    n = est.n_processes
    columns = [dict(est.rows)] + ([dict(est.dp_rows), dict(est.sharded_rows)] if n > 1 else [])
    labels = list(dict.fromkeys([label for label, _ in est.rows + (est.dp_rows + est.sharded_rows if n > 1 else [])]))
    width = max(len(label) for label in labels + ["peak"]) + 2
    heads = ["1 GPU"] + ([f"{n} GPUs", f"{n} GPUs, if sharded"] if n > 1 else [])
    size = f"{est.params / 1e9:.2f} B" if est.params >= 1e9 else f"{est.params / 1e6:.1f} M"
    lines = [f"{size} parameters, {est.precision}",
             " " * (width + 2) + "".join(f"{h:>20}" for h in heads)]
    for label in labels:
        lines.append(f"  {label:<{width}}" + "".join(f"{c[label]:>20.1f}" if label in c else f"{'-':>20}"
                                                     for c in columns))
    totals = [est.total_gib] + ([est.dp_total_gib, est.sharded_total_gib] if n > 1 else [])
    lines.append(f"  {'peak':<{width}}" + "".join(f"{t:>20.1f}" for t in totals))
    return lines + [f"  note: {note}" for note in est.notes]
