"""Greedy decoding with a KV cache, collecting the hidden state LISA turns into each mask.

LISA regenerates the whole sequence at every step (no cache) and then reads, from the last step's final-layer
post-norm hidden states, the state *before* each ``[SEG]`` token - the state whose logits predicted ``[SEG]``.
With a cache that state is simply the last-position output of the step that emitted ``[SEG]``, so we keep those
and never re-run the prefix: O(T) LLM calls of one token instead of O(T) calls over the whole sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, LlamaForCausalLM


@dataclass
class GenerationOutput:
    """Per sequence of the batch.

    Attributes:
        tokens: generated ids, ``EOS`` included when it was produced.
        seg_states: ``n_seg x H`` final-layer hidden states that predicted each generated ``[SEG]``.
    """

    tokens: list[list[int]]
    seg_states: list[torch.Tensor]


@torch.inference_mode()
def greedy_generate(
    llm: LlamaForCausalLM,
    embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    max_new_tokens: int,
    eos_id: int,
    seg_id: int,
) -> GenerationOutput:
    """Greedy decoding of a left-padded batch.

    Args:
        embeds: ``B x T x H`` prompt embeddings (image features spliced in), left-padded.
        attention_mask: ``B x T`` (1 = real token).
        position_ids: ``B x T`` positions restarting at 0 after each row's padding.
        max_new_tokens: upper bound on generated tokens per row; rows stop at ``EOS``.
    """
    batch = embeds.shape[0]
    cache = DynamicCache()
    out = llm.model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                    cache=cache, use_cache=True)
    last = out.last_hidden_state[:, -1]  # B x H: predicts the next token
    tokens: list[list[int]] = [[] for _ in range(batch)]
    seg_rows: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    done = torch.zeros(batch, dtype=torch.bool, device=embeds.device)
    positions = position_ids[:, -1:]
    for _step in range(max_new_tokens):
        logits = llm.lm_head(last).float()
        next_ids = logits.argmax(-1)
        for b in (~done).nonzero()[:, 0].tolist():
            tok = int(next_ids[b])
            tokens[b].append(tok)
            if tok == seg_id:
                seg_rows[b].append(last[b])
        done |= next_ids == eos_id
        if bool(done.all()) or _step == max_new_tokens - 1:
            break
        # Finished rows keep feeding EOS; their outputs are ignored.
        next_ids = torch.where(done, torch.full_like(next_ids, eos_id), next_ids)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((batch, 1))], dim=1)
        positions = positions + 1
        out = llm.model(inputs_embeds=llm.model.embed_tokens(next_ids[:, None]), attention_mask=attention_mask,
                        position_ids=positions, cache=cache, use_cache=True)
        last = out.last_hidden_state[:, -1]
    hidden = embeds.shape[-1]
    seg_states = [torch.stack(r) if r else embeds.new_zeros((0, hidden)) for r in seg_rows]
    return GenerationOutput(tokens=tokens, seg_states=seg_states)
