"""Generation speed: ``snn-research generate``'s cached decoding loop, hybrid against teacher.

Gemma 3 270M, greedy, a 24-token prompt of random ids, ``NEW_TOKENS`` generated tokens (no stop at the
end-of-sequence token), every candidate timed round-robin, best of 3:
- ``generate``: ``generate.generate_ids``, which also meters every token's energy (forward hooks on the
  analog linears and norms, a ``SpikeRecorder`` over the spiking sites);
- ``bare``: the same cached loop, one forward pass over one new position per token, with nothing attached:
  what decoding itself costs.
The hybrid is the integer one of ``benchmarks.integer_model`` (weighted code, T = 5, 8-bit weights on the
int8 kernel through ``set_integer_path``, as ``generate`` runs it). Both loops decode the same tokens (checked).

Target (issue 25): the hybrid's generate-to-teacher ratio within 5 % of its bare decoding ratio, i.e. the
metering costs the hybrid no more than it costs the teacher, plus 5 %. INFO rows: the bare ratio, and what
the metering costs each model. At one new position per pass the LM head (262 k x 640) is the largest single
matrix product of a Gemma 3 270M step, which both models share.
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import Row, interleaved, row

NEW_TOKENS = 24
PROMPT_TOKENS = 24
TARGET = ">= 0.95"


class Decode:
    """One greedy decoding run to time; keeps its tokens so the two loops can be compared."""

    def __init__(self, model, prompt: list[int], metered: bool, new_tokens: int = NEW_TOKENS) -> None:
        self.model, self.prompt, self.metered, self.new_tokens, self.tokens = model, prompt, metered, new_tokens, None

    def __call__(self) -> None:
        from snn_research.generate import GenerationOptions, generate_ids

        if self.metered:
            options = GenerationOptions(max_new_tokens=self.new_tokens, stop_at_eos=False)
            self.tokens, _, _ = generate_ids(self.model, self.prompt, options)
            return
        self.tokens = bare_decode(self.model, self.prompt, self.new_tokens)


@torch.no_grad()
def bare_decode(model, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy cached decoding with nothing attached: the prompt but its last token fills the cache, then one
    pass per token over one new position (the loop ``generate_ids`` runs, without its meter)."""
    import inspect

    from transformers import DynamicCache

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = {name: DynamicCache(config=model.config)}
    model(input_ids=torch.tensor([prompt[:-1]]), use_cache=True, logits_to_keep=1, **cache)
    sequence, tokens = list(prompt), []
    for _ in range(new_tokens):
        logits = model(input_ids=torch.tensor([[sequence[-1]]]), use_cache=True, **cache).logits
        tokens.append(int(logits[0, -1].argmax()))
        sequence.append(tokens[-1])
    return tokens


def run(repeats: int = 3) -> list[Row]:
    from benchmarks.common import load_gemma_teacher
    from benchmarks.integer_model import integer_hybrid
    from snn_research.models.hybrid_transformer import set_integer_path

    teacher, source = load_gemma_teacher()
    hybrid = integer_hybrid(teacher)
    if set_integer_path(hybrid, True) != len(teacher.model.layers):
        raise RuntimeError("not every FFN took the integer path")
    prompt = torch.randint(0, teacher.config.vocab_size, (PROMPT_TOKENS,),
                           generator=torch.Generator().manual_seed(7)).tolist()
    runs = {f"{model_name}_{loop}": Decode(model, prompt, metered=loop == "generate")
            for model_name, model in (("teacher", teacher), ("hybrid", hybrid))
            for loop in ("generate", "bare")}
    times = interleaved(runs, repeats)
    for model_name in ("teacher", "hybrid"):
        if runs[f"{model_name}_generate"].tokens != runs[f"{model_name}_bare"].tokens:
            raise RuntimeError(f"{model_name}: the metered and the bare loop decoded different tokens")
    rate = {name: NEW_TOKENS / seconds for name, seconds in times.items()}
    generate_ratio = rate["hybrid_generate"] / rate["teacher_generate"]
    bare_ratio = rate["hybrid_bare"] / rate["teacher_bare"]
    shape = (f"{PROMPT_TOKENS}-token prompt, {NEW_TOKENS} new tokens, greedy, {torch.get_num_threads()} threads, "
             f"integer hybrid T=5; teacher from {source}")
    return [
        row("generation", "hybrid / teacher tokens/s (generate) over the same ratio of bare decoding", TARGET,
            generate_ratio / bare_ratio, f"bare decoding ratio {bare_ratio:.3f}",
            f"generate: hybrid {rate['hybrid_generate']:.1f}, teacher {rate['teacher_generate']:.1f} tok/s "
            f"(ratio {generate_ratio:.3f}); {shape}"),
        row("generation", "hybrid / teacher tokens/s (bare cached decoding)", "", bare_ratio,
            f"teacher {rate['teacher_bare']:.1f} tok/s", f"hybrid {rate['hybrid_bare']:.1f} tok/s"),
        row("generation", "hybrid generate / bare decoding tokens/s (cost of the energy meter)", "",
            rate["hybrid_generate"] / rate["hybrid_bare"], f"hybrid bare {rate['hybrid_bare']:.1f} tok/s",
            f"teacher: generate / bare {rate['teacher_generate'] / rate['teacher_bare']:.3f}"),
    ]


if __name__ == "__main__":
    from benchmarks.common import print_rows

    started = time.perf_counter()
    print_rows(run())
    print(f"{time.perf_counter() - started:.0f} s")
