"""Where a pixel's conditional cross-attention goes on two-object prompts: the share of each kind of token.

    OMP_NUM_THREADS=1 python experiments/attention_shares.py        # 30 tuning prompts, ~2 min on one CPU thread

Cross-Token NMS only rescales the concept columns, so their share bounds how much of the attention it steers.
"""

from collections import defaultdict

import torch
from diffusers import PixArtAlphaPipeline
from diffusers.models.attention_processor import AttnProcessor2_0
from jsonargparse import CLI

from dit_cache import EMBEDDED_GUIDANCE_SCALE, embedded_model_path
from dit_cache.toy import shapes
from dit_cache.concepts import concept_token_groups, cross_attention_probs
from dit_cache.toy.evaluation import prompt_set


class RecordConditionalAttention:
    """Stock cross-attention that also keeps, per call, the conditional half's mean probability per text token."""

    def __init__(self, records: list):
        self.records, self.stock = records, AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        probs, _ = cross_attention_probs(attn, hidden_states, encoder_hidden_states, attention_mask)
        self.records.append(probs[probs.shape[0] // 2:].mean(dim=(0, 1)))  # rows: [uncond, cond] x heads
        return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)


def main(model: str | None = None, count: int = 30, seed: int = 20_000, steps: int = 20,
         guidance_scale: float = EMBEDDED_GUIDANCE_SCALE):
    """Args:
        model: a PixArt pipeline folder or hub id (default: the embedded model).
        count: two-object prompts ("a red circle and a blue square"), each with its own seed.
    """
    pipe = PixArtAlphaPipeline.from_pretrained(model or embedded_model_path())
    pipe.set_progress_bar_config(disable=True)
    records = []
    for block in pipe.transformer.transformer_blocks:
        block.attn2.set_processor(RecordConditionalAttention(records))
    shares = defaultdict(list)
    for i, prompt in enumerate(prompt_set(2, count, seed)):
        records.clear()
        pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale, clean_caption=False,  # lowercase already
             generator=torch.Generator().manual_seed(seed + i))
        per_token = torch.stack(records).mean(dim=0)  # over blocks and steps
        tokens = pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer(prompt)["input_ids"])
        phrases = concept_token_groups(pipe.tokenizer, prompt, [f"{c} {s}" for c, s in shapes.parse_caption(prompt)])
        kinds = {"color words": [group[0] for group in phrases], "shape words": [group[-1] for group in phrases],
                 '"and"': [tokens.index("▁and")], '"</s>"': [tokens.index("</s>")],
                 'the two "a"': [t for t, token in enumerate(tokens) if token == "▁a"],
                 "padding": list(range(len(tokens), per_token.numel()))}
        for kind, columns in kinds.items():
            shares[kind].append(float(per_token[columns].sum()))
    print(f"{count} two-object prompts x seeds {seed}+, {steps} steps, cfg {guidance_scale}: share of the "
          "conditional cross-attention (mean over blocks, heads, image tokens and steps)")
    for kind, values in shares.items():
        print(f"  {kind}: {sum(values) / len(values):.1%}")


if __name__ == "__main__":
    CLI(main, as_positional=False)
