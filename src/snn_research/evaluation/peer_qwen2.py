"""The peer series of the T sweep: SpikingJelly 2.0's Qwen2 ANN-to-SNN recipe on a Llama-family teacher.

SpikingJelly (``spikingjelly.activation_based.ann2snn.recipes.qwen2``) converts a Hugging Face Qwen2
causal LM after training: per-channel signed QCFS encoders (pairs of IF neurons, one per sign) at the
embeddings, at q/k/v after the rotary embedding, and at the MLP product that feeds ``down_proj``; the
scale of a channel is its calibration quantile of |activation| over ``calibration_levels``, and a value
is sent as round(x / scale) spikes, at most T per sign. The rest of the decoder (norms, attention, SiLU,
the gating multiply) runs as SpikingJelly's temporal operators, offline over all T steps. Its neurons keep
state between calls: ``PeerModel`` resets them before each one, as SpikingJelly's own evaluation does.

A Llama decoder is a Qwen2 decoder without the q/k/v biases, so ``as_qwen2`` rebuilds the teacher as a
Qwen2 model with those biases zero and checks that its logits match; the recipe then runs unmodified.
SpikingJelly is an optional dependency (``make peer`` installs it); it is imported only here.
"""

from __future__ import annotations

import torch
from torch import nn


def _import_recipe():
    try:
        from spikingjelly.activation_based import functional
        from spikingjelly.activation_based.ann2snn import ModuleConverter
        from spikingjelly.activation_based.ann2snn.recipes.qwen2 import (
            Qwen2SNNConfig,
            Qwen2SNNRecipe,
            calibrate_qwen2_snn,
        )
    except ImportError as error:
        raise ValueError(f"the peer needs SpikingJelly 2.0 ({error}); install it with `make peer`") from None
    return ModuleConverter, Qwen2SNNConfig, Qwen2SNNRecipe, calibrate_qwen2_snn, functional.reset_net


class PeerModel(nn.Module):
    """The converted model, its neurons reset before every call (as SpikingJelly's own evaluation does): its
    membranes keep state from one call to the next, so without the reset a batch's logits would depend on the
    batches before it."""

    def __init__(self, snn: nn.Module, reset_net) -> None:
        super().__init__()
        self.snn = snn
        self._reset_net = reset_net

    @property
    def layers(self):
        return self.snn.layers

    def set_collect_statistics(self, enabled: bool) -> None:
        self.snn.set_collect_statistics(enabled)

    def forward(self, input_ids: torch.Tensor, **kwargs):
        self._reset_net(self.snn)
        kwargs.pop("use_cache", None)
        return self.snn(input_ids=input_ids, **kwargs)


def as_qwen2(model: nn.Module, check_ids: torch.Tensor, atol: float = 1e-4) -> nn.Module:
    """The Llama-family ``model`` as an equal Qwen2ForCausalLM (zero q/k/v biases), in eval mode.

    Refuses (ValueError) a model Qwen2 cannot express, and a copy whose logits on ``check_ids`` differ
    from the source's by more than ``atol``.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = model.config
    if config.model_type != "llama":
        raise ValueError(f"the Qwen2 peer takes a Llama-family teacher (model_type 'llama'); got "
                         f"{config.model_type!r}")
    refusals = {
        "attention_bias": (getattr(config, "attention_bias", False), False),
        "mlp_bias": (getattr(config, "mlp_bias", False), False),
        "hidden_act": (config.hidden_act, "silu"),
        "head_dim": (getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
                     config.hidden_size // config.num_attention_heads),
        "rope_type": ((getattr(config, "rope_parameters", None) or {}).get("rope_type", "default"), "default"),
    }
    for field, (got, needed) in refusals.items():
        if got != needed:
            raise ValueError(f"the teacher's config.{field} is {got!r}; Qwen2 needs {needed!r}")
    qwen_config = Qwen2Config(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings, rope_parameters=config.rope_parameters,
        use_sliding_window=False, attention_dropout=0.0, bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id, pad_token_id=getattr(config, "pad_token_id", None))
    source = next(model.parameters())
    qwen = Qwen2ForCausalLM(qwen_config).to(device=source.device, dtype=source.dtype).eval()
    missing, unexpected = qwen.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) for name in missing):
        raise ValueError(f"the teacher's weights do not map onto Qwen2: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name, parameter in qwen.named_parameters():
            if name in missing:
                parameter.zero_()
        if qwen_config.tie_word_embeddings:
            qwen.tie_weights()
        gap = (qwen(input_ids=check_ids).logits - model(input_ids=check_ids, use_cache=False).logits).abs().max()
    if not float(gap) <= atol:
        raise ValueError(f"the Qwen2 copy of the teacher is not exact: logits differ by {float(gap):.3g} > {atol}")
    return qwen


def peer_levels(time_steps: int) -> int:
    """The recipe's calibration levels at T: T / 2 (its default pair is T = 32, 16 levels), at least 1."""
    return max(1, time_steps // 2)


def convert_peer(qwen: nn.Module, calib_ids: torch.Tensor, time_steps: int, levels: int, quantile: float,
                 batch_size: int) -> PeerModel:
    """Calibrate the recipe on ``calib_ids`` and convert ``qwen``; the recipe's own checks raise ValueError."""
    module_converter, config_class, recipe_class, calibrate, reset_net = _import_recipe()
    try:
        config = config_class(time_steps=time_steps, calibration_levels=levels, calibration_quantile=quantile)
    except (TypeError, ValueError) as error:
        raise ValueError(f"SpikingJelly refused the peer's settings T={time_steps}, levels={levels}, "
                         f"quantile={quantile}: {error}") from None
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids in calib_ids.split(batch_size)]
    calibration = calibrate(qwen, batches, config)
    return PeerModel(module_converter(recipe_class(calibration, config)).convert(qwen).eval(), reset_net)


@torch.no_grad()
def mlp_spikes_per_token(snn: PeerModel, input_ids: torch.Tensor, batch_size: int) -> list[float]:
    """Per layer, spikes (both signs, all T steps) the MLP encoder sends into ``down_proj``, per token."""
    encoders = [layer.encoders["mlp"] for layer in snn.layers]
    snn.set_collect_statistics(True)
    totals = [0.0] * len(encoders)
    tokens = 0
    for ids in input_ids.split(batch_size):
        snn(input_ids=ids)
        for index, encoder in enumerate(encoders):  # statistics describe the last call of each encoder
            totals[index] += encoder.positive_spike_count + encoder.negative_spike_count
        tokens += ids.numel()
    return [total / tokens for total in totals]
