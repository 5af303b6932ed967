"""transformers `generate` on the same checkpoint and GPU: the peer `moeray bench generate` compares
against (greedy, EOS ignored, the same prompt length and number of new tokens)."""

from __future__ import annotations

import time

import numpy as np


def time_hf_generate(directory: str, batch: int, prompt_tokens: int, new_tokens: int, device: str, seed: int = 0) -> dict:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16 if device == "cuda"
                                                              else torch.float32).to(device).eval()
    vocab = model.config.vocab_size
    rng = np.random.default_rng(seed)
    ids = torch.tensor(rng.integers(3, vocab, (batch, prompt_tokens)), device=device)
    mask = torch.ones_like(ids)
    kwargs = dict(attention_mask=mask, do_sample=False, pad_token_id=0, eos_token_id=None)
    try:
        with torch.no_grad():
            model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kwargs)  # warm-up
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
            if device == "cuda":
                torch.cuda.synchronize()
            prefill_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, **kwargs)
            if device == "cuda":
                torch.cuda.synchronize()
            total_s = time.perf_counter() - t0
    except torch.OutOfMemoryError as exc:
        return {"batch": batch, "error": f"out of memory: {str(exc)[:120]}"}
    finally:
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    step_s = (total_s - prefill_s) / new_tokens
    return {"batch": batch, "prefill_s": prefill_s, "decode_step_ms": 1e3 * step_s,
            "decode_tokens_per_s": batch / step_s}
