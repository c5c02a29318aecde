"""A teacher or hybrid folder as a model of lm-evaluation-harness (``lm-eval``), for the field's benchmarks.

``FolderLM`` answers the harness's three request types with the project's own loading and scoring:

- ``loglikelihood(context, continuation)``: the continuation's summed log-probability after the context, and
  whether greedy decoding would have produced it. The whole text is encoded once (a space that ends the
  context moves to the continuation first, as the harness's Hugging Face model does) and fed as it is; the
  continuation's tokens are those that start at or after the context's end. So the model never sees a
  split the tokenizer would not make; a token that straddles the boundary counts with the context. The
  tokenizer's BOS goes in front (unless the text starts with it), as every block of the project's splits
  starts with it. A sequence longer than ``max_length`` keeps its last tokens.
- ``loglikelihood_rolling(text)``: the text's summed log-probability in windows of ``max_length`` tokens, each
  token predicted once, the first window after BOS, every later one with as much preceding text as fits
  (the harness's documented windowing). Text that fits in one window is scored exactly as the project's
  scorer (``evaluation/quality.py``) scores one block of the splits: tested equal.
- ``generate_until(context, {until, max_gen_toks, ...})``: greedy decoding with the project's cached loop
  (``generate.generate_ids``), cut at the first stop string.

The harness itself is an optional extra (``pip install -e ".[harness]"``): this module imports it only in
``register`` and ``evaluate_tasks``, so the project needs it only to run benchmarks. ``snn-research lm-eval
FOLDER --tasks ...`` runs tasks on a folder; ``--include-path`` adds a folder of task YAMLs (local data). The
``lm_eval`` command line does not import this module: from Python, ``register()`` makes the model known to
the harness as ``snn-hybrid``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

MODEL_NAME = "snn-hybrid"


def encode_pair(tokenizer, prefix: list[int], context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(prefix + the context's tokens, the continuation's tokens) of the whole text encoded once: the
    continuation's tokens are those starting at or after the context's end (after a space that ends the
    context has moved to the continuation); an empty continuation gives no token."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    encoding = tokenizer(context + continuation, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoding["input_ids"]), encoding["offset_mapping"]
    split = next((i for i, (start, _) in enumerate(offsets) if start >= len(context)), len(ids))
    if ids and prefix and ids[0] == prefix[0]:
        prefix = []  # the text starts with the BOS already
    return prefix + ids[:split], ids[split:]


class FolderLM:
    """The three request types of the harness on a model folder; ``requests`` are objects with ``.args``."""

    def __init__(self, path: str | Path, max_length: int | None = None, max_gen_toks: int = 256) -> None:
        from snn_research.generate import load_model_folder

        super().__init__()
        self.model, self.tokenizer, self.kind = load_model_folder(path)
        self.model.eval()
        configured = getattr(self.model.config, "max_position_embeddings", None) or 2049
        self.max_length = int(max_length or min(configured, 2049) - 1)  # + 1 fed token whose logits go unused
        if self.max_length < 2:
            raise ValueError(f"--max-length must be >= 2 (got {self.max_length})")
        self.max_gen_toks = int(max_gen_toks)
        if self.tokenizer.bos_token_id is None:
            raise ValueError(f"{path}: the tokenizer has no BOS token to start a sequence with")
        self.prefix = [self.tokenizer.bos_token_id]

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @torch.no_grad()
    def _log_probs(self, ids: list[int], scored: int) -> torch.Tensor:
        """(scored, V) log-probabilities of the last ``scored`` tokens of ``ids``, each from the tokens before
        it, in float32. The whole sequence is fed and the last position's logits dropped, as the project's
        scorer feeds a block: a spiking site rounds to levels, so even the float noise of another sequence
        length could move a token. Only the scored positions get a softmax (Gemma's vocabulary is 262k)."""
        logits = self.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, :-1]
        return logits[-scored:].float().log_softmax(-1)

    def _score(self, ids: list[int], scored: int) -> tuple[float, bool]:
        """Summed log-probability of the last ``scored`` tokens of ``ids``, and whether each is the argmax."""
        if scored == 0:
            return 0.0, True
        log_probs = self._log_probs(ids, scored)
        targets = torch.tensor(ids[-scored:])
        total = float(log_probs.gather(-1, targets[:, None]).sum())
        return total, bool((log_probs.argmax(-1) == targets).all())

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        return encode_pair(self.tokenizer, self.prefix, context, continuation)

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        results = []
        for request in requests:
            context_ids, continuation_ids = self.encode_pair(request.args[0], request.args[1])
            ids = (context_ids + continuation_ids)[-(self.max_length + 1):]
            # a continuation longer than the window keeps its last tokens
            results.append(self._score(ids, min(len(continuation_ids), len(ids) - 1)))
        return results

    def rolling_windows(self, tokens: list[int]) -> list[tuple[list[int], int]]:
        """(window ids, scored tokens at its end) covering ``tokens`` once each: the first window after the
        prefix, each later one ending at its last scored token with up to ``max_length`` tokens of input."""
        first = tokens[: self.max_length]
        windows, done = [(self.prefix + first, len(first))], len(first)
        while done < len(tokens):
            scored = min(self.max_length, len(tokens) - done)
            end = done + scored
            windows.append((tokens[max(0, end - self.max_length - 1): end], scored))
            done = end
        return windows

    def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
        results = []
        for request in requests:
            tokens = self._encode(request.args[0])
            results.append(sum(self._score(ids, scored)[0] for ids, scored in self.rolling_windows(tokens)))
        return results

    def generate_until(self, requests: list[Any]) -> list[str]:
        from snn_research.generate import GenerationOptions, _eos_ids, generate_ids

        outputs = []
        for request in requests:
            context, kwargs = request.args[0], dict(request.args[1] or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            if kwargs.get("do_sample"):
                raise ValueError(f"{MODEL_NAME} decodes greedily; the task asks for sampling ({kwargs})")
            if max_new >= self.max_length:
                raise ValueError(f"max_gen_toks {max_new} leaves no room for a prompt in max_length {self.max_length}")
            prompt = (self.prefix + self._encode(context))[-(self.max_length - max_new):]
            generated, _, _ = generate_ids(self.model, prompt, GenerationOptions(max_new_tokens=max_new),
                                           _eos_ids(self.model, self.tokenizer))
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            cuts = [text.index(stop) for stop in until if stop and stop in text]
            outputs.append(text[: min(cuts)] if cuts else text)
        return outputs


def register() -> type:
    """The harness's model class for folders, registered as ``snn-hybrid`` (model_args ``path=FOLDER``) for
    ``lm_eval.simple_evaluate`` in this process; ImportError names the extra to install."""
    try:
        from lm_eval.api.model import LM
        from lm_eval.api.registry import MODEL_REGISTRY, register_model
    except ImportError:
        raise ImportError("lm-evaluation-harness is not installed: pip install -e \".[harness]\"") from None

    if MODEL_NAME in MODEL_REGISTRY:
        return MODEL_REGISTRY[MODEL_NAME]

    class HarnessFolderLM(FolderLM, LM):
        """A teacher or hybrid folder; model_args: path (required), max_length, max_gen_toks."""

        @classmethod
        def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
            from lm_eval.utils import simple_parse_args_string

            args = simple_parse_args_string(arg_string)
            if "path" not in args:
                raise ValueError(f"{MODEL_NAME}: model_args needs path=<model folder> (got {arg_string!r})")
            return cls(**args)

    return register_model(MODEL_NAME)(HarnessFolderLM)


def evaluate_tasks(path: str | Path, tasks: list[str], include_path: Path | None = None, limit: int | None = None,
                   max_length: int | None = None, num_fewshot: int | None = None) -> dict[str, Any]:
    """Run the harness's ``tasks`` on the folder; returns the harness's results dict."""
    model_class = register()
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}: not in the harness's tasks"
                         + (f" nor in {include_path}" if include_path else " (give --include-path for local ones)"))
    model = model_class(path, max_length=max_length)
    results = lm_eval.simple_evaluate(model=model, tasks=tasks, task_manager=manager, limit=limit,
                                      num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=0)
    return {"model": str(path), "kind": model.kind, "results": results["results"],
            "versions": {str(k): v for k, v in results.get("versions", {}).items()}}
