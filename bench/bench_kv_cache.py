"""(a) KV-cached greedy generation vs LISA-style regeneration without a cache.

32 new tokens after a ~300-token prompt on a random mid-size Llama (hidden 512, 8 layers). LISA's ``evaluate``
re-runs the whole sequence at every step (``use_cache=False``); ours prefills once and then feeds one token.
Goal: >= 3x. Run: ``.venv/bin/python bench/bench_kv_cache.py``
"""

from __future__ import annotations

import torch
from common import timeit_pair
from transformers import LlamaConfig, LlamaForCausalLM

from model.generation import greedy_generate

PROMPT, NEW = 300, 32


@torch.inference_mode()
def no_cache(llm: LlamaForCausalLM, embeds: torch.Tensor) -> list[int]:
    """LISA's generation: every step runs the full sequence; the last position's logits pick the token."""
    tokens = []
    for _ in range(NEW):
        hidden = llm.model(inputs_embeds=embeds, use_cache=False).last_hidden_state
        tok = llm.lm_head(hidden[:, -1]).argmax(-1)
        tokens.append(int(tok))
        embeds = torch.cat([embeds, llm.model.embed_tokens(tok)[:, None]], dim=1)
    return tokens


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    cfg = LlamaConfig(vocab_size=32004, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                      num_attention_heads=8, max_position_embeddings=2048)
    llm = LlamaForCausalLM(cfg).eval()
    embeds = llm.model.embed_tokens(torch.randint(3, 32000, (1, PROMPT)))
    mask = torch.ones(1, PROMPT, dtype=torch.long)
    pos = torch.arange(PROMPT)[None]

    def cached():
        return greedy_generate(llm, embeds, mask, pos, NEW, eos_id=-1, seg_id=-1).tokens[0]

    same = cached() == no_cache(llm, embeds)
    t_cache, t_nocache, _, _ = timeit_pair(cached, lambda: no_cache(llm, embeds), repeats=5)
    print(f"KV cache: {t_cache * 1e3:.0f} ms, no cache (LISA): {t_nocache * 1e3:.0f} ms for {NEW} tokens after "
          f"{PROMPT}; identical tokens: {same}")
    print(f"speed-up (no cache / cache): {t_nocache / t_cache:.2f}x  (goal >= 3x)")


if __name__ == "__main__":
    main()
