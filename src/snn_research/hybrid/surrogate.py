"""Surrogate derivatives of the Heaviside step.

A spike is ``H(z)`` with ``z = u / threshold - 1`` (the membrane measured in
units of the threshold, so one sharpness suits every channel whatever its
threshold). The forward pass is always the exact step; the backward pass uses
the derivative of a smooth stand-in whose steepness is ``sharpness``. Each
derivative integrates to 1 over the real line, like the delta it replaces.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch

SurrogateName = Literal["atan", "sigmoid", "triangle"]


def atan_derivative(z: torch.Tensor, sharpness: float) -> torch.Tensor:
    # d/dz [arctan(pi * a * z / 2) / pi]
    half_pi_a = math.pi * sharpness / 2.0
    return (sharpness / 2.0) / (1.0 + (half_pi_a * z) ** 2)


def sigmoid_derivative(z: torch.Tensor, sharpness: float) -> torch.Tensor:
    sig = torch.sigmoid(sharpness * z)
    return sharpness * sig * (1.0 - sig)


def triangle_derivative(z: torch.Tensor, sharpness: float) -> torch.Tensor:
    # A triangle of half-width 1/sharpness and height sharpness.
    return sharpness * torch.clamp(1.0 - sharpness * z.abs(), min=0.0)


SURROGATES: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "atan": atan_derivative,
    "sigmoid": sigmoid_derivative,
    "triangle": triangle_derivative,
}


def surrogate_derivative(name: str) -> Callable[[torch.Tensor, float], torch.Tensor]:
    try:
        return SURROGATES[name]
    except KeyError:
        raise ValueError(
            f"unknown surrogate {name!r}; choose one of {sorted(SURROGATES)}"
        ) from None
