"""Tiny random teachers of each supported MLP family, built from configs (no downloads)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, LlamaConfig

VOCAB = 96


def tiny_config(family: str, layers: int = 2):
    if family == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=layers, n_head=2, resid_pdrop=0.0,
                          embd_pdrop=0.0, attn_pdrop=0.0)
    if family == "llama":
        return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if family == "gemma3":
        return Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                                sliding_window=8, layer_types=["sliding_attention", "full_attention"][:layers] if layers <= 2
                                else None)
    raise ValueError(family)


def tiny_model(family: str, layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    config = tiny_config(family, layers)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # random init at std 0.02 makes near-constant activations; widen it so the FFNs matter
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.2)
    model.eval()
    return model


FAMILIES = ["gpt2", "llama", "gemma3"]


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def input_ids() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (2, 24), generator=generator)


def calibration_batches(count: int = 4, seed: int = 2):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, 24), generator=generator) for _ in range(count)]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh, empty working directory: stages read and write relative to it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def tiny() -> dict:
    """The smoke pipeline's params made tiny (8 plays, 32-token blocks, a few steps), tracking off."""
    from pipeline_support import tiny_params as build  # imported late: it imports the whole CLI

    return build()


@pytest.fixture(autouse=True)
def _mlflow_state_stays_with_its_test():
    """Stages run in-process, and MLflow's set_tracking_uri also writes MLFLOW_TRACKING_URI into the
    environment, which the project's tracker obeys: a test must not hand the next one its store, an active
    run or those variables."""
    import os
    import sys

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    before = {name: os.environ.get(name) for name in names}
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    if "mlflow" not in sys.modules:
        return
    import mlflow
    from mlflow.tracking import _model_registry, _tracking_service

    while mlflow.active_run() is not None:
        mlflow.end_run()
    _tracking_service.utils._tracking_uri = None
    _model_registry.utils._registry_uri = None
